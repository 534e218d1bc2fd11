"""The same server speaks KServe v2 (Triton's gRPC protocol): tritonclient.grpc works against it
unchanged, and ModelInfer runs the exported graphs exactly as ONNX Runtime does in process."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from fuseloop.repository import DECODER, ENCODER, MODELS, REWARD, ModelRepository
from services.inference.config import InferenceServiceConfig
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread

TOKEN = "kserve-admin"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(shared_repo_dir):
    config = InferenceServiceConfig(port=0, admin_token=TOKEN)
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    with ServerThread(InferenceServer(config, runtime, ModelRepository(shared_repo_dir))) as thread:
        yield thread


@pytest.fixture(scope="module")
def client(server):
    client = tc.InferenceServerClient(server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def local(shared_repo_dir):
    """The serving version loaded in process: the reference for every ModelInfer."""
    return OnnxRuntime(OnnxRuntimeConfig(device="cpu")).load(ModelRepository(shared_repo_dir), 2)


def inputs_for(model: str, cfg: dict, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Well-formed random inputs for one graph of a model with config `cfg`."""
    rng = np.random.default_rng(seed)
    S, R, P, M, d = 5, 4, 3, 21, cfg["d_model"]
    H = cfg["n_heads"]
    pixels = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
    prompt_ids = rng.integers(4, 40, (batch, S)).astype(np.int64)
    prompt_mask = np.ones((batch, S), dtype=np.int64)
    prompt_mask[0, -2:] = 0
    if model == ENCODER:
        return {"pixel_values": pixels, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask}
    if model == REWARD:
        mask = np.ones((batch, R), dtype=np.int64)
        mask[-1, -1] = 0
        return {"pixel_values": pixels, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                "response_ids": rng.integers(4, 40, (batch, R)).astype(np.int64), "response_mask": mask}
    attention = np.ones((batch, P + 2), dtype=np.int64)
    attention[0, 0] = 0
    return {"input_ids": rng.integers(4, 40, (batch, 2)).astype(np.int64),
            "position_ids": np.full((batch, 2), P, dtype=np.int64), "attention_mask": attention,
            "memory": rng.normal(size=(batch, M, d)).astype(np.float32),
            "memory_mask": np.ones((batch, M), dtype=np.int64),
            "past": rng.normal(size=(batch, 2 * cfg["n_decoder_layers"], H, P, d // H)).astype(np.float32)}


def infer_inputs(arrays: dict[str, np.ndarray]) -> list[tc.InferInput]:
    out = []
    for name, arr in arrays.items():
        i = tc.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
        i.set_data_from_numpy(arr)
        out.append(i)
    return out


def call_local(local, model: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from services.inference.kserve import run_model

    return run_model(local, model, arrays)


def test_server_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "fuseloop" and "model_repository" in meta.extensions


def test_what_fuseloop_does_not_implement_is_unimplemented_by_name(client):
    with pytest.raises(InferenceServerException) as err:
        client.get_inference_statistics()
    assert err.value.status() == "StatusCode.UNIMPLEMENTED" and "ModelStatistics" in err.value.message()


def test_model_readiness_and_metadata_follow_the_manifest(client, local):
    for model in MODELS:
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "2") and not client.is_model_ready(model, "1")
        meta = client.get_model_metadata(model)
        assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["2"]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == \
               [(t.name, t.datatype, list(t.shape)) for t in local.manifest.io(model, "inputs")]
        assert [t.name for t in meta.outputs] == [t.name for t in local.manifest.io(model, "outputs")]
    assert not client.is_model_ready("no_such_model")


def test_model_config_is_the_repositorys_config_pbtxt(client, shared_repo_dir):
    for model in MODELS:
        got = client.get_model_config(model).config
        want = text_format.Parse((shared_repo_dir / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert got == want
        assert got.max_batch_size == 64 and got.platform == "onnxruntime_onnx"


@pytest.mark.parametrize("model", MODELS)
def test_model_infer_gives_the_same_numbers_as_onnxruntime_in_process(client, local, model):
    arrays = inputs_for(model, local.manifest.model_config)
    result = client.infer(model, infer_inputs(arrays))
    assert result.get_response().model_version == "2"
    for name, want in call_local(local, model, arrays).items():
        np.testing.assert_array_equal(result.as_numpy(name), want)


def test_typed_contents_and_requested_outputs_work_too(server, local):
    arrays = inputs_for(ENCODER, local.manifest.model_config, batch=2)
    request = service_pb2.ModelInferRequest(model_name=ENCODER, id="typed-1")
    for name, arr in arrays.items():
        t = request.inputs.add(name=name, datatype="FP32" if arr.dtype == np.float32 else "INT64", shape=arr.shape)
        if arr.dtype == np.float32:
            t.contents.fp32_contents.extend(arr.ravel().tolist())
        else:
            t.contents.int64_contents.extend(arr.ravel().tolist())
    request.outputs.add(name="memory_mask")
    with grpc.insecure_channel(server.address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.id == "typed-1" and [o.name for o in response.outputs] == ["memory_mask"]
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.int64).reshape(response.outputs[0].shape)
    np.testing.assert_array_equal(got, call_local(local, ENCODER, arrays)["memory_mask"])


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("prompt_mask"), "missing input(s) prompt_mask"),
    (lambda a: a.update(pixel_values=a["pixel_values"][:, :, :16]), "has shape [3, 3, 16, 32]"),
    (lambda a: a.update(prompt_mask=a["prompt_mask"][:2]), "disagree on the batch size"),
    (lambda a: a.update(prompt_ids=a["prompt_ids"].astype(np.float32)), "prompt_ids is INT64, not FP32"),
    (lambda a: a.update(extra=a["prompt_ids"]), "unknown input 'extra'"),
    (lambda a: a.update({k: np.repeat(v, 30, axis=0) for k, v in a.items()}), "exceeds fuseloop_encoder's max_batch_size 64"),
])
def test_bad_infer_requests_are_invalid_arguments(client, local, change, message):
    arrays = inputs_for(ENCODER, local.manifest.model_config)
    change(arrays)
    with pytest.raises(InferenceServerException) as err:
        client.infer(ENCODER, infer_inputs(arrays))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and message in err.value.message()


def test_unknown_models_and_unloaded_versions_are_refused(client, local):
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no_such_model")
    assert "unknown model" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer(ENCODER, infer_inputs(inputs_for(ENCODER, local.manifest.model_config)), model_version="1")
    assert "version 1 of fuseloop_encoder is not loaded" in err.value.message()


def test_repository_load_and_unload_follow_the_version_policy_and_need_the_admin_token(client, local):
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert index[(ENCODER, "2")] == "READY" and index[(ENCODER, "1")] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as err:
        client.load_model(ENCODER)
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    client.load_model(ENCODER, headers=ADMIN)  # config.pbtxt: latest 2 -> versions 1 and 2
    assert client.is_model_ready(ENCODER, "1")
    arrays = inputs_for(ENCODER, local.manifest.model_config)
    result = client.infer(ENCODER, infer_inputs(arrays), model_version="1")
    assert result.get_response().model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("memory"), call_local(local, ENCODER, arrays)["memory"])  # same weights
    client.unload_model(ENCODER, headers=ADMIN)
    assert not client.is_model_ready(ENCODER)
    with pytest.raises(InferenceServerException) as err:
        client.infer(ENCODER, infer_inputs(arrays))
    assert "unloaded" in err.value.message()
    assert client.is_model_ready(DECODER)  # the other models are untouched
    client.load_model(ENCODER, headers=ADMIN)
    assert client.is_model_ready(ENCODER)
    for model in MODELS:
        client.unload_model(model, headers=ADMIN)
    for model in MODELS:
        client.load_model(model, headers=ADMIN)
        assert client.is_model_ready(model, "2")


def _with(model, cfg, **changes):
    arrays = inputs_for(model, cfg)
    for name, fn in changes.items():
        arrays[name] = fn(arrays[name])
    return arrays


@pytest.mark.parametrize("model, change, message", [
    (ENCODER, {"prompt_ids": lambda a: a + 1000}, "input prompt_ids: "),
    (DECODER, {"position_ids": lambda a: a + 1000}, "outside the position table"),
    (ENCODER, {"prompt_ids": lambda a: a[:, :0], "prompt_mask": lambda a: a[:, :0]}, "input prompt_ids: dimension 1 is 0"),
    (DECODER, {"attention_mask": lambda a: a[:, :-1]}, "input attention_mask has length"),
    (REWARD, {"response_mask": lambda a: a * 7}, "input response_mask: mask values must be 0 or 1"),
])
def test_each_class_of_graph_mistake_is_an_invalid_argument_naming_the_input(client, local, model, change, message):
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, infer_inputs(_with(model, local.manifest.model_config, **change)))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and message in err.value.message()


