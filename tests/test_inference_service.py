"""The inference service over real gRPC: Generate, GenerateStream and Score, seeded sampling,
best_of reranking, inference events on the bus, health, reflection and metrics."""

from __future__ import annotations

import io
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from fuseloop.bus import TopicConfig, open_bus
from fuseloop.repository import ModelRepository
from fuseloop.scenes import make_split, png_bytes, render
from fuseloop.v1 import events_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import ADMIN_SERVICE, INFERENCE_SERVICE, KSERVE_SERVICE, InferenceServer, ServerThread

EXAMPLES = make_split("test", 8)
IMAGE = png_bytes(render(EXAMPLES[0].scene))
PROMPT = EXAMPLES[0].prompt
TOPICS = TopicConfig(inference="test.inference")
INLINE_LIMIT = 4096  # event image bytes inlined up to this size


def noise_png(size: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def sampling(**kw) -> events_pb2.SamplingParams:
    return events_pb2.SamplingParams(**kw)


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    bus = open_bus(f"sqlite://{tmp_path_factory.mktemp('bus')}/bus.db")
    yield bus
    bus.close()


@pytest.fixture(scope="module")
def server(shared_repo_dir, bus):
    config = InferenceServiceConfig(port=0, metrics_port=0, topics=TOPICS, event_image_max_bytes=INLINE_LIMIT,
                                    max_queue_delay_ms=1.0)
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    with ServerThread(InferenceServer(config, runtime, ModelRepository(shared_repo_dir), bus)) as thread:
        yield thread


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return inference_pb2_grpc.InferenceServiceStub(channel)


def events_for(bus, request_ids: set[str], group: str) -> dict[str, tuple[bytes, events_pb2.InferenceEvent]]:
    """Reads the inference topic until every request id has its event; returns request id -> (key, event)."""
    consumer = bus.consumer(group, [TOPICS.inference])
    found = {}
    try:
        for _ in range(100):
            for record in consumer.poll(timeout_s=0.1):
                event = events_pb2.InferenceEvent.FromString(record.value)
                if event.request_id in request_ids:
                    found[event.request_id] = (record.key, event)
            if set(found) == request_ids:
                return found
    finally:
        consumer.close()
    raise AssertionError(f"events missing for {request_ids - set(found)}")


def test_generate_answers_each_candidate_with_its_own_response_id_and_the_serving_version(stub):
    r = stub.Generate(inference_pb2.GenerateRequest(image=IMAGE, prompt=PROMPT, num_candidates=3,
                                                    sampling=sampling(temperature=1.0, seed=7)))
    assert r.model_version == "2"  # the latest version serves when no state file says otherwise
    assert len(r.candidates) == 3
    assert len({c.response_id for c in r.candidates}) == 3 and r.request_id
    for c in r.candidates:
        assert c.num_tokens >= 1 and c.logprob <= 0
        assert not c.HasField("reward")  # only best_of scores


def test_seeded_sampling_is_reproducible_and_candidates_differ(stub):
    def sample(seed: int) -> list[tuple[str, float]]:
        r = stub.Generate(inference_pb2.GenerateRequest(image=IMAGE, prompt=PROMPT, num_candidates=4,
                                                        sampling=sampling(temperature=1.5, seed=seed)))
        return sorted((c.text, round(c.logprob, 4)) for c in r.candidates)  # display order is random

    first = sample(11)
    assert sample(11) == first
    assert sample(12) != first
    assert len(set(first)) > 1  # each candidate has its own random stream


def test_greedy_generation_is_the_same_whoever_else_is_in_the_batch(stub):
    requests = [inference_pb2.GenerateRequest(image=png_bytes(render(e.scene)), prompt=e.prompt) for e in EXAMPLES]
    alone = [stub.Generate(r).candidates[0].text for r in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: stub.Generate(r).candidates[0].text, requests))
    assert together == alone


def test_best_of_reranks_with_the_reward_model_and_reports_rewards_that_score_agrees_with(stub, bus):
    r = stub.Generate(inference_pb2.GenerateRequest(image=IMAGE, prompt=PROMPT, num_candidates=2, best_of=5,
                                                    sampling=sampling(temperature=1.5, seed=3)))
    assert len(r.candidates) == 2 and all(c.HasField("reward") for c in r.candidates)
    for c in r.candidates:
        scored = stub.Score(inference_pb2.ScoreRequest(image=IMAGE, prompt=PROMPT, response=c.text))
        assert scored.reward == pytest.approx(c.reward, abs=1e-5)
    _, event = events_for(bus, {r.request_id}, "best-of")[r.request_id]
    assert len(event.responses) == 5  # every sampled response is logged, shown or not
    shown = [x for x in event.responses if x.display_position >= 0]
    hidden = [x for x in event.responses if x.display_position < 0]
    assert len(shown) == 2 and len(hidden) == 3
    assert min(x.reward for x in shown) >= max(x.reward for x in hidden)


def test_generate_stream_sends_tokens_as_produced_and_ends_each_candidate_with_done(stub):
    request = inference_pb2.GenerateRequest(image=IMAGE, prompt=PROMPT, num_candidates=2,
                                            sampling=sampling(temperature=1.5, seed=5))
    chunks = list(stub.GenerateStream(request))
    by_candidate: dict[int, list] = {}
    for c in chunks:
        by_candidate.setdefault(c.candidate_index, []).append(c)
    assert sorted(by_candidate) == [0, 1]
    streamed = []
    for pieces in by_candidate.values():
        assert [p.done for p in pieces] == [False] * (len(pieces) - 1) + [True]
        assert len({p.response_id for p in pieces}) == 1 and pieces[0].model_version == "2"
        streamed.append("".join(p.text_delta for p in pieces).strip())
    unary = stub.Generate(request)
    assert sorted(streamed) == sorted(c.text for c in unary.candidates)


