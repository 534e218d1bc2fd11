"""The feedback gRPC server: FeedbackService + health + reflection on one grpc.aio server.

`serve_feedback(config, bus, stop)` runs it in the caller's event loop (the CLI); `FeedbackServer`
runs it on a thread of its own with start()/stop(), for tests, benchmarks and the demo.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fuseloop.bus import EventBus, TopicConfig
from fuseloop.rpc_decoding import safe_deserializer
from fuseloop.tls import TlsConfig, listen
from fuseloop.v1 import events_pb2, feedback_pb2
from services.feedback.app_tokens import AppTokens
from services.feedback.metrics import FeedbackMetrics
from services.feedback.pseudonym import Pseudonymizer
from services.feedback.service import FeedbackService
from services.feedback.validation import FeedbackLimits

SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name


@dataclass
class FeedbackServiceConfig:
    app_tokens: dict[str, str]  # token -> app id
    pseudonym_key: bytes  # secret for the user-id HMAC; at least 16 bytes
    host: str = "127.0.0.1"
    port: int = 50052  # 0: any free port
    topics: TopicConfig = field(default_factory=TopicConfig)
    max_text_bytes: int = 8 * 1024
    max_id_bytes: int = 256
    max_batch: int = 1000  # events per SubmitBatch
    stream_chunk: int = 100  # a Stream writes its events to the bus in chunks of this many
    max_message_bytes: int = 4 * 1024 * 1024
    recent_event_ids: int = 100_000  # remembered to answer resubmits as duplicates
    publish_threads: int = 32  # bus writes block until durable; this many may wait at once
    metrics_port: int | None = None  # serve Prometheus /metrics here (0: any free port)
    shutdown_grace_s: float = 5.0
    tls: TlsConfig | None = None  # None: plaintext (terminate TLS in front of the service)

    @property
    def limits(self) -> FeedbackLimits:
        return FeedbackLimits(max_text_bytes=self.max_text_bytes, max_id_bytes=self.max_id_bytes)


def _counted(method: str, handler, metrics: FeedbackMetrics):
    async def counted(request, context: grpc.aio.ServicerContext):
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await handler(request, context)
            code = grpc.StatusCode.OK
            return response
        except grpc.aio.AbortError:
            code = context.code() or code
            raise
        finally:
            metrics.requests.labels(method, code.name).inc()

    return counted


async def build_server(
    config: FeedbackServiceConfig, bus: EventBus, executor: ThreadPoolExecutor, metrics: FeedbackMetrics
) -> tuple[grpc.aio.Server, int]:
    """A started server and the port it listens on."""
    service = FeedbackService(
        bus=bus,
        topic=config.topics.feedback,
        tokens=AppTokens(config.app_tokens),
        pseudonymizer=Pseudonymizer(config.pseudonym_key),
        limits=config.limits,
        max_batch=config.max_batch,
        stream_chunk=config.stream_chunk,
        executor=executor,
        metrics=metrics,
        recent_event_ids=config.recent_event_ids,
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
    )
    event = safe_deserializer(events_pb2.FeedbackEvent)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE_NAME,
                {
                    "Submit": grpc.unary_unary_rpc_method_handler(
                        _counted("Submit", service.submit, metrics),
                        request_deserializer=event,
                        response_serializer=feedback_pb2.SubmitResponse.SerializeToString,
                    ),
                    "SubmitBatch": grpc.unary_unary_rpc_method_handler(
                        _counted("SubmitBatch", service.submit_batch, metrics),
                        request_deserializer=safe_deserializer(feedback_pb2.SubmitBatchRequest),
                        response_serializer=feedback_pb2.SubmitBatchResponse.SerializeToString,
                    ),
                    "Stream": grpc.stream_unary_rpc_method_handler(
                        _counted("Stream", service.stream, metrics),
                        request_deserializer=event,
                        response_serializer=feedback_pb2.SubmitBatchResponse.SerializeToString,
                    ),
                },
            ),
        )
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = listen(server, f"{config.host}:{config.port}", config.tls)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def new_metrics(bus: EventBus) -> FeedbackMetrics:
    spooled = getattr(bus, "spooled", None)  # only the Kafka bus spools
    return FeedbackMetrics(spooled=(lambda: bus.spooled) if spooled is not None else None)


async def serve_feedback(config: FeedbackServiceConfig, bus: EventBus, stop: asyncio.Event) -> None:
    """Serves until `stop` is set, then stops gracefully (in-flight calls get `shutdown_grace_s`)."""
    metrics = new_metrics(bus)
    with ThreadPoolExecutor(config.publish_threads, thread_name_prefix="feedback-publish") as executor:
        server, port = await build_server(config, bus, executor, metrics)
        metrics_port = metrics.serve_http(config.host, config.metrics_port) if config.metrics_port is not None else None
        print(
            f"feedback service on {config.host}:{port}" + (f", metrics on :{metrics_port}/metrics" if metrics_port else ""),
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await server.stop(config.shutdown_grace_s)
            metrics.stop_http()


class FeedbackServer:
    """The server on its own thread and event loop. The bus stays the caller's to close."""

    def __init__(self, config: FeedbackServiceConfig, bus: EventBus) -> None:
        self.config = config
        self.bus = bus
        self.port = 0
        self.metrics = new_metrics(bus)
        self.metrics_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> "FeedbackServer":
        started = threading.Event()
        failure: list[BaseException] = []
        self._executor = ThreadPoolExecutor(self.config.publish_threads, thread_name_prefix="feedback-publish")

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._server, self.port = self._loop.run_until_complete(build_server(self.config, self.bus, self._executor, self.metrics))
                if self.config.metrics_port is not None:
                    self.metrics_port = self.metrics.serve_http(self.config.host, self.config.metrics_port)
            except BaseException as e:  # reported to start()'s caller
                failure.append(e)
                started.set()
                return
            started.set()
            self._loop.run_forever()  # until stop()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="feedback-server", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self, grace_s: float | None = None) -> None:
        if self._server is not None and self._loop is not None and self._thread is not None and self._thread.is_alive():
            grace = self.config.shutdown_grace_s if grace_s is None else grace_s
            asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.metrics.stop_http()
        self._server = None

    def __enter__(self) -> "FeedbackServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
