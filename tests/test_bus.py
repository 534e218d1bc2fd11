"""The event bus: both implementations (real Kafka, embedded SQLite) behave the same way."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from fuseloop.bus import BusConsumer, BusError, BusFull, EventBus, EventDeduper, Record, dedupe_key, open_bus
from fuseloop.bus.kafka import KafkaBus, KafkaBusConfig, producer_settings
from fuseloop.bus.spool import Spool
from fuseloop.bus.sqlite import SqliteBus, SqliteBusConfig
from fuseloop.devkafka import free_port


@pytest.fixture(params=["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus(request, tmp_path) -> EventBus:
    if request.param == "sqlite":
        bus = open_bus(f"sqlite://{tmp_path}/bus.db")
    else:
        kafka = request.getfixturevalue("local_kafka")
        bus = open_bus(kafka.url, spool_dir=str(tmp_path / "spool"), client_id="test-bus")
    yield bus
    bus.close()


def read(consumer: BusConsumer, count: int, timeout_s: float = 20.0) -> list[Record]:
    """Polls until `count` records arrived (or the time is up)."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        out += consumer.poll(max_records=count - len(out), timeout_s=0.5)
    return out


def test_a_consumer_reads_what_was_published_with_each_session_in_order(bus, fresh_topics):
    topic = fresh_topics.feedback
    sent = [(f"session-{i % 5}".encode(), f"event-{i}".encode()) for i in range(60)]
    bus.publish(topic, *sent[0])
    bus.publish_many(topic, sent[1:])
    consumer = bus.consumer("readers", [topic])
    got = read(consumer, len(sent))
    consumer.close()

    assert sorted((r.key, r.value) for r in got) == sorted(sent)
    by_session: dict[bytes, list[bytes]] = defaultdict(list)
    for r in sorted(got, key=lambda r: (r.partition, r.offset)):
        by_session[r.key].append(r.value)
    for key, values in by_session.items():
        assert values == [v for k, v in sent if k == key], "a session's events come back in the order sent"
    assert len({(r.key, r.partition) for r in got}) == 5, "one session, one partition"


def test_a_group_continues_after_its_committed_offsets_and_other_groups_start_from_the_beginning(bus, fresh_topics):
    topic = fresh_topics.feedback
    bus.publish_many(topic, [(b"s", f"{i}".encode()) for i in range(10)])
    first = bus.consumer("trainer", [topic])
    got = read(first, 10)
    first.commit()
    committed = first.position()
    first.close()
    bus.publish_many(topic, [(b"s", f"{i}".encode()) for i in range(10, 15)])

    again = bus.consumer("trainer", [topic])
    rest = read(again, 5)
    assert [r.value for r in got] == [f"{i}".encode() for i in range(10)]
    assert [r.value for r in rest] == [f"{i}".encode() for i in range(10, 15)]
    assert again.poll(timeout_s=0.3) == []
    assert sum(again.position().values()) == sum(committed.values()) + 5
    again.close()

    other = bus.consumer("evaluator", [topic])
    assert len(read(other, 15)) == 15
    other.close()


def test_records_polled_but_not_committed_are_delivered_again(bus, fresh_topics):
    topic = fresh_topics.feedback
    bus.publish_many(topic, [(b"s", b"a"), (b"s", b"b"), (b"s", b"c")])
    crashed = bus.consumer("trainer", [topic])
    first = read(crashed, 3)
    crashed.commit({(first[0].topic, first[0].partition): first[0].offset + 1})  # only "a" done
    crashed.close()

    successor = bus.consumer("trainer", [topic])
    assert [r.value for r in read(successor, 2)] == [b"b", b"c"]
    successor.close()


def test_two_members_of_a_group_share_the_partitions(bus, fresh_topics):
    topic = fresh_topics.feedback
    bus.publish(topic, b"warm-up", b"creates the topic")
    a = bus.consumer("pair", [topic])
    b = bus.consumer("pair", [topic])
    got: dict[str, list[Record]] = {"a": [], "b": []}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # Kafka rebalances while both poll
        got["a"] += a.poll(timeout_s=0.2)
        got["b"] += b.poll(timeout_s=0.2)
        pa, pb = set(a.position()), set(b.position())
        if pa and pb and not pa & pb and len(pa | pb) == 3:
            break
    assert pa and pb and not pa & pb, f"disjoint assignments, got {pa} and {pb}"
    assert len(pa | pb) == 3, "together they cover every partition"

    sent = [(f"session-{i}".encode(), f"{i}".encode()) for i in range(90)]
    expected = {v for _, v in sent}
    bus.publish_many(topic, sent)
    got = {"a": [], "b": []}  # (the warm-up record may be read twice: it was read during the rebalance)
    deadline = time.monotonic() + 20
    while {r.value for r in got["a"] + got["b"]} < expected and time.monotonic() < deadline:
        got["a"] += a.poll(timeout_s=0.2)
        got["b"] += b.poll(timeout_s=0.2)
    a.close()
    b.close()

    values_a = [r.value for r in got["a"] if r.value in expected]
    values_b = [r.value for r in got["b"] if r.value in expected]
    assert values_a and values_b, "both members got work"
    assert sorted(values_a + values_b) == sorted(expected), "each record went to exactly one member"
    assert {r.partition for r in got["a"]} <= {p for _, p in pa}


