"""`fuseloop train --config FILE --set NAME=VALUE`: every TrainConfig field from outside, the
effective config recorded in the round's report and the published version's manifest, and bad
files refused in one line that names the key and the expected type."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fuseloop.bus.url import open_bus
from fuseloop.config_file import apply_overrides, build, to_dict, to_toml
from fuseloop.errors import ConfigError
from fuseloop.repository import ModelRepository
from tests.traffic_factory import publish_traffic
from trainer.round import TrainConfig

FAST_TOML = """
min_new_feedback = 1
prompt_window_rounds = 2
[reward]
steps = 3
batch_size = 8
[policy]
steps = 2
prompts_per_step = 4
kl_beta = 0.05
[gate]
min_reward_gain = -inf
kl_budget = inf
[ingest]
poll_timeout_s = 0.3
"""


def fuseloop(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fuseloop.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_nested_tables_and_dotted_overrides_set_fields_and_keep_the_rest():
    import tomllib

    values = apply_overrides(tomllib.loads(FAST_TOML), ["policy.lr=1e-4", "weights.implicit=0.5", "workdir=/tmp/w"])
    cfg = build(TrainConfig, values, base=TrainConfig(workdir=Path("x")))
    assert (cfg.policy.kl_beta, cfg.policy.lr, cfg.policy.steps, cfg.policy.temperature) == (0.05, 1e-4, 2, 1.0)
    assert cfg.weights.implicit == 0.5 and cfg.workdir == Path("/tmp/w") and cfg.gate.kl_budget == math.inf
    # What --print-config prints reads back as the same config; the JSON form keeps infinities.
    assert build(TrainConfig, tomllib.loads(to_toml(cfg))) == cfg
    assert build(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize("override, message", [
    ("policy.kl_bta=0.1", "unknown config key policy.kl_bta"),
    ("policy.steps=1.5", "policy.steps must be int, got 1.5"),
    ("reward.lr=fast", "reward.lr must be float, got 'fast'"),
    ("policy=3", "policy: expected a table"),
    ("nonsense", "write it as NAME=VALUE"),
])
def test_unknown_keys_and_wrong_types_name_the_dotted_field_and_the_type(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build(TrainConfig, apply_overrides({}, [override]), base=TrainConfig(workdir=Path("x")))


@pytest.mark.slow
def test_train_from_a_config_file_records_what_it_used_in_the_report_and_manifest(
        fresh_topics, quick_checkpoint, repo_copy, tmp_path):
    bus_url = f"sqlite:///{tmp_path / 'bus.db'}"
    bus = open_bus(bus_url)
    publish_traffic(bus, fresh_topics, quick_checkpoint, requests=40)
    bus.close()
    config = tmp_path / "train.toml"
    config.write_text(FAST_TOML)
    workdir = tmp_path / "work"
    done = fuseloop("train", "--repo", str(repo_copy), "--bus", bus_url, "--workdir", str(workdir),
                    "--config", str(config), "--set", "policy.temperature=0.8", "--rm-steps", "4",
                    "--inference-topic", fresh_topics.inference, "--feedback-topic", fresh_topics.feedback,
                    "--dead-letter-topic", fresh_topics.dead_letter)
    assert done.returncode == 0, done.stderr
    report = json.loads((workdir / "round-001.json").read_text())
    used = report["config"]
    assert used["policy"]["kl_beta"] == 0.05 and used["policy"]["temperature"] == 0.8
    assert used["reward"]["steps"] == 4  # the old flag still overrides the file
    assert used["prompt_window_rounds"] == 2 and used["gate"]["kl_budget"] == "inf"
    assert report["policy"]["steps"] == 2
    manifest = ModelRepository(repo_copy).manifest(report["version"])
    assert manifest.train_config == used
    # The manifest's config is enough to retrain the same way.
    assert build(TrainConfig, manifest.train_config).policy.kl_beta == 0.05


@pytest.mark.parametrize("text, message", [
    ("[policy]\nkl_beta = 'high'\n", "error: policy.kl_beta must be float, got 'high'"),
    ("[polcy]\nsteps = 1\n", "error: unknown config key polcy"),
    ("[policy\n", "is not valid TOML"),
])
def test_a_bad_config_file_gets_one_line_and_a_non_zero_exit(text, message, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    done = fuseloop("train", "--repo", str(tmp_path), "--bus", f"sqlite:///{tmp_path / 'bus.db'}",
                    "--config", str(config), "--print-config", timeout=60)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
