"""Prometheus metrics of one feedback server, in its own registry (several servers can share a process)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PUBLISH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class FeedbackMetrics:
    def __init__(self, spooled: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        self._http = None

    def count_accepted(self, app_id: str, kinds: list[str]) -> None:
        for kind, n in Tally(kinds).items():
            self.accepted.labels(app_id, kind).inc(n)

    def serve_http(self, host: str, port: int) -> int:
        """Serves /metrics on its own thread; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
