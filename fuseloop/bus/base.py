"""The event-bus contract shared by producers (services) and consumers (trainer)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from concurrent.futures import Executor
from dataclasses import dataclass

from fuseloop.errors import UserError


class BusError(UserError):
    """The bus could not take or give events (unreachable, or over a capacity limit): the command
    line answers it in one line."""

    exit_code = 1


class BusFull(BusError):
    """The bus cannot accept more events right now (e.g. the spool is at its cap): push back."""


@dataclass(frozen=True)
class TopicConfig:
    inference: str = "fuseloop.inference"
    feedback: str = "fuseloop.feedback"
    dead_letter: str = "fuseloop.dead-letter"

    def all(self) -> list[str]:
        return [self.inference, self.feedback, self.dead_letter]


@dataclass(frozen=True)
class Record:
    """One event as read back: where it sits, and its protobuf bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


class EventBus(ABC):
    """Publishes protobuf payloads. `publish` returns only once the event is durable."""

    @abstractmethod
    def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Durable on return (acked by the broker, or fsynced locally), else raises BusError."""

    def publish_many(self, topic: str, items: list[tuple[bytes, bytes]]) -> None:
        """Publishes (key, value) pairs; durable on return. Implementations batch the sync."""
        for key, value in items:
            self.publish(topic, key, value)

    async def publish_many_async(self, topic: str, items: list[tuple[bytes, bytes]], executor: Executor | None = None) -> None:
        """`publish_many` for asyncio callers: durable on return, without blocking the event loop.
        By default it runs `publish_many` on `executor`; implementations may do better."""
        await asyncio.get_running_loop().run_in_executor(executor, self.publish_many, topic, items)

    @abstractmethod
    def consumer(self, group: str, topics: list[str]) -> "BusConsumer":
        """A consumer-group member reading `topics` from the group's committed offsets."""

    def close(self) -> None:
        """Flushes and releases resources."""


@dataclass(frozen=True)
class Assignment:
    """What one consumer-group member holds after joining, as it sees the group."""

    generation: int  # the group generation these partitions belong to; -1 where the bus has no generations
    partitions: frozenset  # {(topic, partition)} this member reads
    topic_partitions: dict  # {topic: partition count} of the subscribed topics that exist
    settled: bool  # the member holds an assignment for the topics as they are now (no rejoin pending)

    def every_partition(self) -> set[tuple[str, int]]:
        return {(t, p) for t, n in self.topic_partitions.items() for p in range(n)}


class BusConsumer(ABC):
    @abstractmethod
    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        """Returns the next records after the last ones polled (possibly none)."""

    @abstractmethod
    def commit(self, offsets: dict[tuple[str, int], int] | None = None) -> None:
        """Commits next-offsets per (topic, partition); None commits everything polled so far."""

    @abstractmethod
    def position(self) -> dict[tuple[str, int], int]:
        """Next offset to read per (topic, partition) assigned to this member."""

    @abstractmethod
    def end_offsets(self) -> dict[tuple[str, int], int]:
        """Next offset to be written per (topic, partition) assigned to this member, now: reading
        up to these drains what was there when asked, while producers keep writing."""

    @abstractmethod
    def join(self, timeout_s: float) -> Assignment:
        """Joins the group (or catches up with a rebalance) and waits, up to `timeout_s`, until this
        member holds its partitions of every subscribed topic that exists now. A consumer that has
        not joined yet holds nothing, which must not be mistaken for "nothing there"."""

    def close(self) -> None:
        """Leaves the group without committing."""
