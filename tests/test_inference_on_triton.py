"""The inference service behaves the same on `--runtime triton://` as on the embedded ONNX
Runtime: the engine sits above the runtime interface, so Generate (greedy and seeded sampling),
Score, best-of reranking, redeploys without a failed request, and rollback all match. The Triton
side is MLServer serving the same Triton-layout repository over the KServe v2 gRPC protocol.

Besides the side-by-side comparisons below, the runtime-independent tests of
tests/test_inference_service.py (those that only use its `server`, `channel`, `stub` and `bus`
fixtures) run here again, with `server` built on the Triton runtime."""

import inspect
import shutil
import threading
import time

import grpc
import pytest

from fuseloop.repository import ModelRepository
from fuseloop.scenes.task import make_split, png_bytes, render
from fuseloop.v1 import admin_pb2, admin_pb2_grpc, events_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from services.inference.runtime import make_runtime
from services.inference.runtime.mlserver_launcher import MLServerProcess
from services.inference.server import InferenceServer, ServerThread
from tests import test_inference_service as embedded_suite
from tests.test_inference_service import bus, channel, stub  # noqa: F401  (fixtures, reused as they are)

pytestmark = pytest.mark.mlserver

SUITE_FIXTURES = {"server", "channel", "stub", "bus"}
for _name, _test in vars(embedded_suite).items():
    if _name.startswith("test_") and callable(_test) and set(inspect.signature(_test).parameters) <= SUITE_FIXTURES:
        globals()[_name] = _test  # collected again in this module, against the Triton-backed `server`

ADMIN_TOKEN = "triton-test-admin"
ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]


@pytest.fixture(scope="module")
def repo_dir(shared_repo_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("inference-on-triton") / "repo"
    shutil.copytree(shared_repo_dir, dst)
    return dst


@pytest.fixture(scope="module")
def mlserver(mlserver_venv, repo_dir):
    with MLServerProcess(repo_dir, venv_dir=mlserver_venv, load_models_at_startup=False) as server:
        yield server


@pytest.fixture(scope="module")
def server(mlserver, repo_dir, bus, tmp_path_factory):
    """The embedded suite's server, configured as there, on the Triton runtime. It serves the
    latest version. pin_versions=false: config.pbtxt's policy, safe beside the other services'
    runtime on the same server."""
    config = InferenceServiceConfig(port=0, metrics_port=0, topics=embedded_suite.TOPICS,
                                    event_image_max_bytes=embedded_suite.INLINE_LIMIT, max_queue_delay_ms=1.0)
    runtime = make_runtime(f"triton://{mlserver.url}?pin_versions=false")
    state = tmp_path_factory.mktemp("state-suite") / "serving.json"
    with ServerThread(InferenceServer(config, runtime, ModelRepository(repo_dir), bus, state_path=state)) as thread:
        yield thread
    runtime.close()


def test_the_embedded_suite_runs_here_on_the_triton_runtime(server):
    reused = [name for name in globals() if name.startswith("test_") and globals()[name].__module__ == embedded_suite.__name__]
    assert len(reused) >= 5, reused
    assert server.server.runtime.name == "triton"


def start_service(runtime_spec: str, repo_dir, state_dir) -> tuple[ServerThread, grpc.Channel]:
    # Serving version 1 first, so that the tests can deploy 2 and roll back.
    (state_dir / "serving.json").write_text('{"serving": 1, "previous": null, "history": [1]}')
    runtime = make_runtime(runtime_spec, device="cpu")
    config = InferenceServiceConfig(port=0, admin_token=ADMIN_TOKEN)
    thread = ServerThread(InferenceServer(config, runtime, ModelRepository(repo_dir),
                                          state_path=state_dir / "serving.json")).start()
    return thread, grpc.insecure_channel(thread.address)


@pytest.fixture(scope="module")
def services(mlserver, repo_dir, tmp_path_factory):
    """The same repository behind both runtimes: {"embedded": channel, "triton": channel}."""
    started = {}
    try:
        for name, spec in (("embedded", "onnxruntime"), ("triton", f"triton://{mlserver.url}")):
            started[name] = start_service(spec, repo_dir, tmp_path_factory.mktemp(f"state-{name}"))
        yield {name: channel for name, (_, channel) in started.items()}
    finally:
        for thread, channel in started.values():
            channel.close()
            thread.stop()
            thread.server.runtime.close()


def examples(n: int):
    return [(png_bytes(render(e.scene)), e.prompt) for e in make_split("test", n)]


def generate(channel, image, prompt, **kwargs) -> inference_pb2.GenerateResponse:
    sampling = kwargs.pop("sampling", events_pb2.SamplingParams(temperature=0.0))
    request = inference_pb2.GenerateRequest(image=image, prompt=prompt, sampling=sampling, **kwargs)
    return inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=30)


