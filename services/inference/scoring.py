"""Batched reward-model scoring: concurrent Score requests (and best_of reranking) share one padded
model call per version, through the process's one `Batcher`."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from fuseloop.preprocessing import pad_right
from services.inference.batching import BatchJob, BatchMetrics, Batcher
from services.inference.runtime.base import LoadedVersion


class ScoreJob(BatchJob):
    """Rows (image, prompt, response) of one request; `on_done(job, rewards | None, error)` is
    called on the batcher thread."""

    def __init__(self, loaded: LoadedVersion, pixels: np.ndarray, prompt_ids: list[int], responses: list[list[int]],
                 on_done: Callable[["ScoreJob", np.ndarray | None, BaseException | None], None],
                 deadline: float | None = None) -> None:
        super().__init__(loaded, len(responses), on_done, deadline)
        self.loaded = loaded
        self.pixels = pixels  # (3, H, W), shared by all rows
        self.prompt_ids = prompt_ids
        self.responses = responses  # decoder inputs: [BOS] + tokens + [EOS]


def score_jobs(loaded: LoadedVersion, jobs: list[ScoreJob]) -> list[np.ndarray]:
    """One padded reward-model call for all the jobs' rows; each job gets its own rewards."""
    pad = loaded.preprocessor.pad_id
    sizes = [j.size for j in jobs]
    pixels = np.repeat(np.stack([j.pixels for j in jobs]), sizes, axis=0)
    prompt_ids, prompt_mask = pad_right([j.prompt_ids for j in jobs for _ in range(j.size)], pad)
    response_ids, response_mask = pad_right([r for j in jobs for r in j.responses], pad)
    rewards = np.asarray(loaded.score(pixels, prompt_ids, prompt_mask, response_ids, response_mask), dtype=np.float32)
    bounds = np.cumsum([0] + sizes)
    return [rewards[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def score_batcher(max_batch: int, max_queue_delay_s: float, max_queue: int, metrics: BatchMetrics | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Batcher[ScoreJob]:
    return Batcher("the reward model", score_jobs, max_batch, max_queue_delay_s, max_queue, metrics, clock)
