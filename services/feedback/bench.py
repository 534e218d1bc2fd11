"""`fuseloop bench feedback`: feedback events/s and ack latency end to end (gRPC client -> feedback
service -> Kafka, acks=all) next to a raw kafka-python producer sending the same payloads with the
same settings: the most the service could do. One run, one local Kafka, side by side.

The service runs in its own process, as in production; the client sends pre-serialized requests
so the client's own protobuf work is not measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from fuseloop.bus import EventBus, TopicConfig, open_bus
from fuseloop.bus.kafka import KafkaBusConfig, producer_settings
from fuseloop.devkafka import LocalKafka
from fuseloop.events import EVENT_SCHEMA_VERSION
from fuseloop.v1 import events_pb2 as ev
from fuseloop.v1 import feedback_pb2 as fb
from services.feedback.pseudonym import Pseudonymizer
from services.feedback.server import SERVICE_NAME, FeedbackServer, FeedbackServiceConfig

TOKEN, APP = "bench-token", "bench-app"
KEY = b"bench-pseudonym-key-0123456789ab"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@dataclass(frozen=True)
class FeedbackBenchConfig:
    seconds: float = 4.0
    batch: int = 100
    batch_concurrency: int = 4
    unary_concurrency: int = 32
    rounds: int = 2
    sessions: int = 500
    seed: int = 0


@dataclass
class Row:
    path: str
    events: int
    seconds: float
    latency_ms: list[float] = field(default_factory=list, repr=False)
    latency_of: str = "event"  # what one latency sample is: an event's ack, or a call's answer
    baseline: str | None = None  # the row this one is compared with

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latency_ms:
            return float("nan")
        ordered = sorted(self.latency_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self, rows: dict[str, "Row"]) -> dict:
        base = rows.get(self.baseline) if self.baseline else None
        return {
            "path": self.path,
            "events": self.events,
            "events_per_s": round(self.events_per_s, 1),
            "latency_of": self.latency_of,
            "latency_p50_ms": round(self.percentile(0.50), 3),
            "latency_p99_ms": round(self.percentile(0.99), 3),
            "vs_raw": round(self.events_per_s / base.events_per_s, 3) if base else None,
            "baseline": self.baseline,
        }


class EventFactory:
    """Realistic feedback: a mix of kinds over a pool of sessions and users, fresh event ids."""

    def __init__(self, sessions: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sessions = [f"sess-{uuid.UUID(int=self.rng.getrandbits(128)).hex}" for _ in range(sessions)]
        self.n = 0

    def event(self) -> ev.FeedbackEvent:
        self.n += 1
        r = self.rng.random()
        session = self.rng.choice(self.sessions)
        e = ev.FeedbackEvent(
            event_id=f"{self.n:012d}-{self.rng.getrandbits(64):016x}",
            response_id=f"resp-{self.rng.getrandbits(64):016x}",
            session_id=session,
            user_id=f"user-{hash(session) % 10_000}@example.com",
            timestamp_ms=int(time.time() * 1000),
        )
        if r < 0.4:
            e.thumbs.up = self.rng.random() < 0.7
        elif r < 0.6:
            e.rating.stars = self.rng.randint(1, 5)
        elif r < 0.85:
            e.implicit.kind = self.rng.choice([ev.IMPLICIT_COPY, ev.IMPLICIT_CLICK, ev.IMPLICIT_DWELL, ev.IMPLICIT_REGENERATE])
            e.implicit.dwell_ms = self.rng.randint(100, 60_000) if e.implicit.kind == ev.IMPLICIT_DWELL else 0
            e.implicit.display_position, e.implicit.num_displayed = self.rng.randint(0, 1), 2
        elif r < 0.95:
            e.response_id = ""
            e.preference.chosen_response_id = f"resp-{self.rng.getrandbits(64):016x}"
            e.preference.rejected_response_id = f"resp-{self.rng.getrandbits(64):016x}"
            e.preference.chosen_side, e.preference.rejected_side = self.rng.choice([(1, 2), (2, 1)])
        else:
            e.correction.text = "The answer should mention the red square on the left. " * self.rng.randint(1, 4)
        return e

    def events(self, n: int) -> list[ev.FeedbackEvent]:
        return [self.event() for _ in range(n)]


def as_published(events: list[ev.FeedbackEvent]) -> list[tuple[bytes, bytes]]:
    """(key, value) exactly as the service writes them, for the raw producer."""
    pseudonyms = Pseudonymizer(KEY)
    out = []
    for e in events:
        e = ev.FeedbackEvent.FromString(e.SerializeToString())
        e.app_id, e.schema_version = APP, EVENT_SCHEMA_VERSION
        e.user_id = pseudonyms.user(APP, e.user_id)
        out.append((e.session_id.encode(), e.SerializeToString()))
    return out


# --- the raw producer: the limit -------------------------------------------------------------------


def raw_pipelined(bus_config: KafkaBusConfig, topic: str, payloads: list[tuple[bytes, bytes]], seconds: float) -> Row:
    """As fast as kafka-python takes them; latency from send() to the broker's ack, per event."""
    from kafka import KafkaProducer

    producer = KafkaProducer(**producer_settings(bus_config))
    producer.send(topic, key=b"warm-up", value=b"").get(timeout=30)
    latencies: list[float] = []
    futures = []
    start = time.perf_counter()
    deadline = start + seconds
    i = 0
    while time.perf_counter() < deadline and i < len(payloads):
        for key, value in payloads[i : i + 100]:
            sent = time.perf_counter()
            future = producer.send(topic, key=key, value=value)
            future.add_callback(lambda _, sent=sent: latencies.append((time.perf_counter() - sent) * 1000))
            futures.append(future)
        i += 100
    for future in futures:
        future.get(timeout=60)
    elapsed = time.perf_counter() - start
    producer.close()
    return Row("raw kafka-python producer, pipelined", len(futures), elapsed, latencies)


