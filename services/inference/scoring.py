"""Batched reward-model scoring on a dedicated thread: concurrent Score requests (and best_of
reranking) share one padded model call per version."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from fuseloop.preprocessing import pad_right
from services.inference.metrics import InferenceMetrics
from services.inference.queueing import Cancelled, DeadlineExceeded, ModelFailure, QueueClosed, RequestQueue
from services.inference.runtime.base import LoadedVersion

log = logging.getLogger(__name__)


class ScoreJob:
    """Rows (image, prompt, response) of one request; `on_done(job, rewards | None, error)` is
    called on the scoring thread."""

    def __init__(self, loaded: LoadedVersion, pixels: np.ndarray, prompt_ids: list[int], responses: list[list[int]],
                 on_done: Callable[["ScoreJob", np.ndarray | None, BaseException | None], None],
                 deadline: float | None = None) -> None:
        self.loaded = loaded
        self.pixels = pixels  # (3, H, W), shared by all rows
        self.prompt_ids = prompt_ids
        self.responses = responses  # decoder inputs: [BOS] + tokens + [EOS]
        self.on_done = on_done
        self.deadline = deadline
        self.size = len(responses)
        self.enqueued_at = 0.0
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled = True

    def _finish(self, rewards: np.ndarray | None, error: BaseException | None) -> None:
        try:
            self.on_done(self, rewards, error)
        except Exception:
            log.exception("a score callback failed")


class ScoreBatcher:
    def __init__(self, max_batch: int, max_queue_delay_s: float, max_queue: int,
                 metrics: InferenceMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_batch = max_batch
        self.metrics = metrics
        self.clock = clock
        self.queue: RequestQueue[ScoreJob] = RequestQueue(max_queue, max_queue_delay_s, clock)
        self._thread: threading.Thread | None = None

    def start(self) -> "ScoreBatcher":
        self._thread = threading.Thread(target=self._run, name="score-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for job in self.queue.close():
            job._finish(None, QueueClosed("the server is shutting down"))
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, job: ScoreJob) -> None:
        self.queue.put(job)

    def _run(self) -> None:
        while True:
            jobs, dropped = self.queue.take(self.max_batch, block=True, admit_oversized=True)
            for job in dropped:
                job._finish(None, Cancelled("cancelled by the client") if job.cancelled
                            else DeadlineExceeded("the deadline passed before scoring"))
            if not jobs:
                if self.queue.closed:
                    return
                continue
            by_version: dict[LoadedVersion, list[ScoreJob]] = {}
            for job in jobs:
                by_version.setdefault(job.loaded, []).append(job)
            for loaded, group in by_version.items():
                try:
                    self._score(loaded, group)
                except Exception as e:  # a bug here must fail these requests, not stop the scorer
                    log.exception("scoring failed")
                    for job in group:
                        job._finish(None, ModelFailure(f"scoring failed: {e}"))
            if self.metrics:
                self.metrics.score_queue_depth.set(len(self.queue))

    def _score(self, loaded: LoadedVersion, jobs: list[ScoreJob]) -> None:
        now = self.clock()
        pad = loaded.preprocessor.pad_id
        sizes = [j.size for j in jobs]
        pixels = np.repeat(np.stack([j.pixels for j in jobs]), sizes, axis=0)
        prompt_ids, prompt_mask = pad_right([j.prompt_ids for j in jobs for _ in range(j.size)], pad)
        response_ids, response_mask = pad_right([r for j in jobs for r in j.responses], pad)
        try:
            rewards = np.asarray(loaded.score(pixels, prompt_ids, prompt_mask, response_ids, response_mask))
        except Exception as e:
            log.exception("scoring failed for version %s", loaded.version)
            for job in jobs:
                job._finish(None, ModelFailure(f"the reward model failed: {e}"))
            return
        if self.metrics:
            self.metrics.score_batch.observe(len(rewards))
            for job in jobs:
                self.metrics.score_queue_time.observe(now - job.enqueued_at)
        start = 0
        for job in jobs:
            job._finish(rewards[start:start + job.size].astype(np.float32), None)
            start += job.size
