"""Hands results from worker threads (engine, scorer, the Kafka producer) to the event loop.

`call_soon_threadsafe` writes to the loop's self-pipe on every call, and each write is a point
where the worker thread releases the GIL and may wait to get it back. Completions of one decode
step arrive in bursts, so they are coalesced: one write per burst, not per request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class LoopBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[Callable, tuple]] = []
        self._lock = threading.Lock()

    def post(self, fn: Callable, *args: object) -> None:
        """Runs fn(*args) on the loop soon; callable from any thread."""
        with self._lock:
            self._pending.append((fn, args))
            first = len(self._pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for fn, args in pending:
            fn(*args)


def settle(future: asyncio.Future, error: BaseException | None, result=None) -> None:
    """Completes a future with a worker's result or error (on the loop: post it), unless it is done."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
