"""Nothing acknowledged is lost when Kafka goes away in the middle of a stream of feedback."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from fuseloop.bus import EventDeduper, dedupe_key
from fuseloop.bus.kafka import KafkaBus, KafkaBusConfig
from fuseloop.v1 import events_pb2 as ev
from fuseloop.v1 import feedback_pb2 as fb
from fuseloop.v1 import feedback_pb2_grpc
from services.feedback.server import FeedbackServer, FeedbackServiceConfig

pytestmark = pytest.mark.kafka
AUTH = [("authorization", "Bearer restart-token")]


class Submitter(threading.Thread):
    """An app sending feedback without pause: single events and batches, remembering what was acked."""

    def __init__(self, address: str, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(grpc.insecure_channel(address))
        self.sent: set[str] = set()
        self.acked: list[str] = []
        self.failures: list[grpc.StatusCode] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            events = [self.event(f"{self.name}-{n + i}", session=f"{self.name}-s{(n + i) % 4}") for i in range(1 if n % 3 else 10)]
            n += len(events)
            self.sent.update(e.event_id for e in events)
            try:
                if len(events) == 1:
                    self.stub.Submit(events[0], metadata=AUTH, timeout=30)
                else:
                    self.stub.SubmitBatch(fb.SubmitBatchRequest(events=events), metadata=AUTH, timeout=30)
                self.acked += [e.event_id for e in events]
            except grpc.RpcError as e:  # not acked: a real app would retry with the same ids
                self.failures.append(e.code())

    @staticmethod
    def event(event_id: str, session: str) -> ev.FeedbackEvent:
        return ev.FeedbackEvent(event_id=event_id, response_id="r", session_id=session, user_id="u", thumbs=ev.Thumbs(up=True))


def test_every_acknowledged_event_arrives_exactly_once_after_a_broker_restart(local_kafka, fresh_topics, tmp_path):
    bus = KafkaBus(
        KafkaBusConfig(
            local_kafka.bootstrap,
            api_version=(0, 9),
            client_id="restart-test",
            spool_dir=str(tmp_path / "spool"),
            send_timeout_s=1.0,  # how long a call may wait for Kafka before its events go to the spool
            replay_interval_s=0.2,
        )
    )
    config = FeedbackServiceConfig(app_tokens={"restart-token": "app"}, pseudonym_key=b"k" * 32, port=0, topics=fresh_topics)
    with FeedbackServer(config, bus) as server:
        apps = [Submitter(server.address, f"app{i}") for i in range(2)]
        for app in apps:
            app.start()
        _wait_until(lambda: sum(len(a.acked) for a in apps) >= 300, timeout_s=30)

        acked_before = sum(len(a.acked) for a in apps)
        local_kafka.stop_broker()
        _wait_until(lambda: bus.spooled > 0 and sum(len(a.acked) for a in apps) > acked_before + 100, timeout_s=30)
        spooled_during_outage = bus.spooled
        local_kafka.start_broker()
        # A restarted 0.9 broker takes a while to elect partition leaders again, longer on a busy
        # 2-core CI machine; what matters here is that the spool drains, not how fast.
        _wait_until(lambda: bus.spooled == 0, timeout_s=120, what=lambda: f"{bus.spooled} events still spooled")
        acked_at_recovery = sum(len(a.acked) for a in apps)
        _wait_until(lambda: sum(len(a.acked) for a in apps) >= acked_at_recovery + 300, timeout_s=60)
        for app in apps:
            app.stop.set()
        for app in apps:
            app.join(timeout=30)
    assert bus.wait_until_replayed(timeout_s=30)

    acked = {i for app in apps for i in app.acked}
    sent = set().union(*(app.sent for app in apps))
    deduper = EventDeduper()
    delivered: list[str] = []
    consumer = bus.consumer("audit", [fresh_topics.feedback])
    deadline = time.monotonic() + 60
    while not acked <= set(delivered) and time.monotonic() < deadline:
        for record in consumer.poll(max_records=2000, timeout_s=0.5):
            event = ev.FeedbackEvent.FromString(record.value)
            if deduper.first_time(dedupe_key(event.app_id, event.event_id)):
                delivered.append(event.event_id)
    consumer.close()
    bus.close()

    assert spooled_during_outage > 0, "the outage was real: events went to the spool"
    assert acked <= set(delivered), f"{len(acked - set(delivered))} acknowledged events were lost"
    assert len(delivered) == len(set(delivered)), "after dedupe each event is there once"
    assert set(delivered) <= sent, "nothing appears that nobody sent"
    assert not [f for app in apps for f in app.failures], "no call failed: the spool took over while Kafka was away"


def _wait_until(condition, timeout_s: float, what=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s {what()}"
        time.sleep(0.05)
