"""Continuous-batching generation: one loop, on a thread of its own or (in the server) as the main
thread of the engine process (`engine_process`).

Between two decode steps, new requests join (prefilled together first) and finished, expired or
cancelled ones leave. Sequences are grouped by the model version their request started on, so a
hot swap never moves a sequence to another model: during a swap two groups step side by side.

The model side is the version's family `Stepper` (fuseloop.families): `prefill` turns prompts
into rows of a `DecodeState`, `step` feeds one token per row. The batching here is the same for
every family. Within a group, every sequence keeps its own KV cache as one row of a batched,
left-padded cache: all rows grow by one token per step, so the previous step's `present` is the
next step's `past` and nothing is copied unless the group's membership changes; the cache mask
hides the padding on the left. Cross-attention memories of different lengths (none for a
decoder-only family) are right-padded and masked the same way.

An idle engine takes the first request at once (waiting at most the max queue delay, and only
for requests it knows are being preprocessed: the engine process knows of none). A busy one admits arrivals when there are enough to
encode together or the oldest has waited the max queue delay.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fuseloop.families import DecodeState
from fuseloop.preprocessing import pad_right
from fuseloop.sampling import sample_next, sequence_rng
from services.inference.metrics import InferenceMetrics
from services.inference.queueing import Cancelled, DeadlineExceeded, ModelFailure, QueueClosed, RequestQueue
from services.inference.runtime.base import LoadedVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceSpec:
    """How one candidate is sampled. Plain numbers, so a spec crosses to the engine process cheaply;
    the engine draws its uniforms from `sequence_rng(seed, index)` (None: unseeded)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None = None
    index: int = 0  # the candidate's index within its request

    def sampler(self) -> random.Random | None:
        return sequence_rng(self.seed, self.index) if self.temperature > 0 else None


@dataclass
class GeneratedSequence:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


TokenCallback = Callable[["GenerationJob", list[tuple[int, int]]], None]  # (candidate index, token id) per step


class GenerationJob:
    """One request: its inputs (already preprocessed), one spec per candidate, and where results go.

    `on_done(job, error)` and `on_tokens` are called on the engine thread; they must be quick.
    """

    def __init__(self, loaded: LoadedVersion, pixels: np.ndarray | bytes, prompt_ids: list[int], specs: list[SequenceSpec],
                 on_done: Callable[["GenerationJob", BaseException | None], None],
                 deadline: float | None = None, on_tokens: TokenCallback | None = None) -> None:
        self.loaded = loaded
        # (3, H, W) float32; the engine process also takes the image still encoded and decodes it
        self.pixels = pixels
        self.prompt_ids = prompt_ids
        self.specs = specs
        self.on_done = on_done
        self.on_tokens = on_tokens
        self.on_cancel: Callable[[], None] | None = None  # set by whoever runs the job elsewhere
        self.deadline = deadline
        self.size = len(specs)
        self.enqueued_at = 0.0
        self.started_at: float | None = None
        self.sequences = [GeneratedSequence() for _ in specs]
        self._remaining = len(specs)
        self._cancelled = False
        self._finished = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """The caller gave up (client cancelled): the engine drops it before the next step."""
        if not self._cancelled and not self._finished:
            self._cancelled = True
            if self.on_cancel is not None:
                self.on_cancel()

    def _finish(self, error: BaseException | None) -> None:
        if not self._finished:
            self._finished = True
            try:
                self.on_done(self, error)
            except Exception:
                log.exception("a generation callback failed")


