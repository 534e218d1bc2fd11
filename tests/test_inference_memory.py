"""Memory that scales with the model: each process of the inference server holds only the graphs it
runs (the engine process the generation graphs, the server the reward graph, plus any graph a KServe
client asks for, loaded on first use), at most two versions stay resident through deploys and
canaries, and each process's peak RSS can be read (`peak_rss_bytes`, and the metrics gauge)."""

from __future__ import annotations

import shutil
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from fuseloop.repository import DECODER, ENCODER, MODELS, REWARD, ModelRepository
from fuseloop.scenes import make_split, png_bytes, render
from fuseloop.v1 import inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from services.inference.kserve_batching import run_model
from services.inference.process_memory import peak_rss_bytes
from services.inference.runtime.base import GENERATION_GRAPHS, SCORING_GRAPHS, RuntimeError_
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread
from tests.test_inference_kserve import infer_inputs, inputs_for
from trainer.export import publish

EXAMPLE = make_split("test", 1)[0]
GENERATE = inference_pb2.GenerateRequest(image=png_bytes(render(EXAMPLE.scene)), prompt=EXAMPLE.prompt)
SCORE = inference_pb2.ScoreRequest(image=GENERATE.image, prompt=EXAMPLE.prompt, response=EXAMPLE.answer)
SERVER_GRAPHS, ENGINE_GRAPHS = sorted(SCORING_GRAPHS), sorted(GENERATION_GRAPHS)


def runtime() -> OnnxRuntime:
    return OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))


@pytest.fixture(scope="module")
def repo3(quick_checkpoint, shared_repo_dir, tmp_path_factory):
    """Versions 1, 2 and 3 (the same weights), in a copy this module may deploy in."""
    root = tmp_path_factory.mktemp("repo3") / "repo"
    shutil.copytree(shared_repo_dir, root)
    repo = ModelRepository(root)
    publish(quick_checkpoint, repo, parent_version=2)
    return repo


@pytest.fixture(scope="module")
def served(repo3):
    config = InferenceServiceConfig(port=0, metrics_port=0)
    with ServerThread(InferenceServer(config, runtime(), repo3)) as thread:
        with grpc.insecure_channel(thread.address) as channel:
            yield thread, inference_pb2_grpc.InferenceServiceStub(channel)


def resident(thread: ServerThread) -> tuple[dict, dict]:
    """(server process, engine process): version -> graphs loaded of it."""
    server = thread.server
    return server.deployment.resident(), thread.call(server.engine.resident())


def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_runtime_loads_the_graphs_asked_for_and_more_on_demand(repo3):
    loaded = runtime().load(repo3, 1, graphs=(REWARD,))
    assert loaded.graphs == {REWARD}
    arrays = inputs_for(ENCODER, loaded.manifest.model_config)
    with pytest.raises(RuntimeError_, match="graph fuseloop_encoder is not loaded"):
        loaded.run(ENCODER, arrays)
    loaded.load_graphs([ENCODER])
    assert loaded.graphs == {ENCODER, REWARD}
    everything = runtime().load(repo3, 1)  # the default: every graph, as before
    assert everything.graphs == set(MODELS)
    for name, want in run_model(everything, ENCODER, arrays).items():
        np.testing.assert_array_equal(run_model(loaded, ENCODER, arrays)[name], want)
    with pytest.raises(ValueError, match="unknown graph"):
        runtime().load(repo3, 1, graphs=("fuseloop_nope",))
    loaded.close()
    assert loaded.graphs == set()  # closing drops the sessions, and their weights


