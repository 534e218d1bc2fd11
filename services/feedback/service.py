"""The FeedbackService RPCs: authenticate, validate, pseudonymize, publish durably, answer.

OK means durable (the bus says so: Kafka acked, or fsynced to the local spool). A resubmitted
event_id that this process accepted recently is answered as a duplicate and not written again;
that is best effort, and consumers still drop repeats themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

import grpc
from google.protobuf.message import Message

from fuseloop.bus import BusError, BusFull, EventBus, EventDeduper, dedupe_key
from fuseloop.events import EVENT_SCHEMA_VERSION, now_ms
from fuseloop.rpc_decoding import Malformed
from fuseloop.v1 import events_pb2, feedback_pb2
from services.feedback.app_tokens import AppTokens, Unauthenticated
from services.feedback.metrics import FeedbackMetrics
from services.feedback.pseudonym import Pseudonymizer
from services.feedback.validation import FeedbackLimits, InvalidFeedback, check_event

log = logging.getLogger(__name__)


class FeedbackService:
    def __init__(
        self,
        bus: EventBus,
        topic: str,
        tokens: AppTokens,
        pseudonymizer: Pseudonymizer,
        limits: FeedbackLimits,
        max_batch: int,
        stream_chunk: int,
        executor: Executor,
        metrics: FeedbackMetrics,
        recent_event_ids: int = 100_000,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self._bus = bus
        self._topic = topic
        self._tokens = tokens
        self._pseudonymizer = pseudonymizer
        self._limits = limits
        self._max_batch = max_batch
        self._stream_chunk = min(stream_chunk, max_batch)
        self._executor = executor
        self._metrics = metrics
        self._recent = EventDeduper(capacity=recent_event_ids)
        self._clock_ms = clock_ms

    async def submit(self, request: events_pb2.FeedbackEvent | Malformed, context: grpc.aio.ServicerContext) -> feedback_pb2.SubmitResponse:
        app_id = await self._authenticate(context)
        event = await self._well_formed(request, context)
        await self._prepare(event, app_id, context, where="")
        accepted, _ = await self._publish([event], app_id, context)
        return feedback_pb2.SubmitResponse(event_id=event.event_id, duplicate=accepted == 0)

    async def submit_batch(self, request: feedback_pb2.SubmitBatchRequest | Malformed, context: grpc.aio.ServicerContext) -> feedback_pb2.SubmitBatchResponse:
        app_id = await self._authenticate(context)
        batch = await self._well_formed(request, context)
        if len(batch.events) > self._max_batch:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the batch has {len(batch.events)} events; the limit is {self._max_batch} (split it)",
            )
        # All or nothing: a bad event rejects the batch before anything is written.
        for i, event in enumerate(batch.events):
            await self._prepare(event, app_id, context, where=f"events[{i}]: ")
        accepted, duplicates = await self._publish(list(batch.events), app_id, context)
        return feedback_pb2.SubmitBatchResponse(accepted=accepted, duplicates=duplicates)

    async def stream(self, requests: AsyncIterator[events_pb2.FeedbackEvent | Malformed], context: grpc.aio.ServicerContext) -> feedback_pb2.SubmitBatchResponse:
        app_id = await self._authenticate(context)
        accepted = duplicates = received = 0
        pending: list[events_pb2.FeedbackEvent] = []
        async for request in requests:
            problem = request.reason if isinstance(request, Malformed) else None
            if problem is None:
                try:
                    self._prepare_or_raise(request, app_id)
                except InvalidFeedback as e:
                    problem = str(e)
            if problem is not None:
                # Events before the bad one are kept, so the message can say exactly what happened.
                a, d = await self._publish(pending, app_id, context)
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"event #{received} of the stream: {problem}; the {received} events before it were taken "
                    f"({accepted + a} accepted, {duplicates + d} duplicates) and it is safe to send them again",
                )
            pending.append(request)
            received += 1
            if len(pending) >= self._stream_chunk:
                a, d = await self._publish(pending, app_id, context)
                accepted, duplicates, pending = accepted + a, duplicates + d, []
        a, d = await self._publish(pending, app_id, context)
        return feedback_pb2.SubmitBatchResponse(accepted=accepted + a, duplicates=duplicates + d)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        try:
            return self._tokens.app_for(context.invocation_metadata())
        except Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            raise  # unreachable: abort raises

    async def _well_formed(self, request: Message | Malformed, context: grpc.aio.ServicerContext) -> Message:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return request

    async def _prepare(self, event: events_pb2.FeedbackEvent, app_id: str, context: grpc.aio.ServicerContext, where: str) -> None:
        try:
            self._prepare_or_raise(event, app_id)
        except InvalidFeedback as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where}{e}")

    def _prepare_or_raise(self, event: events_pb2.FeedbackEvent, app_id: str) -> None:
        """Validates, then fills in what the service owns: app id, pseudonym, version, time."""
        check_event(event, self._limits)
        event.app_id = app_id  # from the token, whatever the client claimed
        event.user_id = self._pseudonymizer.user(app_id, event.user_id)
        event.schema_version = EVENT_SCHEMA_VERSION
        if event.timestamp_ms == 0:
            event.timestamp_ms = self._clock_ms()

    async def _publish(self, events: list[events_pb2.FeedbackEvent], app_id: str, context: grpc.aio.ServicerContext) -> tuple[int, int]:
        """(accepted, duplicates). Durable when it returns; aborts with a retryable status when not."""
        fresh: list[events_pb2.FeedbackEvent] = []
        keys: set[str] = set()
        for event in events:
            key = dedupe_key(app_id, event.event_id)
            if key not in keys and key not in self._recent:
                keys.add(key)
                fresh.append(event)
        if fresh:
            items = [(e.session_id.encode("utf-8"), e.SerializeToString()) for e in fresh]
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                await self._bus.publish_many_async(self._topic, items, self._executor)
            except BusFull as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"not accepted, retry later: {e}")
            except BusError as e:
                log.error("publishing feedback failed: %s", e)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"not accepted, retry later: {e}")
            self._metrics.publish_seconds.observe(loop.time() - started)
            for key in keys:
                self._recent.add(key)
            self._metrics.count_accepted(app_id, [e.WhichOneof("signal") for e in fresh])
        if len(events) > len(fresh):
            self._metrics.duplicates.labels(app_id).inc(len(events) - len(fresh))
        return len(fresh), len(events) - len(fresh)
