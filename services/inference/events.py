"""Inference events: every Generate, as a fuseloop.v1.InferenceEvent on the bus, so the trainer can
join feedback to what the model said.

Publishing happens on a writer thread that drains a queue in batches (`publish_many`: one durable
sync for many events), so the event loop never waits for the bus. A bus failure does not fail the
Generate: the user already has the answer, and refusing to answer because logging is down would
turn a logging outage into a serving outage. Lost events are counted
(fuseloop_inference_event_failures) and logged; a bounded backlog keeps a slow bus from eating memory.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fuseloop.bus import EventBus
from fuseloop.events import EVENT_SCHEMA_VERSION, new_id
from fuseloop.v1 import events_pb2
from services.inference.metrics import InferenceMetrics

log = logging.getLogger(__name__)



@dataclass
class ResponseRecord:
    response_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    reward: float | None
    display_position: int  # -1: sampled for best_of but not returned


def build_event(*, request_id: str, model_version: int, prompt: str, image: bytes, image_max_bytes: int,
                responses: list[ResponseRecord], sampling: events_pb2.SamplingParams, timestamp_ms: int,
                session_id: str, arm: str = "stable") -> events_pb2.InferenceEvent:
    event = events_pb2.InferenceEvent(
        schema_version=EVENT_SCHEMA_VERSION, event_id=new_id(), request_id=request_id,
        model_version=str(model_version), prompt=prompt,
        image=image if len(image) <= image_max_bytes else b"",
        image_sha256=hashlib.sha256(image).hexdigest(), sampling=sampling, timestamp_ms=timestamp_ms,
        session_id=session_id, arm=arm,
    )
    for r in responses:
        msg = event.responses.add(response_id=r.response_id, text=r.text, token_ids=r.token_ids,
                                  token_logprobs=r.logprobs, display_position=r.display_position)
        if r.reward is not None:
            msg.reward = r.reward
    return event


class EventPublisher:
    """Queues events and writes them to the bus from its own thread."""

    def __init__(self, bus: EventBus | None, topic: str, metrics: InferenceMetrics | None = None,
                 max_pending: int = 10_000, max_batch: int = 500) -> None:
        self.bus = bus
        self.topic = topic
        self.metrics = metrics
        self.max_pending = max_pending
        self.max_batch = max_batch
        self._items: deque[tuple[bytes, Callable[[], events_pb2.InferenceEvent]]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.on_published: Callable[[int], None] | None = None  # tests and the bench watch progress

    def start(self) -> "EventPublisher":
        if self.bus is not None:
            self._thread = threading.Thread(target=self._run, name="inference-events", daemon=True)
            self._thread.start()
        return self

    def publish(self, key: str, build: Callable[[], events_pb2.InferenceEvent]) -> None:
        """Never blocks and never raises: the event is queued, or dropped and counted. `build` runs on
        the writer thread, so hashing a large image and serializing stay off the event loop."""
        if self.bus is None:
            return
        with self._cond:
            if self._closed or len(self._items) >= self.max_pending:
                self._lost("backlog_full" if not self._closed else "closed", 1)
                return
            self._items.append((key.encode(), build))
            self._cond.notify()

    def close(self) -> None:
        """Writes what is queued, then stops (the bus stays the caller's to close)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items and self._closed:
                    return
                queued = [self._items.popleft() for _ in range(min(self.max_batch, len(self._items)))]
            batch = []
            for key, build in queued:
                try:
                    batch.append((key, build().SerializeToString()))
                except Exception:
                    log.exception("could not build an inference event")
                    self._lost("build_error", 1)
            if not batch:
                continue
            try:
                self.bus.publish_many(self.topic, batch)
            except Exception as e:  # BusError, or anything a bus implementation lets slip
                log.error("could not publish %d inference events: %s", len(batch), e)
                self._lost("bus_error", len(batch))
                continue
            if self.metrics:
                self.metrics.events_published.inc(len(batch))
            if self.on_published:
                self.on_published(len(batch))

    def _lost(self, reason: str, n: int) -> None:
        if self.metrics:
            self.metrics.event_failures.labels(reason).inc(n)
        if reason != "bus_error":
            log.warning("dropped %d inference event(s): %s", n, reason)
