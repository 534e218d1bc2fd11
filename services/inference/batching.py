"""One dynamic batcher for every batched model call in this process (Score's reward model, and
KServe ModelInfer on models whose config.pbtxt has `dynamic_batching`).

A dedicated thread takes jobs out of a `RequestQueue` (max batch rows, max queue delay,
deadlines, cancellation), groups them by `job.key` (what a model call must agree on: the version,
and for KServe the shapes that cannot be padded), and hands each group to `run`, which returns one
result per job. A result that is an exception fails that job alone, so a request the model refuses
does not take its batch-mates down with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from services.inference.queueing import Cancelled, DeadlineExceeded, ModelFailure, QueueClosed, RequestQueue

log = logging.getLogger(__name__)


class BatchJob:
    """One request's rows. `on_done(job, result | None, error)` is called on the batcher thread."""

    def __init__(self, key: Hashable, size: int, on_done: Callable[[Any, Any, BaseException | None], None],
                 deadline: float | None = None) -> None:
        self.key = key
        self.size = size
        self.on_done = on_done
        self.deadline = deadline
        self.enqueued_at = 0.0
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled = True

    def finish(self, result: Any, error: BaseException | None) -> None:
        try:
            self.on_done(self, result, error)
        except Exception:
            log.exception("a batch job's callback failed")


J = TypeVar("J", bound=BatchJob)
# (key, jobs) -> one result per job, in order; an exception as a result fails that job alone.
RunBatch = Callable[[Hashable, list[J]], Sequence[Any]]


@dataclass
class BatchMetrics:
    """Prometheus children a batcher updates (any may be None)."""
    batch_rows: Any = None  # Histogram: rows per model call
    queue_time: Any = None  # Histogram: seconds from submission to the model call
    queue_depth: Any = None  # Gauge: jobs waiting


class Batcher(Generic[J]):
    def __init__(self, name: str, run: RunBatch, max_batch: int, max_queue_delay_s: float, max_queue: int,
                 metrics: BatchMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.run = run
        self.max_batch = max_batch
        self.metrics = metrics or BatchMetrics()
        self.clock = clock
        self.queue: RequestQueue[J] = RequestQueue(max_queue, max_queue_delay_s, clock)
        self._thread: threading.Thread | None = None
        self._last_rows = 0

    def configure(self, max_batch: int, max_queue_delay_s: float) -> None:
        """New limits for the batches to come (KServe follows the model's config.pbtxt)."""
        self.max_batch = max_batch
        self.queue.max_delay_s = max_queue_delay_s

    def start(self) -> "Batcher[J]":
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for job in self.queue.close():
            job.finish(None, QueueClosed("the server is shutting down"))
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, job: J) -> None:
        self.queue.put(job)

    def _loop(self) -> None:
        while True:
            jobs, dropped = self.queue.take(self.max_batch, block=True, admit_oversized=True, expect=self._last_rows)
            self._last_rows = sum(j.size for j in jobs)
            for job in dropped:
                job.finish(None, Cancelled("cancelled by the client") if job.cancelled
                           else DeadlineExceeded(f"the deadline passed before {self.name} ran"))
            if not jobs:
                if self.queue.closed:
                    return
                continue
            groups: dict[Hashable, list[J]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for key, group in groups.items():
                self._run_group(key, group)
            if self.metrics.queue_depth is not None:
                self.metrics.queue_depth.set(len(self.queue))

    def _run_group(self, key: Hashable, jobs: list[J]) -> None:
        now = self.clock()
        try:
            results = self.run(key, jobs)
        except Exception as e:  # a model or batching fault fails these requests, never the batcher
            log.exception("%s failed", self.name)
            results = [ModelFailure(f"{self.name} failed: {e}")] * len(jobs)
        m = self.metrics
        if m.batch_rows is not None:
            m.batch_rows.observe(sum(j.size for j in jobs))
        if m.queue_time is not None:
            for job in jobs:
                m.queue_time.observe(now - job.enqueued_at)
        for job, result in zip(jobs, results):
            if isinstance(result, BaseException):
                job.finish(None, result)
            else:
                job.finish(result, None)
