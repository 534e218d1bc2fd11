"""A training round on a real bus (the embedded SQLite log and the real Kafka broker): joining,
dedupe, dead letters, publish and redeploy through the inference service's admin API."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fuseloop.bus import TopicConfig
from fuseloop.bus.url import open_bus
from fuseloop.repository import ModelRepository
from fuseloop.v1 import events_pb2
from tests.traffic_factory import publish_traffic
from trainer.deploy import AdminDeployer
from trainer.gate import GateConfig
from trainer.ingest import IngestConfig
from trainer.policy_gradient import PolicyGradientConfig
from trainer.reward_training import RewardTrainConfig
from trainer.round import TrainConfig, Trainer

# Small and permissive: these tests are about the data path, not about learning.
FAST = dict(reward=RewardTrainConfig(steps=4, batch_size=16), policy=PolicyGradientConfig(steps=2, prompts_per_step=4),
            ingest=IngestConfig(poll_timeout_s=0.3), min_new_feedback=1,
            gate=GateConfig(min_reward_gain=-math.inf, kl_budget=math.inf))


@pytest.fixture(params=["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bus.db'}"
    kafka = request.getfixturevalue("local_kafka")
    return kafka.url


@pytest.fixture
def bus(bus_url, tmp_path):
    b = open_bus(bus_url, client_id="trainer-test", spool_dir=str(tmp_path / "spool"))
    yield b
    b.close()


def consume_all(bus, topic: str, group: str) -> list[bytes]:
    consumer = bus.consumer(group, [topic])
    out, idle = [], 0
    while idle < 3:
        records = consumer.poll(1000, 0.5)
        idle = 0 if records else idle + 1
        out += [r.value for r in records]
    consumer.close()
    return out


def test_a_round_joins_dedupes_publishes_and_redeploys(bus, fresh_topics, quick_checkpoint, repo_copy, tmp_path):
    from services.inference.config import InferenceServiceConfig
    from services.inference.runtime.onnx_runtime import OnnxRuntime
    from services.inference.server import InferenceServer, ServerThread

    traffic = publish_traffic(bus, fresh_topics, quick_checkpoint, requests=60)
    # Redelivery: the first 10 feedback events arrive twice.
    for fb in traffic.feedback[:10]:
        bus.publish(fresh_topics.feedback, fb.session_id.encode(), fb.SerializeToString())
    repo = ModelRepository(repo_copy)
    server = ServerThread(InferenceServer(InferenceServiceConfig(port=0, admin_token="admin"), OnnxRuntime(), repo,
                                          state_path=tmp_path / "serving.json")).start()
    try:
        trainer = Trainer(TrainConfig(workdir=tmp_path / "work", **FAST), bus, repo, fresh_topics,
                          deployer=AdminDeployer(server.address, "admin"))
        report = trainer.run_round()
        trainer.close()
        status = AdminDeployer(server.address, "admin").status()
    finally:
        server.stop()

    ingest = report["ingest"]
    assert ingest["inference_events"] == len(traffic.inference)
    assert ingest["feedback_events"] == len(traffic.feedback)
    assert ingest["duplicates"] == 10
    assert report["signals"]["unjoined"] == 0
    assert sum(v for k, v in report["signals"]["counts"].items() if k != "preference_ties") == len(traffic.feedback)
    assert report["deployed"] and report["version"] == 3
    assert status.serving_version == "3"
    lineage = repo.manifest(3).lineage
    assert lineage["parent_version"] == report["parent_version"]
    assert lineage["inference_events"] == len(traffic.inference)
    assert sum(lineage["feedback_counts"].values()) >= len(traffic.feedback)
    assert lineage["offsets_to"]  # which records it learned from
    assert (tmp_path / "work" / "rounds.png").exists() and (tmp_path / "work" / "rounds.csv").exists()


def test_a_second_round_without_new_feedback_learns_nothing(bus, fresh_topics, quick_checkpoint, repo_copy, tmp_path):
    publish_traffic(bus, fresh_topics, quick_checkpoint, requests=20)
    trainer = Trainer(TrainConfig(workdir=tmp_path / "work", **FAST), bus, ModelRepository(repo_copy), fresh_topics)
    first = trainer.run_round()
    second = trainer.run_round()
    trainer.close()
    assert first["version"] == 3 and not first["deployed"]  # published; no deployer given
    assert second["ingest"]["records"] == 0 and "skipped" in second


def test_malformed_and_unjoinable_events_go_to_the_dead_letter_topic(bus, fresh_topics, quick_checkpoint, repo_copy,
                                                                     tmp_path):
    publish_traffic(bus, fresh_topics, quick_checkpoint, requests=10)
    bus.publish(fresh_topics.feedback, b"s", b"\xff\xfe not a protobuf")
    bus.publish(fresh_topics.feedback, b"s", events_pb2.FeedbackEvent(
        schema_version=1, event_id="no-signal", response_id="r").SerializeToString())
    bus.publish(fresh_topics.feedback, b"s", events_pb2.FeedbackEvent(
        schema_version=1, event_id="orphan", response_id="never-logged", thumbs=events_pb2.Thumbs(up=True),
        app_id="test-app").SerializeToString())
    bus.publish(fresh_topics.inference, b"s", events_pb2.InferenceEvent(
        schema_version=9, event_id="future").SerializeToString())
    cfg = replace(TrainConfig(workdir=tmp_path / "work", **FAST), join_grace_rounds=0)
    trainer = Trainer(cfg, bus, ModelRepository(repo_copy), fresh_topics)
    report = trainer.run_round()
    trainer.close()
    letters = [events_pb2.DeadLetter.FromString(v) for v in consume_all(bus, fresh_topics.dead_letter, "dlq-reader")]
    reasons = sorted(l.reason for l in letters)
    assert len(letters) == 4, reasons
    assert any("malformed FeedbackEvent" in r for r in reasons)
    assert any("no signal" in r for r in reasons)
    assert any("never logged" in r for r in reasons)
    assert any("schema_version 9" in r for r in reasons)
    assert report["unjoined_dead_lettered"] == 1


def test_the_gate_keeps_but_does_not_deploy_a_candidate_that_does_not_beat_serving(
        bus, fresh_topics, quick_checkpoint, repo_copy, tmp_path):
    publish_traffic(bus, fresh_topics, quick_checkpoint, requests=30)
    strict = {**FAST, "gate": GateConfig(min_reward_gain=1e9)}
    gold_calls = []

    def gold(policy) -> float:
        gold_calls.append(policy)
        return 0.5

    trainer = Trainer(TrainConfig(workdir=tmp_path / "work", **strict), bus, ModelRepository(repo_copy), fresh_topics,
                      gold=gold)
    report = trainer.run_round()
    trainer.close()
    assert not report["deployed"] and report["version"] is None
    assert any("does not beat serving" in r for r in report["not_deployed_because"])
    assert ModelRepository(repo_copy).versions() == [1, 2]
    assert (tmp_path / "work" / "candidates" / "round-001" / "policy" / "model.safetensors").exists()
    assert len(gold_calls) >= 2  # the oracle judged candidate and serving (evaluation only)


def test_a_round_drains_what_was_there_while_traffic_goes_on(bus, fresh_topics, quick_checkpoint, repo_copy, tmp_path):
    import threading

    first = publish_traffic(bus, fresh_topics, quick_checkpoint, requests=20)
    stop = threading.Event()

    def keep_producing():
        seed = 1
        while not stop.is_set():
            publish_traffic(bus, fresh_topics, quick_checkpoint, requests=5, seed=seed)
            seed += 1

    producer = threading.Thread(target=keep_producing, daemon=True)
    producer.start()
    try:
        trainer = Trainer(TrainConfig(workdir=tmp_path / "work", **FAST), bus, ModelRepository(repo_copy), fresh_topics)
        report = trainer.run_round()  # must end although the topics never go quiet
        trainer.close()
    finally:
        stop.set()
        producer.join()
    assert report["ingest"]["inference_events"] >= len(first.inference)


def test_lora_is_refused_for_the_built_in_model_with_a_clear_error(quick_checkpoint, shared_repo_dir, tmp_path,
                                                                   capsys):
    from fuseloop.cli import main
    from fuseloop.errors import UserError
    from fuseloop.families import hf_lora

    train = ["train", "--repo", str(shared_repo_dir), "--bus", f"sqlite:///{tmp_path / 'bus.db'}",
             "--workdir", str(tmp_path / "work"), "--deploy-to", "none"]
    assert main(train + ["--lora-rank", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lora-rank 4") and "the built-in model has no LoRA adapters" in err, err
    assert main(train + ["--lora-rank", "-1"]) == 2
    assert "positive rank" in capsys.readouterr().err
    with pytest.raises(UserError, match="LoRA adapters need a Hugging Face family's policy"):
        hf_lora.add_lora(quick_checkpoint.policy, rank=4)


# --- The first round on Kafka: a group that has not joined yet holds no partitions, which is not
# "nothing there". Each test uses its own group and topics, as a new deployment would.

def fresh_group() -> str:
    import uuid

    return f"trainer-{uuid.uuid4().hex[:8]}"


@pytest.mark.kafka
def test_the_first_round_of_a_fresh_group_on_fresh_topics_trains_and_deploys(
        local_kafka, fresh_topics, quick_checkpoint, repo_copy, tmp_path):
    from services.inference.config import InferenceServiceConfig
    from services.inference.runtime.onnx_runtime import OnnxRuntime
    from services.inference.server import InferenceServer, ServerThread

    bus = open_bus(local_kafka.url, client_id="first-round", spool_dir=str(tmp_path / "spool"))
    repo = ModelRepository(repo_copy)
    server = ServerThread(InferenceServer(InferenceServiceConfig(port=0, admin_token="admin"), OnnxRuntime(), repo,
                                          state_path=tmp_path / "serving.json")).start()
    try:
        # The demo's order: the services write first (creating the topics), then the trainer's
        # first round subscribes and joins a group the broker has never seen.
        traffic = publish_traffic(bus, fresh_topics, quick_checkpoint, requests=40)
        config = TrainConfig(workdir=tmp_path / "work", **{**FAST, "ingest": IngestConfig(group=fresh_group())})
        trainer = Trainer(config, bus, repo, fresh_topics, deployer=AdminDeployer(server.address, "admin"))
        report = trainer.run_round()
        trainer.close()
    finally:
        server.stop()
        bus.close()
    assert report["ingest"]["joined"]
    assert report["ingest"]["inference_events"] == len(traffic.inference)
    assert report["ingest"]["feedback_events"] == len(traffic.feedback)
    assert report["deployed"] and report["version"] == 3


@pytest.mark.kafka
def test_topics_that_appear_after_the_trainer_joined_are_read_by_its_next_round(
        local_kafka, fresh_topics, quick_checkpoint, repo_copy, tmp_path):
    bus = open_bus(local_kafka.url, client_id="late-topics", spool_dir=str(tmp_path / "spool"))
    config = TrainConfig(workdir=tmp_path / "work", **{**FAST, "ingest": IngestConfig(group=fresh_group())})
    trainer = Trainer(config, bus, ModelRepository(repo_copy), fresh_topics)
    try:
        before = trainer.run_round()  # subscribed before anything was written
        traffic = publish_traffic(bus, fresh_topics, quick_checkpoint, requests=20)
        after = trainer.run_round()  # the same consumer: kafka-python would refresh metadata in 5 minutes
    finally:
        trainer.close()
        bus.close()
    assert before["ingest"]["records"] == 0 and "skipped" in before
    assert after["ingest"]["inference_events"] == len(traffic.inference)
    assert after["ingest"]["feedback_events"] == len(traffic.feedback)
    assert after["version"] == 3


class ThreadGather:
    """ProcessGroup.gather for trainer "processes" that are threads: every member's view, in rank order."""

    def __init__(self, members: int) -> None:
        import threading

        self.barrier, self.views = threading.Barrier(members, timeout=60), [None] * members

    def for_rank(self, rank: int):
        def gather(view) -> list:
            self.views[rank] = view
            self.barrier.wait()
            out = list(self.views)
            self.barrier.wait()
            return out
        return gather


