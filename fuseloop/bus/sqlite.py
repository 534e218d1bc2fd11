"""The embedded default bus: an append-only log in one SQLite file, for a single machine.

Durable on return (WAL with synchronous=FULL), and safe for several processes on the same file
(the feedback service, the inference service and the trainer): each opens its own connections,
writers serialize on SQLite's write lock, readers never block them.

Like Kafka: topics have partitions (a record's key picks one, so one session stays in order),
offsets count from 0 per partition, and consumer groups keep committed offsets per partition.
Group members register with heartbeats; the live members of a group split the partitions
between them, and a member that stops polling for `session_timeout_s` is dropped.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from fuseloop.bus.base import Assignment, BusConsumer, BusError, EventBus, Record

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    topic TEXT NOT NULL, part INTEGER NOT NULL, off INTEGER NOT NULL,
    key BLOB, value BLOB NOT NULL,
    PRIMARY KEY (topic, part, off)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS committed (
    grp TEXT NOT NULL, topic TEXT NOT NULL, part INTEGER NOT NULL, next_off INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, part)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members (
    grp TEXT NOT NULL, member TEXT NOT NULL, heartbeat REAL NOT NULL,
    PRIMARY KEY (grp, member)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class SqliteBusConfig:
    path: str
    partitions: int = 3  # fixed when the file is created; later opens use the stored number
    session_timeout_s: float = 10.0
    poll_interval_s: float = 0.02  # how often an idle consumer looks for new records
    busy_timeout_ms: int = 60_000


def partition_for(key: bytes, partitions: int) -> int:
    return zlib.crc32(key) % partitions


def _connect(config: SqliteBusConfig) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so transactions are exactly ours.
    db = sqlite3.connect(config.path, timeout=config.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout={int(config.busy_timeout_ms)}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error; takes the write lock up front so two
    processes never both read-then-write the same offsets."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


class SqliteBus(EventBus):
    def __init__(self, config: SqliteBusConfig) -> None:
        if not os.path.isabs(config.path):
            raise ValueError(f"the SQLite bus needs an absolute path, got {config.path!r}")
        Path(config.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = _connect(config)
        with _Transaction(self._db) as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('partitions', ?)", (str(config.partitions),))
            stored = int(db.execute("SELECT value FROM meta WHERE name = 'partitions'").fetchone()[0])
        self.config = SqliteBusConfig(**{**config.__dict__, "partitions": stored})

    @property
    def partitions(self) -> int:
        return self.config.partitions

    def publish(self, topic: str, key: bytes, value: bytes) -> None:
        self.publish_many(topic, [(key, value)])

    def publish_many(self, topic: str, items: list[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        try:
            with self._lock, _Transaction(self._db) as db:
                next_offsets: dict[int, int] = {}
                rows = []
                for key, value in items:
                    part = partition_for(key, self.partitions)
                    if part not in next_offsets:
                        row = db.execute(
                            "SELECT MAX(off) FROM log WHERE topic = ? AND part = ?", (topic, part)
                        ).fetchone()
                        next_offsets[part] = 0 if row[0] is None else row[0] + 1
                    rows.append((topic, part, next_offsets[part], key, value))
                    next_offsets[part] += 1
                db.executemany("INSERT INTO log VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as e:
            raise BusError(f"could not write to {self.config.path}: {e}") from e

    def consumer(self, group: str, topics: list[str]) -> "SqliteConsumer":
        return SqliteConsumer(self.config, group, topics)

    def end_offsets(self, topic: str) -> dict[int, int]:
        """Next offset to be written, per partition (the high watermark)."""
        with self._lock:
            rows = self._db.execute("SELECT part, MAX(off) + 1 FROM log WHERE topic = ? GROUP BY part", (topic,))
            found = dict(rows.fetchall())
        return {p: found.get(p, 0) for p in range(self.partitions)}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SqliteConsumer(BusConsumer):
    def __init__(self, config: SqliteBusConfig, group: str, topics: list[str]) -> None:
        self.config = config
        self.group = group
        self.topics = list(topics)
        self.member = uuid.uuid4().hex
        self._db = _connect(config)
        self._positions: dict[tuple[str, int], int] = {}
        self._polled: dict[tuple[str, int], int] = {}
        self._heartbeat()  # join now, so members created together split the partitions from the start

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        while True:
            self._rebalance()
            records = self._fetch(max_records)
            if records or time.monotonic() >= deadline:
                return records
            time.sleep(min(self.config.poll_interval_s, max(0.0, deadline - time.monotonic())))

    def commit(self, offsets: dict[tuple[str, int], int] | None = None) -> None:
        self._rebalance()
        wanted = dict(self._polled) if offsets is None else dict(offsets)
        # Partitions handed to another member meanwhile are theirs to commit now (as in Kafka).
        owned = {tp: off for tp, off in wanted.items() if tp in self._positions}
        try:
            with _Transaction(self._db) as db:
                db.executemany(
                    "INSERT INTO committed VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (grp, topic, part) DO UPDATE SET next_off = excluded.next_off",
                    [(self.group, t, p, off) for (t, p), off in owned.items()],
                )
        except sqlite3.Error as e:
            raise BusError(f"could not commit offsets for group {self.group!r}: {e}") from e

    def position(self) -> dict[tuple[str, int], int]:
        self._rebalance()
        return dict(self._positions)

    def join(self, timeout_s: float) -> Assignment:
        # Members register when created and split the partitions on every call: nothing to wait for.
        self._rebalance()
        return Assignment(-1, frozenset(self._positions), {t: self.config.partitions for t in self.topics}, True)

    def end_offsets(self) -> dict[tuple[str, int], int]:
        self._rebalance()
        out = {}
        for topic, part in self._positions:
            row = self._db.execute("SELECT MAX(off) + 1 FROM log WHERE topic = ? AND part = ?", (topic, part)).fetchone()
            out[(topic, part)] = row[0] or 0
        return out

    def close(self) -> None:
        try:
            with _Transaction(self._db) as db:
                db.execute("DELETE FROM members WHERE grp = ? AND member = ?", (self.group, self.member))
        finally:
            self._db.close()

    def _heartbeat(self) -> None:
        """Registers this member as alive (a write, so at most every few seconds)."""
        now = time.time()
        with _Transaction(self._db) as db:
            db.execute(
                "INSERT INTO members VALUES (?, ?, ?) ON CONFLICT (grp, member) DO UPDATE SET heartbeat = excluded.heartbeat",
                (self.group, self.member, now),
            )
            db.execute(
                "DELETE FROM members WHERE grp = ? AND heartbeat < ?", (self.group, now - self.config.session_timeout_s)
            )
        self._last_heartbeat = time.monotonic()

    def _live_members(self) -> list[str]:
        cutoff = time.time() - self.config.session_timeout_s
        rows = self._db.execute(
            "SELECT member FROM members WHERE grp = ? AND (heartbeat >= ? OR member = ?) ORDER BY member",
            (self.group, cutoff, self.member),
        )
        return [m for (m,) in rows]

    def _rebalance(self) -> None:
        if time.monotonic() - self._last_heartbeat > self.config.session_timeout_s / 5:
            self._heartbeat()
        members = self._live_members()
        if self.member not in members:  # our row was expired by someone else while we were away
            self._heartbeat()
            members = self._live_members()
        me = members.index(self.member)
        every = [(t, p) for t in sorted(self.topics) for p in range(self.config.partitions)]
        mine = set(every[me :: len(members)])
        for tp in list(self._positions):
            if tp not in mine:
                del self._positions[tp]
                self._polled.pop(tp, None)
        new = [tp for tp in mine if tp not in self._positions]
        if new:
            for tp in new:
                row = self._db.execute(
                    "SELECT next_off FROM committed WHERE grp = ? AND topic = ? AND part = ?", (self.group, *tp)
                ).fetchone()
                self._positions[tp] = row[0] if row else 0  # no commit yet: from the earliest

    def _fetch(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        # Fair share per partition, then whatever is left, so one busy partition does not starve the rest.
        partitions = sorted(self._positions)
        for tp in partitions:
            if len(out) >= max_records:
                break
            share = max(1, (max_records - len(out)) // max(1, len(partitions)))
            rows = self._db.execute(
                "SELECT off, key, value FROM log WHERE topic = ? AND part = ? AND off >= ? ORDER BY off LIMIT ?",
                (tp[0], tp[1], self._positions[tp], share),
            ).fetchall()
            for off, key, value in rows:
                out.append(Record(tp[0], tp[1], off, key, value))
            if rows:
                self._positions[tp] = rows[-1][0] + 1
                self._polled[tp] = self._positions[tp]
        return out
