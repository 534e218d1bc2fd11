"""The Triton runtime, against MLServer serving the same Triton-layout repository over the
KServe v2 gRPC protocol: it loads and checks versions through the server, answers exactly as
ONNX Runtime in process does, rolls a new version out beside the serving one, refuses tampered
artifacts, and says clearly when the server is gone."""

import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from fuseloop.repository import DECODER, ENCODER, MANIFEST, MODELS, REWARD, Manifest, ModelRepository, RepositoryError
from services.inference.runtime.base import LoadedVersion, RuntimeError_
from services.inference.runtime.mlserver_launcher import MLServerProcess
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.runtime.triton_runtime import (
    TritonError,
    TritonRuntime,
    TritonRuntimeConfig,
    TritonVersion,
    policy_override,
)

mlserver = pytest.mark.mlserver


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def repo_dir(shared_repo_dir, tmp_path_factory) -> Path:
    """A copy the module may add versions to (the server reads it, as Triton would)."""
    dst = tmp_path_factory.mktemp("triton-repo") / "repo"
    shutil.copytree(shared_repo_dir, dst)
    return dst


@pytest.fixture(scope="module")
def repo(repo_dir) -> ModelRepository:
    return ModelRepository(repo_dir)


@pytest.fixture(scope="module")
def server(mlserver_venv, repo_dir):
    # Explicit model control, as fuseloop runs Triton: nothing serves until the runtime loads it.
    with MLServerProcess(repo_dir, venv_dir=mlserver_venv, load_models_at_startup=False) as server:
        yield server


@pytest.fixture(scope="module")
def runtime(server):
    runtime = TritonRuntime(TritonRuntimeConfig(url=server.url, load_timeout_s=60))
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def v1(runtime, repo) -> TritonVersion:
    return runtime.load(repo, 1)


@pytest.fixture(scope="module")
def ort_versions(shared_repo_dir):
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu"))
    repo = ModelRepository(shared_repo_dir)
    return {v: runtime.load(repo, v) for v in (1, 2)}


def model_inputs(loaded: LoadedVersion, batch: int, seed: int, prompt_len: int = 5):
    rng = np.random.default_rng(seed)
    cfg = loaded.manifest.model_config
    size = loaded.preprocessor.config.image_size
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    ids = rng.integers(4, cfg["vocab_size"], (batch, prompt_len)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, -1] = 0  # right padding, as the preprocessor pads
    return pixels, ids, mask


def assert_same(got, expected) -> None:
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def encode(loaded: LoadedVersion, pixels, ids, mask) -> list[np.ndarray]:
    """The prefill graph: memory and its mask."""
    return loaded.run(ENCODER, {"pixel_values": pixels, "prompt_ids": ids, "prompt_mask": mask})


def greedy(loaded: LoadedVersion, pixels, ids, mask, max_new_tokens: int) -> np.ndarray:
    """The decode loop with a KV cache through the family's stepper, as the engine runs it at temperature 0."""
    pre = loaded.preprocessor
    state = loaded.stepper.prefill(pixels, ids, mask)
    done = np.zeros(len(ids), dtype=bool)
    out = []
    for _ in range(max_new_tokens):
        nxt = np.where(done, pre.pad_id, loaded.stepper.step(state).argmax(-1))
        out.append(nxt)
        done |= nxt == pre.eos_id
        state.tokens = nxt
        if done.all():
            break
    return np.stack(out, axis=1)


def add_version_copy(repo: ModelRepository, src: int, dst: int) -> None:
    """Version `dst` as a byte copy of `src` with its own manifest (what a publish would write)."""
    for model in MODELS:
        shutil.copytree(repo.version_dir(model, src), repo.version_dir(model, dst))
    manifest = repo.manifest(src)
    manifest.version = dst
    manifest.parent_version = src
    manifest.files = {rel.replace(f"/{src}/", f"/{dst}/", 1): digest for rel, digest in manifest.files.items()}
    (repo.version_dir(ENCODER, dst) / MANIFEST).write_text(manifest.to_json())


def remove_version(repo: ModelRepository, version: int) -> None:
    for model in MODELS:
        shutil.rmtree(repo.version_dir(model, version), ignore_errors=True)


# ------------------------------------------------------------------------------ without a server