def raw_in_flight(bus_config: KafkaBusConfig, topic: str, payloads: list[tuple[bytes, bytes]], seconds: float, limit: int) -> Row:
    """At most `limit` events unacknowledged at a time, like `limit` clients each waiting for an ack."""
    from kafka import KafkaProducer

    producer = KafkaProducer(**producer_settings(bus_config))
    producer.send(topic, key=b"warm-up", value=b"").get(timeout=30)
    slots = threading.BoundedSemaphore(limit)
    latencies: list[float] = []

    def done(sent: float) -> None:
        latencies.append((time.perf_counter() - sent) * 1000)
        slots.release()

    start = time.perf_counter()
    deadline = start + seconds
    n = 0
    for key, value in payloads:
        if time.perf_counter() >= deadline:
            break
        slots.acquire()
        sent = time.perf_counter()
        producer.send(topic, key=key, value=value).add_both(lambda _, sent=sent: done(sent))
        n += 1
    producer.flush(timeout=60)
    elapsed = time.perf_counter() - start
    producer.close()
    return Row(f"raw kafka-python producer, {limit} in flight", n, elapsed, latencies)


# --- the service, in a process of its own ----------------------------------------------------------


class DiscardingBus(EventBus):
    """Takes events and drops them: what the service costs by itself, without any bus behind it."""

    def publish(self, topic: str, key: bytes, value: bytes) -> None:
        pass

    async def publish_many_async(self, topic: str, items: list[tuple[bytes, bytes]], executor=None) -> None:
        pass

    def consumer(self, group: str, topics: list[str]):
        raise NotImplementedError("a discarding bus has nothing to read")


def _serve_main() -> None:
    """The child process: serve until stdin closes. Arguments come as JSON on argv[1]."""
    args = json.loads(sys.argv[1])
    topics = TopicConfig(**args["topics"])
    if args["bus_url"] == "discard:":
        bus: EventBus = DiscardingBus()
    else:
        bus = open_bus(args["bus_url"], **args["bus_settings"])
    config = FeedbackServiceConfig(
        app_tokens={TOKEN: APP}, pseudonym_key=KEY, port=0, topics=topics, max_batch=args["max_batch"]
    )
    server = FeedbackServer(config, bus).start()
    print(server.address, flush=True)
    sys.stdin.read()  # until the parent closes it
    server.stop()
    bus.close()