def test_the_engine_process_holds_the_generation_graphs_and_the_server_the_reward_graph(served, repo3):
    thread, stub = served
    version = thread.server.deployment.serving.version
    assert stub.Generate(GENERATE).candidates[0].text
    assert np.isfinite(stub.Score(SCORE).reward)
    server, engine = resident(thread)
    assert server == {version: SERVER_GRAPHS} and engine == {version: ENGINE_GRAPHS}

    client = tc.InferenceServerClient(thread.address)
    try:
        # Readiness and metadata answer from the manifest: nothing loads for them.
        for model in MODELS:
            assert client.is_model_ready(model) and client.get_model_metadata(model).inputs
        assert resident(thread)[0] == {version: SERVER_GRAPHS}
        # A ModelInfer loads the graph it needs into the server, once, and answers as ORT does.
        local = runtime().load(repo3, version)
        arrays = inputs_for(ENCODER, local.manifest.model_config)
        for _ in range(2):
            result = client.infer(ENCODER, infer_inputs(arrays))
            for name, want in run_model(local, ENCODER, arrays).items():
                np.testing.assert_array_equal(result.as_numpy(name), want)
        assert resident(thread) == ({version: sorted([ENCODER, REWARD])}, {version: ENGINE_GRAPHS})
    finally:
        client.close()


def test_through_deploys_and_canaries_at_most_two_versions_stay_resident(served):
    thread, stub = served
    deployment = thread.server.deployment
    seen_at_load: list[dict] = []  # what the server held each time it began loading a version
    load = deployment.runtime.load

    def recording_load(repo, version, graphs):
        seen_at_load.append(deployment.resident())
        return load(repo, version, graphs)

    deployment.runtime.load = recording_load
    try:
        for version in (1, 2, 3, 1):
            thread.call(deployment.deploy(version))
            assert stub.Generate(GENERATE).model_version == str(version)
            wait_for(lambda: resident(thread) == ({version: SERVER_GRAPHS}, {version: ENGINE_GRAPHS}))

        # A request still running on the outgoing version keeps it (and only it) beside the new one.
        lease = deployment.acquire()
        thread.call(deployment.deploy(3))
        assert resident(thread) == ({1: SERVER_GRAPHS, 3: SERVER_GRAPHS}, {1: ENGINE_GRAPHS, 3: ENGINE_GRAPHS})
        lease.release()
        wait_for(lambda: resident(thread) == ({3: SERVER_GRAPHS}, {3: ENGINE_GRAPHS}))

        # A canary is the second resident version; replacing it or deploying a third one drops it
        # before the next version loads.
        thread.call(deployment.start_canary(2, 10))
        wait_for(lambda: resident(thread) == ({2: SERVER_GRAPHS, 3: SERVER_GRAPHS}, {2: ENGINE_GRAPHS, 3: ENGINE_GRAPHS}))
        thread.call(deployment.start_canary(1, 10))
        wait_for(lambda: resident(thread) == ({1: SERVER_GRAPHS, 3: SERVER_GRAPHS}, {1: ENGINE_GRAPHS, 3: ENGINE_GRAPHS}))
        thread.call(deployment.deploy(2))
        wait_for(lambda: resident(thread) == ({2: SERVER_GRAPHS}, {2: ENGINE_GRAPHS}))
        thread.call(deployment.start_canary(3, 10))
        thread.call(deployment.deploy(3))  # the canary promoted: nothing new loads
        wait_for(lambda: resident(thread) == ({3: SERVER_GRAPHS}, {3: ENGINE_GRAPHS}))
    finally:
        deployment.runtime.load = load
    assert len(seen_at_load) == 9
    assert all(len(held) <= 1 for held in seen_at_load), [(i, h) for i, h in enumerate(seen_at_load) if len(h) > 1]  # + the one loading: two


def test_each_process_peak_rss_is_readable_and_exported(served):
    thread, _ = served
    server = thread.server
    own, engine = peak_rss_bytes(), peak_rss_bytes(server.engine.pid)
    assert own > 50 * 2**20 and engine > 50 * 2**20  # a Python with ONNX Runtime and a model loaded
    assert peak_rss_bytes(2**22 + 12345) is None  # no such process
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("fuseloop_inference_process_peak_rss_bytes{"):
            labels, value = line.rsplit(" ", 1)
            values[labels.split('"')[1]] = float(value)
    assert set(values) == {"server", "engine"} and values["server"] >= own and values["engine"] >= engine