class DecodeGroup:
    """The sequences of one model version, decoded together (see the module docstring). The rows'
    model state is the family's `DecodeState`; the group adds what sampling needs per row."""

    def __init__(self, loaded: LoadedVersion) -> None:
        self.loaded = loaded
        self.eos_id = loaded.preprocessor.eos_id
        self.state: DecodeState | None = None
        self.jobs: list[GenerationJob] = []  # per row
        self.index: list[int] = []  # candidate index per row
        self.generated = np.zeros(0, dtype=np.int64)  # tokens each row has fed so far
        self.temperature = np.zeros(0)
        self.top_p = np.zeros(0)
        self.max_new = np.zeros(0, dtype=np.int64)
        self.rngs: list[random.Random | None] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, jobs: list[GenerationJob], state: DecodeState) -> None:
        """Joins jobs' candidates: `state` holds one prefilled row per job, repeated per candidate."""
        sizes = [j.size for j in jobs]
        rows = state.repeat(sizes)
        self.state = rows if self.state is None else DecodeState.concat([self.state, rows])
        specs = [s for j in jobs for s in j.specs]
        self.generated = np.concatenate([self.generated, np.zeros(len(specs), dtype=np.int64)])
        self.temperature = np.concatenate([self.temperature, [s.temperature for s in specs]])
        self.top_p = np.concatenate([self.top_p, [s.top_p for s in specs]])
        self.max_new = np.concatenate([self.max_new, np.array([s.max_new_tokens for s in specs], dtype=np.int64)])
        self.rngs += [s.sampler() for s in specs]
        for j in jobs:
            self.jobs += [j] * j.size
            self.index += list(range(j.size))

    def keep(self, rows: np.ndarray) -> None:
        """Keeps the rows where `rows` is True; trims padding no remaining row needs."""
        idx = np.flatnonzero(rows)
        self.jobs = [self.jobs[i] for i in idx]
        self.index = [self.index[i] for i in idx]
        self.rngs = [self.rngs[i] for i in idx]
        for name in ("generated", "temperature", "top_p", "max_new"):
            setattr(self, name, getattr(self, name)[idx])
        self.state = self.state.take(idx) if len(idx) else None

    def step(self) -> np.ndarray:
        """Feeds each row's next token; returns the logits (B, V) for the token after it."""
        logits = self.loaded.stepper.step(self.state)
        self.generated = self.generated + 1
        return logits


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # sequences decoded together, across versions
    max_queue_delay_s: float = 0.002
    max_queue: int = 256


