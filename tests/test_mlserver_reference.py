"""The KServe v2 reference server (MLServer over a Triton-layout repository) behaves like Triton
for what fuseloop's Triton runtime uses: health, model metadata, batched inference for every
input/output by name and dtype, explicit load/unload, and two versions of a model side by side."""

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from services.inference.runtime.mlserver_launcher import MLServerProcess

pytestmark = pytest.mark.mlserver

INPUTS = [("x", "FP32", [-1, 3]), ("ids", "INT64", [-1, 2]), ("mask", "BOOL", [-1, 2])]
OUTPUTS = [("y", "FP32", [-1, 4]), ("ids_out", "INT64", [-1, 2]), ("mask_out", "BOOL", [-1, 2])]
_ONNX_TYPES = {"FP32": TensorProto.FLOAT, "INT64": TensorProto.INT64, "BOOL": TensorProto.BOOL}
_CONFIG_TYPES = {"FP32": model_config_pb2.TYPE_FP32, "INT64": model_config_pb2.TYPE_INT64,
                 "BOOL": model_config_pb2.TYPE_BOOL}
_NUMPY_TYPES = {"FP32": np.float32, "INT64": np.int64, "BOOL": np.bool_}


def write_version(model_dir: Path, version: int) -> Path:
    """A tiny graph whose weights depend on `version`, saved with its weights in model.onnx.data
    (as torch.onnx.export writes them): y = x @ W + b, ids_out = ids * version, mask_out = !mask."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4) * version, "W")
    b = numpy_helper.from_array(np.full(4, 0.5 * version, np.float32), "b")
    k = numpy_helper.from_array(np.array(version, np.int64), "k")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
            helper.make_node("Mul", ["ids", "k"], ["ids_out"]),
            helper.make_node("Not", ["mask"], ["mask_out"]),
        ],
        "tiny",
        [helper.make_tensor_value_info(n, _ONNX_TYPES[t], ["batch", *s[1:]]) for n, t, s in INPUTS],
        [helper.make_tensor_value_info(n, _ONNX_TYPES[t], ["batch", *s[1:]]) for n, t, s in OUTPUTS],
        [w, b, k],
    )
    # IR 10: onnx 1.23's default IR version is newer than onnxruntime 1.31 reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    path = model_dir / str(version) / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save_model(model, str(path), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    return path


def write_config(model_dir: Path, policy: str) -> None:
    config = model_config_pb2.ModelConfig(
        name=model_dir.name, platform="onnxruntime_onnx", max_batch_size=8
    )
    for name, dtype, shape in INPUTS:
        config.input.add(name=name, data_type=_CONFIG_TYPES[dtype], dims=shape[1:])
    for name, dtype, shape in OUTPUTS:
        config.output.add(name=name, data_type=_CONFIG_TYPES[dtype], dims=shape[1:])
    text_format.Parse(policy, config.version_policy)
    config.dynamic_batching.SetInParent()
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))


def write_model(repo: Path, name: str, versions, policy: Optional[str]) -> None:
    """policy None: no config.pbtxt at all (Triton auto-completes ONNX models)."""
    (repo / name).mkdir()
    if policy is not None:
        write_config(repo / name, policy)
    for version in versions:
        write_version(repo / name, version)


def make_request(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    feeds = {
        "x": rng.standard_normal((batch, 3)).astype(np.float32),
        "ids": rng.integers(-1000, 1000, (batch, 2)).astype(np.int64),
        "mask": rng.random((batch, 2)) > 0.5,
    }
    inputs = []
    for name, dtype, _ in INPUTS:
        tensor = grpcclient.InferInput(name, list(feeds[name].shape), dtype)
        tensor.set_data_from_numpy(feeds[name])
        inputs.append(tensor)
    return inputs, feeds


def reference(model_file: Path, feeds) -> dict:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = [name for name, _, _ in OUTPUTS]
    return dict(zip(names, session.run(names, feeds)))


def assert_same_outputs(result, expected: dict) -> None:
    for name, dtype, _ in OUTPUTS:
        got = result.as_numpy(name)
        assert got.dtype == _NUMPY_TYPES[dtype], name
        np.testing.assert_allclose(got, expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    write_model(repo, "tiny", [1, 2], "all {}")
    write_model(repo, "rolling", [1, 2], "latest { num_versions: 2 }")
    write_model(repo, "idle", [1, 2], None)
    write_model(repo, "mismatch", [1], "all {}")
    config = (repo / "mismatch" / "config.pbtxt").read_text()
    (repo / "mismatch" / "config.pbtxt").write_text(config.replace('name: "ids"', 'name: "tokens"'))
    return repo


@pytest.fixture(scope="module")
def server(mlserver_venv, repo):
    # Explicit model control, as fuseloop runs Triton: nothing is served until loaded.
    with MLServerProcess(repo, venv_dir=mlserver_venv, load_models_at_startup=False) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    client = grpcclient.InferenceServerClient(server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tiny(client, repo):
    client.load_model("tiny")
    return repo / "tiny"


def test_server_is_live_and_ready_at_the_url_it_reports(server, client):
    assert server.url.startswith("127.0.0.1:")
    assert client.is_server_live()
    assert client.is_server_ready()


def test_explicit_control_serves_a_model_only_between_load_and_unload(client):
    indexed = {m.name for m in client.get_model_repository_index().models}
    assert {"tiny", "rolling", "idle"} <= indexed
    with pytest.raises(InferenceServerException):
        client.is_model_ready("idle")  # never loaded: MLServer answers NOT_FOUND

    client.load_model("idle")
    assert client.is_model_ready("idle")
    assert client.is_model_ready("idle", "2")

    client.unload_model("idle")
    with pytest.raises(InferenceServerException, match="not found"):
        client.infer("idle", make_request(1, seed=0)[0])
    assert client.is_server_ready()


def test_without_config_pbtxt_the_latest_version_serves_with_the_graph_signature(client):
    client.load_model("idle")
    meta = client.get_model_metadata("idle")
    assert list(meta.versions) == ["2"]  # Triton's default policy: latest { num_versions: 1 }
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == INPUTS
    with pytest.raises(InferenceServerException, match="not found"):
        client.infer("idle", make_request(1, seed=0)[0], model_version="1")
    client.unload_model("idle")


def test_a_config_that_contradicts_the_graph_fails_to_load_with_the_reason(client):
    with pytest.raises(InferenceServerException, match="declares input 'tokens'"):
        client.load_model("mismatch")
    assert client.is_server_ready()


def test_loading_a_model_missing_from_the_repository_fails_with_not_found(client):
    with pytest.raises(InferenceServerException) as err:
        client.load_model("no_such_model")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_metadata_reports_names_datatypes_dynamic_batch_and_served_versions(client, tiny):
    for version in ("", "1", "2"):
        meta = client.get_model_metadata("tiny", version)
        assert meta.name == "tiny"
        assert meta.platform == "onnxruntime_onnx"
        assert list(meta.versions) == ["1", "2"]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == INPUTS
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == OUTPUTS


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("version", ["1", "2"])
def test_infer_matches_onnxruntime_in_process(client, tiny, batch, version):
    inputs, feeds = make_request(batch, seed=batch)
    result = client.infer("tiny", inputs, model_version=version)
    assert result.get_response().model_version == version
    assert_same_outputs(result, reference(tiny / version / "model.onnx", feeds))


def test_two_versions_serve_side_by_side_and_unversioned_requests_get_the_latest(client, tiny):
    inputs, feeds = make_request(3, seed=7)
    v1 = client.infer("tiny", inputs, model_version="1")
    v2 = client.infer("tiny", inputs, model_version="2")
    latest = client.infer("tiny", inputs)
    assert not np.allclose(v1.as_numpy("y"), v2.as_numpy("y"))
    assert_same_outputs(v1, reference(tiny / "1" / "model.onnx", feeds))
    assert_same_outputs(v2, reference(tiny / "2" / "model.onnx", feeds))
    assert latest.get_response().model_version == "2"
    np.testing.assert_array_equal(latest.as_numpy("y"), v2.as_numpy("y"))


def test_requested_outputs_limit_the_response(client, tiny):
    inputs, _ = make_request(2, seed=3)
    result = client.infer("tiny", inputs, outputs=[grpcclient.InferRequestedOutput("ids_out")])
    assert [o.name for o in result.get_response().outputs] == ["ids_out"]


def test_load_picks_up_a_new_version_folder_and_applies_the_version_policy(client, repo):
    client.load_model("rolling")
    assert client.is_model_ready("rolling", "1") and client.is_model_ready("rolling", "2")

    write_version(repo / "rolling", 3)
    client.load_model("rolling")  # latest { num_versions: 2 }: serves 2 and 3, drops 1

    assert client.is_model_ready("rolling", "2") and client.is_model_ready("rolling", "3")
    with pytest.raises(InferenceServerException, match="not found"):
        client.infer("rolling", make_request(1, seed=0)[0], model_version="1")
    inputs, feeds = make_request(4, seed=11)
    assert_same_outputs(client.infer("rolling", inputs, model_version="3"),
                        reference(repo / "rolling" / "3" / "model.onnx", feeds))
    assert client.infer("rolling", inputs).get_response().model_version == "3"
    assert list(client.get_model_metadata("rolling").versions) == ["2", "3"]


def _tensor(name: str, array: np.ndarray, dtype: str):
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: [_tensor("x", np.zeros((2, 3), np.float64), "FP64"), *t[1:]], "must be FP32"),
        (lambda t: [_tensor("x", np.zeros((2, 5), np.float32), "FP32"), *t[1:]], "must have shape"),
        (lambda t: t[1:], "missing inputs ['x']"),
        (lambda t: [*t, _tensor("extra", np.zeros((2, 1), np.float32), "FP32")], "no input 'extra'"),
    ],
    ids=["wrong-dtype", "wrong-shape", "missing-input", "unknown-input"],
)
def test_bad_input_is_invalid_argument_with_a_reason_and_the_server_keeps_serving(
    client, tiny, mutate, message
):
    inputs, _ = make_request(2, seed=5)
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny", mutate(inputs))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in err.value.message()
    assert client.is_model_ready("tiny")
    client.infer("tiny", inputs)


def test_a_batch_above_max_batch_size_is_invalid_argument(client, tiny):
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny", make_request(9, seed=1)[0])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "exceeds max_batch_size 8" in err.value.message()
    client.infer("tiny", make_request(8, seed=1)[0])