def test_a_runtime_spec_names_the_grpc_endpoint_and_options():
    config = TritonRuntimeConfig.from_spec("triton://triton.internal:8001?model_control=false&infer_timeout_s=2.5")
    assert (config.url, config.model_control, config.infer_timeout_s) == ("triton.internal:8001", False, 2.5)
    assert TritonRuntimeConfig.from_spec("triton://127.0.0.1:9001").ssl is False
    for bad, reason in [("grpc://h:1", "starts with triton://"), ("triton://host", "HOST:PORT"),
                        ("triton://h:1?colour=red", "unknown option 'colour'"),
                        ("triton://h:1?ssl=maybe", "ssl must be true or false")]:
        with pytest.raises(ValueError, match=reason):
            TritonRuntimeConfig.from_spec(bad)


def test_the_load_override_is_the_models_config_serving_exactly_the_given_versions(shared_repo_dir):
    path = shared_repo_dir / DECODER / "config.pbtxt"
    original = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    override = json_format.Parse(policy_override(path, [3, 1, 3]), model_config_pb2.ModelConfig())
    assert list(override.version_policy.specific.versions) == [1, 3]
    override.version_policy.Clear()
    original.version_policy.Clear()
    assert override == original


def test_a_missing_config_is_a_repository_error(tmp_path):
    with pytest.raises(RepositoryError, match="config.pbtxt is missing"):
        policy_override(tmp_path / "config.pbtxt", [1])


# ------------------------------------------------------------------------------ against MLServer

@mlserver
def test_loading_a_version_serves_it_on_the_server_with_the_manifests_signatures(runtime, v1):
    assert v1.version == 1 and v1.is_ready()
    assert runtime.held_versions() == [1]
    meta = v1.metadata()
    assert (meta["runtime"], meta["url"], meta["platform"]) == ("triton", runtime.config.url, "onnxruntime_onnx")
    assert set(meta["signatures"]) == set(MODELS)
    assert v1.preprocessor.bos_id is not None  # the tokenizer comes from the repository


@mlserver
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_encode_decode_step_and_score_equal_onnxruntime_in_process(v1, ort_versions, batch):
    ort = ort_versions[1]
    pixels, ids, mask = model_inputs(v1, batch, seed=batch)
    memory = encode(v1, pixels, ids, mask)
    assert_same(memory, encode(ort, pixels, ids, mask))
    assert_same([v1.score(pixels, ids, mask, ids, mask)], [ort.score(pixels, ids, mask, ids, mask)])

    rng = np.random.default_rng(batch)
    past_shape = v1.stepper.prefill(pixels, ids, mask).past.shape
    for past_len, new in [(0, 1), (0, 3), (1, 1), (7, 2)]:
        past = rng.standard_normal((*past_shape[:3], past_len, past_shape[4])).astype(np.float32)
        attention = np.ones((batch, past_len + new), dtype=np.int64)
        if past_len:
            attention[0, 0] = 0  # a left-padded cache row
        step = {"input_ids": ids[:, :new], "position_ids": np.full((batch, new), past_len, dtype=np.int64),
                "attention_mask": attention, "memory": memory[0], "memory_mask": memory[1], "past": past}
        logits, present = v1.run(DECODER, step)
        assert present.shape == (*past_shape[:3], past_len + new, past_shape[4])
        assert_same([logits, present], ort.run(DECODER, step))
        logits[:] = 0  # writable, like ONNX Runtime's outputs


@mlserver
def test_greedy_generation_matches_onnxruntime_token_for_token(v1, ort_versions):
    pixels, ids, mask = model_inputs(v1, 3, seed=11)
    max_new = v1.preprocessor.config.max_response_tokens
    tokens = greedy(v1, pixels, ids, mask, max_new)
    np.testing.assert_array_equal(tokens, greedy(ort_versions[1], pixels, ids, mask, max_new))
    assert tokens.shape[1] >= 2


@mlserver
def test_a_batch_above_the_servers_max_batch_size_is_split_and_reassembled(v1, ort_versions):
    batch = v1.max_batch[ENCODER] + 3
    pixels, ids, mask = model_inputs(v1, batch, seed=5)
    assert_same(encode(v1, pixels, ids, mask), encode(ort_versions[1], pixels, ids, mask))
    assert_same([v1.score(pixels, ids, mask, ids, mask)], [ort_versions[1].score(pixels, ids, mask, ids, mask)])


