"""Event schema helpers shared by producers (services) and consumers (trainer)."""

from __future__ import annotations

import time
import uuid

from fuseloop.v1 import events_pb2

# The envelope version producers write; consumers refuse versions they do not know.
EVENT_SCHEMA_VERSION = 1
SIGNALS = ("thumbs", "rating", "preference", "correction", "implicit")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


def signal_kind(event: events_pb2.FeedbackEvent) -> str | None:
    """The feedback's kind ("thumbs", "rating", ...), or None when no signal is set."""
    return event.WhichOneof("signal")


def dead_letter(payload: bytes, source_topic: str, reason: str, event_id: str = "") -> bytes:
    return events_pb2.DeadLetter(payload=payload, source_topic=source_topic, reason=reason,
                                 timestamp_ms=now_ms(), event_id=event_id).SerializeToString()
