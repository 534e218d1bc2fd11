"""fuseloop.v1.InferenceService: Generate, GenerateStream and Score over the engine and the scorer.

A request leases the serving version first and keeps it to the end (a hot swap never changes its
model), checks and preprocesses its inputs with that version's preprocessor, then waits for the
engine process (generation) or the scoring thread. Every failure becomes a gRPC status saying what
was wrong.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

import grpc
import numpy as np

from fuseloop.events import new_id, now_ms
from fuseloop.loop_bridge import LoopBridge, settle
from fuseloop.preprocessing import InvalidInput, image_pixels
from fuseloop.v1 import inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from services.inference.batching import Batcher
from services.inference.deployment import Deployment, Lease, NoServingVersion
from services.inference.engine import GeneratedSequence, GenerationJob, SequenceSpec
from services.inference.engine_process import EngineProcess
from services.inference.events import EventPublisher, ResponseRecord, build_event
from services.inference.metrics import InferenceMetrics
from services.inference.queueing import Arrival, Cancelled, DeadlineExceeded, ModelFailure, QueueClosed, QueueFull
from services.inference.runtime.base import LoadedVersion
from services.inference.scoring import ScoreJob
from services.inference.tokenization_cache import TokenizationCache
from services.inference.validation import GenerateParams, check_text, generate_params

log = logging.getLogger(__name__)

STATUS_OF = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NoServingVersion: grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    QueueClosed: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    ModelFailure: grpc.StatusCode.INTERNAL,
}
KNOWN_ERRORS = tuple(STATUS_OF)


class ObservedRpc:
    """Counts an RPC's outcome and latency: `async with ObservedRpc(metrics, "Generate") as call`."""

    def __init__(self, metrics: InferenceMetrics, method: str) -> None:
        self.metrics, self.method = metrics, method
        self.lease: Lease | None = None  # set once the call has a version: its latency is also counted by version and arm
        self._recorded = False

    async def __aenter__(self) -> "ObservedRpc":
        self.t0 = time.perf_counter()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is asyncio.CancelledError:
            self.record(grpc.StatusCode.CANCELLED)
        self.record(grpc.StatusCode.OK if exc is None else grpc.StatusCode.INTERNAL)

    def record(self, code: grpc.StatusCode) -> None:
        """Counts the outcome once (an abort sends its status at once, so it records first)."""
        if not self._recorded:
            self._recorded = True
            self.metrics.requests.labels(self.method, code.name).inc()
            seconds = time.perf_counter() - self.t0
            self.metrics.latency.labels(self.method).observe(seconds)
            if self.lease is not None:
                self.metrics.version_latency.labels(self.method, str(self.lease.loaded.version),
                                                    self.lease.arm).observe(seconds)


