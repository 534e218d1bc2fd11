"""The trainer's durable dataset: joined events, the round snapshots and the bus offsets they
came from, in one SQLite file.

Exactly-once comes from one transaction: events (deduplicated by primary key) and the offsets
they were read up to are written together; only after that commit are offsets committed to the
bus. A crash (kill -9) anywhere re-reads at most what the store already holds, and the primary
keys drop the repeats.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
  response_id TEXT PRIMARY KEY, request_id TEXT, event_id TEXT, model_version TEXT, prompt TEXT,
  image BLOB, image_sha256 TEXT, text TEXT, token_ids TEXT, logprobs TEXT, display_position INTEGER,
  num_displayed INTEGER, session_id TEXT, timestamp_ms INTEGER, round INTEGER);
CREATE TABLE IF NOT EXISTS feedback (
  key TEXT PRIMARY KEY, event_id TEXT, response_id TEXT, kind TEXT, payload BLOB, session_id TEXT,
  timestamp_ms INTEGER, round INTEGER);
CREATE TABLE IF NOT EXISTS seen_inference (event_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS offsets (topic TEXT, partition INTEGER, next_offset INTEGER,
  PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, report TEXT);
CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, reason TEXT,
  event_id TEXT, round INTEGER);
"""


@dataclass
class ResponseRow:
    response_id: str
    request_id: str
    model_version: str
    prompt: str
    image: bytes
    text: str
    token_ids: list[int]
    logprobs: list[float]
    display_position: int
    num_displayed: int


@dataclass
class FeedbackRow:
    key: str
    event_id: str
    response_id: str
    kind: str
    payload: bytes  # the FeedbackEvent protobuf
    round: int


class DatasetStore:
    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- writing, one transaction per poll batch -------------------------------------------
    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        self.db.execute("ROLLBACK")

    def add_inference(self, event_id: str, rows: list[ResponseRow], session_id: str, timestamp_ms: int,
                      round_: int) -> bool:
        """False when this inference event was stored before (a redelivery)."""
        if self.db.execute("INSERT OR IGNORE INTO seen_inference VALUES (?)", (event_id,)).rowcount == 0:
            return False
        for r in rows:
            self.db.execute(
                "INSERT OR IGNORE INTO responses VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (r.response_id, r.request_id, event_id, r.model_version, r.prompt, r.image, "", r.text,
                 json.dumps(r.token_ids), json.dumps(r.logprobs), r.display_position, r.num_displayed,
                 session_id, timestamp_ms, round_))
        return True

    def add_feedback(self, key: str, event_id: str, response_id: str, kind: str, payload: bytes, session_id: str,
                     timestamp_ms: int, round_: int) -> bool:
        """False for a duplicate event (same app and event_id)."""
        cur = self.db.execute("INSERT OR IGNORE INTO feedback VALUES (?,?,?,?,?,?,?,?)",
                              (key, event_id, response_id, kind, payload, session_id, timestamp_ms, round_))
        return cur.rowcount == 1

    def add_dead_letter(self, topic: str, reason: str, event_id: str, round_: int) -> None:
        self.db.execute("INSERT INTO dead_letters (topic, reason, event_id, round) VALUES (?,?,?,?)",
                        (topic, reason, event_id, round_))

    def set_offsets(self, offsets: dict[tuple[str, int], int]) -> None:
        for (topic, partition), nxt in offsets.items():
            self.db.execute("INSERT OR REPLACE INTO offsets VALUES (?,?,?)", (topic, partition, nxt))

    def move_feedback(self, keys: list[str], round_: int) -> None:
        self.db.executemany("UPDATE feedback SET round=? WHERE key=?", [(round_, k) for k in keys])

    def delete_feedback(self, keys: list[str]) -> None:
        self.db.executemany("DELETE FROM feedback WHERE key=?", [(k,) for k in keys])

    # -- reading -------------------------------------------------------------------------
    def offsets(self) -> dict[tuple[str, int], int]:
        return {(t, p): o for t, p, o in self.db.execute("SELECT topic, partition, next_offset FROM offsets")}

    def last_round(self) -> int:
        row = self.db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return row[0] or 0

    def save_round(self, round_: int, report: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?)", (round_, json.dumps(report)))

    def round_report(self, round_: int) -> dict | None:
        row = self.db.execute("SELECT report FROM rounds WHERE round=?", (round_,)).fetchone()
        return json.loads(row[0]) if row else None

    def feedback(self, round_: int | None = None, since_round: int | None = None) -> list[FeedbackRow]:
        q, args = "SELECT key, event_id, response_id, kind, payload, round FROM feedback", ()
        if round_ is not None:
            q, args = q + " WHERE round=?", (round_,)
        elif since_round is not None:
            q, args = q + " WHERE round>=?", (since_round,)
        return [FeedbackRow(*r) for r in self.db.execute(q + " ORDER BY rowid", args)]

    def response(self, response_id: str) -> ResponseRow | None:
        row = self.db.execute(
            "SELECT response_id, request_id, model_version, prompt, image, text, token_ids, logprobs, "
            "display_position, num_displayed FROM responses WHERE response_id=?", (response_id,)).fetchone()
        if row is None:
            return None
        return ResponseRow(*row[:6], json.loads(row[6]), json.loads(row[7]), row[8], row[9])

    def responses_of_request(self, request_id: str) -> list[ResponseRow]:
        ids = [r[0] for r in self.db.execute("SELECT response_id FROM responses WHERE request_id=?", (request_id,))]
        return [self.response(i) for i in ids]

    def requests(self, since_round: int, limit: int) -> list[tuple[str, str, bytes]]:
        """(request_id, prompt, image) of logged requests since a round, newest first."""
        rows = self.db.execute(
            "SELECT request_id, prompt, image FROM responses WHERE round>=? AND length(image) > 0 "
            "GROUP BY request_id ORDER BY timestamp_ms DESC LIMIT ?", (since_round, limit))
        return [(r, p, bytes(i)) for r, p, i in rows]

    def shown_by_position(self) -> Counter:
        """How many logged responses were displayed in each slot."""
        return Counter(dict(self.db.execute(
            "SELECT display_position, COUNT(*) FROM responses GROUP BY display_position").fetchall()))

    def counts(self) -> dict[str, int]:
        return {
            "responses": self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0],
            "feedback": self.db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0],
            "dead_letters": self.db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0],
        }
