"""`fuseloop train --when-feedback N` runs rounds on its own until SIGTERM; a SIGTERM mid-round
lets the round finish, and a restart carries on with every event counted exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from fuseloop.bus.url import open_bus
from fuseloop.errors import UserError
from tests.test_train_config import FAST_TOML
from tests.test_trainer_crash import stored
from tests.traffic_factory import publish_traffic
from trainer.schedule import Schedule, StopSignals, gate_check, parse_duration, run_scheduled


def test_durations_read_like_a_crontab_user_would_write_them():
    assert [parse_duration(t) for t in ("90", "90s", "10m", "2h")] == [90, 90, 600, 7200]
    with pytest.raises(UserError, match="duration like 90s"):
        parse_duration("soon")


def test_rounds_start_when_enough_feedback_waits_and_stop_on_the_signal():
    signals, waiting, ran = StopSignals(), iter([0, 3, 9, 9]), []

    def run_round() -> dict:
        ran.append(1)
        if len(ran) == 2:
            signals.stop.set()  # as SIGTERM during the second round: it finishes, then the loop ends
        return {"round": len(ran)}

    done = run_scheduled(run_round, lambda: next(waiting), Schedule(when_feedback=5, check_s=0.01), signals)
    assert done == 2


def test_refusals_are_labelled_by_the_gate_check():
    assert gate_check("reward-model score 0.1 does not beat serving 0.2 by more than 0.0") == "reward"
    assert gate_check("eval-set accuracy 0.7 is below serving's 0.8 by more than the margin 0") == "eval_set"
    assert gate_check("KL to the reference 4.0 is over the budget 3.0") == "kl"


@pytest.mark.slow
def test_sigterm_mid_round_then_restart_counts_every_event_once(fresh_topics, quick_checkpoint, repo_copy, tmp_path):
    bus_url = f"sqlite:///{tmp_path / 'bus.db'}"
    bus = open_bus(bus_url)
    first = publish_traffic(bus, fresh_topics, quick_checkpoint, requests=120, seed=1)
    config = tmp_path / "train.toml"
    config.write_text(FAST_TOML)
    workdir, db = tmp_path / "work", tmp_path / "work" / "dataset.db"
    cmd = [sys.executable, "-m", "fuseloop.cli", "train", "--repo", str(repo_copy), "--bus", bus_url,
           "--workdir", str(workdir), "--config", str(config), "--ingest-batch", "10", "--when-feedback", "10",
           "--inference-topic", fresh_topics.inference, "--feedback-topic", fresh_topics.feedback,
           "--dead-letter-topic", fresh_topics.dead_letter]
    proc = subprocess.Popen(cmd + ["--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not 0 < stored(db, "feedback") < len(first.feedback):
        time.sleep(0.02)
    assert proc.poll() is None, "the trainer ended before the signal"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    report = json.loads((workdir / "round-001.json").read_text())  # the round finished, then the trainer stopped
    assert report["ingest"]["feedback_events"] == len(first.feedback)
    assert not (workdir / "round-002.json").exists()

    second = publish_traffic(bus, fresh_topics, quick_checkpoint, requests=60, seed=2)
    restarted = subprocess.run(cmd + ["--rounds", "1"], capture_output=True, text=True, timeout=180)
    bus.close()
    assert restarted.returncode == 0, restarted.stderr
    report = json.loads((workdir / "round-002.json").read_text())
    assert report["ingest"]["feedback_events"] == len(second.feedback)
    assert report["ingest"]["inference_events"] == len(second.inference)
    assert report["ingest"]["duplicates"] == 0
    assert stored(db, "feedback") == len(first.feedback) + len(second.feedback)
    assert stored(db, "seen_inference") == len(first.inference) + len(second.inference)


def test_trainer_metrics_are_exposed_in_prometheus_format():
    from prometheus_client.parser import text_string_to_metric_families

    from fuseloop.metrics import MetricsRegistry
    from trainer.schedule import TrainerMetrics

    registry = MetricsRegistry()
    metrics = TrainerMetrics(registry)
    metrics.record({"round": 1, "timings": {"reward_model": 2.0}, "seconds": 3.0, "deployed": False,
                    "not_deployed_because": ["KL to the reference 4.0 is over the budget 3.0"]})
    metrics.record({"round": 2, "timings": {}, "seconds": 3.0, "deployed": True, "version": 3})
    port = registry.serve_http("127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        registry.stop_http()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("fuseloop_trainer_rounds_total", (("outcome", "refused"),))] == 1
    assert samples[("fuseloop_trainer_rounds_total", (("outcome", "deployed"),))] == 1
    assert samples[("fuseloop_trainer_refused_total", (("reason", "kl"),))] == 1
    assert samples[("fuseloop_trainer_phase_seconds_count", (("phase", "reward_model"),))] == 1
    assert samples[("fuseloop_trainer_last_round", ())] == 2
