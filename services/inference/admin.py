"""fuseloop.v1.AdminService: list versions, deploy, roll back, status. Every call needs the admin
token as `authorization: Bearer <token>` metadata: none -> UNAUTHENTICATED, wrong -> PERMISSION_DENIED."""

from __future__ import annotations

import hmac
import json
import logging

import grpc

from fuseloop.repository import RepositoryError, ServingConflict
from fuseloop.v1 import admin_pb2, admin_pb2_grpc
from services.inference.deployment import Deployment, NothingToRollBack, VersionNotFound

log = logging.getLogger(__name__)


class AdminAuth:
    """Checks the bearer token in constant time. No configured token: every call is refused."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        header = dict(context.invocation_metadata() or ()).get("authorization")
        if self._token is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "the admin API is disabled: start the server with an admin token")
        if not header:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing `authorization: Bearer <admin token>` metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be `Bearer <admin token>`")
        if not hmac.compare_digest(token.strip().encode(), self._token):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the admin token is not valid")


def parse_version(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"version must be a positive integer, got {text!r}")
    return int(text)


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, deployment: Deployment, auth: AdminAuth, runtime_name: str) -> None:
        self.deployment = deployment
        self.auth = auth
        self.runtime_name = runtime_name

    async def ListModels(self, request, context) -> admin_pb2.ListModelsResponse:
        await self.auth.check(context)
        repo = self.deployment.repo
        serving = self.deployment.serving
        out = admin_pb2.ListModelsResponse()
        for v in repo.versions():
            try:
                m = repo.manifest(v)
                parent, created, metrics = m.parent_version, m.created_at, json.dumps(m.metrics, sort_keys=True)
            except RepositoryError as e:
                parent, created, metrics = None, "", json.dumps({"error": str(e)})
            out.versions.add(version=str(v), parent_version="" if parent is None else str(parent), created_at=created,
                             serving=serving is not None and serving.version == v, metrics_json=metrics)
        return out

    async def Deploy(self, request: admin_pb2.DeployRequest, context) -> admin_pb2.DeployResponse:
        await self.auth.check(context)
        try:
            version = parse_version(request.version)
            percent = request.canary_percent
            if not (percent == 0 or 0 < percent < 100):  # NaN fails both
                raise ValueError(f"canary_percent must be 0 (everyone) or between 0 and 100, got {percent:g}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if percent:
            return await self._swap(context, lambda: self.deployment.start_canary(version, percent))
        return await self._swap(context, lambda: self.deployment.deploy(version))

    async def Rollback(self, request, context) -> admin_pb2.DeployResponse:
        await self.auth.check(context)
        return await self._swap(context, self.deployment.rollback)

    async def Status(self, request, context) -> admin_pb2.StatusResponse:
        await self.auth.check(context)
        d = self.deployment
        state, serving = d.state, d.serving
        failure = d.failures.get(state.serving) if state.serving is not None else None
        return admin_pb2.StatusResponse(
            serving_version="" if serving is None else str(serving.version),
            previous_version="" if state.previous is None else str(state.previous),
            runtime=self.runtime_name, ready=serving is not None, history=[str(v) for v in state.history],
            desired_version="" if state.serving is None else str(state.serving),
            desired_generation=state.generation, desired_status=d.desired_status,
            desired_error=failure.error if failure else "",
            canary_version="" if state.canary is None else str(state.canary), canary_percent=state.canary_percent,
            canary_status=d.canary_status)

    async def _swap(self, context, action) -> admin_pb2.DeployResponse:
        try:
            state = await action()
        except VersionNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ValueError as e:  # e.g. a canary of the version that already serves everyone
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (RepositoryError, NothingToRollBack, ServingConflict) as e:
            # The artifact failed verification (checksum, signature) or there is nowhere to go:
            # the serving version keeps serving.
            log.warning("deploy refused: %s", e)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except Exception as e:  # e.g. the runtime could not load a verified artifact
            log.exception("deploy failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"deploy failed: {e}")
        return admin_pb2.DeployResponse(serving_version=str(state.serving),
                                        previous_version="" if state.previous is None else str(state.previous),
                                        generation=state.generation,
                                        canary_version="" if state.canary is None else str(state.canary))