@mlserver
def test_a_tampered_artifact_is_refused_before_the_server_sees_it_and_v1_keeps_serving(runtime, repo, v1):
    add_version_copy(repo, src=2, dst=3)
    try:
        path = repo.model_path(DECODER, 3)
        path.write_bytes(path.read_bytes() + b"\0")
        with pytest.raises(RepositoryError, match="checksum mismatch for fuseloop_decoder/3/model.onnx"):
            runtime.load(repo, 3)
        assert not runtime.model_ready(DECODER, 3)
        assert runtime.held_versions() == [1]
        pixels, ids, mask = model_inputs(v1, 2, seed=1)
        encode(v1, pixels, ids, mask)
    finally:
        remove_version(repo, 3)


@mlserver
def test_v2_loads_beside_v1_while_v1_keeps_answering(runtime, repo, v1, ort_versions):
    pixels, ids, mask = model_inputs(v1, 2, seed=3)
    expected = ort_versions[1].score(pixels, ids, mask, ids, mask)
    answers, failures, stop = [], [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                answers.append(v1.score(pixels, ids, mask, ids, mask))
            except Exception as e:  # every failure counts against zero downtime
                failures.append(e)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(0.2)
        before = len(answers)
        v2 = runtime.load(repo, 2)
        during = len(answers) - before
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert during > 0, "v1 answered nothing while v2 loaded"
    for answer in answers:
        np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-6)
    assert v1.is_ready() and v2.is_ready()
    assert runtime.held_versions() == [1, 2]
    assert_same(encode(v2, pixels, ids, mask), encode(ort_versions[2], pixels, ids, mask))

    v2.close()  # released here, but another replica may still use it: it stays loaded
    assert runtime.held_versions() == [1] and v2.is_ready()


@mlserver
def test_a_version_whose_graphs_differ_from_its_manifest_is_refused(mlserver_venv, repo_copy):
    repo = ModelRepository(repo_copy)
    path = repo.version_dir(ENCODER, 2) / MANIFEST
    manifest = Manifest.from_json(path.read_text())
    manifest.signatures[REWARD]["inputs"][0]["name"] = "image"
    path.write_text(manifest.to_json())
    with MLServerProcess(repo_copy, venv_dir=mlserver_venv, load_models_at_startup=False) as server:
        runtime = TritonRuntime(TritonRuntimeConfig(url=server.url, load_timeout_s=60))
        v1 = runtime.load(repo, 1)
        with pytest.raises(RepositoryError, match=r"version 2: fuseloop_reward tensors .* differ from the manifest"):
            runtime.load(repo, 2)
        assert runtime.held_versions() == [1]
        encode(v1, *model_inputs(v1, 1, seed=0))

        # Unloading: never a version still open here; the last one goes with its models.
        with pytest.raises(RuntimeError_, match="still open"):
            runtime.unload_version(repo, 1)
        v1.close()
        assert runtime.unload_version(repo, 1) is True
        assert not v1.is_ready()
        with pytest.raises(TritonError, match="fuseloop_encoder version 1: inference failed"):
            encode(v1, *model_inputs(v1, 1, seed=0))
        runtime.close()


@mlserver
def test_when_the_server_is_gone_readiness_is_false_and_calls_fail_clearly(mlserver_venv, shared_repo_dir):
    repo = ModelRepository(shared_repo_dir)
    server = MLServerProcess(shared_repo_dir, venv_dir=mlserver_venv, load_models_at_startup=False).start()
    runtime = TritonRuntime(TritonRuntimeConfig(url=server.url, load_timeout_s=60, infer_timeout_s=5))
    try:
        v1 = runtime.load(repo, 1)
        assert v1.is_ready() and runtime.server_ready()
    finally:
        server.stop()
    assert not v1.is_ready() and not runtime.server_ready()
    with pytest.raises(TritonError, match=f"Triton at {server.url} is unreachable") as err:
        encode(v1, *model_inputs(v1, 1, seed=0))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(TritonError, match="cannot load a model version.*unreachable"):
        runtime.load(repo, 2)
    runtime.close()
