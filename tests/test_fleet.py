"""A fleet converges on one serving record: three inference replicas on one repository, a deploy
or rollback through any one of them (or the trainer, or `models --repo`) and every replica serves
it within 5 s with no failed request; a version a replica can't load leaves it serving what it has,
NOT_SERVING for that version in Status and /metrics, and retrying."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from fuseloop.repository import DECODER, MODEL_FILE, ModelRepository, ServingState
from fuseloop.v1 import admin_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread
from tests.test_inference_admin import AUTH, REQUEST, TOKEN, Clients
from trainer.deploy import RecordDeployer

CONVERGE_S = 5.0


def replica(repo: Path) -> ServerThread:
    config = InferenceServiceConfig(port=0, admin_token=TOKEN, max_queue=1024, worker_threads=2)
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    return ServerThread(InferenceServer(config, runtime, ModelRepository(repo))).start()


@pytest.fixture(scope="module")
def fleet(shared_repo_dir, tmp_path_factory):
    import shutil

    repo = tmp_path_factory.mktemp("fleet") / "repo"
    shutil.copytree(shared_repo_dir, repo)
    servers = [replica(repo) for _ in range(3)]
    clients = [Clients(s.address) for s in servers]
    yield repo, servers, clients
    for c in clients:
        c.channel.close()
    for s in servers:
        s.stop()


class Load:
    """Generate calls against every replica until stopped; counts answers by version, and failures."""

    def __init__(self, servers: list[ServerThread], per_replica: int = 2) -> None:
        self.stop_flag = threading.Event()
        self.versions: Counter = Counter()
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(s.address,))
                        for s in servers for _ in range(per_replica)]

    def _client(self, address: str) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            while not self.stop_flag.is_set():
                try:
                    self.versions[stub.Generate(REQUEST, timeout=30).model_version] += 1
                except grpc.RpcError as e:
                    self.failures.append(f"{e.code()}: {e.details()}")

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join()


def converged_in(clients: list[Clients], version: str) -> float:
    """Seconds until every replica serves `version` and says so against the record."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        statuses = [c.status() for c in clients]
        if all(s.serving_version == version and s.desired_status == "SERVING" for s in statuses):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"not converged on {version}: {[(s.serving_version, s.desired_status) for s in statuses]}")


def test_a_deploy_or_rollback_through_one_replica_reaches_every_replica_under_load(fleet):
    repo, servers, clients = fleet
    with Load(servers) as load:
        time.sleep(0.3)
        assert clients[0].deploy("1").serving_version == "1"
        deployed_s = converged_in(clients, "1")
        rollback = clients[2].admin.Rollback(admin_pb2.RollbackRequest(), metadata=AUTH)
        assert rollback.serving_version == "2"
        rolled_back_s = converged_in(clients, "2")
        time.sleep(0.3)
    assert load.failures == []
    print(f"fleet of 3: deploy converged in {deployed_s:.2f} s, rollback in {rolled_back_s:.2f} s, "
          f"{sum(load.versions.values())} requests, 0 failed")
    assert deployed_s < CONVERGE_S and rolled_back_s < CONVERGE_S
    assert load.versions["1"] > 0 and load.versions["2"] > 0
    record = ServingState.read(repo / "serving.json")
    assert (record.serving, record.previous) == (2, 1) and record.generation >= 2
    assert {c.status().desired_generation for c in clients} == {record.generation}


def test_the_trainer_deploys_by_changing_the_record_and_every_replica_follows(fleet):
    repo, servers, clients = fleet
    line = RecordDeployer(ModelRepository(repo)).deploy(1)
    assert "version 1" in line
    assert converged_in(clients, "1") < CONVERGE_S
    RecordDeployer(ModelRepository(repo)).rollback()
    assert converged_in(clients, "2") < CONVERGE_S


def test_a_version_a_replica_cannot_load_leaves_it_serving_and_reporting_not_serving(fleet, tmp_path):
    repo, servers, clients = fleet
    onnx = repo / DECODER / "1" / MODEL_FILE
    good = onnx.read_bytes()
    onnx.write_bytes(good[:-10] + bytes(b ^ 0xFF for b in good[-10:]))
    try:
        # Through a replica, the broken version is refused before it becomes the fleet's record.
        with pytest.raises(grpc.RpcError) as err:
            clients[1].deploy("1")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ServingState.read(repo / "serving.json").serving == 2
        # Written into the record by hand (or a repository that is still syncing), every replica
        # keeps serving 2, says NOT_SERVING for 1 with the reason, and in /metrics.
        ServingState.update(repo / "serving.json", lambda s: s.deployed(1))
        time.sleep(1.5)
        for c in clients:
            s = c.status()
            assert (s.serving_version, s.desired_version, s.desired_status) == ("2", "1", "NOT_SERVING")
            assert "checksum mismatch" in s.desired_error
            assert c.inference.Generate(REQUEST).model_version == "2"
        metrics = servers[0].server.metrics
        assert metrics.desired_serving.labels("1")._value.get() == 0
    finally:
        onnx.write_bytes(good)
    # It retries: once the artifact is whole, the fleet converges on the record.
    assert converged_in(clients, "1") < 35
    assert servers[0].server.metrics.desired_serving.labels("1")._value.get() == 1
    RecordDeployer(ModelRepository(repo)).deploy(2)
    converged_in(clients, "2")


