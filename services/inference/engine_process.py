"""The generation engine in a process of its own.

Python runs one thread of a process at a time (the GIL). With the engine on a thread beside the
event loop, every decode step waited for the busy loop to hand the GIL back, and the loop waited
for the engine's numpy work: at 32 concurrent clients a decode step took 2.7 ms inside the server
against 0.9 ms for the same engine alone. So, as vLLM's engine core does, the server keeps gRPC,
checks, tokenization and scoring in its own process and runs the engine in a child with its own
interpreter, which also decodes small images (the event loop is the server's busiest thread).
Two pipes connect them:

- down (server -> engine): submit a job, cancel one, load or unload a version, ask which
  versions are resident, stop;
- up (engine -> server): after a pass of the engine loop that finished a job or streamed tokens,
  one message with those and the engine's metric observations (metrics alone at most every
  `STATS_EVERY_S`); and the answers to loads and questions.

The child loads only the generation graphs of a version (`GENERATION_GRAPHS`); the server loads
the reward graph, so no graph is held twice.

The child's engine loop reads the down pipe between decode steps, on its only busy thread, so
nothing in it waits for a GIL. Versions load on a helper thread, beside the running engine. If
the child dies, the jobs it held fail and a new child loads the same versions.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import pickle
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fuseloop.preprocessing import InvalidInput, PreprocessConfig, image_pixels
from fuseloop.repository import ModelRepository, RepositoryError
from services.inference.engine import EngineConfig, GenerationEngine, GenerationJob, SequenceSpec
from services.inference.metrics import InferenceMetrics
from services.inference.queueing import Arrival, ModelFailure, QueueClosed, QueueFull, RequestQueue
from services.inference.runtime.base import GENERATION_GRAPHS, LoadedVersion, ModelRuntime, RuntimeError_

log = logging.getLogger(__name__)

PICKLE = pickle.HIGHEST_PROTOCOL
STATS_EVERY_S = 0.1


class EngineProcessGone(ModelFailure):
    """The engine process exited; the requests it held fail (INTERNAL)."""


class _Readable:
    """`conn.poll()` builds a selector on every call; this registers the pipe once."""

    def __init__(self, conn) -> None:
        self._poller = select.poll()
        self._poller.register(conn.fileno(), select.POLLIN)

    def __call__(self, timeout_ms: int | None = 0) -> bool:
        return bool(self._poller.poll(timeout_ms))


# -- the server's side ---------------------------------------------------------------------------
class ForwardingQueue(RequestQueue[GenerationJob]):
    """The engine's queue as the server sees it: bounds the requests in the engine (waiting or
    decoding) and hands each one on instead of keeping it."""

    def __init__(self, capacity: int, forward: Callable[[GenerationJob], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(capacity, 0.0, clock)
        self._forward = forward
        self.in_engine = 0
        self.closed_because = "the server is shutting down"

    def _put(self, item: GenerationJob, arrival: Arrival | None) -> None:
        with self._cond:
            if arrival is not None:
                arrival._close_locked()
            if self._closed:
                raise QueueClosed(self.closed_because)
            if self.in_engine >= self.capacity:
                raise QueueFull(f"{self.in_engine} requests are already in the engine (the limit is {self.capacity}); "
                                "retry later")
            self.in_engine += 1
            item.enqueued_at = self.clock()
        self._forward(item)

    def finished(self) -> None:
        with self._cond:
            self.in_engine -= 1

    def reopen(self) -> None:
        """A new engine process took over: nothing is in it yet."""
        with self._cond:
            self._closed = False
            self.in_engine = 0


class EngineProcess:
    """The engine in a child process, with the surface the service uses: `queue.arriving()` and
    `submit(job)`. Job callbacks run on the event loop that started it. It also keeps the child's
    versions in step with the deployment (`load` before a version serves, `unload` after)."""

    def __init__(self, runtime: ModelRuntime, repo: ModelRepository, config: EngineConfig,
                 metrics: InferenceMetrics, image_limits: tuple[int, int] = (1 << 62, 1 << 62),
                 on_exit: Callable[[BaseException], object] | None = None,
                 on_restart: Callable[[], object] | None = None, max_restarts: int = 3,
                 start_timeout_s: float = 120.0) -> None:
        """image_limits: the service's (max bytes, max pixels) for images the child decodes. If the
        child dies, `on_exit` is called, then a new child is started with the same versions (at
        most `max_restarts` times in the server's life) and `on_restart` is called."""
        self.config = config
        self.metrics = metrics
        self.on_exit, self.on_restart = on_exit, on_restart  # called on the event loop
        self.max_restarts = max_restarts
        self.restarts = 0
        self.start_timeout_s = start_timeout_s
        self.queue = ForwardingQueue(config.max_queue + config.max_batch, self.submit)
        self._child_args = (runtime.worker_factory(), str(repo.root), config, image_limits)
        self._versions: set[int] = set()  # loaded in the child and not unloaded: what a restart loads again
        self._jobs: dict[int, GenerationJob] = {}
        self._loads: dict[int, asyncio.Future] = {}
        self._questions: list[asyncio.Future] = []  # resident() calls, answered in order
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._gone = False
        self._stopping = False
        self._spawn()

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads, locks or sessions
        down_r, self._down = ctx.Pipe(duplex=False)
        self._up, up_w = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_child_main, name="fuseloop-engine", daemon=True,
                                    args=(*self._child_args, down_r, up_w))
        self._child_ends = (down_r, up_w)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def start(self) -> "EngineProcess":
        self._loop = asyncio.get_running_loop()
        try:
            await self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    async def _launch(self) -> None:
        self._ready = self._loop.create_future()
        self._gone = False
        self._process.start()
        for end in self._child_ends:  # the child holds them now; the pipes close when it exits
            end.close()
        self._readable = _Readable(self._up)
        self._loop.add_reader(self._up.fileno(), self._on_readable)
        await asyncio.wait_for(asyncio.shield(self._ready), self.start_timeout_s)

    async def _restart(self) -> None:
        self.restarts += 1
        log.warning("starting a new generation engine process (restart %d of at most %d)", self.restarts,
                    self.max_restarts)
        try:
            self._spawn()
            await self._launch()
            for version in sorted(self._versions):
                await self.load(version)
        except Exception:  # a child that dies again has already scheduled the next attempt
            log.exception("the new generation engine process did not start")
            if self._process.is_alive():
                self._process.kill()
            return
        self.queue.reopen()
        if self.on_restart is not None:
            _call_on_loop(self._loop, self.on_restart)

    # -- requests -------------------------------------------------------------------------------
    def submit(self, job: GenerationJob) -> None:
        """Called by `queue` once the job is admitted (bounded); raises QueueClosed when the child is
        gone. The job's deadline is time.monotonic(), a clock both processes read alike."""
        if self._gone:
            self.queue.finished()
            raise QueueClosed(self.queue.closed_because)
        jid = next(self._ids)
        try:
            self._send(("submit", (jid, job.loaded.version, job.pixels, job.prompt_ids, job.specs, job.deadline,
                                   job.on_tokens is not None)))
        except OSError:  # the child died and the event loop has not heard yet
            self.queue.finished()
            raise QueueClosed("the generation engine process exited; the server needs a restart") from None
        self._jobs[jid] = job
        job.on_cancel = lambda: self._cancel(jid)

    def _cancel(self, jid: int) -> None:
        if not self._gone and jid in self._jobs:
            try:
                self._send(("cancel", jid))
            except OSError:  # the child is gone; its exit fails the job
                pass

    # -- versions (the deployment's mirror) -----------------------------------------------------
    async def load(self, version: int) -> None:
        """Loads and warms `version` in the child; raises RepositoryError when a graph doesn't
        match the manifest, RuntimeError_ when it could not load otherwise."""
        if self._gone:
            raise RuntimeError_("the generation engine is not running")
        future = self._loads[version] = self._loop.create_future()
        self._send(("load", version))
        await future
        self._versions.add(version)

    def unload(self, version: int) -> None:
        self._versions.discard(version)
        if not self._gone:
            self._send(("unload", version))

    async def resident(self) -> dict[int, list[str]]:
        """The versions the child holds (loaded, or unloaded but still finishing requests) -> the
        graphs it loaded of each."""
        if self._gone:
            raise RuntimeError_("the generation engine is not running")
        future = self._loop.create_future()
        self._questions.append(future)
        self._send(("resident", None))
        return await future

    # -- lifecycle ------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the child: jobs still waiting fail with QueueClosed, decoding ones finish first.
        Callable from any thread."""
        self._stopping = True
        self.queue.close()
        if self._process.is_alive():
            try:
                self._send(("stop", None))
            except OSError:
                pass
            self._process.join(timeout_s)
        if self._process.is_alive():
            log.error("the engine process did not stop in %.0f s; killing it", timeout_s)
            self._process.kill()
            self._process.join()
        loop = getattr(self, "_loop", None)
        if loop is None:  # never started
            return
        done = threading.Event()

        def detach() -> None:
            self._on_readable()  # what the child sent before exiting
            self._child_gone(QueueClosed("the server is shutting down"))
            done.set()

        if loop.is_closed() or _running_loop() is loop:
            detach()
        else:
            loop.call_soon_threadsafe(detach)
            done.wait(timeout_s)

    def _send(self, message: tuple) -> None:
        data = pickle.dumps(message, PICKLE)
        with self._send_lock:
            self._down.send_bytes(data)

    def _on_readable(self) -> None:
        """On the event loop: everything the child has sent so far."""
        try:
            while not self._gone and self._readable():
                kind, payload = pickle.loads(self._up.recv_bytes())
                if kind == "pass":
                    self._apply_pass(*payload)
                elif kind == "loaded":
                    version, error, mismatch = payload
                    future = self._loads.pop(version, None)
                    if future is not None and not future.done():
                        if error:  # a graph that doesn't match its manifest is the artifact's fault, as here
                            future.set_exception(RepositoryError(error) if mismatch else RuntimeError_(error))
                        else:
                            future.set_result(None)
                elif kind == "resident":
                    future = self._questions.pop(0)
                    if not future.done():
                        future.set_result(payload)
                elif kind == "ready":
                    self._ready.set_result(None)
        except (EOFError, OSError):
            self._child_gone(QueueClosed("the server is shutting down") if self._stopping else
                             EngineProcessGone(f"the generation engine process exited (code {self._process.exitcode})"))

    def _apply_pass(self, finished: list, streamed: list, stats: "PassStats") -> None:
        for jid, items in streamed:
            job = self._jobs.get(jid)
            if job is not None and job.on_tokens is not None:
                job.on_tokens(job, items)
        for jid, sequences, error in finished:
            job = self._jobs.pop(jid, None)
            if job is None:
                continue
            self.queue.finished()
            for seq, (token_ids, logprobs) in zip(job.sequences, sequences):
                seq.token_ids, seq.logprobs = token_ids, logprobs
            job._finish(error)
        stats.apply(self.metrics)

    def _child_gone(self, error: BaseException) -> None:
        if self._gone:
            return
        self._gone = True
        restart = not self._stopping and self.restarts < self.max_restarts
        if not self._stopping:
            self.queue.closed_because = ("the generation engine process exited; " +
                                         ("a new one is starting" if restart else "the server needs a restart"))
        self.queue.close()
        if not self._loop.is_closed():
            self._loop.remove_reader(self._up.fileno())
        self._up.close()
        if not self._ready.done():
            self._ready.set_exception(RuntimeError_(f"the generation engine process did not start: {error}"))
        for future in [*self._loads.values(), *self._questions]:
            if not future.done():
                future.set_exception(RuntimeError_(str(error)))
        self._questions = []
        jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            job._finish(error)
        if not self._stopping:
            log.error("%s", error)
            if self.on_exit is not None:
                _call_on_loop(self._loop, self.on_exit, error)
            if restart:
                self._loop.create_task(self._restart())


def _call_on_loop(loop: asyncio.AbstractEventLoop, callback: Callable, *args: object) -> None:
    """Calls a callback that may be a coroutine function (then it runs as a task)."""
    result = callback(*args)
    if asyncio.iscoroutine(result):
        loop.create_task(result)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# -- metrics, observed in the child and applied in the server ------------------------------------
class _Observed:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


class _Last:
    def __init__(self) -> None:
        self.value = 0

    def set(self, value: int) -> None:
        self.value = value


class EngineObservations:
    """Stands in for InferenceMetrics in the child (the engine's part of it), collecting what one
    pass of the engine loop observed."""

    def __init__(self) -> None:
        self.encode_batch, self.decode_batch, self.generate_queue_time = _Observed(), _Observed(), _Observed()
        self.active_sequences, self.generate_queue_depth = _Last(), _Last()
        self.tokens = 0

    def count_tokens(self, n: int) -> None:
        self.tokens += n

    def pending(self) -> bool:
        return bool(self.encode_batch.values or self.decode_batch.values or self.generate_queue_time.values)

    def take(self) -> "PassStats":
        stats = PassStats(self.encode_batch.values, self.decode_batch.values, self.generate_queue_time.values,
                          self.tokens, self.active_sequences.value, self.generate_queue_depth.value)
        self.encode_batch.values, self.decode_batch.values, self.generate_queue_time.values = [], [], []
        self.tokens = 0
        return stats


@dataclass
class PassStats:
    encode_batches: list[float] = field(default_factory=list)
    decode_batches: list[float] = field(default_factory=list)
    queue_times: list[float] = field(default_factory=list)
    tokens: int = 0
    active: int = 0
    queue_depth: int = 0

    def apply(self, metrics: InferenceMetrics) -> None:
        for x in self.encode_batches:
            metrics.encode_batch.observe(x)
        for x in self.decode_batches:
            metrics.decode_batch.observe(x)
        for x in self.queue_times:
            metrics.generate_queue_time.observe(x)
        if self.tokens:
            metrics.count_tokens(self.tokens)
        metrics.active_sequences.set(self.active)
        metrics.generate_queue_depth.set(self.queue_depth)


# -- the child's side ----------------------------------------------------------------------------
class PipeQueue(RequestQueue[GenerationJob]):
    """The child's engine queue, filled from the down pipe whenever the engine looks at it: between
    decode steps, or blocking while it is idle. Control messages are handled on the way."""

    def __init__(self, capacity: int, pipe, handle: Callable[[str, object], None],
                 before_blocking: Callable[[], None]) -> None:
        super().__init__(capacity, 0.0)
        self._pipe = pipe
        self._readable = _Readable(pipe)
        self._handle = handle
        self._before_blocking = before_blocking  # sends what handling messages produced (refusals)

    def drain(self, block: bool) -> None:
        try:
            if block:
                self._readable(None)
            while self._readable():
                self._handle(*pickle.loads(self._pipe.recv_bytes()))
        except (EOFError, OSError):  # the server is gone
            self._handle("stop", None)

    def waiting(self) -> int:
        self.drain(block=False)
        return super().waiting()

    def take(self, room: int, block: bool, admit_oversized: bool) -> tuple[list[GenerationJob], list[GenerationJob]]:
        self.drain(block=False)
        while block and not self._items and not self._closed:
            self._before_blocking()
            self.drain(block=True)
        return super().take(room, False, admit_oversized)


class EngineWorker:
    """The child: a GenerationEngine on its main thread, fed from the down pipe, reporting up."""

    def __init__(self, runtime: ModelRuntime, repo: ModelRepository, config: EngineConfig,
                 image_limits: tuple[int, int], down, up) -> None:
        self.runtime = runtime
        self.repo = repo
        self.image_limits = image_limits
        self.up = up
        self.versions: dict[int, LoadedVersion] = {}
        self.image_configs: dict[int, PreprocessConfig] = {}
        self.jobs: dict[int, GenerationJob] = {}
        self.retiring: list[LoadedVersion] = []
        self.finished: list = []
        self.streamed: list = []
        self.observations = EngineObservations()
        self._stats_sent = 0.0
        self._send_lock = threading.Lock()
        # The server bounds what it sends (ForwardingQueue); this queue never refuses.
        queue = PipeQueue(1 << 30, down, self._handle, before_blocking=self._report)
        self.engine = GenerationEngine(config, self.observations, queue=queue, on_iteration=self._report)

    def run(self) -> None:
        self._send(("ready", None))
        self.engine.run()
        self._report()
        for loaded in [*self.versions.values(), *self.retiring]:
            loaded.close()

    def _handle(self, kind: str, payload) -> None:
        if kind == "submit":
            self._submit(*payload)
        elif kind == "cancel":
            job = self.jobs.get(payload)
            if job is not None:
                job.cancel()
        elif kind == "load":
            threading.Thread(target=self._load, args=(payload,), name=f"load-v{payload}", daemon=True).start()
        elif kind == "unload":  # new jobs can't use it; closed once no sequence or queued job does
            loaded = self.versions.pop(payload, None)
            self.image_configs.pop(payload, None)
            if loaded is not None:
                self.retiring.append(loaded)
                self._close_retired()
        elif kind == "resident":
            held = [*self.versions.values(), *self.retiring]
            self._send(("resident", {v.version: sorted(v.graphs) for v in sorted(held, key=lambda v: v.version)}))
        elif kind == "stop":
            for job in self.engine.queue.close():
                job._finish(QueueClosed("the server is shutting down"))

    def _submit(self, jid: int, version: int, pixels: np.ndarray | bytes, prompt_ids: list[int],
                specs: list[SequenceSpec], deadline: float | None, streams: bool) -> None:
        loaded = self.versions.get(version)
        if loaded is None:
            self.finished.append((jid, [], ModelFailure(f"version {version} is not loaded in the engine")))
            return
        if isinstance(pixels, bytes):
            try:
                pixels = image_pixels(pixels, self.image_configs[version])
            except InvalidInput as e:
                self.finished.append((jid, [], e))
                return
        job = GenerationJob(loaded, pixels, prompt_ids, specs, on_done=self._done, deadline=deadline,
                            on_tokens=self._tokens if streams else None)
        job.jid = jid
        self.jobs[jid] = job
        self.engine.queue.put(job)

    def _done(self, job: GenerationJob, error: BaseException | None) -> None:
        self.jobs.pop(job.jid, None)
        self.finished.append((job.jid, [(s.token_ids, s.logprobs) for s in job.sequences], error))

    def _tokens(self, job: GenerationJob, items: list[tuple[int, int]]) -> None:
        self.streamed.append((job.jid, items))

    def _report(self) -> None:
        """Sends what this pass of the engine loop produced, in one message: at once when a job
        finished or streamed, else the metrics alone at most every `STATS_EVERY_S` (a message per
        decode step would cost both processes a wake-up per step)."""
        if self.retiring:
            self._close_retired()
        now = time.monotonic()
        if self.finished or self.streamed or (now - self._stats_sent >= STATS_EVERY_S and self.observations.pending()):
            message = ("pass", (self.finished, self.streamed, self.observations.take()))
            self.finished, self.streamed = [], []
            self._stats_sent = now
            self._send(message)

    def _close_retired(self) -> None:
        in_use = {*self.engine.groups, *(job.loaded for job in self.jobs.values())}
        for loaded in [v for v in self.retiring if v not in in_use]:
            self.retiring.remove(loaded)
            loaded.close()

    def _load(self, version: int) -> None:
        try:
            loaded = self.runtime.load(self.repo, version, GENERATION_GRAPHS)
            # The version's preprocessing under the service's image limits, worked out once.
            self.image_configs[version] = loaded.preprocessor.config.within(*self.image_limits)
            self.versions[version] = loaded
            error, mismatch = None, False
        except Exception as e:  # reported to the deploy that asked
            log.exception("the engine process could not load version %s", version)
            error = f"the engine process could not load version {version}: {e}"
            mismatch = isinstance(e, RepositoryError)
        self._send(("loaded", (version, error, mismatch)))

    def _send(self, message: tuple) -> None:
        data = pickle.dumps(message, PICKLE)
        try:
            with self._send_lock:
                self.up.send_bytes(data)
        except OSError:  # the server is gone: stop
            self.engine.queue.close()


def _child_main(runtime_factory: Callable[[], ModelRuntime], repo_root: str, config: EngineConfig,
                image_limits: tuple[int, int], down, up) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when the engine stops
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s engine-process %(name)s: %(message)s")
    runtime = runtime_factory()
    try:
        EngineWorker(runtime, ModelRepository(Path(repo_root)), config, image_limits, down, up).run()
    finally:
        runtime.close()
