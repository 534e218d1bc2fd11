"""Redeploying a published version. By default, by changing the fleet's serving record in the
repository (every inference replica converges on it); or through one replica's admin Deploy RPC
(which changes the same record); or Triton's RepositoryModelLoad directly."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import grpc

from fuseloop.repository import MODELS, ModelRepository, RepositoryError, ServingState
from fuseloop.v1 import admin_pb2, admin_pb2_grpc


class Deployer(ABC):
    @abstractmethod
    def deploy(self, version: int) -> str:
        """Makes `version` serve; returns a line saying what happened."""

    def rollback(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} cannot roll back")

    def canary(self, version: int, percent: float) -> str:
        """Puts `version` on trial for a sticky `percent` of traffic beside the serving version."""
        raise NotImplementedError(f"{type(self).__name__} cannot run a canary")


class RecordDeployer(Deployer):
    """Changes the serving record (`serving.json` in the shared repository). Every replica watching
    it loads, warms and swaps within its watch interval; one that can't keeps serving what it has
    and says so in Status. The version is verified against its manifest first, so a broken
    artifact never becomes the fleet's desired state."""

    def __init__(self, repo: ModelRepository, history_limit: int = 50) -> None:
        self.repo, self.history_limit = repo, history_limit

    def _check(self, version: int) -> None:
        if version not in self.repo.versions():
            raise RepositoryError(f"version {version} is not in the repository "
                                  f"(available: {', '.join(map(str, self.repo.versions())) or 'none'})")
        self.repo.verify(version)

    def deploy(self, version: int) -> str:
        self._check(version)
        state = ServingState.update(self.repo.serving_state_path, lambda s: s.deployed(version, self.history_limit))
        return (f"serving record of {self.repo.root}: version {version} (previous {state.previous or '-'}, "
                f"generation {state.generation}); replicas converge on it")

    def canary(self, version: int, percent: float) -> str:
        self._check(version)
        state = ServingState.update(self.repo.serving_state_path,
                                    lambda s: s.with_canary(version, percent, int(time.time() * 1000)))
        return (f"serving record of {self.repo.root}: canary {version} for {percent:g}% beside {state.serving} "
                f"(generation {state.generation})")

    def rollback(self) -> str:
        """Ends the canary if there is one, else returns to the previous version."""
        record = self.repo.serving_state()
        if record.canary is not None:
            state = ServingState.update(self.repo.serving_state_path, lambda s: s.without_canary(),
                                        expect_generation=record.generation)
            return f"serving record of {self.repo.root}: canary {record.canary} ended; {state.serving} serves everyone"
        if record.previous is None:
            raise RepositoryError(f"the serving record of {self.repo.root} has no previous version to roll back to")
        target = record.previous
        self.repo.verify(target)
        state = ServingState.update(self.repo.serving_state_path, lambda s: s.deployed(target, self.history_limit),
                                    expect_generation=record.generation)
        return f"serving record of {self.repo.root}: rolled back to {target} (was {state.previous}, generation {state.generation})"


class AdminDeployer(Deployer):
    """Through the inference service's AdminService (it loads, warms and swaps atomically)."""

    def __init__(self, target: str, admin_token: str, timeout_s: float = 120.0) -> None:
        self.target, self.token, self.timeout_s = target, admin_token, timeout_s

    def _call(self, method: str, request):
        with grpc.insecure_channel(self.target) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            return getattr(stub, method)(request, timeout=self.timeout_s,
                                         metadata=[("authorization", f"Bearer {self.token}")])

    def deploy(self, version: int) -> str:
        r = self._call("Deploy", admin_pb2.DeployRequest(version=str(version)))
        return f"deployed {r.serving_version} on {self.target} (previous {r.previous_version or '-'})"

    def canary(self, version: int, percent: float) -> str:
        r = self._call("Deploy", admin_pb2.DeployRequest(version=str(version), canary_percent=percent))
        return f"canary {r.canary_version} for {percent:g}% beside {r.serving_version}, through {self.target}"

    def rollback(self) -> str:
        r = self._call("Rollback", admin_pb2.RollbackRequest())
        return f"rolled back to {r.serving_version} on {self.target} (was {r.previous_version})"

    def status(self) -> admin_pb2.StatusResponse:
        return self._call("Status", admin_pb2.StatusRequest())

    def list_models(self) -> admin_pb2.ListModelsResponse:
        return self._call("ListModels", admin_pb2.ListModelsRequest())


class TritonDeployer(Deployer):
    """RepositoryModelLoad of each model: with version_policy latest 2, the new version loads
    beside the old one, so nothing fails during the swap."""

    def __init__(self, url: str) -> None:
        self.url = url

    def deploy(self, version: int) -> str:
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(self.url)
        for model in MODELS:
            client.load_model(model)
        for model in MODELS:
            if not client.is_model_ready(model, str(version)):
                raise RuntimeError(f"Triton at {self.url} did not make {model} version {version} ready")
        return f"loaded version {version} on Triton {self.url}"


def make_deployer(target: str | None, admin_token: str = "", repo: ModelRepository | None = None) -> Deployer | None:
    """None -> the repository's serving record (the fleet converges); `HOST:PORT` -> one replica's
    admin service (which changes the record); `triton://HOST:PORT` -> Triton; `none` -> publish only."""
    if target == "none":
        return None
    if not target:
        return RecordDeployer(repo) if repo is not None else None
    if target.startswith("triton://"):
        return TritonDeployer(target.removeprefix("triton://"))
    return AdminDeployer(target.removeprefix("grpc://"), admin_token)