@pytest.mark.parametrize("shape", [[2**32, 2**32, 1, 1], [-1, 3, 32, 32], [3, 3, 32, -32]])
def test_shapes_that_overflow_or_go_negative_are_invalid_arguments(client, local, shape):
    inputs = infer_inputs(inputs_for(ENCODER, local.manifest.model_config))
    inputs[0].set_shape(shape)
    with pytest.raises(InferenceServerException) as err:
        client.infer(ENCODER, inputs)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "pixel_values" in err.value.message()


@pytest.mark.parametrize("version", ["\u00b2", "\u0662", "1" * 40, "-1"])
def test_versions_that_isdigit_accepts_but_int_does_not_are_invalid_arguments(client, local, version):
    with pytest.raises(InferenceServerException) as err:
        client.infer(ENCODER, infer_inputs(inputs_for(ENCODER, local.manifest.model_config)), model_version=version)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "model_version" in err.value.message()
    for call in (client.is_model_ready, client.get_model_metadata):
        with pytest.raises(InferenceServerException) as err:
            call(ENCODER, version)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_fuzzed_model_infer_requests_never_get_unknown_or_internal(server, client, local):
    """Seeded mutations of valid requests: every answer is OK or a client-error status."""
    rng = np.random.default_rng(13)
    valid = {}
    for model in MODELS:
        req = service_pb2.ModelInferRequest(model_name=model)
        for name, arr in inputs_for(model, local.manifest.model_config, batch=2).items():
            req.inputs.add(name=name, datatype="FP32" if arr.dtype == np.float32 else "INT64", shape=arr.shape)
            req.raw_input_contents.append(arr.tobytes())
        valid[model] = req
    bad = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        futures = []
        for i in range(600):
            req = service_pb2.ModelInferRequest()
            req.CopyFrom(valid[MODELS[i % 3]])
            for _ in range(rng.integers(1, 4)):
                k = int(rng.integers(len(req.inputs)))
                what = rng.integers(8)
                if what == 0:
                    req.inputs[k].shape[int(rng.integers(len(req.inputs[k].shape)))] = int(rng.integers(-2**62, 2**62))
                elif what == 1:
                    req.inputs[k].datatype = str(rng.choice(["FP16", "BYTES", "INT32", "", "FP64", "BOOL"]))
                elif what == 2:
                    req.raw_input_contents[k] = req.raw_input_contents[k][: int(rng.integers(0, 64))]
                elif what == 3:
                    req.raw_input_contents[k] = rng.integers(0, 256, len(req.raw_input_contents[k]), dtype=np.uint8).tobytes()
                elif what == 4:
                    req.model_version = str(rng.choice(["\u00b2", "\u0663", "2", "99", "x", "9" * 30]))
                elif what == 5:
                    req.inputs[k].name = req.inputs[(k + 1) % len(req.inputs)].name
                elif what == 6:
                    del req.inputs[k]
                else:
                    req.inputs[k].shape[:] = [1] * int(rng.integers(0, 12))
            futures.append(stub.ModelInfer.future(req))
            if i % 50 == 0:
                futures.append(stub.ModelMetadata.future(service_pb2.ModelMetadataRequest(
                    name=str(rng.choice(MODELS + ("nope",))), version=str(rng.choice(["", "2", "\u00b3", "1" * 25])))))
                futures.append(stub.ModelReady.future(service_pb2.ModelReadyRequest(
                    name=str(rng.choice(MODELS)), version=str(rng.choice(["", "2", "\u0664"])))))
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        assert not bad & set(codes), [c for c in codes if c in bad][:5]
        assert stub.ServerLive(service_pb2.ServerLiveRequest()).live
        assert stub.ServerReady(service_pb2.ServerReadyRequest()).ready
        stub.ModelInfer(valid[REWARD])
