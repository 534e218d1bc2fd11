"""Which version serves: load-and-warm beside the serving one, atomic swap, rollback, and a state
file so the choice survives restarts.

Requests take a `Lease` on the version they start with and keep it to the end, so a swap never
changes a request's model midway; a replaced version is closed when its last lease is returned.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fuseloop.repository import MODELS, ModelRepository, RepositoryError, ServingState
from services.inference.metrics import InferenceMetrics
from services.inference.runtime.base import LoadedVersion, ModelRuntime, RuntimeError_

log = logging.getLogger(__name__)


class VersionNotFound(LookupError):
    """The repository has no complete version by that number (NOT_FOUND)."""


class NoServingVersion(RuntimeError):
    """Nothing is loaded yet (UNAVAILABLE)."""


class NothingToRollBack(RuntimeError):
    """There is no previous version (FAILED_PRECONDITION)."""


class VersionMirror(Protocol):
    """Another process serving the versions this deployment serves (the engine process): each
    version is loaded there before it serves, and dropped there when it is closed here."""

    async def load(self, version: int) -> None: ...

    def unload(self, version: int) -> None: ...


class ServedVersion:
    """A loaded version with a count of the requests using it. `on_close` is called once it is
    closed (on the thread that returned its last lease)."""

    def __init__(self, loaded: LoadedVersion, mirrors: Sequence[VersionMirror] = (),
                 on_close: Callable[["ServedVersion"], None] | None = None) -> None:
        self.loaded = loaded
        self.mirrors = mirrors
        self.on_close = on_close
        self._refs = 0
        self._retired = False
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self.loaded.version

    def lease(self, arm: str = "stable") -> "Lease":
        with self._lock:
            self._refs += 1
        return Lease(self, arm)

    def _release(self) -> None:
        with self._lock:
            self._refs -= 1
            close = self._retired and self._refs == 0
        if close:
            self._close()

    def retire(self) -> None:
        """No new leases will be taken; closes once the in-flight ones are returned."""
        with self._lock:
            self._retired = True
            close = self._refs == 0
        if close:
            self._close()

    def _close(self) -> None:
        try:
            for mirror in self.mirrors:
                mirror.unload(self.version)
            self.loaded.close()
        except Exception:  # a runtime's cleanup failing must not fail the request that finished last
            log.exception("closing version %s failed", self.version)
        if self.on_close is not None:
            self.on_close(self)


class Lease:
    """Keeps a version loaded until released (use as a context manager)."""

    def __init__(self, served: ServedVersion, arm: str = "stable") -> None:
        self.served = served
        self.arm = arm  # "stable" (the serving version) or "canary"
        self._released = False

    @property
    def loaded(self) -> LoadedVersion:
        return self.served.loaded

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.served._release()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class LoadFailure:
    """The desired version would not load here: why, and when to try again."""

    error: str
    backoff_s: float
    retry_at: float


def in_canary(route_key: str, percent: float) -> bool:
    """Sticky: the same key always lands in the same arm, on every replica, for a given share;
    raising the share only adds keys to the canary."""
    h = int.from_bytes(hashlib.blake2b(route_key.encode(), digest_size=8).digest(), "big")
    return h / 2**64 * 100 < percent


class Deployment:
    """This replica's serving version, converging on the fleet's record (`serving.json`, see
    `fuseloop.repository.ServingState`). Deploy and Rollback verify, load and warm the version
    here first, then change the record; every other replica's watcher sees the change within
    `watch_interval_s`, loads and warms, then swaps. A replica that cannot load the desired version
    keeps serving what it has, reports NOT_SERVING for it, and retries with backoff.
    Deploys are serialized; reads are lock-free.

    `graphs`: the graphs loaded here (the server scores; its engine process, a mirror, loads the
    generation graphs itself). At most two versions are resident at once in steady operation:
    the serving one and the canary, or during a swap the incoming one and the outgoing one until
    its last request ends (`resident`)."""

    def __init__(self, repo: ModelRepository, runtime: ModelRuntime, executor: Executor,
                 state_path: Path | None = None, history_limit: int = 50,
                 mirrors: Sequence[VersionMirror] = (), watch_interval_s: float = 0.5,
                 retry_backoff_s: tuple[float, float] = (1.0, 30.0), metrics: InferenceMetrics | None = None,
                 graphs: Iterable[str] = MODELS) -> None:
        self.repo = repo
        self.runtime = runtime
        self.graphs = tuple(graphs)
        self.executor = executor
        self.mirrors = mirrors
        self.state_path = Path(state_path) if state_path else repo.serving_state_path
        self.history_limit = history_limit
        self.watch_interval_s = watch_interval_s
        self.retry_backoff_s = retry_backoff_s
        self.metrics = metrics
        self.state = ServingState.read(self.state_path)  # the record, as last read
        self.failures: dict[int, LoadFailure] = {}  # desired versions that would not load here
        self._serving: ServedVersion | None = None
        self._canary: ServedVersion | None = None
        self._canary_percent = 0.0
        self._deploy_lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        self.last_error: str = ""
        self._listeners: list[Callable[[int], None]] = []
        self._resident: set[ServedVersion] = set()  # loaded here and not closed yet

    def resident(self) -> dict[int, list[str]]:
        """The versions loaded in this process and not closed yet (retired ones still finishing
        requests included) -> the graphs loaded of each."""
        return {s.version: sorted(s.loaded.graphs) for s in sorted(list(self._resident), key=lambda s: s.version)}

    def on_swap(self, listener: Callable[[int], object]) -> None:
        """Called (and awaited, if it returns an awaitable) with the new version after every swap."""
        self._listeners.append(listener)

    @property
    def serving(self) -> ServedVersion | None:
        return self._serving

    @property
    def canary(self) -> ServedVersion | None:
        return self._canary

    @property
    def canary_status(self) -> str:
        """This replica against the record's canary, as `desired_status` is for the serving version."""
        return self._status(self.state.canary, self._canary)

    @property
    def desired_status(self) -> str:
        """This replica against the record: SERVING (it serves the desired version), LOADING, or
        NOT_SERVING (it could not load it, see `failures`); "" when there is no record yet."""
        return self._status(self.state.serving, self._serving)

    def _status(self, wanted: int | None, have: ServedVersion | None) -> str:
        if wanted is None:
            return ""
        if have is not None and have.version == wanted:
            return "SERVING"
        return "NOT_SERVING" if wanted in self.failures else "LOADING"

    def acquire(self, route_key: str | None = None) -> Lease:
        """A lease on the version this request is served by: the canary for the sticky share of
        route keys (session id, else request id) the record gives it, else the serving version."""
        canary = self._canary
        if canary is not None and route_key and in_canary(route_key, self._canary_percent):
            return canary.lease("canary")
        served = self._serving
        if served is None:
            raise NoServingVersion("no model version is loaded yet" + (f" ({self.last_error})" if self.last_error else ""))
        return served.lease()

    def initial_version(self) -> int | None:
        """The recorded serving version if it is in the repository, else the latest."""
        available = self.repo.versions()
        if self.state.serving in available:
            return self.state.serving
        if self.state.serving is not None:
            log.warning("recorded serving version %s is not in %s; serving the latest", self.state.serving, self.repo.root)
        return available[-1] if available else None

    async def start(self) -> None:
        """Loads the initial version (on failure the server stays up, NOT_SERVING), then watches
        the record."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="serving-record-watcher")
        version = self.initial_version()
        if version is None:
            self.last_error = f"the repository {self.repo.root} has no versions"
            log.warning("%s; waiting for a Deploy", self.last_error)
            return
        async with self._deploy_lock:
            try:
                await self._swap(await self._load(version))
            except (RepositoryError, VersionNotFound, RuntimeError_, OSError) as e:
                self.last_error = str(e)
                self._failed(version, e)
                log.error("could not load version %s: %s", version, e)

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
            self._watcher = None

    def close(self) -> None:
        """Retires the serving version and the canary (closed once in-flight requests are done)."""
        for served in (self._serving, self._canary):
            if served is not None:
                served.retire()
        self._serving = self._canary = None

    async def deploy(self, version: int) -> ServingState:
        async with self._deploy_lock:
            return await self._decide(version, lambda s: self._or_local(s).deployed(version, self.history_limit))

    async def start_canary(self, version: int, percent: float) -> ServingState:
        """Puts `version` on trial for `percent` of route keys: verified, loaded and warmed here
        first, then recorded; the other replicas load it as they converge."""
        async with self._deploy_lock:
            record = self._or_local(ServingState.read(self.state_path))
            record.with_canary(version, percent, 0)  # refuses a bad share or the serving version up front
            served = None
            if self._canary is None or self._canary.version != version:
                self._set_canary(None)  # a replaced trial is gone before the new one loads (at most two resident)
                served = await self._load(version)
            try:
                state = ServingState.update(
                    self.state_path, lambda s: self._or_local(s).with_canary(version, percent, int(time.time() * 1000)))
            except BaseException:
                if served is not None:
                    served.retire()
                raise
            self.state = state
            if served is not None:
                self._set_canary(served)
            self._canary_percent = state.canary_percent
            self._report()
            return state

    async def rollback(self) -> ServingState:
        """Ends a canary if there is one (the serving version keeps serving everyone); else
        returns to the previous version."""
        async with self._deploy_lock:
            record = self._or_local(ServingState.read(self.state_path))
            if record.canary is not None:
                state = ServingState.update(self.state_path, lambda s: s.without_canary(), record.generation)
                self.state = state
                self._set_canary(None)
                self._report()
                return state
            if record.previous is None:
                raise NothingToRollBack("there is no previous version to roll back to")
            target = record.previous
            return await self._decide(target, lambda s: self._or_local(s).deployed(target, self.history_limit),
                                      record.generation)

    async def converge(self) -> None:
        """One look at the record: load and warm what it names, then swap (or note why not)."""
        record = await asyncio.get_running_loop().run_in_executor(self.executor, ServingState.read, self.state_path)
        if record.serving is None or self._stale(record):  # no record yet: keep what serves
            return
        self.state = record
        self._report()
        if self._canary is not None and self._canary.version not in (record.canary, record.serving):
            self._set_canary(None)  # an ended or replaced trial is gone before anything new loads
        if self._wants(record.serving, self._serving):
            async with self._deploy_lock:
                if not self._stale(record) and self._wants(record.serving, self._serving):
                    served = self._take_canary(record.serving) or await self._try_load(record.serving)
                    if served is not None:
                        await self._swap(served)
        if self._stale(record):
            return
        self._canary_percent = record.canary_percent
        if record.canary is None:
            if self._canary is not None:
                self._set_canary(None)
        elif self._wants(record.canary, self._canary):
            async with self._deploy_lock:
                if not self._stale(record) and self._wants(record.canary, self._canary):
                    served = await self._try_load(record.canary)
                    if served is not None:
                        self._set_canary(served)
        self._report()

    def _stale(self, record: ServingState) -> bool:
        """A change made here since `record` was read is newer than it (the next look sees both)."""
        return record.generation < self.state.generation

    def _wants(self, version: int, have: ServedVersion | None) -> bool:
        """`version` is not what `have` holds, and is not waiting out a failed load's backoff."""
        if have is not None and have.version == version:
            return False
        failure = self.failures.get(version)
        return failure is None or time.monotonic() >= failure.retry_at

    async def _try_load(self, version: int) -> ServedVersion | None:
        try:
            served = await self._load(version)
        except (RepositoryError, VersionNotFound, RuntimeError_, OSError) as e:
            self._failed(version, e)
            return None
        self.failures.pop(version, None)
        return served

    def _take_canary(self, version: int) -> ServedVersion | None:
        """A promotion reuses the canary already loaded and warm."""
        canary = self._canary
        if canary is None or canary.version != version:
            return None
        self._canary = None
        return canary

    def _set_canary(self, served: ServedVersion | None) -> None:
        old, self._canary = self._canary, served
        if served is not None:
            log.info("canary version %s for %.3g%% of traffic", served.version, self._canary_percent)
        if old is not None and old is not served:
            old.retire()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval_s)
            try:
                await self.converge()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad moment on a shared volume must not end the watch
                log.exception("converging on %s failed", self.state_path)

    def _or_local(self, record: ServingState) -> ServingState:
        """No record yet (a repository never deployed to): what this replica serves stands in for it."""
        if record.serving is not None or self.state.serving is None:
            return record
        return ServingState(self.state.serving, self.state.previous, list(self.state.history), record.generation)

    async def _decide(self, version: int, change: Callable[[ServingState], ServingState],
                      expect_generation: int | None = None) -> ServingState:
        """Verify, load and warm `version` here, then change the record (so a version that can't
        load never becomes the fleet's), then swap. A canary of another version ends first (the
        record ends it too), so no third version is resident while this one loads; if the load
        fails, the watcher brings the record's canary back."""
        served = None
        if self._serving is None or self._serving.version != version:
            canary = self._canary if self._canary is not None and self._canary.version == version else None
            if canary is None:
                self._set_canary(None)
            served = canary or await self._load(version)
        try:
            state = ServingState.update(self.state_path, change, expect_generation)
        except BaseException:
            if served is not None and served is not self._canary:
                served.retire()
            raise
        self.state = state
        if served is not None:
            if served is self._canary:
                self._take_canary(version)
            await self._swap(served)
        if state.canary is None and self._canary is not None:
            self._set_canary(None)
        return state

    async def _load(self, version: int) -> ServedVersion:
        if version not in self.repo.versions():
            raise VersionNotFound(f"version {version} is not in the repository "
                                  f"(available: {', '.join(map(str, self.repo.versions())) or 'none'})")
        # Verify, load and warm off the event loop, beside the serving version.
        loaded = await asyncio.get_running_loop().run_in_executor(
            self.executor, self.runtime.load, self.repo, version, self.graphs)
        served = ServedVersion(loaded, self.mirrors, on_close=self._resident.discard)
        self._resident.add(served)
        try:
            for mirror in self.mirrors:
                await mirror.load(version)
        except BaseException:
            served.retire()
            raise
        return served

    def _failed(self, version: int, error: BaseException) -> None:
        low, high = self.retry_backoff_s
        before = self.failures.get(version)
        backoff = low if before is None else min(high, before.backoff_s * 2)
        self.failures[version] = LoadFailure(str(error), backoff, time.monotonic() + backoff)
        self._report()
        if before is None or before.error != str(error):
            log.error("cannot load desired version %s (keeps serving %s; retrying): %s", version,
                      self._serving.version if self._serving else "nothing", error)

    def _report(self) -> None:
        wanted = self.state.serving
        if self.metrics is None or wanted is None:
            return
        self.metrics.desired_version.set(wanted)
        self.metrics.desired_serving.labels(str(wanted)).set(1 if self.desired_status == "SERVING" else 0)
        if self.state.canary is not None:
            self.metrics.desired_serving.labels(str(self.state.canary)).set(int(self.canary_status == "SERVING"))

    async def _swap(self, served: ServedVersion) -> None:
        old = self._serving
        version = served.version
        if self.state.serving != version:  # startup without (a usable) record: serve, don't write
            self.state = ServingState(serving=version, previous=None,
                                      history=(self.state.history + [version])[-self.history_limit:],
                                      generation=self.state.generation)
        self._serving = served  # the swap: one reference assignment
        self.failures.pop(version, None)
        self.last_error = ""
        if old is not None:
            old.retire()
        self._report()
        log.info("serving version %s (previous %s)", version, self.state.previous)
        for listener in self._listeners:
            result = listener(version)
            if inspect.isawaitable(result):
                await result
