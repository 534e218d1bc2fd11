"""AdminService: token checks, listing, deploy and rollback (hot, atomic, under load), refusing
tampered artifacts while the serving version keeps serving, and the deployed version surviving restarts."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseloop.repository import DECODER, ENCODER, MANIFEST, MODEL_FILE, ModelRepository
from fuseloop.scenes import make_split, png_bytes, render
from fuseloop.v1 import admin_pb2, admin_pb2_grpc, events_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from fuseloop.repository import SERVING_STATE as STATE_FILE
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread

TOKEN = "admin-secret"
AUTH = [("authorization", f"Bearer {TOKEN}")]
EXAMPLE = make_split("test", 1)[0]
REQUEST = inference_pb2.GenerateRequest(image=png_bytes(render(EXAMPLE.scene)), prompt=EXAMPLE.prompt)


def start(repo: Path, token: str | None = TOKEN, wait_ready: bool = True) -> ServerThread:
    config = InferenceServiceConfig(port=0, admin_token=token, max_queue=1024)
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    return ServerThread(InferenceServer(config, runtime, ModelRepository(repo))).start(wait_ready)


class Clients:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self) -> admin_pb2.StatusResponse:
        return self.admin.Status(admin_pb2.StatusRequest(), metadata=AUTH)

    def deploy(self, version: str) -> admin_pb2.DeployResponse:
        return self.admin.Deploy(admin_pb2.DeployRequest(version=version), metadata=AUTH)


@pytest.fixture
def served(repo_copy):
    server = start(repo_copy)
    clients = Clients(server.address)
    yield server, clients
    clients.channel.close()
    server.stop()


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_every_admin_call_needs_the_token(served):
    _, c = served
    calls = {
        "ListModels": lambda md: c.admin.ListModels(admin_pb2.ListModelsRequest(), metadata=md),
        "Deploy": lambda md: c.admin.Deploy(admin_pb2.DeployRequest(version="1"), metadata=md),
        "Rollback": lambda md: c.admin.Rollback(admin_pb2.RollbackRequest(), metadata=md),
        "Status": lambda md: c.admin.Status(admin_pb2.StatusRequest(), metadata=md),
    }
    for name, call in calls.items():
        assert refusal(lambda: call(None)).code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert refusal(lambda: call([("authorization", "Basic abc")])).code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert refusal(lambda: call([("authorization", "Bearer wrong")])).code() == grpc.StatusCode.PERMISSION_DENIED, name
    assert c.status().serving_version == "2"  # nothing above changed anything


def test_without_a_configured_token_the_admin_api_is_closed(repo_copy):
    server = start(repo_copy, token=None)
    try:
        c = Clients(server.address)
        err = refusal(lambda: c.status())
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "disabled" in err.details()
    finally:
        server.stop()


def test_list_models_and_status_describe_the_repository(served):
    _, c = served
    listed = c.admin.ListModels(admin_pb2.ListModelsRequest(), metadata=AUTH).versions
    assert [v.version for v in listed] == ["1", "2"]
    assert [v.serving for v in listed] == [False, True]
    assert listed[1].parent_version == "1" and listed[0].parent_version == ""
    assert listed[0].created_at and "export_max_abs_diff" in json.loads(listed[0].metrics_json)
    status = c.status()
    assert (status.serving_version, status.runtime, status.ready) == ("2", "onnxruntime", True)


def test_deploy_swaps_versions_and_rollback_returns_in_one_call(served, repo_copy):
    _, c = served
    r = c.deploy("1")
    assert (r.serving_version, r.previous_version) == ("1", "2")
    assert c.inference.Generate(REQUEST).model_version == "1"
    r = c.admin.Rollback(admin_pb2.RollbackRequest(), metadata=AUTH)
    assert (r.serving_version, r.previous_version) == ("2", "1")
    assert c.inference.Generate(REQUEST).model_version == "2"
    assert list(c.status().history) == ["2", "1", "2"]
    assert json.loads((repo_copy / STATE_FILE).read_text())["serving"] == 2


def test_deploying_an_unknown_or_malformed_version_is_refused(served):
    _, c = served
    err = refusal(lambda: c.deploy("9"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "version 9 is not in the repository" in err.details()
    err = refusal(lambda: c.deploy("latest"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rollback_without_a_previous_version_is_a_failed_precondition(repo_copy):
    server = start(repo_copy)
    try:
        c = Clients(server.address)
        err = refusal(lambda: c.admin.Rollback(admin_pb2.RollbackRequest(), metadata=AUTH))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop()


def test_a_tampered_artifact_is_refused_and_the_serving_version_keeps_serving(served, repo_copy):
    _, c = served
    onnx = repo_copy / DECODER / "1" / MODEL_FILE
    data = bytearray(onnx.read_bytes())
    data[-10] ^= 0xFF
    onnx.write_bytes(bytes(data))
    err = refusal(lambda: c.deploy("1"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "checksum mismatch for fuseloop_decoder/1/model.onnx" in err.details()
    assert c.status().serving_version == "2"
    assert c.inference.Generate(REQUEST).model_version == "2"


def test_an_artifact_whose_signature_differs_from_its_manifest_is_refused(served, repo_copy):
    _, c = served
    path = repo_copy / ENCODER / "1" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["signatures"][DECODER]["inputs"][0]["datatype"] = "INT32"  # the graph says INT64
    path.write_text(json.dumps(manifest))
    err = refusal(lambda: c.deploy("1"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "the manifest says INT32" in err.details()
    assert c.inference.Generate(REQUEST).model_version == "2"


def test_the_deployed_version_survives_a_restart(repo_copy):
    server = start(repo_copy)
    try:
        Clients(server.address).deploy("1")
    finally:
        server.stop()
    server = start(repo_copy)
    try:
        c = Clients(server.address)
        assert c.status().serving_version == "1"
        assert c.inference.Generate(REQUEST).model_version == "1"
    finally:
        server.stop()


def test_the_server_is_not_serving_until_a_version_is_loaded(shared_repo_dir, tmp_path):
    empty = tmp_path / "repo"
    empty.mkdir()
    server = start(empty)
    try:
        c = Clients(server.address)
        assert c.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        err = refusal(lambda: c.inference.Generate(REQUEST))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "no model version is loaded" in err.details()
        assert not c.status().ready
        shutil.copytree(shared_repo_dir, empty, dirs_exist_ok=True)
        assert c.deploy("1").serving_version == "1"
        assert c.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert c.inference.Generate(REQUEST).model_version == "1"
    finally:
        server.stop()


def test_redeploying_under_concurrent_load_fails_no_request(served):
    _, c = served
    stop = threading.Event()
    versions: Counter = Counter()
    failures: list[str] = []
    request = inference_pb2.GenerateRequest(image=REQUEST.image, prompt=REQUEST.prompt, num_candidates=2,
                                            sampling=events_pb2.SamplingParams(temperature=1.0))

    def client() -> None:
        with grpc.insecure_channel(served[0].address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    versions[stub.Generate(request, timeout=30).model_version] += 1
                except grpc.RpcError as e:
                    failures.append(f"{e.code()}: {e.details()}")

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for version in ("1", "2", "1"):
            assert c.deploy(version).serving_version == version
            time.sleep(0.2)
        assert c.admin.Rollback(admin_pb2.RollbackRequest(), metadata=AUTH).serving_version == "2"
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert versions["1"] > 0 and versions["2"] > 0
