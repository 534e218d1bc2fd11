"""Drop events already seen, by their idempotency key (the client-chosen event_id, per app).

The bus delivers at least once: a retried publish, a spool replayed after a crash or a consumer
rebalance can each hand the same event over twice. Consumers put every event through an
`EventDeduper` and act only on the first copy. In memory it remembers the last `capacity` keys;
with a `path` it remembers them in SQLite, across restarts of the consumer.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict


def dedupe_key(app_id: str, event_id: str) -> str:
    """Event ids are chosen by each app's clients, so they are unique only within an app."""
    return f"{app_id}\x1f{event_id}"


class EventDeduper:
    def __init__(self, capacity: int = 1_000_000, path: str | os.PathLike | None = None) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._db = sqlite3.connect(os.fspath(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("CREATE TABLE IF NOT EXISTS seen (seq INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL)")

    def first_time(self, key: str) -> bool:
        """True the first time a key is offered (and remembers it), False for every repeat."""
        with self._lock:
            if self._db is not None:
                return self._first_time_persistent(key)
            if key in self._recent:
                self._recent.move_to_end(key)
                return False
            self._recent[key] = None
            if len(self._recent) > self.capacity:
                self._recent.popitem(last=False)
            return True

    def first_time_many(self, keys: list[str]) -> list[bool]:
        """`first_time` for each key, in one transaction when persistent (one fsync per batch)."""
        if self._db is None:
            return [self.first_time(k) for k in keys]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = [self._first_time_persistent(k) for k in keys]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if self._db is not None:
                return self._db.execute("SELECT 1 FROM seen WHERE key = ?", (key,)).fetchone() is not None
            return key in self._recent

    def add(self, key: str) -> None:
        self.first_time(key)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def _first_time_persistent(self, key: str) -> bool:
        assert self._db is not None
        cur = self._db.execute("INSERT OR IGNORE INTO seen (key) VALUES (?)", (key,))
        if cur.rowcount == 0:
            return False
        seq = cur.lastrowid
        if seq is not None and seq % 1000 == 0:  # trim now and then, not on every insert
            self._db.execute("DELETE FROM seen WHERE seq <= ?", (seq - self.capacity,))
        return True
