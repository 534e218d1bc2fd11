"""KServe ModelInfer batches like Triton's dynamic batcher: concurrent requests for a model whose
config.pbtxt has `dynamic_batching` share one graph run of at most `max_batch_size` rows, and each
answer holds exactly its own rows, equal to running them alone. Ragged lengths share a run only in
the reward model (ids + mask inputs, (B,) output); other graphs are grouped by shape, and a model
without `dynamic_batching` runs each request on its own."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from fuseloop.repository import DECODER, ENCODER, REWARD, ModelRepository
from services.inference.config import InferenceServiceConfig
from services.inference.kserve_batching import InferJob, Signature, infer_jobs, run_model
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread
from tests.test_inference_kserve import inputs_for

ENCODER_MAX_BATCH = 4


def _edit_config(repo, model: str, edit) -> None:
    path = repo / model / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    edit(config)
    path.write_text(text_format.MessageToString(config))


@pytest.fixture(scope="module")
def repo_dir(shared_repo_dir, tmp_path_factory):
    """The shared repository with three batching setups: the reward model batches (with a long
    queue delay, so a burst surely merges), the encoder batches at most 4 rows, the decoder does
    not batch at all."""
    repo = tmp_path_factory.mktemp("kserve-batching") / "repo"
    shutil.copytree(shared_repo_dir, repo)

    def slow_queue(config):
        config.dynamic_batching.max_queue_delay_microseconds = 50_000

    def small_batches(config):
        slow_queue(config)
        config.max_batch_size = ENCODER_MAX_BATCH

    _edit_config(repo, REWARD, slow_queue)
    _edit_config(repo, ENCODER, small_batches)
    _edit_config(repo, DECODER, lambda config: config.ClearField("dynamic_batching"))
    return repo


@pytest.fixture(scope="module")
def server(repo_dir):
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    with ServerThread(InferenceServer(InferenceServiceConfig(port=0), runtime, ModelRepository(repo_dir))) as thread:
        yield thread


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def local(repo_dir):
    return OnnxRuntime(OnnxRuntimeConfig(device="cpu")).load(ModelRepository(repo_dir), 2)


def request_for(model: str, arrays: dict[str, np.ndarray]) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model)
    for name, arr in arrays.items():
        req.inputs.add(name=name, datatype="FP32" if arr.dtype == np.float32 else "INT64", shape=arr.shape)
        req.raw_input_contents.append(arr.tobytes())
    return req


def outputs_of(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {o.name: np.frombuffer(raw, dtype=dtypes[o.datatype]).reshape(o.shape)
            for o, raw in zip(response.outputs, response.raw_output_contents)}


def ragged_reward_inputs(cfg: dict, rows: int, prompt_len: int, response_len: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompt_mask = np.ones((rows, prompt_len), dtype=np.int64)
    prompt_mask[0, prompt_len - rng.integers(0, prompt_len):] = 0  # the client's own padding, too
    prompt_mask[0, 0] = 1
    response_mask = np.ones((rows, response_len), dtype=np.int64)
    response_mask[-1, 1 + rng.integers(0, response_len):] = 0
    return {"pixel_values": rng.normal(size=(rows, 3, 32, 32)).astype(np.float32),
            "prompt_ids": rng.integers(4, cfg["vocab_size"], (rows, prompt_len)).astype(np.int64),
            "prompt_mask": prompt_mask,
            "response_ids": rng.integers(4, cfg["vocab_size"], (rows, response_len)).astype(np.int64),
            "response_mask": response_mask}


def row_by_row(local, model: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch-1 answer: every row run alone."""
    rows = [run_model(local, model, {k: v[i:i + 1] for k, v in arrays.items()}) for i in range(len(arrays[next(iter(arrays))]))]
    return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}


def batch_stats(server, model: str) -> tuple[float, float, float]:
    """(model runs, rows, runs of at most ENCODER_MAX_BATCH rows) from the ModelInfer batch-size histogram."""
    sample = server.server.metrics.registry.get_sample_value
    labels = {"model": model}
    return (sample("fuseloop_kserve_batch_size_count", labels) or 0.0,
            sample("fuseloop_kserve_batch_size_sum", labels) or 0.0,
            sample("fuseloop_kserve_batch_size_bucket", {**labels, "le": f"{float(ENCODER_MAX_BATCH)}"}) or 0.0)


def burst(stub, requests: list[service_pb2.ModelInferRequest]) -> list:
    """All requests in flight at once; each answer, or the grpc error it got."""
    futures = [stub.ModelInfer.future(r, timeout=30) for r in requests]
    out = []
    for f in futures:
        try:
            out.append(f.result())
        except grpc.RpcError as e:
            out.append(e)
    return out


def merged_burst(server, stub, model: str, requests: list[service_pb2.ModelInferRequest]):
    """A burst whose requests shared model runs (fewer runs than requests), and the histogram's
    (runs, rows, small runs) deltas. Whether a burst merges depends on timing on a busy machine,
    so up to three bursts are sent."""
    for _ in range(3):
        before = batch_stats(server, model)
        responses = burst(stub, requests)
        delta = tuple(b - a for a, b in zip(before, batch_stats(server, model)))
        if delta[0] < len(requests):
            return responses, delta
    raise AssertionError(f"three bursts of {len(requests)} {model} requests never shared a run")