def answers(response):
    return [(c.text, c.num_tokens, round(c.logprob, 3), round(c.reward, 3) if c.HasField("reward") else None)
            for c in response.candidates]


def admin(channel):
    return admin_pb2_grpc.AdminServiceStub(channel)


def test_the_triton_service_reports_its_runtime_and_serving_version(services):
    status = admin(services["triton"]).Status(admin_pb2.StatusRequest(), metadata=ADMIN, timeout=10)
    assert (status.runtime, status.serving_version, status.ready) == ("triton", "1", True)


def test_greedy_generation_is_the_same_on_both_runtimes(services):
    for image, prompt in examples(4):
        embedded = generate(services["embedded"], image, prompt)
        triton = generate(services["triton"], image, prompt)
        assert triton.model_version == embedded.model_version == "1"
        assert answers(triton) == answers(embedded)
        assert triton.candidates[0].text


def test_seeded_sampling_with_best_of_reranking_is_the_same_on_both_runtimes(services):
    image, prompt = examples(1)[0]
    sampling = events_pb2.SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    embedded = generate(services["embedded"], image, prompt, sampling=sampling, num_candidates=2, best_of=5)
    triton = generate(services["triton"], image, prompt, sampling=sampling, num_candidates=2, best_of=5)
    assert len(triton.candidates) == 2
    assert all(c.HasField("reward") for c in triton.candidates)
    # The service shows the chosen candidates in random order (no position bias in feedback).
    assert sorted(answers(triton)) == sorted(answers(embedded))


def test_score_is_the_same_on_both_runtimes(services):
    for image, prompt in examples(3):
        request = inference_pb2.ScoreRequest(image=image, prompt=prompt, response="a red circle")
        scores = [inference_pb2_grpc.InferenceServiceStub(services[name]).Score(request, timeout=30)
                  for name in ("embedded", "triton")]
        assert scores[1].model_version == scores[0].model_version
        assert scores[1].reward == pytest.approx(scores[0].reward, abs=1e-5)


def test_bad_input_is_refused_the_same_way(services):
    for channel in services.values():
        with pytest.raises(grpc.RpcError) as err:
            generate(channel, b"not an image", "what colour is the circle ?")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deploy_and_rollback_on_triton_fail_no_request(services):
    channel = services["triton"]
    work = examples(3)
    failures, served, stop = [], [], threading.Event()

    def traffic(i: int):
        while not stop.is_set():
            image, prompt = work[i % len(work)]
            try:
                served.append(generate(channel, image, prompt).model_version)
            except grpc.RpcError as e:  # every failure counts against zero downtime
                failures.append(f"{e.code()}: {e.details()}")

    clients = [threading.Thread(target=traffic, args=(i,)) for i in range(3)]
    for client in clients:
        client.start()
    try:
        time.sleep(0.3)
        deployed = admin(channel).Deploy(admin_pb2.DeployRequest(version="2"), metadata=ADMIN, timeout=60)
        assert (deployed.serving_version, deployed.previous_version) == ("2", "1")
        time.sleep(0.3)
        rolled = admin(channel).Rollback(admin_pb2.RollbackRequest(), metadata=ADMIN, timeout=60)
        assert (rolled.serving_version, rolled.previous_version) == ("1", "2")
        time.sleep(0.3)
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert failures == []
    assert {"1", "2"} <= set(served)
    assert served[-1] == "1"
