"""Prometheus metrics of one server instance, in its own registry (no process-global state), so
several servers (tests, benchmarks) can live in one process."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from fuseloop.metrics import MetricsRegistry
from services.inference.batching import BatchMetrics
from services.inference.process_memory import peak_rss_bytes

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class InferenceMetrics(MetricsRegistry):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("fuseloop_inference_requests", "RPCs answered, by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("fuseloop_inference_latency_seconds", "RPC latency, by method", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.version_latency = Histogram("fuseloop_inference_version_latency_seconds",
                                         "Generate latency by model version and arm (stable, canary), to compare them",
                                         ["method", "version", "arm"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("fuseloop_inference_queue_seconds", "Time from submission to the first model call",
                                    ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("fuseloop_inference_batch_size", "Rows per model call, by kind (encode, decode, score)",
                                    ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.tokens = Counter("fuseloop_inference_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_second = Gauge("fuseloop_inference_tokens_per_second", "Generated tokens/s over the last second",
                                       registry=r)
        self.serving_version = Gauge("fuseloop_inference_serving_version", "The model version serving new requests",
                                     registry=r)
        self.queue_depth = Gauge("fuseloop_inference_queue_depth", "Requests waiting for the engine, by kind", ["kind"],
                                 registry=r)
        self.active_sequences = Gauge("fuseloop_inference_active_sequences", "Sequences being decoded", registry=r)
        self.events_published = Counter("fuseloop_inference_events_published", "Inference events on the bus", registry=r)
        self.event_failures = Counter("fuseloop_inference_event_failures",
                                      "Inference events lost (bus error or publish backlog full)", ["reason"], registry=r)
        self.kserve_internal_errors = Counter("fuseloop_kserve_internal_errors",
                                              "KServe v2 calls answered INTERNAL (server faults, logged)", registry=r)
        self.kserve_batch_size = Histogram("fuseloop_kserve_batch_size", "Rows per KServe ModelInfer model call, by model",
                                           ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.deploys = Counter("fuseloop_inference_deploys", "Version swaps", registry=r)
        self.responses = Counter("fuseloop_inference_responses", "Generate calls answered, by model version and "
                                 "arm (stable, canary)", ["version", "arm"], registry=r)
        self.desired_version = Gauge("fuseloop_inference_desired_version",
                                     "The version the fleet's serving record says should serve", registry=r)
        self.desired_serving = Gauge("fuseloop_inference_desired_version_serving",
                                     "1: this replica serves the desired version; 0: not yet, or it could not "
                                     "load it (it keeps serving what it has and retries)", ["version"], registry=r)
        self.peak_rss = Gauge("fuseloop_inference_process_peak_rss_bytes",
                              "Peak resident memory (VmHWM) of the server process and of its engine process",
                              ["process"], registry=r)
        # Children the worker threads update on every step, looked up once.
        self.encode_batch, self.decode_batch, self.score_batch = (self.batch_size.labels(k) for k in ("encode", "decode", "score"))
        self.generate_queue_time, self.score_queue_time = (self.queue_time.labels(k) for k in ("generate", "score"))
        self.generate_queue_depth, self.score_queue_depth = (self.queue_depth.labels(k) for k in ("generate", "score"))
        self._window_start = time.monotonic()
        self._window_tokens = 0
        self._lock = threading.Lock()

    def watch_peak_rss(self, process: str, pid: Callable[[], int | None]) -> None:
        """Reads `process`'s peak RSS at each scrape; `pid` is asked each time (a restarted engine
        process has a new one); NaN while it has none."""
        def read() -> float:
            value = peak_rss_bytes(pid())
            return math.nan if value is None else float(value)

        self.peak_rss.labels(process).set_function(read)

    def score_batching(self) -> BatchMetrics:
        return BatchMetrics(self.score_batch, self.score_queue_time, self.score_queue_depth)

    def kserve_batching(self, model: str) -> BatchMetrics:
        return BatchMetrics(self.kserve_batch_size.labels(model), self.queue_time.labels("kserve"))

    def count_tokens(self, n: int) -> None:
        self.tokens.inc(n)
        with self._lock:
            self._window_tokens += n
            now = time.monotonic()
            if now - self._window_start >= 1.0:
                self.tokens_per_second.set(self._window_tokens / (now - self._window_start))
                self._window_start, self._window_tokens = now, 0
