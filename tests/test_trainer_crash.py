"""kill -9 at any point of a round, then a restart: no event lost, none counted twice."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuseloop.bus.url import open_bus
from fuseloop.repository import ModelRepository
from tests.test_trainer_round import FAST
from tests.traffic_factory import publish_traffic
from trainer.round import TrainConfig, Trainer


def stored(db: Path, table: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.parametrize("kill_at", ["mid-ingest", "mid-training"])
def test_kill_9_then_resume_counts_every_event_exactly_once(kill_at, fresh_topics, quick_checkpoint, repo_copy,
                                                            tmp_path):
    # A short session timeout: the killed member keeps its partitions until it expires, as in Kafka.
    bus_url = f"sqlite:///{tmp_path / 'bus.db'}?session_timeout_s=1.5"
    bus = open_bus(bus_url)
    traffic = publish_traffic(bus, fresh_topics, quick_checkpoint, requests=150)
    workdir = tmp_path / "work"
    db = workdir / "dataset.db"
    cmd = [sys.executable, "-m", "fuseloop.cli", "train", "--repo", str(repo_copy), "--bus", bus_url,
           "--workdir", str(workdir), "--ingest-batch", "10", "--rm-steps", "4", "--pg-steps", "2",
           "--inference-topic", fresh_topics.inference, "--feedback-topic", fresh_topics.feedback,
           "--dead-letter-topic", fresh_topics.dead_letter]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    total = len(traffic.feedback)
    while time.monotonic() < deadline and proc.poll() is None:
        n = stored(db, "feedback")
        if (kill_at == "mid-ingest" and 0 < n < total) or (kill_at == "mid-training" and n == total):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the trainer ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    time.sleep(2.0)  # the killed member's session expires; the restarted trainer gets every partition
    trainer = Trainer(TrainConfig(workdir=workdir, **FAST), bus, ModelRepository(repo_copy), fresh_topics)
    report = trainer.run_round()
    trainer.close()
    bus.close()
    assert report["round"] == 1  # the killed round never finished: it is redone
    assert stored(db, "feedback") == total
    assert stored(db, "seen_inference") == len(traffic.inference)
    # Whatever was re-read after the kill was recognized as already stored, not counted again.
    assert report["signals"]["unjoined"] == 0
    assert sum(v for k, v in report["signals"]["counts"].items() if k != "preference_ties") == total
