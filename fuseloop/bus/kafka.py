"""The Kafka bus (kafka-python), with a local disk spool so nothing acknowledged is ever lost.

`publish` returns once Kafka acked the events (acks=all), or, when Kafka does not answer within
`send_timeout_s`, once they are fsynced to the spool. While anything waits in the spool, new events
queue behind it (so a session's events keep their order), and a background thread replays the
spool into Kafka, oldest first, until it is empty. Replays and retries can deliver an event twice:
consumers drop repeats by event_id (`fuseloop.bus.dedupe`).

Works with Kafka 0.9 (the test broker: no idempotent producer, no headers) up to current versions:
the idempotent producer is used where `api_version` says the broker has it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.net.compat import KafkaNetClient
from kafka.structs import OffsetAndMetadata, TopicPartition

from fuseloop.bus.base import Assignment, BusConsumer, BusError, EventBus, Record
from fuseloop.bus.spool import Spool, SpooledRecord
from fuseloop.loop_bridge import LoopBridge, settle

log = logging.getLogger(__name__)

IDEMPOTENT_PRODUCER_SINCE = (0, 11)


@dataclass(frozen=True)
class KafkaBusConfig:
    bootstrap: str  # "host:port[,host:port...]"
    api_version: tuple[int, ...] | None = None  # None: ask the broker (kafka-python 3 needs (0, 9) for 0.9)
    client_id: str = "fuseloop"
    spool_dir: str | None = None  # None: ~/.local/state/fuseloop/spool/<client_id>
    spool_max_bytes: int = 1 << 30  # past this, publish raises BusFull
    send_timeout_s: float = 10.0  # no ack within this: the events go to the spool instead
    delivery_timeout_s: float = 30.0  # how long the producer itself keeps retrying a record
    # Records batch up anyway while a request is in flight. Measured with 32 unary callers: 1 ms makes
    # requests 2-5x larger (about 20% less CPU per event) but adds about 1 ms to every ack when idle.
    linger_ms: int = 0
    batch_size: int = 256 * 1024
    compression: str | None = "gzip"  # gzip needs no extra library; lz4/snappy/zstd do
    replay_interval_s: float = 1.0  # how often the spool replayer retries while Kafka is away
    replay_batch: int = 1000
    consumer_session_timeout_ms: int = 10_000
    consumer_heartbeat_interval_ms: int = 1_000
    connect_timeout_s: float = 10.0  # a consumer that gets no metadata within this says the broker is unreachable
    extra_producer_settings: dict = field(default_factory=dict)

    @property
    def spool_path(self) -> Path:
        if self.spool_dir:
            return Path(self.spool_dir)
        state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
        return state / "fuseloop" / "spool" / self.client_id


class ProducerNetClient(KafkaNetClient):
    """kafka-python 3.0's network client, minus a busy loop in the producer's sender thread.

    The sender skips a broker whose connection is paused (max_in_flight requests outstanding)
    and polls for `connection_delay(node)` ms. The 3.0 client answers 0 for a paused connection
    (and seconds, not ms, otherwise), so with one request in flight and records waiting for
    another partition the sender spun on a zero-timeout poll, 10-27 loops per request, taking
    the GIL from the event loop each time. A paused connection unpauses when its response
    arrives, which wakes the poll anyway; send() wakes it for new records."""

    def connection_delay(self, node_id: object) -> float:
        conn = self._manager._conns.get(node_id)  # no public "is it paused" in kafka-python
        if conn is not None and conn.connected and conn.paused:
            return self._manager.config["request_timeout_ms"]
        return super().connection_delay(node_id) * 1000


def producer_settings(config: KafkaBusConfig) -> dict:
    """kafka-python producer settings; the benchmark's raw-producer baseline uses the same ones."""
    settings = dict(
        bootstrap_servers=config.bootstrap.split(","),
        client_id=config.client_id,
        acks="all",
        retries=2**31 - 1,
        compression_type=config.compression,
        linger_ms=config.linger_ms,
        batch_size=config.batch_size,
        max_block_ms=int(config.send_timeout_s * 1000),
        delivery_timeout_ms=int(config.delivery_timeout_s * 1000),
        request_timeout_ms=min(30_000, int(config.delivery_timeout_s * 1000) - config.linger_ms - 1),
        bootstrap_timeout_ms=int(config.send_timeout_s * 1000),
        reconnect_backoff_max_ms=1000,
        metrics_enabled=False,  # kafka-python's own sensors cost CPU on every record; we export our own
        kafka_client=ProducerNetClient,
    )
    if config.api_version is not None:
        settings["api_version"] = tuple(config.api_version)
        idempotent = tuple(config.api_version) >= IDEMPOTENT_PRODUCER_SINCE
        settings["enable_idempotence"] = idempotent
        if not idempotent:
            # Without the idempotent producer, a retried request can overtake a later one:
            # one request in flight keeps each session's events in order.
            settings["max_in_flight_requests_per_connection"] = 1
    # api_version None: kafka-python asks the broker and turns idempotence off below 0.11 itself.
    settings.update(config.extra_producer_settings)
    return settings