async def abort_for(context: grpc.aio.ServicerContext, call: ObservedRpc, error: Exception) -> None:
    code = next(c for t, c in STATUS_OF.items() if isinstance(error, t))
    call.record(code)
    await context.abort(code, str(error))


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, config: InferenceServiceConfig, deployment: Deployment, engine: EngineProcess,
                 scorer: Batcher[ScoreJob], events: EventPublisher, metrics: InferenceMetrics, executor: Executor,
                 bridge: LoopBridge, clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = now_ms, shuffle: random.Random | None = None) -> None:
        self.config = config
        self.deployment = deployment
        self.engine = engine
        self.scorer = scorer
        self.events = events
        self.metrics = metrics
        self.executor = executor
        self.bridge = bridge
        self.tokens = TokenizationCache()
        self.clock = clock
        self.wall_ms = wall_ms
        self.shuffle = shuffle or random.Random()

    # -- RPCs -----------------------------------------------------------------------------------
    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> inference_pb2.GenerateResponse:
        async with ObservedRpc(self.metrics, "Generate") as call:
            request_id = new_id()
            try:
                with self.engine.queue.arriving() as arrival, \
                        self.deployment.acquire(request.session_id or request_id) as lease:
                    loaded, call.lease = lease.loaded, lease
                    params = generate_params(request, self.config, self._max_tokens(loaded))
                    pixels, prompt_ids = await self._inputs(loaded, request.image, request.prompt,
                                                            for_engine=not params.rerank)  # reranking scores pixels here
                    sequences = await self._generate(arrival, loaded, pixels, prompt_ids, params, context)
                    texts = [self.tokens(loaded).decode(s.token_ids) for s in sequences]
                    rewards = None
                    if params.rerank:
                        rewards = await self._score(loaded, pixels, prompt_ids, texts, context)
                        chosen = [int(i) for i in np.argsort(-rewards, kind="stable")[: params.num_candidates]]
                    else:
                        chosen = list(range(len(sequences)))
            except KNOWN_ERRORS as e:
                await abort_for(context, call, e)
            shown = self._display_order(chosen)
            records = [ResponseRecord(new_id(), texts[i], s.token_ids, s.logprobs,
                                      None if rewards is None else float(rewards[i]),
                                      shown.index(i) if i in shown else -1)
                       for i, s in enumerate(sequences)]
            response = inference_pb2.GenerateResponse(request_id=request_id, model_version=str(loaded.version))
            for i in shown:
                r = records[i]
                c = response.candidates.add(response_id=r.response_id, text=r.text, logprob=float(sum(r.logprobs)),
                                            num_tokens=len(r.token_ids))
                if r.reward is not None:
                    c.reward = r.reward
            self._log_event(request, request_id, lease, records, params)
            return response

    async def GenerateStream(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        async with ObservedRpc(self.metrics, "GenerateStream") as call:
            request_id = new_id()
            try:
                with self.engine.queue.arriving() as arrival, \
                        self.deployment.acquire(request.session_id or request_id) as lease:
                    loaded, call.lease = lease.loaded, lease
                    params = generate_params(request, self.config, self._max_tokens(loaded))
                    if params.rerank:
                        raise InvalidInput("best_of reranks finished candidates, so it cannot stream; use Generate")
                    pixels, prompt_ids = await self._inputs(loaded, request.image, request.prompt, for_engine=True)
                    n = params.num_sequences
                    shown = self._display_order(list(range(n)))
                    position = {c: p for p, c in enumerate(shown)}
                    response_ids = [new_id() for _ in range(n)]
                    tokens: list[list[int]] = [[] for _ in range(n)]
                    texts = [""] * n
                    pre = loaded.preprocessor
                    tokenization = self.tokens(loaded)
                    job, steps = self._submit_stream(arrival, loaded, pixels, prompt_ids, params, context)
                    try:
                        while (items := await steps.get()) is not None:
                            if isinstance(items, BaseException):
                                raise items
                            for i, token in items:
                                tokens[i].append(token)
                                text = tokenization.decode(tokens[i])
                                delta = text[len(texts[i]):] if text.startswith(texts[i]) else text
                                texts[i] = text
                                done = token == pre.eos_id or len(tokens[i]) >= params.max_new_tokens
                                yield inference_pb2.GenerateChunk(
                                    candidate_index=position[i], response_id=response_ids[i], text_delta=delta,
                                    done=done, model_version=str(loaded.version), request_id=request_id)
                    finally:
                        job.cancel()  # no-op once finished; stops decoding when the client goes away mid-stream
            except KNOWN_ERRORS as e:
                await abort_for(context, call, e)
            records = [ResponseRecord(response_ids[i], texts[i], s.token_ids, s.logprobs, None, position[i])
                       for i, s in enumerate(job.sequences)]
            self._log_event(request, request_id, lease, records, params)

    async def Score(self, request: inference_pb2.ScoreRequest, context: grpc.aio.ServicerContext
                    ) -> inference_pb2.ScoreResponse:
        async with ObservedRpc(self.metrics, "Score") as call:
            try:
                with self.scorer.queue.arriving() as arrival, self.deployment.acquire() as lease:
                    loaded = lease.loaded
                    check_text("response", request.response, self.config.max_response_chars)
                    pixels, prompt_ids = await self._inputs(loaded, request.image, request.prompt)
                    rewards = await self._score(loaded, pixels, prompt_ids, [request.response], context, arrival)
            except KNOWN_ERRORS as e:
                await abort_for(context, call, e)
            return inference_pb2.ScoreResponse(reward=float(rewards[0]), model_version=str(loaded.version))

    # -- steps ----------------------------------------------------------------------------------
    def _max_tokens(self, loaded: LoadedVersion) -> int:
        return loaded.preprocessor.config.max_response_tokens

    async def _inputs(self, loaded: LoadedVersion, image: bytes, prompt: str, for_engine: bool = False
                      ) -> tuple[np.ndarray | bytes, list[int]]:
        """Checked, preprocessed (pixels (3, H, W), prompt ids). Large images decode off the event
        loop. `for_engine`: small images stay encoded, for the engine process to check and decode
        (the event loop is the server's busiest thread; the engine decodes them between steps)."""
        check_text("prompt", prompt, self.config.max_prompt_chars)
        prompt_ids = self.tokens(loaded).prompt_ids(prompt)
        small = len(image) <= self.config.inline_decode_max_image_bytes
        if small and for_engine:
            return image, prompt_ids
        limits = loaded.preprocessor.config.within(self.config.max_image_bytes, self.config.max_image_pixels)
        if small:
            return image_pixels(image, limits), prompt_ids
        return await asyncio.get_running_loop().run_in_executor(self.executor, image_pixels, image, limits), prompt_ids

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else self.clock() + remaining

    def _specs(self, params: GenerateParams) -> list[SequenceSpec]:
        return [SequenceSpec(params.temperature, params.top_p, params.max_new_tokens, params.seed, i)
                for i in range(params.num_sequences)]

    async def _generate(self, arrival: Arrival, loaded: LoadedVersion, pixels: np.ndarray | bytes, prompt_ids: list[int],
                        params: GenerateParams, context: grpc.aio.ServicerContext) -> list[GeneratedSequence]:
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        job = GenerationJob(loaded, pixels, prompt_ids, self._specs(params),
                            on_done=lambda j, err: settle(done, err),  # on the loop (EngineProcess)
                            deadline=self._deadline(context))
        arrival.put(job)
        try:
            await done
        except asyncio.CancelledError:
            job.cancel()
            raise
        return job.sequences

    def _submit_stream(self, arrival: Arrival, loaded: LoadedVersion, pixels: np.ndarray | bytes, prompt_ids: list[int],
                       params: GenerateParams, context: grpc.aio.ServicerContext) -> tuple[GenerationJob, asyncio.Queue]:
        """Submits a job whose queue receives [(candidate index, token id)] per decode step, then
        None when done (or the exception that ended it)."""
        steps: asyncio.Queue = asyncio.Queue()
        job = GenerationJob(loaded, pixels, prompt_ids, self._specs(params),
                            on_done=lambda j, err: steps.put_nowait(err),
                            on_tokens=lambda j, items: steps.put_nowait(items),
                            deadline=self._deadline(context))
        arrival.put(job)
        return job, steps

    async def _score(self, loaded: LoadedVersion, pixels: np.ndarray, prompt_ids: list[int], responses: list[str],
                     context: grpc.aio.ServicerContext, arrival: Arrival | None = None) -> np.ndarray:
        pre = loaded.preprocessor
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        tokenization = self.tokens(loaded)
        job = ScoreJob(loaded, pixels, prompt_ids, [[pre.bos_id] + tokenization.response_ids(r) for r in responses],
                       on_done=lambda j, rewards, err: self.bridge.post(settle, done, err, rewards),
                       deadline=self._deadline(context))
        (arrival.put if arrival is not None else self.scorer.submit)(job)
        try:
            return await done
        except asyncio.CancelledError:
            job.cancel()
            raise

    def _display_order(self, chosen: list[int]) -> list[int]:
        """Candidates in the order shown: random when several, so position bias can be estimated."""
        shown = list(chosen)
        if len(shown) > 1:
            self.shuffle.shuffle(shown)
        return shown

    def _log_event(self, request: inference_pb2.GenerateRequest, request_id: str, lease: Lease,
                   records: list[ResponseRecord], params: GenerateParams) -> None:
        timestamp_ms = self.wall_ms()
        version = lease.loaded.version
        self.metrics.responses.labels(str(version), lease.arm).inc()
        self.events.publish(request.session_id or request_id, lambda: build_event(
            request_id=request_id, model_version=version, prompt=request.prompt, image=request.image,
            image_max_bytes=self.config.event_image_max_bytes, responses=records, sampling=params.sampling_proto(),
            timestamp_ms=timestamp_ms, session_id=request.session_id, arm=lease.arm))