def test_score_returns_the_reward_and_version(stub):
    r = stub.Score(inference_pb2.ScoreRequest(image=IMAGE, prompt=PROMPT, response=EXAMPLES[0].answer))
    assert r.model_version == "2" and np.isfinite(r.reward)
    other = stub.Score(inference_pb2.ScoreRequest(image=IMAGE, prompt=PROMPT, response="a large red square at top left"))
    assert other.reward != r.reward


def test_concurrent_scores_are_batched_and_each_gets_its_own_reward(stub):
    requests = [inference_pb2.ScoreRequest(image=png_bytes(render(e.scene)), prompt=e.prompt, response=e.answer)
                for e in EXAMPLES]
    alone = [stub.Score(r).reward for r in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: stub.Score(r).reward, requests))
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_every_generate_is_logged_as_an_inference_event_keyed_by_session(stub, bus):
    big = noise_png(64)
    assert len(big) > INLINE_LIMIT
    r1 = stub.Generate(inference_pb2.GenerateRequest(image=IMAGE, prompt=PROMPT, num_candidates=3, session_id="s-1",
                                                     sampling=sampling(temperature=1.0, top_p=0.9, seed=1)))
    r2 = stub.Generate(inference_pb2.GenerateRequest(image=big, prompt=PROMPT))
    events = events_for(bus, {r1.request_id, r2.request_id}, "events")
    key, e1 = events[r1.request_id]
    assert key == b"s-1" and e1.session_id == "s-1" and e1.schema_version == 1 and e1.event_id
    assert e1.model_version == "2" and e1.prompt == PROMPT and e1.timestamp_ms > 0
    assert e1.image == IMAGE and len(e1.image_sha256) == 64
    assert e1.sampling.temperature == pytest.approx(1.0) and e1.sampling.top_p == pytest.approx(0.9)
    assert e1.sampling.seed == 1
    # The candidates come back in a random order; the event records where each was shown.
    shown = {x.response_id: x for x in e1.responses}
    for position, c in enumerate(r1.candidates):
        logged = shown[c.response_id]
        assert logged.display_position == position and logged.text == c.text
        assert len(logged.token_ids) == len(logged.token_logprobs) == c.num_tokens
        assert sum(logged.token_logprobs) == pytest.approx(c.logprob, abs=1e-4)
    key2, e2 = events[r2.request_id]
    assert key2 == r2.request_id.encode()  # no session: keyed by request
    assert e2.image == b"" and e2.image_sha256  # too big to inline; still identifiable
    assert e2.sampling.temperature == 0 and not e2.sampling.HasField("seed")


def test_a_bus_failure_does_not_fail_generate_and_is_counted(shared_repo_dir, tmp_path):
    broken = open_bus(f"sqlite://{tmp_path}/bus.db")
    broken.close()  # every publish now fails inside the real bus
    config = InferenceServiceConfig(port=0, topics=TOPICS)
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    with ServerThread(InferenceServer(config, runtime, ModelRepository(shared_repo_dir), broken)) as thread:
        with grpc.insecure_channel(thread.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for _ in range(3):
                assert stub.Generate(inference_pb2.GenerateRequest(image=IMAGE, prompt=PROMPT)).candidates
        thread.server.events.close()  # drain the writer
        failures = thread.server.metrics.registry.get_sample_value(
            "fuseloop_inference_event_failures_total", {"reason": "bus_error"})
        assert failures == 3


def test_health_reports_serving_for_the_server_and_its_services(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", INFERENCE_SERVICE, KSERVE_SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_every_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {INFERENCE_SERVICE, ADMIN_SERVICE, KSERVE_SERVICE, "grpc.health.v1.Health"} <= names


def test_metrics_are_served_over_http_from_the_servers_own_registry(server, stub):
    stub.Generate(inference_pb2.GenerateRequest(image=IMAGE, prompt=PROMPT))
    with pytest.raises(grpc.RpcError):
        stub.Generate(inference_pb2.GenerateRequest(image=b"not an image", prompt=PROMPT))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    for needle in ('fuseloop_inference_requests_total{code="OK",method="Generate"}',
                   'fuseloop_inference_requests_total{code="INVALID_ARGUMENT",method="Generate"}',
                   "fuseloop_inference_latency_seconds_bucket", 'fuseloop_inference_batch_size_bucket{kind="decode"',
                   'fuseloop_inference_queue_seconds_bucket{kind="generate"', "fuseloop_inference_generated_tokens_total",
                   "fuseloop_inference_serving_version 2.0", "fuseloop_inference_tokens_per_second"):
        assert needle in text, needle
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("fuseloop_inference_generated_tokens_total") is None  # not global


def test_a_request_past_its_deadline_gets_deadline_exceeded_and_the_server_keeps_serving(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(inference_pb2.GenerateRequest(image=IMAGE, prompt=PROMPT), timeout=0.0001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stub.Generate(inference_pb2.GenerateRequest(image=IMAGE, prompt=PROMPT)).candidates