class ServiceProcess:
    """The feedback service in a child process; the context gives its address."""

    def __init__(self, bus_url: str, bus_settings: dict, topics: TopicConfig, max_batch: int) -> None:
        self._args = json.dumps(
            {"bus_url": bus_url, "bus_settings": bus_settings, "topics": asdict(topics), "max_batch": max_batch}
        )
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        code = "from services.feedback.bench import _serve_main; _serve_main()"
        self._process = subprocess.Popen(
            [sys.executable, "-c", code, self._args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        address = self._process.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"the feedback service did not start (exit code {self._process.wait()})")
        return address

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        self._process.stdin.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


async def _drive(address: str, method: str, requests: list[tuple[bytes, int]], concurrency: int, seconds: float) -> tuple[int, float, list[float]]:
    """Sends pre-serialized requests from `concurrency` callers until the time is up: (events, seconds, call latencies)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE_NAME}/{method}")
        warm_up, count = requests[0]
        await call(warm_up, metadata=AUTH, timeout=60)
        pending = iter(requests[1:])
        latencies: list[float] = []
        events = 0
        start = time.perf_counter()
        deadline = start + seconds

        async def caller() -> None:
            nonlocal events
            for payload, n in pending:
                if time.perf_counter() >= deadline:
                    return
                sent = time.perf_counter()
                await call(payload, metadata=AUTH, timeout=60)
                latencies.append((time.perf_counter() - sent) * 1000)
                events += n

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return events, time.perf_counter() - start, latencies


def service_row(address: str, path: str, method: str, requests: list[tuple[bytes, int]], concurrency: int, seconds: float, baseline: str | None) -> Row:
    events, elapsed, latencies = asyncio.run(_drive(address, method, requests, concurrency, seconds))
    return Row(path, events, elapsed, latencies, latency_of="call", baseline=baseline)


def batch_requests(factory: EventFactory, events: int, size: int) -> list[tuple[bytes, int]]:
    return [(fb.SubmitBatchRequest(events=factory.events(size)).SerializeToString(), size) for _ in range(max(2, events // size))]


def unary_requests(factory: EventFactory, events: int) -> list[tuple[bytes, int]]:
    return [(factory.event().SerializeToString(), 1) for _ in range(max(2, events))]


# --- the run ---------------------------------------------------------------------------------------


def measure(config: FeedbackBenchConfig, kafka: LocalKafka, workdir: Path, progress=print) -> list[dict]:
    """Rows in pairs (raw producer, then the service doing the same), interleaved over `rounds` so
    that a noisy moment hurts both sides alike; each row keeps its best round."""
    factory = EventFactory(config.sessions, config.seed)
    bus_config = KafkaBusConfig(kafka.bootstrap, api_version=(0, 9), client_id="bench-raw")
    run = uuid.uuid4().hex[:8]
    best: dict[str, Row] = {}

    def keep(row: Row) -> Row:
        if row.path not in best or row.events_per_s > best[row.path].events_per_s:
            best[row.path] = row
        progress(f"  {row.path}: {row.events_per_s:,.0f} events/s")
        return row

    payloads = as_published(factory.events(int(config.seconds * 40_000)))
    progress("  warming up the broker (not measured) ...")
    raw_pipelined(bus_config, f"bench-warm-up-{run}", payloads, min(3.0, config.seconds))

    settings = dict(client_id="bench-feedback", spool_dir=str(workdir / "spool"))
    topics = TopicConfig(feedback=f"bench-feedback-{run}")
    raw_topic = f"bench-raw-{run}"
    batch_path = f"gRPC SubmitBatch({config.batch}) x{config.batch_concurrency}"
    unary_path = f"gRPC Submit x{config.unary_concurrency}"
    with contextlib.ExitStack() as services:
        kafka_service = services.enter_context(ServiceProcess(kafka.url, settings, topics, config.batch))
        sqlite_service = services.enter_context(ServiceProcess(f"sqlite://{workdir / 'bus.db'}", {}, topics, config.batch))
        no_bus_service = services.enter_context(ServiceProcess("discard:", {}, topics, config.batch))
        for _ in range(config.rounds):
            raw = keep(raw_pipelined(bus_config, raw_topic, payloads, config.seconds))
            # Enough requests for 1.5x the raw rate; a row ends early if they run out.
            requests = batch_requests(factory, int(raw.events_per_s * config.seconds * 1.5), config.batch)
            keep(service_row(kafka_service, f"{batch_path} -> Kafka", "SubmitBatch",
                             requests, config.batch_concurrency, config.seconds, raw.path))
            raw = keep(raw_in_flight(bus_config, raw_topic, payloads, config.seconds, config.unary_concurrency))
            requests = unary_requests(factory, int(raw.events_per_s * config.seconds * 1.5))
            keep(service_row(kafka_service, f"{unary_path} -> Kafka", "Submit",
                             requests, config.unary_concurrency, config.seconds, raw.path))
            requests = batch_requests(factory, int(config.seconds * 60_000), config.batch)
            keep(service_row(sqlite_service, f"{batch_path} -> embedded SQLite bus", "SubmitBatch",
                             requests, config.batch_concurrency, config.seconds, None))
            requests = unary_requests(factory, int(config.seconds * 10_000))
            keep(service_row(no_bus_service, f"{unary_path} -> no bus (the service's own ceiling)", "Submit",
                             requests, config.unary_concurrency, config.seconds, None))
    return [row.summary(best) for row in best.values()]


def run_bench(config: FeedbackBenchConfig, as_json: bool = False) -> int:
    progress = (lambda *_: None) if as_json else print
    progress("starting a local Kafka 0.9 broker ...")
    with LocalKafka() as kafka, tempfile.TemporaryDirectory(prefix="fuseloop-bench-") as tmp:
        results = measure(config, kafka, Path(tmp), progress)
    report = {"benchmark": "feedback", "config": asdict(config), "broker": "Kafka 0.9.0.1 (local, 1 broker)",
              "producer": "kafka-python, acks=all, gzip, same settings for raw and service", "rows": results}
    if as_json:
        print(json.dumps(report))
        return 0
    print()
    print(f"Feedback ingestion, best of {config.rounds} rounds of {config.seconds:g} s. "
          "Latency: per event ack (raw) or per call (gRPC).")
    print(f"{'path':<58} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'vs raw':>7}")
    for r in results:
        ratio = f"{r['vs_raw']:.2f}x" if r["vs_raw"] is not None else ""
        print(f"{r['path']:<58} {r['events_per_s']:>10,.0f} {r['latency_p50_ms']:>8.2f} {r['latency_p99_ms']:>8.2f} {ratio:>7}")
    return 0