class KafkaBus(EventBus):
    def __init__(self, config: KafkaBusConfig) -> None:
        self.config = config
        # The spool is opened (and its directory locked) only when needed, so processes that just
        # consume, or never see Kafka fail, leave it to the one that does.
        self._spool: Spool | None = None
        self._producer: KafkaProducer | None = None
        self._producer_lock = threading.Lock()
        # Held while choosing between Kafka and the spool, and while appending to the spool.
        self._mode_lock = threading.Lock()
        self._spooling = False
        self._inflight: tuple[list[SpooledRecord], list] | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._bridge: LoopBridge | None = None  # carries producer callbacks to the asyncio callers' loop
        if _holds_records(config.spool_path):  # left over from the last run: replay first
            try:
                with self._mode_lock:
                    self._spooling = self._open_spool().pending_records > 0
            except BusError as e:
                log.warning("not replaying %s: %s", config.spool_path, e)
        self._replayer = threading.Thread(target=self._replay_loop, name="kafka-spool-replay", daemon=True)
        self._replayer.start()
        if self._spooling:
            log.warning("%d events wait in the spool %s; replaying them into Kafka", self.spooled, config.spool_path)
            self._wake.set()

    @property
    def spooled(self) -> int:
        """Events waiting in the local spool for Kafka."""
        return self._spool.pending_records if self._spool is not None else 0

    def publish(self, topic: str, key: bytes, value: bytes) -> None:
        self.publish_many(topic, [(key, value)])

    def publish_many(self, topic: str, items: list[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        if not self._spooling:
            try:
                producer = self._get_producer()
                futures = [producer.send(topic, key=key, value=value) for key, value in items]
                deadline = time.monotonic() + self.config.send_timeout_s
                for future in futures:
                    future.get(timeout=max(0.0, deadline - time.monotonic()))
                return
            except KafkaError as e:
                if not _worth_spooling(e):
                    raise BusError(f"Kafka refused the events: {e}") from e
                log.warning("Kafka did not ack within %.1fs (%s); spooling to %s", self.config.send_timeout_s, e, self.config.spool_path)
        self._append_to_spool([(topic, key, value) for key, value in items])

    async def publish_many_async(self, topic: str, items: list[tuple[bytes, bytes]], executor: Executor | None = None) -> None:
        """Hands the events to the producer on the caller's loop and awaits the acks, with no thread
        per call; falls back to the blocking path whenever it might block (spooling, no metadata yet)."""
        producer = self._producer
        # send() blocks only to fetch a topic's metadata (kafka-python has no public non-blocking check).
        if not items or self._spooling or producer is None or producer._metadata.partitions_for_topic(topic) is None:
            return await super().publish_many_async(topic, items, executor)
        loop = asyncio.get_running_loop()
        bridge = self._bridge_to(loop)
        acked = loop.create_future()
        remaining = itertools.count(len(items) - 1, -1)  # next() is atomic under the GIL

        def on_ack(_: object) -> None:
            if next(remaining) == 0:
                bridge.post(settle, acked, None)

        def on_error(error: BaseException) -> None:
            bridge.post(settle, acked, error)

        # A timer instead of asyncio.wait_for: no extra task per call.
        timer = loop.call_later(
            self.config.send_timeout_s, settle, acked, KafkaTimeoutError(f"no ack within {self.config.send_timeout_s}s")
        )
        try:
            for key, value in items:
                producer.send(topic, key=key, value=value).add_callback(on_ack).add_errback(on_error)
            await acked
            return
        except KafkaError as e:
            error: BaseException = e
        finally:
            timer.cancel()
        if not _worth_spooling(error):
            raise BusError(f"Kafka refused the events: {error}") from error
        log.warning("Kafka did not ack (%s); spooling to %s", error, self.config.spool_path)
        records = [(topic, key, value) for key, value in items]
        await loop.run_in_executor(executor, self._append_to_spool, records)

    def _bridge_to(self, loop: asyncio.AbstractEventLoop) -> LoopBridge:
        """One bridge per loop: a produce response acks many events at once, and waking the loop
        once per event would make the network thread give up the GIL once per event."""
        bridge = self._bridge
        if bridge is None or bridge.loop is not loop:
            bridge = self._bridge = LoopBridge(loop)
        return bridge

    def consumer(self, group: str, topics: list[str]) -> "KafkaBusConsumer":
        return KafkaBusConsumer(self.config, group, topics)

    def wait_until_replayed(self, timeout_s: float) -> bool:
        """True once the spool is empty (everything handed to Kafka); for tests and shutdown."""
        deadline = time.monotonic() + timeout_s
        while self._spooling or self.spooled:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.05)
        return True

    def close(self) -> None:
        """Stops replaying (what is left stays in the spool for next time) and flushes the producer."""
        self._closed.set()
        self._wake.set()
        self._replayer.join(timeout=self.config.send_timeout_s + 5)
        with self._producer_lock:
            if self._producer is not None:
                try:
                    self._producer.close(timeout=self.config.send_timeout_s)
                except KafkaError as e:  # the spool holds anything unacked
                    log.warning("closing the Kafka producer: %s", e)
                self._producer = None
        if self._spool is not None:
            self._spool.close()

    def _append_to_spool(self, records: list[tuple[str, bytes, bytes]]) -> None:
        with self._mode_lock:
            self._open_spool().append(records)  # BusFull past the cap: the caller pushes back
            self._spooling = True
        self._wake.set()

    def _open_spool(self) -> Spool:
        """Call with _mode_lock held."""
        if self._spool is None:
            self._spool = Spool(self.config.spool_path, max_bytes=self.config.spool_max_bytes)
        return self._spool

    def _get_producer(self) -> KafkaProducer:
        with self._producer_lock:
            if self._closed.is_set():
                raise BusError("the bus is closed")
            if self._producer is None:
                try:
                    self._producer = KafkaProducer(**producer_settings(self.config))
                except KafkaError:
                    raise
                except (OSError, ValueError) as e:  # e.g. bootstrap address that does not resolve
                    raise BusError(f"cannot create a Kafka producer for {self.config.bootstrap}: {e}") from e
            return self._producer

    def _replay_loop(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(timeout=self.config.replay_interval_s)
            self._wake.clear()
            if self._closed.is_set() or not self._spooling:
                continue
            try:
                self._replay()
            except KafkaError as e:
                log.info("spool replay waits for Kafka: %s (%d events spooled)", e, self.spooled)
            except Exception:  # keep the thread alive; the events stay in the spool
                log.exception("spool replay failed; retrying in %.1fs", self.config.replay_interval_s)
            if self._spooling:
                self._closed.wait(self.config.replay_interval_s / 4)

    def _replay(self) -> None:
        """Sends the spool's oldest batch, waits for its acks, acknowledges it in the spool, repeats.
        A batch whose acks are late is not sent again while the producer still retries it."""
        spool = self._spool
        assert spool is not None  # _spooling is only set once the spool is open
        while not self._closed.is_set():
            if self._inflight is None:
                batch = spool.peek(self.config.replay_batch)
                if not batch:
                    with self._mode_lock:
                        if spool.pending_records == 0:
                            self._spooling = False
                            log.info("spool replayed; publishing straight to Kafka again")
                            return
                    continue
                producer = self._get_producer()
                self._inflight = (batch, [producer.send(r.topic, key=r.key, value=r.value) for r in batch])
            batch, futures = self._inflight
            deadline = time.monotonic() + self.config.send_timeout_s
            for future in futures:
                if not future.is_done:
                    try:
                        future.get(timeout=max(0.0, deadline - time.monotonic()))
                    except KafkaError:
                        pass
                if not future.is_done:
                    raise KafkaError(f"no ack within {self.config.send_timeout_s}s")
            failed = next((f.exception for f in futures if f.failed()), None)
            self._inflight = None
            if failed is not None:
                if _worth_spooling(failed):
                    raise failed
                self._set_aside(batch, failed)
            spool.ack(batch)

    def _set_aside(self, batch: list[SpooledRecord], error: Exception) -> None:
        """Kafka will never take these (e.g. too large): keep them out of the queue's way, on disk."""
        aside = Spool(self.config.spool_path / "rejected", max_bytes=1 << 62)
        try:
            aside.append([(r.topic, r.key, r.value) for r in batch])
        finally:
            aside.close()
        log.error("Kafka rejected %d spooled events (%s); kept in %s/rejected", len(batch), error, self.config.spool_path)


def _holds_records(spool_dir: Path) -> bool:
    return any(p.stat().st_size > 0 for p in spool_dir.glob("*.seg")) if spool_dir.is_dir() else False


def _worth_spooling(error: BaseException) -> bool:
    """Kafka away or slow (retriable): spool and retry. Anything else would fail again the same way."""
    return isinstance(error, KafkaError) and error.retriable


class KafkaBusConsumer(BusConsumer):
    def __init__(self, config: KafkaBusConfig, group: str, topics: list[str]) -> None:
        settings = dict(
            bootstrap_servers=config.bootstrap.split(","),
            client_id=config.client_id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=config.consumer_session_timeout_ms,
            heartbeat_interval_ms=config.consumer_heartbeat_interval_ms,
        )
        if config.api_version is not None:
            settings["api_version"] = tuple(config.api_version)
        try:
            self._consumer = KafkaConsumer(*topics, **settings)
        except KafkaError as e:
            raise BusError(f"cannot reach Kafka at {config.bootstrap}: {e}") from e
        self._polled: dict[tuple[str, int], int] = {}
        self._check_reachable(config)

    def _check_reachable(self, config: KafkaBusConfig) -> None:
        """With api_version given, kafka-python never bootstraps up front, and its metadata calls wait
        for a broker forever: a trainer pointed at a wrong address would read "no events" round after
        round. One metadata request, bounded, tells the two apart."""
        answer: dict = {}

        def probe() -> None:
            try:
                answer["topics"] = self._consumer.topics()
            except Exception as e:  # reported below, in the caller's thread
                answer["error"] = e

        thread = threading.Thread(target=probe, name="kafka-probe", daemon=True)
        thread.start()
        thread.join(config.connect_timeout_s)
        if "topics" not in answer:
            self._consumer.close(autocommit=False)
            why = answer.get("error") or f"no metadata within {config.connect_timeout_s:g} s"
            raise BusError(f"cannot reach Kafka at {config.bootstrap}: {why} (is the broker running, "
                           "and is the bus URL right?)")

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as e:
            raise BusError(f"Kafka poll failed: {e}") from e
        out: list[Record] = []
        for tp, messages in batches.items():
            for m in messages:
                out.append(Record(m.topic, m.partition, m.offset, m.key, m.value))
            if messages:
                self._polled[(tp.topic, tp.partition)] = messages[-1].offset + 1
        return out

    def commit(self, offsets: dict[tuple[str, int], int] | None = None) -> None:
        wanted = dict(self._polled) if offsets is None else dict(offsets)
        assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        # Partitions handed to another member in a rebalance are theirs to commit now.
        owned = {TopicPartition(t, p): OffsetAndMetadata(off, "", -1) for (t, p), off in wanted.items() if (t, p) in assigned}
        if not owned:
            return
        try:
            self._consumer.commit(owned)
        except KafkaError as e:
            raise BusError(f"Kafka commit failed: {e}") from e

    def position(self) -> dict[tuple[str, int], int]:
        return {(tp.topic, tp.partition): self._consumer.position(tp) for tp in self._consumer.assignment()}

    def join(self, timeout_s: float) -> Assignment:
        """Drives the group protocol (without fetching records) until this member is in a stable
        generation whose assignment was made for the subscribed topics as they exist now.

        kafka-python joins only inside poll(), and learns about topics created after subscribe()
        only at its next metadata refresh (metadata_max_age_ms, 5 minutes): a round that just polled
        twice saw no partitions and concluded that the bus was empty."""
        deadline = time.monotonic() + timeout_s
        coordinator = self._consumer._coordinator  # kafka-python has no public "join the group" call
        topics: dict[str, int] = {}
        try:
            while True:
                # A full metadata request (it does not auto-create topics on 0.9, unlike a request
                # naming them); the coordinator sees new topics or partitions and rejoins.
                existing = self._consumer.topics()
                topics = {t: len(self._consumer.partitions_for_topic(t) or ())
                          for t in sorted(self._consumer.subscription() or ()) if t in existing}
                left_ms = max(0, int((deadline - time.monotonic()) * 1000))
                coordinator.poll(timeout_ms=min(left_ms, 500))
                generation = coordinator.generation_if_stable()
                assigned = frozenset((tp.topic, tp.partition) for tp in self._consumer.assignment())
                settled = (generation is not None and not coordinator.need_rejoin()
                           and {t for t, _ in assigned} <= set(topics))
                if settled or time.monotonic() >= deadline:
                    gen_id = generation.generation_id if generation is not None else -1
                    return Assignment(gen_id, assigned, topics, settled)
                time.sleep(0.05)
        except KafkaError as e:
            raise BusError(f"Kafka group join failed: {e}") from e

    def end_offsets(self) -> dict[tuple[str, int], int]:
        assigned = list(self._consumer.assignment())
        if not assigned:
            return {}
        try:
            ends = self._consumer.end_offsets(assigned)
        except KafkaError as e:
            raise BusError(f"Kafka end_offsets failed: {e}") from e
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}

    def close(self) -> None:
        self._consumer.close(autocommit=False)
