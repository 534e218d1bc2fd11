"""Prometheus metrics of one feedback server, in its own registry (several servers can share a process)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from fuseloop.metrics import MetricsRegistry

PUBLISH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class FeedbackMetrics(MetricsRegistry):
    def __init__(self, spooled: Callable[[], float] | None = None) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("fuseloop_feedback_requests", "RPCs answered, by method and status code", ["method", "code"], registry=r)
        self.accepted = Counter("fuseloop_feedback_events_accepted", "Events written durably, by app and kind", ["app", "kind"], registry=r)
        self.duplicates = Counter("fuseloop_feedback_events_duplicate", "Resubmitted events not written again", ["app"], registry=r)
        self.publish_seconds = Histogram(
            "fuseloop_feedback_publish_seconds", "Time until the bus says a write is durable", buckets=PUBLISH_BUCKETS, registry=r
        )
        # Events that wait in the local spool because Kafka is away: alert when this grows.
        self.spooled = Gauge("fuseloop_feedback_spooled_events", "Events in the local spool waiting for Kafka", registry=r)
        if spooled is not None:
            self.spooled.set_function(spooled)

    def count_accepted(self, app_id: str, kinds: list[str]) -> None:
        for kind, n in Tally(kinds).items():
            self.accepted.labels(app_id, kind).inc(n)
