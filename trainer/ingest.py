"""Consuming the bus: parse, validate, dedupe and store events; dead-letter what can't be used.

Offsets are committed to the bus only after the store's transaction (events + offsets) is
durable, so a crash at any point neither loses nor double-counts an event.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from fuseloop.bus import Assignment, BusConsumer, EventBus, Record, TopicConfig
from fuseloop.bus.dedupe import dedupe_key
from fuseloop.events import EVENT_SCHEMA_VERSION, dead_letter, signal_kind
from fuseloop.v1 import events_pb2
from trainer.store import DatasetStore, ResponseRow


@dataclass(frozen=True)
class IngestConfig:
    group: str = "fuseloop-trainer"
    max_events: int = 200_000  # per round; with live traffic a round takes what is there, up to this
    poll_records: int = 1000
    poll_timeout_s: float = 0.5
    idle_polls: int = 2  # empty polls in a row that mean "caught up" (only once the group has settled)
    join_timeout_s: float = 30.0  # how long a round waits for the group to hand out every partition
    join_slice_s: float = 1.0  # each member compares views this often; it must stay well under the session timeout
    catch_up_timeout_s: float = 60.0  # how long empty polls may go on below the round's end offsets


@dataclass
class IngestReport:
    records: int = 0
    inference_events: int = 0
    feedback_events: int = 0
    duplicates: int = 0
    dead_letters: Counter = field(default_factory=Counter)
    feedback_by_kind: Counter = field(default_factory=Counter)
    offsets_from: dict = field(default_factory=dict)
    offsets_to: dict = field(default_factory=dict)
    join_seconds: float = 0.0
    joined: bool = False  # every partition of the topics was assigned to a member before reading
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"records": self.records, "inference_events": self.inference_events,
                "feedback_events": self.feedback_events, "duplicates": self.duplicates,
                "dead_letters": dict(self.dead_letters), "feedback_by_kind": dict(self.feedback_by_kind),
                "offsets_from": _offsets_json(self.offsets_from), "offsets_to": _offsets_json(self.offsets_to),
                "joined": self.joined, "join_seconds": round(self.join_seconds, 2), "seconds": round(self.seconds, 2)}


def _reached(position: dict[tuple[str, int], int], snapshot: dict[tuple[str, int], int]) -> bool:
    """Every partition still assigned has been read up to its snapshot end."""
    return all(position.get(tp, 0) >= end for tp, end in snapshot.items() if tp in position)


def group_settled(views: list[Assignment]) -> bool:
    """Every member settled in the same generation, on the same topics, and together they hold
    each partition of those topics exactly once."""
    first = views[0]
    if not all(v.settled and v.generation == first.generation and v.topic_partitions == first.topic_partitions
               for v in views):
        return False
    held = [tp for v in views for tp in v.partitions]
    return len(held) == len(set(held)) and set(held) == first.every_partition()


def _offsets_json(offsets: dict[tuple[str, int], int]) -> dict[str, int]:
    return {f"{t}/{p}": o for (t, p), o in sorted(offsets.items())}


class Ingestor:
    def __init__(self, bus: EventBus, store: DatasetStore, topics: TopicConfig = TopicConfig(),
                 config: IngestConfig = IngestConfig()) -> None:
        self.bus, self.store, self.topics, self.config = bus, store, topics, config
        self._consumer: BusConsumer | None = None

    def consumer(self) -> BusConsumer:
        if self._consumer is None:
            self._consumer = self.bus.consumer(self.config.group, [self.topics.inference, self.topics.feedback])
        return self._consumer

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def join(self, gather: Callable[[object], list] = lambda view: [view]) -> bool:
        """Waits, up to join_timeout_s, until the group has handed out every partition of the topics
        as they exist now. `gather` collects every trainer process's view, in the same order on
        each, so processes sharing the group wait for one another and all decide alike.
        False: it timed out, and the round reads what it holds."""
        consumer = self.consumer()
        deadline = time.monotonic() + self.config.join_timeout_s
        while True:
            # Short slices: a member that settled first keeps driving its coordinator (heartbeats,
            # rejoins) while it waits for the others. Blocked in `gather` for a whole session timeout
            # (on 0.9 that is also the poll timeout), it would be dropped and the group never settles.
            mine = consumer.join(max(0.0, min(self.config.join_slice_s, deadline - time.monotonic())))
            # Each process's clock says when it gives up; gathered, the first to give up stops all.
            views = gather((mine, time.monotonic() >= deadline))
            if group_settled([view for view, _ in views]):
                return True
            if any(out_of_time for _, out_of_time in views):
                return False
            time.sleep(0.2)  # a member still in an old generation learns of the rebalance by heartbeat

    def ingest(self, round_: int, gather: Callable[[object], list] = lambda view: [view]) -> IngestReport:
        """Reads what the bus held for the group at the round's start (up to max_events) into the store."""
        t0 = time.perf_counter()
        report = IngestReport()
        consumer = self.consumer()
        report.joined = self.join(gather)
        report.join_seconds = time.perf_counter() - t0
        idle = 0
        # A round drains what was on the bus when it started: traffic goes on meanwhile.
        snapshot = consumer.end_offsets()
        catch_up_until = time.monotonic() + self.config.catch_up_timeout_s
        while report.records < self.config.max_events:
            if snapshot and _reached(consumer.position(), snapshot):
                break
            records = consumer.poll(self.config.poll_records, self.config.poll_timeout_s)
            if not records:
                idle += 1
                # Below the end offsets, an empty poll is a slow fetch (or a rebalance), not the end.
                if idle >= self.config.idle_polls and (not snapshot or time.monotonic() >= catch_up_until):
                    break
                continue
            idle = 0
            self._store_batch(records, round_, report)
            consumer.commit({(r.topic, r.partition): r.offset + 1 for r in records})
            if not snapshot:  # the group assignment arrives with the first poll (Kafka)
                snapshot = consumer.end_offsets()
        report.seconds = time.perf_counter() - t0
        return report

    def _store_batch(self, records: list[Record], round_: int, report: IngestReport) -> None:
        next_offsets: dict[tuple[str, int], int] = {}
        self.store.begin()
        try:
            for rec in records:
                report.records += 1
                tp = (rec.topic, rec.partition)
                report.offsets_from.setdefault(tp, rec.offset)
                next_offsets[tp] = rec.offset + 1
                reason = self._store_record(rec, round_, report)
                if reason is not None:
                    self._dead_letter(rec, reason, round_, report)
            self.store.set_offsets(next_offsets)
            self.store.commit()
        except BaseException:
            self.store.rollback()
            raise
        report.offsets_to.update(next_offsets)

    def _store_record(self, rec: Record, round_: int, report: IngestReport) -> str | None:
        """Stores one record; returns a dead-letter reason when it can't be used."""
        if rec.topic == self.topics.inference:
            return self._store_inference(rec, round_, report)
        if rec.topic == self.topics.feedback:
            return self._store_feedback(rec, round_, report)
        return f"unexpected topic {rec.topic}"

    def _store_inference(self, rec: Record, round_: int, report: IngestReport) -> str | None:
        try:
            ev = events_pb2.InferenceEvent.FromString(rec.value)
        except DecodeError as e:
            return f"malformed InferenceEvent protobuf: {e}"
        if ev.schema_version != EVENT_SCHEMA_VERSION:
            return f"unknown schema_version {ev.schema_version} (this trainer reads {EVENT_SCHEMA_VERSION})"
        if not ev.event_id or not ev.responses:
            return "inference event without event_id or responses"
        if not ev.image:
            return f"image not inlined (sha256 {ev.image_sha256[:12]}): cannot train on this request"
        rows = [ResponseRow(r.response_id, ev.request_id, ev.model_version, ev.prompt, ev.image, r.text,
                            list(r.token_ids), list(r.token_logprobs), r.display_position, len(ev.responses))
                for r in ev.responses]
        if self.store.add_inference(ev.event_id, rows, ev.session_id, ev.timestamp_ms, round_):
            report.inference_events += 1
        else:
            report.duplicates += 1
        return None

    def _store_feedback(self, rec: Record, round_: int, report: IngestReport) -> str | None:
        try:
            ev = events_pb2.FeedbackEvent.FromString(rec.value)
        except DecodeError as e:
            return f"malformed FeedbackEvent protobuf: {e}"
        if ev.schema_version != EVENT_SCHEMA_VERSION:
            return f"unknown schema_version {ev.schema_version} (this trainer reads {EVENT_SCHEMA_VERSION})"
        kind = signal_kind(ev)
        if kind is None:
            return "feedback event with no signal"
        if not ev.event_id:
            return "feedback event without event_id"
        if not ev.response_id and kind != "preference":
            return f"{kind} feedback without response_id"
        key = dedupe_key(ev.app_id, ev.event_id)
        if self.store.add_feedback(key, ev.event_id, ev.response_id, kind, rec.value, ev.session_id,
                                   ev.timestamp_ms, round_):
            report.feedback_events += 1
            report.feedback_by_kind[kind] += 1
        else:
            report.duplicates += 1
        return None

    def _dead_letter(self, rec: Record, reason: str, round_: int, report: IngestReport) -> None:
        event_id = ""
        self.bus.publish(self.topics.dead_letter, rec.key or b"", dead_letter(rec.value, rec.topic, reason, event_id))
        self.store.add_dead_letter(rec.topic, reason, event_id, round_)
        report.dead_letters[reason.split(":")[0]] += 1