@pytest.mark.kafka
def test_two_trainers_joining_a_fresh_group_split_the_partitions_and_read_every_event_once(
        local_kafka, fresh_topics, tmp_path):
    import threading

    from fuseloop.events import EVENT_SCHEMA_VERSION, new_id
    from trainer.ingest import Ingestor
    from trainer.store import DatasetStore

    bus = open_bus(local_kafka.url, client_id="two-trainers", spool_dir=str(tmp_path / "spool"))
    sent = []
    for i in range(60):
        ev = events_pb2.FeedbackEvent(schema_version=EVENT_SCHEMA_VERSION, event_id=new_id(), response_id=new_id(),
                                      app_id="a", session_id=f"s{i}", thumbs=events_pb2.Thumbs(up=True))
        bus.publish(fresh_topics.feedback, f"s{i}".encode(), ev.SerializeToString())
        sent.append(ev.event_id)
    group, gather = fresh_group(), ThreadGather(2)
    ingestors = [Ingestor(bus, DatasetStore(tmp_path / f"rank-{r}.db"), fresh_topics, IngestConfig(group=group))
                 for r in (0, 1)]
    reports: list = [None, None]

    def rank(r: int) -> None:
        reports[r] = ingestors[r].ingest(1, gather=gather.for_rank(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    # Rank 1 comes late: rank 0 has settled alone and must rejoin while it waits for rank 1's view.
    ingestors[0].consumer().join(10.0)
    for t in threads:
        t.start()
        time.sleep(1.5)
    for t in threads:
        t.join(timeout=90)
    read = [{e for (e,) in i.store.db.execute("SELECT event_id FROM feedback")} for i in ingestors]
    for i in ingestors:
        i.close()
    bus.close()
    assert all(r.joined for r in reports)
    assert read[0] and read[1] and not read[0] & read[1]  # each rank its own partitions
    assert read[0] | read[1] == set(sent)
