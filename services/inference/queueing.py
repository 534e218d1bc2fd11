"""The bounded request queue in front of a batching thread (generation engine, score batcher).

The event loop puts requests in; one worker thread takes batches out. Two rules shape a batch:

- max queue delay: an idle worker holds the first request back at most this long for more to join,
  but only while requests are known to be on their way (accepted by the service, still being
  preprocessed: `arriving()`) or, for a batcher, while fewer rows wait than its last batch had
  (steady load), so a lone request is never delayed for company that isn't coming.
- deadlines and cancellation: expired or cancelled requests are handed back separately, never run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class QueueFull(Exception):
    """Too many requests are waiting (RESOURCE_EXHAUSTED)."""


class QueueClosed(Exception):
    """The worker is shutting down (UNAVAILABLE)."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it finished (DEADLINE_EXCEEDED)."""


class Cancelled(Exception):
    """The client went away; nobody reads the answer."""


class ModelFailure(Exception):
    """The runtime failed while running a batch (INTERNAL); the worker keeps serving others."""


class Queued(Protocol):
    size: int  # capacity units it takes in a batch (sequences for generation, rows for scoring)
    deadline: float | None  # monotonic seconds
    enqueued_at: float

    @property
    def cancelled(self) -> bool: ...


T = TypeVar("T", bound=Queued)


class Arrival:
    """One request on its way in: counts towards `incoming` until put or abandoned."""

    def __init__(self, queue: "RequestQueue") -> None:
        self._queue = queue
        self._open = True

    def put(self, item) -> None:
        self._queue._put(item, arrival=self)

    def _close_locked(self) -> bool:
        if self._open:
            self._open = False
            self._queue._incoming -= 1
            return True
        return False

    def __enter__(self) -> "Arrival":
        return self

    def __exit__(self, *exc: object) -> None:
        with self._queue._cond:
            if self._close_locked():
                self._queue._cond.notify()


class RequestQueue(Generic[T]):
    def __init__(self, capacity: int, max_delay_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.max_delay_s = max_delay_s
        self.clock = clock
        self._items: deque[T] = deque()
        self._incoming = 0
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def waiting(self) -> int:
        """Requests waiting (read without the lock: a hint for batching decisions)."""
        return len(self._items)

    def oldest_wait(self) -> float:
        """Seconds the oldest waiting request has waited (0 when none)."""
        try:
            return self.clock() - self._items[0].enqueued_at
        except IndexError:
            return 0.0

    def arriving(self) -> Arrival:
        with self._cond:
            self._incoming += 1
        return Arrival(self)

    def put(self, item: T) -> None:
        self._put(item, arrival=None)

    def _put(self, item: T, arrival: Arrival | None) -> None:
        with self._cond:
            if arrival is not None:
                arrival._close_locked()
            if self._closed:
                raise QueueClosed("the server is shutting down")
            if len(self._items) >= self.capacity:
                raise QueueFull(f"{len(self._items)} requests are already waiting (the limit is {self.capacity}); retry later")
            item.enqueued_at = self.clock()
            self._items.append(item)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def close(self) -> list[T]:
        """Refuses new requests; returns the ones still waiting."""
        with self._cond:
            self._closed = True
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    @property
    def closed(self) -> bool:
        return self._closed

    def take(self, room: int, block: bool, admit_oversized: bool, expect: int = 0) -> tuple[list[T], list[T]]:
        """(batch, dropped): requests whose sizes fit in `room`, FIFO, and the expired or cancelled
        ones found on the way. block: wait for a first request, then up to the max queue delay
        while more are on their way, or while fewer than `expect` rows wait (a batcher passes its
        last batch's rows: under steady load the next batch is as big, once its requests are in).
        admit_oversized: a request larger than `room` still runs alone (the worker is idle)."""
        with self._cond:
            if block:
                while not self._items and not self._closed:
                    self._cond.wait()
                expect = min(expect, room)
                if self._items and self.max_delay_s > 0:
                    until = self._items[0].enqueued_at + self.max_delay_s
                    while not self._closed and (left := until - self.clock()) > 0:
                        rows = sum(i.size for i in self._items)
                        if rows >= room or (self._incoming <= 0 and rows >= expect):
                            break
                        self._cond.wait(left)
            now = self.clock()
            batch, dropped, used = [], [], 0
            keep: deque[T] = deque()
            while self._items:
                item = self._items.popleft()
                if item.cancelled or (item.deadline is not None and now > item.deadline):
                    dropped.append(item)
                elif not keep and (used + item.size <= room or (admit_oversized and not batch)):
                    batch.append(item)
                    used += item.size
                else:
                    keep.append(item)  # FIFO: nothing overtakes a request that didn't fit
            self._items = keep
            return batch, dropped
