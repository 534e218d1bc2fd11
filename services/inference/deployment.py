"""Which version serves: load-and-warm beside the serving one, atomic swap, rollback, and a state
file so the choice survives restarts.

Requests take a `Lease` on the version they start with and keep it to the end, so a swap never
changes a request's model midway; a replaced version is closed when its last lease is returned.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Protocol

from fuseloop.repository import ModelRepository, RepositoryError, ServingState
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
    """A loaded version with a count of the requests using it."""

    def __init__(self, loaded: LoadedVersion, mirrors: Sequence[VersionMirror] = ()) -> None:
        self.loaded = loaded
        self.mirrors = mirrors
        self._refs = 0
        self._retired = False
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self.loaded.version

    def lease(self) -> "Lease":
        with self._lock:
            self._refs += 1
        return Lease(self)

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


class Lease:
    """Keeps a version loaded until released (use as a context manager)."""

    def __init__(self, served: ServedVersion) -> None:
        self.served = served
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


class Deployment:
    """The serving version and the previous one. Deploys are serialized; reads are lock-free."""

    def __init__(self, repo: ModelRepository, runtime: ModelRuntime, executor: Executor,
                 state_path: Path | None = None, history_limit: int = 50,
                 mirrors: Sequence[VersionMirror] = ()) -> None:
        self.repo = repo
        self.runtime = runtime
        self.executor = executor
        self.mirrors = mirrors
        self.state_path = Path(state_path) if state_path else repo.serving_state_path
        self.history_limit = history_limit
        self.state = ServingState.read(self.state_path)
        self._serving: ServedVersion | None = None
        self._deploy_lock = asyncio.Lock()
        self.last_error: str = ""
        self._listeners: list[Callable[[int], None]] = []

    def on_swap(self, listener: Callable[[int], object]) -> None:
        """Called (and awaited, if it returns an awaitable) with the new version after every swap."""
        self._listeners.append(listener)

    @property
    def serving(self) -> ServedVersion | None:
        return self._serving

    def acquire(self) -> Lease:
        served = self._serving
        if served is None:
            raise NoServingVersion("no model version is loaded yet" + (f" ({self.last_error})" if self.last_error else ""))
        return served.lease()

    def initial_version(self) -> int | None:
        """The persisted serving version if it is still in the repository, else the latest."""
        available = self.repo.versions()
        if self.state.serving in available:
            return self.state.serving
        if self.state.serving is not None:
            log.warning("persisted serving version %s is not in %s; serving the latest", self.state.serving, self.repo.root)
        return available[-1] if available else None

    async def start(self) -> None:
        """Loads the initial version; on failure the server stays up, NOT_SERVING, until a Deploy."""
        version = self.initial_version()
        if version is None:
            self.last_error = f"the repository {self.repo.root} has no versions"
            log.warning("%s; waiting for a Deploy", self.last_error)
            return
        try:
            await self._swap_to(version, persist=False)
        except (RepositoryError, VersionNotFound, RuntimeError_, OSError) as e:
            self.last_error = str(e)
            log.error("could not load version %s: %s", version, e)

    def close(self) -> None:
        """Retires the serving version (closed once in-flight requests are done)."""
        if self._serving is not None:
            self._serving.retire()
            self._serving = None

    async def deploy(self, version: int) -> ServingState:
        async with self._deploy_lock:
            if self._serving is not None and self._serving.version == version:
                return self.state
            await self._swap_to(version, persist=True)
            return self.state

    async def rollback(self) -> ServingState:
        async with self._deploy_lock:
            if self.state.previous is None:
                raise NothingToRollBack("there is no previous version to roll back to")
            await self._swap_to(self.state.previous, persist=True)
            return self.state

    async def _swap_to(self, version: int, persist: bool) -> None:
        """Loads `version` beside the serving one, records it (in the state file when `persist`:
        deploys, not the startup load, so a read-only repository can still be served), swaps."""
        if version not in self.repo.versions():
            raise VersionNotFound(f"version {version} is not in the repository "
                                  f"(available: {', '.join(map(str, self.repo.versions())) or 'none'})")
        # Verify, load and warm off the event loop, beside the serving version.
        loaded = await asyncio.get_running_loop().run_in_executor(self.executor, self.runtime.load, self.repo, version)
        served = ServedVersion(loaded, self.mirrors)
        try:
            for mirror in self.mirrors:
                await mirror.load(version)
        except BaseException:
            served.retire()
            raise
        old = self._serving
        if persist:
            state = ServingState(serving=version, previous=old.version if old else self.state.serving,
                                    history=(self.state.history + [version])[-self.history_limit:])
            try:
                state.write(self.state_path)
            except OSError:
                served.retire()
                raise
            self.state = state
        elif self.state.serving != version:  # startup without (a usable) state file
            self.state = ServingState(serving=version, previous=None,
                                         history=(self.state.history + [version])[-self.history_limit:])
        self._serving = served  # the swap: one reference assignment
        self.last_error = ""
        if old is not None:
            old.retire()
        log.info("serving version %s (previous %s)", version, self.state.previous)
        for listener in self._listeners:
            result = listener(version)
            if inspect.isawaitable(result):
                await result
