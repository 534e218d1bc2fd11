"""The feedback gRPC server: FeedbackService + health + reflection on one grpc.aio server.

`serve_feedback(config, bus)` runs it in the caller's event loop (the CLI); `FeedbackServer`
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
from fuseloop.v1 import events_pb2, feedback_pb2
from services.feedback.app_tokens import AppTokens
from services.feedback.pseudonym import Pseudonymizer
from services.feedback.service import FeedbackService, safe_deserializer
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
    max_batch: int = 1000  # events per SubmitBatch, and per bus write in Stream
    max_message_bytes: int = 4 * 1024 * 1024
    recent_event_ids: int = 100_000  # remembered to answer resubmits as duplicates
    publish_threads: int = 32  # bus writes block until durable; this many may wait at once
    shutdown_grace_s: float = 5.0

    @property
    def limits(self) -> FeedbackLimits:
        return FeedbackLimits(max_text_bytes=self.max_text_bytes, max_id_bytes=self.max_id_bytes)


async def build_server(config: FeedbackServiceConfig, bus: EventBus, executor: ThreadPoolExecutor) -> tuple[grpc.aio.Server, int]:
    """A started server and the port it listens on."""
    service = FeedbackService(
        bus=bus,
        topic=config.topics.feedback,
        tokens=AppTokens(config.app_tokens),
        pseudonymizer=Pseudonymizer(config.pseudonym_key),
        limits=config.limits,
        max_batch=config.max_batch,
        executor=executor,
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
                        service.submit,
                        request_deserializer=event,
                        response_serializer=feedback_pb2.SubmitResponse.SerializeToString,
                    ),
                    "SubmitBatch": grpc.unary_unary_rpc_method_handler(
                        service.submit_batch,
                        request_deserializer=safe_deserializer(feedback_pb2.SubmitBatchRequest),
                        response_serializer=feedback_pb2.SubmitBatchResponse.SerializeToString,
                    ),
                    "Stream": grpc.stream_unary_rpc_method_handler(
                        service.stream,
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
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def serve_feedback(config: FeedbackServiceConfig, bus: EventBus, ready: asyncio.Event | None = None) -> None:
    """Serves until cancelled, then stops gracefully (in-flight calls get `shutdown_grace_s`)."""
    with ThreadPoolExecutor(config.publish_threads, thread_name_prefix="feedback-publish") as executor:
        server, _ = await build_server(config, bus, executor)
        if ready is not None:
            ready.set()
        try:
            await server.wait_for_termination()
        finally:
            await asyncio.shield(server.stop(config.shutdown_grace_s))


class FeedbackServer:
    """The server on its own thread and event loop. The bus stays the caller's to close."""

    def __init__(self, config: FeedbackServiceConfig, bus: EventBus) -> None:
        self.config = config
        self.bus = bus
        self.port = 0
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
                self._server, self.port = self._loop.run_until_complete(build_server(self.config, self.bus, self._executor))
            except BaseException as e:  # reported to start()'s caller
                failure.append(e)
                started.set()
                return
            started.set()
            self._loop.run_until_complete(self._server.wait_for_termination())
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
            self._thread.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._server = None

    def __enter__(self) -> "FeedbackServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