def test_bus_urls_pick_the_implementation_and_reject_anything_else(tmp_path):
    bus = open_bus(f"sqlite://{tmp_path}/x.db?partitions=4")
    assert isinstance(bus, SqliteBus) and bus.partitions == 4
    bus.close()
    for bad, says in [
        ("redis://localhost:6379", "unknown bus URL"),
        ("sqlite://relative.db", "absolute"),
        ("kafka://", "needs brokers"),
        ("kafka://127.0.0.1:9092?api_version=zero", "api_version"),
        ("kafka://127.0.0.1:9092?acks=1", "unknown bus setting"),
    ]:
        with pytest.raises(ValueError, match=says):
            open_bus(bad)


def test_the_idempotent_producer_follows_the_broker_version():
    old = producer_settings(KafkaBusConfig("k:9092", api_version=(0, 9)))
    new = producer_settings(KafkaBusConfig("k:9092", api_version=(3, 7)))
    assert old["enable_idempotence"] is False and old["max_in_flight_requests_per_connection"] == 1
    assert new["enable_idempotence"] is True
    assert old["acks"] == new["acks"] == "all"
    assert "enable_idempotence" not in producer_settings(KafkaBusConfig("k:9092"))  # auto: kafka-python decides


# --- Nothing lost: the Kafka bus spools to disk while Kafka is away ---------------------------------


def unreachable_kafka(tmp_path: Path, **settings) -> KafkaBus:
    defaults = dict(api_version=(0, 9), send_timeout_s=0.3, replay_interval_s=0.1)
    config = KafkaBusConfig(f"127.0.0.1:{free_port()}", spool_dir=str(tmp_path / "spool"), **{**defaults, **settings})
    return KafkaBus(config)


def test_while_kafka_is_unreachable_publish_returns_once_the_events_are_spooled(tmp_path, fresh_topics):
    bus = unreachable_kafka(tmp_path)
    started = time.monotonic()
    bus.publish(fresh_topics.feedback, b"s", b"first")  # waits send_timeout_s for an ack
    bus.publish_many(fresh_topics.feedback, [(b"s", b"second"), (b"s", b"third")])  # straight to the spool
    assert bus.spooled == 3
    assert time.monotonic() - started < 2
    bus.close()


def test_past_the_spool_cap_publish_pushes_back_with_bus_full(tmp_path, fresh_topics):
    bus = unreachable_kafka(tmp_path, spool_max_bytes=1000)
    bus.publish(fresh_topics.feedback, b"s", b"x" * 400)
    bus.publish(fresh_topics.feedback, b"s", b"x" * 400)
    with pytest.raises(BusFull, match="spool is full"):
        bus.publish(fresh_topics.feedback, b"s", b"x" * 400)
    assert bus.spooled == 2
    bus.close()


@pytest.mark.kafka
def test_events_spooled_in_an_earlier_run_are_replayed_into_kafka_on_startup(tmp_path, fresh_topics, local_kafka):
    down = unreachable_kafka(tmp_path)
    down.publish_many(fresh_topics.feedback, [(b"s", f"{i}".encode()) for i in range(20)])
    down.close()

    up = KafkaBus(KafkaBusConfig(local_kafka.bootstrap, api_version=(0, 9), spool_dir=str(tmp_path / "spool")))
    assert up.wait_until_replayed(timeout_s=30)
    consumer = up.consumer("replayed", [fresh_topics.feedback])
    assert [r.value for r in read(consumer, 20)] == [f"{i}".encode() for i in range(20)]
    consumer.close()
    up.close()


