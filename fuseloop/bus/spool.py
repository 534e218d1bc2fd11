"""A durable local FIFO of (topic, key, value) records: where events wait while Kafka is unreachable.

Segment files of length-prefixed, CRC-checked records, appended and fsynced. A cursor file says
how far the records have been handed on (replayed into Kafka); fully replayed segments are deleted.
A torn record at the tail (a crash mid-append) is cut off when the spool is opened: that append
never returned, so nobody was told the event was safe.

One process owns a spool directory at a time (an exclusive lock on it).
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from fuseloop.bus.base import BusError, BusFull

_HEADER = struct.Struct(">II")  # body length, crc32(body)
_BODY_PREFIX = struct.Struct(">HI")  # topic length, key length; the value is the rest
_CURSOR = struct.Struct(">QQ")  # segment number, byte offset
_SUFFIX = ".seg"


@dataclass(frozen=True)
class SpooledRecord:
    topic: str
    key: bytes
    value: bytes
    segment: int
    end: int  # byte offset just past this record in its segment
    size: int  # bytes it takes in the spool


class Spool:
    def __init__(self, directory: str | os.PathLike, max_bytes: int = 1 << 30, segment_bytes: int = 64 << 20) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._lock_file = open(self.directory / "lock", "a+b")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise BusError(f"spool {self.directory} is in use by another process; give each its own spool dir") from None
        segments = self._segments()
        self._cursor = self._read_cursor(default=(segments[0] if segments else 1, 0))
        self._pending_records = self._pending_bytes = 0
        for n in segments:
            if n < self._cursor[0]:
                continue
            with open(self._path(n), "r+b") as f:
                end = self._cursor[1] if n == self._cursor[0] else 0
                for record in _records(f, n, end):
                    self._pending_records += 1
                    self._pending_bytes += record.size
                    end = record.end
                if n == segments[-1] and f.seek(0, os.SEEK_END) > end:
                    f.truncate(end)  # a torn tail
                    os.fsync(f.fileno())
        self._segment = max(segments[-1] if segments else 1, self._cursor[0])
        self._writer = open(self._path(self._segment), "ab")
        self._fsync_dir()

    @property
    def pending_records(self) -> int:
        return self._pending_records

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def append(self, records: list[tuple[str, bytes, bytes]]) -> None:
        """Appends (topic, key, value) records, fsynced on return; BusFull past max_bytes."""
        blob = b"".join(_encode(topic, key, value) for topic, key, value in records)
        with self._lock:
            if self._pending_bytes + len(blob) > self.max_bytes:
                raise BusFull(
                    f"the local spool is full: {self._pending_bytes} of {self.max_bytes} bytes are waiting for Kafka"
                )
            if self._writer.tell() >= self.segment_bytes:
                self._writer.close()
                self._segment += 1
                self._writer = open(self._path(self._segment), "ab")
                self._fsync_dir()
            self._writer.write(blob)
            self._writer.flush()
            os.fsync(self._writer.fileno())
            self._pending_bytes += len(blob)
            self._pending_records += len(records)

    def peek(self, max_records: int = 1000) -> list[SpooledRecord]:
        """The oldest records not yet acknowledged, in append order."""
        with self._lock:
            out: list[SpooledRecord] = []
            for n in range(self._cursor[0], self._segment + 1):
                start = self._cursor[1] if n == self._cursor[0] else 0
                try:
                    with open(self._path(n), "rb") as f:
                        for record in _records(f, n, start):
                            out.append(record)
                            if len(out) >= max_records:
                                return out
                except FileNotFoundError:
                    continue
            return out

    def ack(self, records: list[SpooledRecord]) -> None:
        """Marks records (a prefix of what peek returned) as handed on, durably."""
        if not records:
            return
        with self._lock:
            self._pending_records -= len(records)
            self._pending_bytes -= sum(r.size for r in records)
            if self._pending_records == 0:
                # All handed on: continue in a fresh segment and drop the old ones.
                self._writer.close()
                self._segment += 1
                self._writer = open(self._path(self._segment), "ab")
                self._cursor = (self._segment, 0)
            else:
                self._cursor = (records[-1].segment, records[-1].end)
            tmp = self.directory / "cursor.tmp"
            with open(tmp, "wb") as f:
                f.write(_CURSOR.pack(*self._cursor))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / "cursor")
            for n in self._segments():
                if n < self._cursor[0]:
                    self._path(n).unlink()
            self._fsync_dir()

    def close(self) -> None:
        with self._lock:
            self._writer.close()
            self._lock_file.close()  # releases the flock

    def _read_cursor(self, default: tuple[int, int]) -> tuple[int, int]:
        try:
            return _CURSOR.unpack((self.directory / "cursor").read_bytes())
        except (FileNotFoundError, struct.error):
            return default

    def _segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob("*" + _SUFFIX))

    def _path(self, n: int) -> Path:
        return self.directory / f"{n:012d}{_SUFFIX}"

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _encode(topic: str, key: bytes, value: bytes) -> bytes:
    t = topic.encode()
    body = _BODY_PREFIX.pack(len(t), len(key)) + t + key + value
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def _records(f: BinaryIO, segment: int, start: int) -> Iterator[SpooledRecord]:
    """Whole, intact records from `start`; stops at the end or at a torn/corrupt record."""
    f.seek(start)
    pos = start
    while True:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        length, crc = _HEADER.unpack(header)
        body = f.read(length)
        if len(body) < length or zlib.crc32(body) != crc:
            return
        tlen, klen = _BODY_PREFIX.unpack_from(body)
        p = _BODY_PREFIX.size
        pos += _HEADER.size + length
        yield SpooledRecord(
            topic=body[p : p + tlen].decode(),
            key=body[p + tlen : p + tlen + klen],
            value=body[p + tlen + klen :],
            segment=segment,
            end=pos,
            size=_HEADER.size + length,
        )