def test_only_ids_with_masks_in_a_graph_without_dynamic_outputs_are_padded(local):
    assert Signature.of(local, REWARD).masks == {"prompt_ids": "prompt_mask", "response_ids": "response_mask"}
    assert Signature.of(local, ENCODER).masks == {}  # memory grows with the prompt: nothing to trim it back by
    assert Signature.of(local, DECODER).masks == {}


def test_concurrent_ragged_requests_share_runs_and_each_gets_exactly_its_own_rows(server, stub, local):
    cfg = local.manifest.model_config
    arrays = [ragged_reward_inputs(cfg, rows=1 + i % 3, prompt_len=2 + i % 6, response_len=2 + (i * 5) % 7, seed=i)
              for i in range(24)]
    responses, (_, rows, _) = merged_burst(server, stub, REWARD, [request_for(REWARD, a) for a in arrays])
    assert rows == sum(len(a["prompt_ids"]) for a in arrays)
    for a, response in zip(arrays, responses):
        got = outputs_of(response)["reward"]
        assert got.shape == (len(a["prompt_ids"]),)
        np.testing.assert_allclose(got, row_by_row(local, REWARD, a)["reward"], atol=1e-5)


def test_an_invalid_request_is_refused_alone_and_does_not_poison_the_batch_it_would_have_joined(server, stub, local):
    cfg = local.manifest.model_config
    good = [ragged_reward_inputs(cfg, rows=2, prompt_len=3 + i % 3, response_len=4, seed=100 + i) for i in range(8)]
    bad = ragged_reward_inputs(cfg, rows=2, prompt_len=4, response_len=4, seed=7)
    bad["response_ids"][1, 2] = cfg["vocab_size"] + 5
    requests = [request_for(REWARD, a) for a in good]
    requests.insert(4, request_for(REWARD, bad))
    responses = burst(stub, requests)
    refused = responses.pop(4)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "response_ids" in refused.details()
    for a, response in zip(good, responses):
        np.testing.assert_allclose(outputs_of(response)["reward"], row_by_row(local, REWARD, a)["reward"], atol=1e-5)


def test_a_merged_run_the_graph_refuses_is_rerun_request_by_request(local):
    """Past the server's checks, ONNX Runtime may still refuse one request's tensors: the others
    get their rows, that one gets the error."""
    sig = Signature.of(local, REWARD)
    arrays = [ragged_reward_inputs(local.manifest.model_config, rows=2, prompt_len=3, response_len=3, seed=s)
              for s in range(3)]
    arrays[1]["pixel_values"] = arrays[1]["pixel_values"].astype(np.float64)  # ORT: wrong element type
    jobs = [InferJob(local, REWARD, sig, a, on_done=lambda j, r, e: None) for a in arrays]
    results = infer_jobs(jobs[0].key, jobs)
    assert isinstance(results[1], Exception) and "input data type" in str(results[1])
    for i in (0, 2):
        np.testing.assert_allclose(results[i]["reward"], row_by_row(local, REWARD, arrays[i])["reward"], atol=1e-5)


def test_graphs_with_dynamic_outputs_batch_by_shape_up_to_max_batch_size(server, stub, local):
    """The encoder's memory grows with the prompt, so only requests of one shape share a run, and
    its config.pbtxt's max_batch_size (4 here) caps every run."""
    cfg = local.manifest.model_config
    arrays = [inputs_for(ENCODER, cfg, batch=1 + i % 2, seed=i) for i in range(16)]
    for a in arrays[::3]:  # another prompt length: its own group
        a["prompt_ids"], a["prompt_mask"] = a["prompt_ids"][:, :3], a["prompt_mask"][:, :3]
    responses, (runs, rows, small) = merged_burst(server, stub, ENCODER, [request_for(ENCODER, a) for a in arrays])
    assert rows == sum(len(a["prompt_ids"]) for a in arrays)
    assert small == runs  # never past 4 rows
    for a, response in zip(arrays, responses):
        got, want = outputs_of(response), row_by_row(local, ENCODER, a)
        assert got["memory"].shape == want["memory"].shape
        np.testing.assert_allclose(got["memory"], want["memory"], atol=1e-5)
        np.testing.assert_array_equal(got["memory_mask"], want["memory_mask"])


def test_a_model_without_dynamic_batching_runs_each_request_on_its_own(server, stub, local):
    arrays = [inputs_for(DECODER, local.manifest.model_config, batch=2, seed=i) for i in range(6)]
    responses = burst(stub, [request_for(DECODER, a) for a in arrays])
    assert batch_stats(server, DECODER)[0] == 0
    for a, response in zip(arrays, responses):
        got, want = outputs_of(response), run_model(local, DECODER, a)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5)