def test_a_spool_dir_belongs_to_one_bus_at_a_time(tmp_path, fresh_topics):
    first = unreachable_kafka(tmp_path)
    first.publish(fresh_topics.feedback, b"s", b"spooled")
    second = unreachable_kafka(tmp_path)  # starts (consumers never need the spool) ...
    with pytest.raises(BusError, match="in use"):
        second.publish(fresh_topics.feedback, b"s", b"nowhere to go")  # ... but cannot spool
    second.close()
    first.close()


# --- The spool file itself ---------------------------------------------------------------------------


def test_the_spool_hands_records_back_in_order_and_forgets_them_once_acknowledged(tmp_path):
    spool = Spool(tmp_path / "s", segment_bytes=200)  # small segments: several files
    spool.append([("t", f"k{i}".encode(), f"v{i}".encode()) for i in range(30)])
    first = spool.peek(10)
    assert [r.value for r in first] == [f"v{i}".encode() for i in range(10)]
    spool.ack(first)
    spool.close()

    reopened = Spool(tmp_path / "s", segment_bytes=200)
    assert reopened.pending_records == 20
    rest = reopened.peek(100)
    assert [r.value for r in rest] == [f"v{i}".encode() for i in range(10, 30)]
    reopened.ack(rest)
    assert reopened.pending_records == 0 and reopened.pending_bytes == 0
    assert len(list((tmp_path / "s").glob("*.seg"))) == 1, "replayed segments are deleted"
    reopened.close()


def test_a_torn_append_at_the_end_of_the_spool_is_cut_off(tmp_path):
    spool = Spool(tmp_path / "s")
    spool.append([("t", b"k", b"whole")])
    spool.close()
    segment = next((tmp_path / "s").glob("*.seg"))
    with open(segment, "ab") as f:
        f.write(b"\x00\x00\x01\x00garbage")  # a crash in the middle of an append

    reopened = Spool(tmp_path / "s")
    assert [r.value for r in reopened.peek()] == [b"whole"]
    reopened.append([("t", b"k", b"after")])
    assert [r.value for r in reopened.peek()] == [b"whole", b"after"]
    reopened.close()


# --- Consumers drop repeats -------------------------------------------------------------------------


def test_the_deduper_lets_each_event_through_once(tmp_path):
    memory = EventDeduper(capacity=2)
    assert [memory.first_time(k) for k in ["a", "b", "a", "c", "a"]] == [True, True, False, True, False]
    assert memory.first_time("b") is True, "the oldest key was forgotten past the capacity"

    persistent = EventDeduper(path=tmp_path / "seen.db")
    assert persistent.first_time_many([dedupe_key("app", "e1"), dedupe_key("app", "e2")]) == [True, True]
    persistent.close()
    after_restart = EventDeduper(path=tmp_path / "seen.db")
    assert after_restart.first_time(dedupe_key("app", "e1")) is False
    assert after_restart.first_time(dedupe_key("other-app", "e1")) is True, "event ids are per app"
    after_restart.close()


# --- The SQLite bus is shared by several processes ---------------------------------------------------

WRITER = """
import sys
from fuseloop.bus import open_bus
bus = open_bus(sys.argv[1])
for i in range(50):
    bus.publish_many("shared", [(f"s{i % 3}".encode(), f"{sys.argv[2]}-{i}-{j}".encode()) for j in range(4)])
bus.close()
"""


def test_processes_writing_one_sqlite_bus_at_once_get_distinct_consecutive_offsets(tmp_path):
    url = f"sqlite://{tmp_path}/shared.db"
    open_bus(url).close()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, url, name]) for name in ("feedback", "inference")]
    assert [w.wait(timeout=60) for w in writers] == [0, 0]

    bus = open_bus(url)
    consumer = bus.consumer("check", ["shared"])
    got = read(consumer, 400)
    consumer.close()
    bus.close()
    assert len({r.value for r in got}) == 400
    for partition in {r.partition for r in got}:
        offsets = sorted(r.offset for r in got if r.partition == partition)
        assert offsets == list(range(len(offsets)))


def test_sqlite_members_that_stop_polling_lose_their_partitions(tmp_path, fresh_topics):
    bus = SqliteBus(SqliteBusConfig(path=str(tmp_path / "b.db"), session_timeout_s=0.5))
    gone = bus.consumer("g", [fresh_topics.feedback])
    stays = bus.consumer("g", [fresh_topics.feedback])
    assert len(stays.position()) < 3
    time.sleep(0.7)  # `gone` neither polls nor closes
    assert len(stays.position()) == 3
    stays.close()
    gone.close()
    bus.close()