def test_concurrent_changes_through_different_replicas_serialize(fleet):
    repo, servers, clients = fleet
    before = ServingState.read(repo / "serving.json").generation
    answers: list = []

    def deploy(c: Clients, v: str) -> None:
        answers.append(c.deploy(v).generation)

    threads = [threading.Thread(target=deploy, args=(c, v)) for c, v in zip(clients, ("1", "2", "1"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record = ServingState.read(repo / "serving.json")
    # Each change saw the one before it; none was lost.
    assert len(answers) == 3 and record.generation > before
    converged_in(clients, str(record.serving))
    RecordDeployer(ModelRepository(repo)).deploy(2)
    converged_in(clients, "2")


def test_a_canary_takes_a_sticky_tenth_of_sessions_on_every_replica_then_promotes(fleet):
    repo, servers, clients = fleet
    reply = clients[1].admin.Deploy(admin_pb2.DeployRequest(version="1", canary_percent=10), metadata=AUTH)
    assert (reply.serving_version, reply.canary_version) == ("2", "1")
    t0 = time.monotonic()
    while not all(c.status().canary_status == "SERVING" for c in clients):
        assert time.monotonic() - t0 < CONVERGE_S
        time.sleep(0.05)
    sessions = [f"user-{i}" for i in range(300)]
    arm_of: dict[str, set] = {}
    for i, session in enumerate(sessions):
        for c in (clients[i % 3], clients[(i + 1) % 3]):  # the same session through two replicas
            request = inference_pb2.GenerateRequest(image=REQUEST.image, prompt=REQUEST.prompt, session_id=session)
            arm_of.setdefault(session, set()).add(c.inference.Generate(request).model_version)
    assert all(len(v) == 1 for v in arm_of.values())  # sticky, whichever replica answers
    share = sum(v == {"1"} for v in arm_of.values()) / len(sessions)
    print(f"canary at 10%: {share:.1%} of {len(sessions)} sessions")
    assert abs(share - 0.10) < 0.04, share
    canary_calls = sum(s.server.metrics.responses.labels("1", "canary")._value.get() for s in servers)
    assert canary_calls == 2 * sum(v == {"1"} for v in arm_of.values())
    timed = sum(s.server.metrics.registry.get_sample_value(
        "fuseloop_inference_version_latency_seconds_count", {"method": "Generate", "version": "1", "arm": "canary"}) or 0
        for s in servers)
    assert timed == canary_calls  # the canary's latency is its own series, beside the stable version's
    # Deploying the canary's version promotes it: everyone gets it, the trial ends.
    assert clients[0].deploy("1").serving_version == "1"
    converged_in(clients, "1")
    assert all(c.status().canary_version == "" for c in clients)
    RecordDeployer(ModelRepository(repo)).deploy(2)
    converged_in(clients, "2")


def test_rollback_during_a_canary_ends_the_trial_and_keeps_the_serving_version(fleet):
    repo, servers, clients = fleet
    print(RecordDeployer(ModelRepository(repo)).canary(1, 50))
    t0 = time.monotonic()
    while not all(c.status().canary_status == "SERVING" for c in clients):
        assert time.monotonic() - t0 < CONVERGE_S
        time.sleep(0.05)
    clients[2].admin.Rollback(admin_pb2.RollbackRequest(), metadata=AUTH)
    t0 = time.monotonic()
    while any(s.server.deployment.canary is not None for s in servers):
        assert time.monotonic() - t0 < CONVERGE_S
        time.sleep(0.05)
    assert all(c.status().serving_version == "2" for c in clients)
    record = ServingState.read(repo / "serving.json")
    assert (record.serving, record.canary) == (2, None)
    with pytest.raises(grpc.RpcError) as err:
        clients[0].admin.Deploy(admin_pb2.DeployRequest(version="2", canary_percent=10), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already serves everyone" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        clients[0].admin.Deploy(admin_pb2.DeployRequest(version="1", canary_percent=150), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
