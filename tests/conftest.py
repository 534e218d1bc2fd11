"""Shared pytest fixtures. One clearly marked section per external dependency."""

# ---------------------------------------------------------------------------------------------
# MLServer: the KServe v2 reference server in its own venv (`make mlserver` -> .venv-mlserver).
# Used by tests marked `mlserver`. Missing venv: skip locally, FAIL when CI=true.
# ---------------------------------------------------------------------------------------------
import os
from pathlib import Path

import pytest

from services.inference.runtime.mlserver_launcher import DEFAULT_VENV, mlserver_executable


@pytest.fixture(scope="session")
def mlserver_venv() -> Path:
    """The MLServer side venv; start servers with MLServerProcess(repo, venv_dir=mlserver_venv)."""
    exe = mlserver_executable(DEFAULT_VENV)
    if exe is None:
        reason = f"MLServer side venv {DEFAULT_VENV} is missing: run `make mlserver`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: the KServe v2 reference tests must run)")
        pytest.skip(reason)
    return exe.parent.parent
# ------------------------------------- end of MLServer section --------------------------------

# ---------------------------------------------------------------------------------------------
# Model: a quick pretrained checkpoint and a Triton-layout repository with versions 1 and 2.
# Built once per session (about 30 s); tests that change a repository copy it first.
# ---------------------------------------------------------------------------------------------
import shutil  # noqa: E402

from tests.fixtures_model import build_quick_run, build_repo  # noqa: E402


@pytest.fixture(scope="session")
def quick_checkpoint(tmp_path_factory):
    return build_quick_run(tmp_path_factory.mktemp("quick-run"))


@pytest.fixture(scope="session")
def quick_run_dir(quick_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick-run-copy")
    quick_checkpoint.save(out)
    return out


@pytest.fixture(scope="session")
def shared_repo_dir(quick_checkpoint, tmp_path_factory) -> Path:
    """Read-only for tests: versions 1 and 2. Copy it (`repo_copy`) to change anything."""
    root = tmp_path_factory.mktemp("repo")
    build_repo(quick_checkpoint, root, versions=2)
    return root


@pytest.fixture
def repo_copy(shared_repo_dir, tmp_path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(shared_repo_dir, dst)
    return dst


@pytest.fixture(scope="session")
def hf_family_runs(tmp_path_factory):
    """The Hugging Face families' tiny models, adapted and exported, each built on first use."""
    from tests.fixtures_hf import FamilyRuns  # transformers and peft load only for the tests that use them

    return FamilyRuns(tmp_path_factory)
# ------------------------------------- end of Model section -----------------------------------


# ---------------------------------------------------------------------------------------------
# Kafka: a real broker (ZooKeeper + Kafka 0.9.0.1 from `make kafka`), one per test session,
# started by fuseloop.devkafka on free 127.0.0.1 ports. Used by tests marked `kafka`.
# Kafka not installed: skip locally, FAIL when CI=true. Installed but not starting: always fail.
# ---------------------------------------------------------------------------------------------
import uuid as _uuid

from fuseloop.bus import TopicConfig as _TopicConfig


@pytest.fixture(scope="session")
def local_kafka():
    """The session's broker. Tests may stop/restart it (LocalKafka.restart_broker) but must leave it running."""
    from fuseloop.devkafka import KafkaNotInstalled, LocalKafka

    try:
        kafka = LocalKafka().start()
    except KafkaNotInstalled as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{e} (CI=true: the Kafka tests must run)")
        pytest.skip(str(e))
    yield kafka
    kafka.stop()


@pytest.fixture
def fresh_topics() -> _TopicConfig:
    """Topic names no other test uses, so tests sharing the broker or a bus file do not see each other's events."""
    suffix = _uuid.uuid4().hex[:10]
    return _TopicConfig(inference=f"inference-{suffix}", feedback=f"feedback-{suffix}", dead_letter=f"dead-{suffix}")
# -------------------------------------- end of Kafka section ----------------------------------