class GenerationEngine:
    """The engine loop, on a thread of its own (`start`) or on the caller's (`run`, as the engine
    process does). `queue` is where jobs come from; `on_iteration` runs after every pass of the
    loop (the engine process sends what the pass produced)."""

    def __init__(self, config: EngineConfig, metrics: InferenceMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, queue: RequestQueue[GenerationJob] | None = None,
                 on_iteration: Callable[[], None] | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.queue: RequestQueue[GenerationJob] = (queue if queue is not None else
                                                  RequestQueue(config.max_queue, config.max_queue_delay_s, clock))
        self.on_iteration = on_iteration
        self.groups: dict[LoadedVersion, DecodeGroup] = {}
        self._thread: threading.Thread | None = None

    # -- the event loop's side ------------------------------------------------------------------
    def start(self) -> "GenerationEngine":
        self._thread = threading.Thread(target=self.run, name="generation-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        for job in self.queue.close():
            job._finish(QueueClosed("the server is shutting down"))
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, job: GenerationJob) -> None:
        """Raises QueueFull or QueueClosed."""
        self.queue.put(job)

    @property
    def active_sequences(self) -> int:
        return sum(len(g) for g in self.groups.values())

    # -- the engine thread ----------------------------------------------------------------------
    def run(self) -> None:
        """Runs until the queue is closed and every admitted sequence has finished."""
        while True:
            arrivals: list[GenerationJob] = []
            try:
                active = self.active_sequences
                if not active or self._worth_admitting(active):
                    arrivals, dropped = self.queue.take(self.config.max_batch - active, block=active == 0,
                                                        admit_oversized=active == 0)
                    for job in dropped:
                        job._finish(self._why_dropped(job))
                if self.queue.closed and not arrivals and not self.groups:
                    return
                if arrivals:
                    self._admit(arrivals)
                for loaded in list(self.groups):
                    self._step(self.groups[loaded])
                    if not self.groups[loaded]:
                        del self.groups[loaded]
                if self.metrics:
                    self.metrics.active_sequences.set(self.active_sequences)
                    self.metrics.generate_queue_depth.set(len(self.queue))
                if self.on_iteration is not None:
                    self.on_iteration()
            except Exception as e:  # a bug here must fail the requests at hand, not stop the engine
                log.exception("generation engine step failed")
                failure = ModelFailure(f"generation failed: {e}")
                for job in {*arrivals, *(j for g in self.groups.values() for j in g.jobs)}:
                    job._finish(failure)
                self.groups.clear()

    def _worth_admitting(self, active: int) -> bool:
        """While decoding, arrivals join once there are enough of them to encode together (a quarter
        of the running batch) or the oldest has waited the max queue delay: one encode call per
        few steps instead of one per step."""
        waiting = self.queue.waiting()
        if not waiting:
            return False
        return waiting >= max(1, active // 4) or self.queue.oldest_wait() >= self.config.max_queue_delay_s

    def _why_dropped(self, job: GenerationJob) -> BaseException:
        if job.cancelled:
            return Cancelled("cancelled by the client")
        return DeadlineExceeded("the deadline passed before generation finished")

    def _admit(self, jobs: list[GenerationJob]) -> None:
        """Prefills arrivals, one batched call per version, and adds them to their version's group."""
        by_version: dict[LoadedVersion, list[GenerationJob]] = {}
        for job in jobs:
            by_version.setdefault(job.loaded, []).append(job)
        now = self.clock()
        for loaded, group_jobs in by_version.items():
            prompt_ids, prompt_mask = pad_right([j.prompt_ids for j in group_jobs], loaded.preprocessor.pad_id)
            pixels = np.stack([j.pixels for j in group_jobs])
            try:
                state = loaded.stepper.prefill(pixels, prompt_ids, prompt_mask)
            except Exception as e:
                log.exception("prefill failed for version %s", loaded.version)
                for job in group_jobs:
                    job._finish(ModelFailure(f"the model failed to encode the request: {e}"))
                continue
            group = self.groups.get(loaded)
            if group is None:
                group = self.groups[loaded] = DecodeGroup(loaded)
            for job in group_jobs:
                job.started_at = now
            group.add(group_jobs, state)
            if self.metrics:
                self.metrics.encode_batch.observe(len(group_jobs))
                for job in group_jobs:
                    self.metrics.generate_queue_time.observe(now - job.enqueued_at)

    def _step(self, group: DecodeGroup) -> None:
        now = self.clock()
        live = np.array([not (j.cancelled or (j.deadline is not None and now > j.deadline)) for j in group.jobs], dtype=bool)
        if not live.all():
            for job in {j for j, ok in zip(group.jobs, live) if not ok}:
                job._finish(self._why_dropped(job))
            group.keep(live)
            if not len(group):
                return
        try:
            logits = group.step()
        except Exception as e:
            log.exception("decode step failed for version %s", group.loaded.version)
            for job in set(group.jobs):
                job._finish(ModelFailure(f"the model failed during decoding: {e}"))
            group.keep(np.zeros(len(group), dtype=bool))
            return
        B = len(group)
        uniforms = np.array([rng.random() if rng is not None else 0.0 for rng in group.rngs])
        tokens, logprobs = sample_next(logits, group.temperature, group.top_p, uniforms)
        group.state.tokens = tokens
        finished = (tokens == group.eos_id) | (group.generated >= group.max_new)
        streamed: dict[GenerationJob, list[tuple[int, int]]] = {}
        tok_list, lp_list, fin_list = tokens.tolist(), logprobs.tolist(), finished.tolist()
        for r in range(B):
            job, i = group.jobs[r], group.index[r]
            seq = job.sequences[i]
            seq.token_ids.append(tok_list[r])
            seq.logprobs.append(lp_list[r])
            if job.on_tokens is not None:
                streamed.setdefault(job, []).append((i, tok_list[r]))
            if fin_list[r]:
                job._remaining -= 1
        for job, items in streamed.items():
            try:
                job.on_tokens(job, items)
            except Exception:
                log.exception("a token callback failed")
        if finished.any():
            for r in np.flatnonzero(finished):
                job = group.jobs[r]
                if job._remaining == 0:
                    job._finish(None)
            group.keep(~finished)
        if self.metrics:
            self.metrics.decode_batch.observe(B)
            self.metrics.count_tokens(B)
