"""The inference gRPC server: InferenceService, AdminService, KServe v2, health and reflection on
one grpc.aio server, plus Prometheus metrics over HTTP.

`InferenceServer` is built from its parts (runtime, repository, bus, config, clock) and started
with `await start()` in the caller's event loop; `ServerThread` runs one on a thread of its own
(tests, benchmarks). Health is NOT_SERVING until a version is loaded, and again while the
generation engine process is being replaced after it died. Generation runs in that child process (`engine_process`); everything else,
scoring included, in this one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2, service_pb2_grpc

from fuseloop.bus import EventBus
from fuseloop.events import now_ms
from fuseloop.loop_bridge import LoopBridge
from fuseloop.repository import MODELS, ModelRepository
from fuseloop.tls import listen
from fuseloop.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from services.inference.admin import AdminAuth, AdminService
from services.inference.config import InferenceServiceConfig
from services.inference.deployment import Deployment
from services.inference.engine import EngineConfig
from services.inference.engine_process import EngineProcess
from services.inference.events import EventPublisher
from services.inference.batching import Batcher
from services.inference.kserve import KServeModels, KServeService
from services.inference.kserve_batching import infer_jobs
from services.inference.metrics import InferenceMetrics
from services.inference.rpc_handlers import add_service
from services.inference.runtime.base import SCORING_GRAPHS, ModelRuntime
from services.inference.scoring import score_batcher
from services.inference.service import InferenceService

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
KSERVE_SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING_NAMES = ("", INFERENCE_SERVICE, KSERVE_SERVICE)


class InferenceServer:
    def __init__(self, config: InferenceServiceConfig, runtime: ModelRuntime, repo: ModelRepository,
                 bus: EventBus | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = now_ms,
                 state_path: Path | None = None, shuffle: random.Random | None = None) -> None:
        self.config = config
        self.runtime = runtime
        self.repo = repo
        self.bus = bus
        self.clock = clock
        self.wall_ms = wall_ms
        self.state_path = state_path
        self.shuffle = shuffle
        self.port = 0
        self.metrics_port: int | None = None
        self.metrics = InferenceMetrics()
        self._server: grpc.aio.Server | None = None
        self._initial_load: asyncio.Task | None = None
        self._started: list = []  # parts to release on stop, in start order

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self, wait_ready: bool = True) -> "InferenceServer":
        """Listens at once (NOT_SERVING), then loads the initial version; `wait_ready` waits for that."""
        try:
            return await self._start(wait_ready)
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self, wait_ready: bool) -> "InferenceServer":
        c = self.config
        self.executor = ThreadPoolExecutor(c.worker_threads, thread_name_prefix="inference-worker")
        self._started.append(lambda: self.executor.shutdown(wait=True))
        self.engine = EngineProcess(self.runtime, self.repo,
                                    EngineConfig(c.max_batch, c.max_queue_delay_ms / 1000, c.max_queue), self.metrics,
                                    image_limits=(c.max_image_bytes, c.max_image_pixels), on_exit=self._engine_exited,
                                    on_restart=self._engine_restarted, max_restarts=c.engine_restarts)
        self._started.append(self.engine.stop)
        await self.engine.start()
        # This process scores; the engine process loads the generation graphs itself.
        self.deployment = Deployment(self.repo, self.runtime, self.executor, self.state_path, mirrors=[self.engine],
                                     watch_interval_s=c.serving_record_watch_s, metrics=self.metrics,
                                     graphs=SCORING_GRAPHS)
        self.metrics.watch_peak_rss("server", os.getpid)
        self.metrics.watch_peak_rss("engine", lambda: self.engine.pid)
        self._started.append(self.deployment.close)
        self.kserve_models = KServeModels(self.deployment, self.executor)
        self._started.append(self.kserve_models.close)
        self.scorer = score_batcher(c.score_max_batch, c.score_max_queue_delay_ms / 1000, c.score_max_queue,
                                    self.metrics.score_batching(), self.clock).start()
        self._started.append(self.scorer.stop)
        self.events = EventPublisher(self.bus, c.topics.inference, self.metrics, c.max_pending_events).start()
        self._started.append(self.events.close)
        if self.bus is None:
            log.warning("no event bus: inference events are not logged")
        auth = AdminAuth(c.admin_token)

        self.kserve_batchers = {}
        for model in MODELS:
            batcher = Batcher(f"ModelInfer {model}", infer_jobs, 1, 0.0, c.kserve_max_queue,
                              self.metrics.kserve_batching(model), self.clock).start()
            self._started.append(batcher.stop)
            self.kserve_batchers[model] = batcher
        bridge = LoopBridge(asyncio.get_running_loop())

        server = grpc.aio.server(options=[("grpc.max_receive_message_length", c.max_message_bytes),
                                          ("grpc.max_send_message_length", c.max_message_bytes)])
        add_service(server, InferenceService(c, self.deployment, self.engine, self.scorer, self.events, self.metrics,
                                             self.executor, bridge, self.clock,
                                             self.wall_ms, self.shuffle),
                    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"], inference_pb2_grpc.InferenceServiceServicer)
        add_service(server, AdminService(self.deployment, auth, self.runtime.name),
                    admin_pb2.DESCRIPTOR.services_by_name["AdminService"], admin_pb2_grpc.AdminServiceServicer)
        add_service(server, KServeService(self.kserve_models, auth, self.executor, bridge, self.kserve_batchers,
                                          metrics=self.metrics, clock=self.clock),
                    service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                    service_pb2_grpc.GRPCInferenceServiceServicer)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, ADMIN_SERVICE, KSERVE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = listen(server, f"{c.host}:{c.port}", c.tls)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.deployment.on_swap(self._swapped)
        await server.start()
        self._server = server
        if c.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(c.host, c.metrics_port)
            self._started.append(self.metrics.stop_http)
        self._initial_load = asyncio.create_task(self.deployment.start())
        if wait_ready:
            await self._initial_load
        return self

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops taking requests, lets in-flight ones finish (up to the grace period), then releases
        the workers (engine and scorer finish what they hold; queued events are written)."""
        if self._initial_load is not None and not self._initial_load.done():
            self._initial_load.cancel()
        if getattr(self, "deployment", None) is not None:
            await self.deployment.stop_watching()
        if self._server is not None:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            await self._server.stop(self.config.shutdown_grace_s if grace_s is None else grace_s)
            self._server = None
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        while self._started:
            release = self._started.pop()
            try:
                release()
            except Exception:  # keep releasing the rest
                log.exception("stopping a part of the inference server failed")

    async def _swapped(self, version: int) -> None:
        self.metrics.serving_version.set(version)
        self.metrics.deploys.inc()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _engine_exited(self, error: BaseException) -> None:
        """Nothing can generate until a new engine process is up (or ever, once the restarts are
        spent: then the orchestrator restarts the server)."""
        if self._server is not None:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _engine_restarted(self) -> None:
        if self._server is not None and self.deployment.serving is not None:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(self, status) -> None:
        for name in SERVING_NAMES:
            await self.health.set(name, status)


class ServerThread:
    """An InferenceServer on its own thread and event loop, with blocking start()/stop()."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="inference-server", daemon=True)

    @property
    def address(self) -> str:
        return self.server.address

    def start(self, wait_ready: bool = True) -> "ServerThread":
        self._thread.start()
        try:
            self.call(self.server.start(wait_ready))
        except BaseException:
            self.stop()
            raise
        return self

    def call(self, coro, timeout: float | None = 120):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace_s: float | None = None) -> None:
        if self._thread.is_alive():
            try:
                self.call(self.server.stop(grace_s))
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join()
                self.loop.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
