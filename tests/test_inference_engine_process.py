"""The generation engine runs in a child process: it serves exactly what the in-thread engine
serves and its work shows in the server's metrics. When it dies, the requests it held fail with a
clear status, a new one takes over with the same version, and once the restarts are spent,
generation is refused clearly while the rest of the server keeps answering."""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseloop.repository import ModelRepository
from fuseloop.scenes import make_split, png_bytes, render
from fuseloop.v1 import events_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from services.inference.engine import EngineConfig, GenerationEngine, GenerationJob, SequenceSpec
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import INFERENCE_SERVICE, InferenceServer, ServerThread

EXAMPLES = make_split("test", 4)


def start_server(repo_dir, **config) -> ServerThread:
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    return ServerThread(InferenceServer(InferenceServiceConfig(port=0, **config), runtime,
                                        ModelRepository(repo_dir))).start()


def health_of(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def request(example, **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(image=png_bytes(render(example.scene)), prompt=example.prompt,
                                         sampling=events_pb2.SamplingParams(**sampling))


@pytest.fixture
def server(shared_repo_dir):
    thread = start_server(shared_repo_dir)
    yield thread
    thread.stop()


def test_the_engine_process_answers_what_the_in_thread_engine_computes(server, shared_repo_dir):
    """Same version, same seeds: the tokens that come back over the pipes are the engine's own."""
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    repo = ModelRepository(shared_repo_dir)
    loaded = runtime.load(repo, repo.latest())
    pre = loaded.preprocessor
    engine = GenerationEngine(EngineConfig()).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for i, example in enumerate(EXAMPLES):
                served = stub.Generate(request(example, temperature=1.0, seed=i), timeout=30).candidates[0]
                done = []
                job = GenerationJob(loaded, pre.image(png_bytes(render(example.scene))), pre.prompt_ids(example.prompt),
                                    [SequenceSpec(1.0, 1.0, int(loaded.manifest.model_config["max_response_tokens"]), i)], on_done=lambda j, err: done.append(err))
                engine.submit(job)
                deadline = time.monotonic() + 30
                while not done and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert done == [None]
                assert served.text == pre.decode(job.sequences[0].token_ids)
                assert served.num_tokens == len(job.sequences[0].token_ids)
                assert served.logprob == pytest.approx(float(np.sum(job.sequences[0].logprobs)), abs=1e-4)
    finally:
        engine.stop()


def test_the_engine_process_work_shows_in_the_servers_metrics(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        answers = [stub.Generate(request(e), timeout=30) for e in EXAMPLES]
    registry = server.server.metrics.registry
    tokens = sum(c.num_tokens for a in answers for c in a.candidates)
    assert registry.get_sample_value("fuseloop_inference_generated_tokens_total") == tokens
    assert registry.get_sample_value("fuseloop_inference_batch_size_count", {"kind": "encode"}) >= 1
    assert registry.get_sample_value("fuseloop_inference_batch_size_sum", {"kind": "decode"}) == tokens
    assert registry.get_sample_value("fuseloop_inference_queue_seconds_count", {"kind": "generate"}) == len(EXAMPLES)


def test_a_new_engine_process_takes_over_when_one_dies(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        before = stub.Generate(request(EXAMPLES[0]), timeout=30)
        first = server.server.engine.pid

        os.kill(first, signal.SIGKILL)
        wait_for(lambda: server.server.engine.restarts == 1 and health_of(channel) == health_pb2.HealthCheckResponse.SERVING)

        assert server.server.engine.pid != first
        after = stub.Generate(request(EXAMPLES[0]), timeout=30)  # greedy: the same version, the same answer
        assert (after.model_version, after.candidates[0].text) == (before.model_version, before.candidates[0].text)


def test_once_the_restarts_are_spent_generation_is_refused_clearly_and_the_rest_still_answers(shared_repo_dir):
    server = start_server(shared_repo_dir, engine_restarts=0)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            assert stub.Generate(request(EXAMPLES[0]), timeout=30).candidates

            os.kill(server.server.engine.pid, signal.SIGKILL)
            wait_for(lambda: health_of(channel, INFERENCE_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING)

            assert health_of(channel) == health_pb2.HealthCheckResponse.NOT_SERVING  # the orchestrator restarts it
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(request(EXAMPLES[1]), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "engine process exited" in refused.value.details()
            # Scoring runs in the server's own process and still answers.
            example = EXAMPLES[1]
            score = stub.Score(inference_pb2.ScoreRequest(image=png_bytes(render(example.scene)), prompt=example.prompt,
                                                          response=example.answer), timeout=30)
            assert np.isfinite(score.reward)
    finally:
        server.stop()
