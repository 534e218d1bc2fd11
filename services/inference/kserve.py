"""KServe v2 / Triton gRPC (`inference.GRPCInferenceService`) for the exported ONNX graphs, on the
same server: tritonclient.grpc works against it unchanged.

The three models of a fused version (fuseloop_encoder, fuseloop_decoder, fuseloop_reward) run
through the runtime's loaded version (for ONNX Runtime: that model's session), so this module stays
runtime-agnostic. The server process holds only the graphs it runs itself (the reward model; the
engine process has its own generation graphs): a ModelInfer for another graph loads it into that
version on first use, and it stays until the version is closed. ModelReady and ModelMetadata
answer from the manifest, loading nothing. Available versions: the serving one, plus those RepositoryModelLoad loaded by
the model's config.pbtxt version policy. Load and unload change what KServe clients see, never what
InferenceService serves; like the AdminService, they need the admin token.

ModelInfer on a model whose config.pbtxt has `dynamic_batching` goes through that model's batcher
(kserve_batching.py: merged runs, each answer its own rows); other models run each request alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype

from fuseloop.repository import MODELS, RepositoryError
from services.inference.admin import AdminAuth
from services.inference.deployment import Deployment, Lease, ServedVersion
from services.inference.batching import Batcher
from services.inference.kserve_batching import InferJob, Signature, Signatures, run_model
from services.inference.kserve_inputs import KServeError, check_graph_inputs, decode_input, invalid, parse_version
from fuseloop.loop_bridge import LoopBridge, settle
from services.inference.metrics import InferenceMetrics
from services.inference.queueing import Arrival, Cancelled, DeadlineExceeded, QueueClosed, QueueFull
from services.inference.runtime.base import LoadedVersion, RuntimeError_

try:  # ONNX Runtime's own verdicts on bad input: passed through as INVALID_ARGUMENT
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument
except ImportError:  # pragma: no cover - a runtime without onnxruntime
    OrtInvalidArgument = ()

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
QUEUE_STATUS = {QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED, QueueClosed: grpc.StatusCode.UNAVAILABLE,
                DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED, Cancelled: grpc.StatusCode.CANCELLED}


def read_model_config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


class KServeModels:
    """Which versions KServe clients can use, and leases on them."""

    def __init__(self, deployment: Deployment, executor: Executor) -> None:
        self.deployment = deployment
        self.executor = executor
        self._extra: dict[int, ServedVersion] = {}
        self._unloaded: set[str] = set()
        self._lock = asyncio.Lock()
        self._configs: dict[str, tuple[int, model_config_pb2.ModelConfig]] = {}
        self._config_paths: dict[str, str] = {}

    def is_unloaded(self, name: str) -> bool:
        return name in self._unloaded

    def config(self, name: str) -> model_config_pb2.ModelConfig:
        """The model's parsed config.pbtxt, re-read when the file changes (a publish rewrites it).
        Called on every ModelInfer: one os.stat on a path string built once."""
        self.check_model(name)
        path = self._config_paths.get(name)
        if path is None:
            path = self._config_paths[name] = str(self.deployment.repo.root / name / "config.pbtxt")
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            raise KServeError(grpc.StatusCode.NOT_FOUND, f"{name} has no config.pbtxt") from None
        cached = self._configs.get(name)
        if cached is None or cached[0] != mtime:
            try:
                cached = self._configs[name] = (mtime, read_model_config(Path(path)))
            except text_format.ParseError as e:
                raise KServeError(grpc.StatusCode.INTERNAL, f"{path} does not parse: {e}") from None
        return cached[1]

    def check_model(self, name: str) -> None:
        if name not in MODELS:
            raise KServeError(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; models: {', '.join(MODELS)}")

    def versions(self, name: str) -> list[int]:
        if name in self._unloaded:
            return []
        serving = self.deployment.serving
        return sorted(set(self._extra) | ({serving.version} if serving else set()))

    def lease(self, name: str, version: str) -> Lease:
        self.check_model(name)
        if name in self._unloaded:
            raise KServeError(grpc.StatusCode.UNAVAILABLE, f"model {name} is unloaded; RepositoryModelLoad it first")
        serving = self.deployment.serving
        if not version:
            if serving is None:
                raise KServeError(grpc.StatusCode.UNAVAILABLE, f"no version of {name} is loaded yet")
            return serving.lease()
        v = parse_version(version, name)
        if serving is not None and serving.version == v:
            return serving.lease()
        if v in self._extra:
            return self._extra[v].lease()
        raise KServeError(grpc.StatusCode.UNAVAILABLE,
                          f"version {v} of {name} is not loaded (loaded: {', '.join(map(str, self.versions(name))) or 'none'})")

    def policy_versions(self, name: str) -> list[int]:
        """The versions config.pbtxt's version_policy selects, as Triton would load them."""
        available = self.deployment.repo.versions()
        policy = self.config(name).version_policy
        kind = policy.WhichOneof("policy_choice")
        if kind == "all":
            return available
        if kind == "specific":
            return [v for v in policy.specific.versions if v in available]
        n = policy.latest.num_versions if kind == "latest" else 1
        return available[-max(1, n):]

    async def load(self, name: str) -> None:
        self.check_model(name)
        async with self._lock:
            serving = self.deployment.serving
            loop = asyncio.get_running_loop()
            for v in self.policy_versions(name):
                if v in self._extra or (serving is not None and serving.version == v):
                    continue
                try:
                    loaded = await loop.run_in_executor(self.executor, self.deployment.runtime.load,
                                                        self.deployment.repo, v, (name,))
                except RepositoryError as e:
                    raise KServeError(grpc.StatusCode.FAILED_PRECONDITION, f"failed to load {name} version {v}: {e}") from None
                self._extra[v] = ServedVersion(loaded)
            self._unloaded.discard(name)

    async def unload(self, name: str) -> None:
        self.check_model(name)
        async with self._lock:
            self._unloaded.add(name)
            if self._unloaded >= set(MODELS):
                for served in self._extra.values():
                    served.retire()
                self._extra.clear()

    def close(self) -> None:
        for served in self._extra.values():
            served.retire()
        self._extra.clear()


class KServeService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """`batchers`: one per model, used for the models whose config.pbtxt has dynamic_batching (the
    others run each request on the executor); `bridge` hands their results to the event loop."""

    def __init__(self, models: KServeModels, auth: AdminAuth, executor: Executor, bridge: LoopBridge,
                 batchers: dict[str, Batcher[InferJob]], server_name: str = "fuseloop",
                 metrics: InferenceMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.models = models
        self.metrics = metrics
        self.bridge = bridge
        self.batchers = batchers
        self.clock = clock
        self.signatures = Signatures()
        self.auth = auth
        self.executor = executor
        self.server_name = server_name

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.models.deployment.serving is not None)

    async def ServerMetadata(self, request, context):
        try:
            ver = package_version("fuseloop")
        except PackageNotFoundError:
            ver = "0"
        return service_pb2.ServerMetadataResponse(name=self.server_name, version=ver,
                                                  extensions=["model_repository", "model_configuration"])

    async def ModelReady(self, request, context):
        if request.name not in MODELS:
            return service_pb2.ModelReadyResponse(ready=False)
        versions = self.models.versions(request.name)
        if request.version:
            try:
                ready = parse_version(request.version, request.name) in versions
            except KServeError as e:
                await context.abort(e.code, str(e))
        else:
            ready = self.models.deployment.serving is not None and not self.models.is_unloaded(request.name)
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request, context):
        return await self._guard(context, self._metadata, request)

    def _metadata(self, request) -> service_pb2.ModelMetadataResponse:
        with self.models.lease(request.name, request.version) as lease:
            manifest = lease.loaded.manifest
        out = service_pb2.ModelMetadataResponse(name=request.name, platform=PLATFORM,
                                                versions=[str(v) for v in self.models.versions(request.name)])
        for t in manifest.io(request.name, "inputs"):
            out.inputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        for t in manifest.io(request.name, "outputs"):
            out.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        return out

    async def ModelConfig(self, request, context):
        return await self._guard(context, self._config, request)

    def _config(self, request) -> service_pb2.ModelConfigResponse:
        if request.version:
            parse_version(request.version, request.name)
        return service_pb2.ModelConfigResponse(config=self.models.config(request.name))

    async def RepositoryIndex(self, request, context):
        out = service_pb2.RepositoryIndexResponse()
        for name in MODELS:
            loaded = set(self.models.versions(name))
            for v in self.models.deployment.repo.versions():
                ready = v in loaded
                if request.ready and not ready:
                    continue
                out.models.add(name=name, version=str(v), state="READY" if ready else "UNAVAILABLE",
                               reason="" if ready else "unloaded")
        return out

    async def RepositoryModelLoad(self, request, context):
        await self.auth.check(context)
        if request.parameters:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "config and file overrides are not supported; publish a version instead")
        return await self._guard_async(context, self.models.load(request.model_name),
                                       service_pb2.RepositoryModelLoadResponse())

    async def RepositoryModelUnload(self, request, context):
        await self.auth.check(context)
        return await self._guard_async(context, self.models.unload(request.model_name),
                                       service_pb2.RepositoryModelUnloadResponse())

    async def ModelInfer(self, request: service_pb2.ModelInferRequest, context):
        model = request.model_name
        try:
            with self.models.lease(model, request.model_version) as lease:
                loaded = lease.loaded
                if model not in loaded.graphs:
                    await self._load_graph(loaded, model)
                sig = self.signatures.get(loaded, model)
                config = self.models.config(model)
                batcher = self._batcher(model, config)
                if batcher is None:
                    inputs, wanted = self._inputs(loaded, model, sig, request, config.max_batch_size)
                    outputs = await self._run_alone(loaded, model, sig, inputs)
                else:
                    # Counted as on its way while it is decoded, so the batcher may wait for it.
                    with batcher.queue.arriving() as arrival:
                        inputs, wanted = self._inputs(loaded, model, sig, request, config.max_batch_size)
                        outputs = await self._run_batched(arrival, loaded, model, sig, inputs, context)
        except KServeError as e:
            await context.abort(e.code, str(e))
        except Exception as e:  # a bug in this server, never the client's doing
            e = self._internal(f"{model} ModelInfer failed: {e}")
            await context.abort(e.code, str(e))
        response = service_pb2.ModelInferResponse(model_name=model, model_version=str(loaded.version), id=request.id)
        add_output, contents = response.outputs.add, response.raw_output_contents
        for name in wanted or sig.outputs:
            arr = outputs[name]
            add_output(name=name, datatype=_kserve_type(arr.dtype), shape=arr.shape)
            contents.append(arr.tobytes())
        return response

    async def _load_graph(self, loaded: LoadedVersion, model: str) -> None:
        """A graph this process does not run for itself, loaded into the version on first use."""
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, loaded.load_graphs, (model,))
        except (RepositoryError, RuntimeError_) as e:  # e.g. the file changed under a verified version
            raise KServeError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"failed to load {model} version {loaded.version}: {e}") from None

    def _batcher(self, model: str, config: model_config_pb2.ModelConfig) -> Batcher | None:
        """The model's batcher, set to its config.pbtxt, when that asks for dynamic batching."""
        batcher = self.batchers.get(model)
        if batcher is None or config.max_batch_size < 1 or not config.HasField("dynamic_batching"):
            return None
        batcher.configure(config.max_batch_size, config.dynamic_batching.max_queue_delay_microseconds / 1e6)
        return batcher

    async def _run_alone(self, loaded: LoadedVersion, model: str, sig: Signature,
                         inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, run_model, loaded, model, inputs, sig.outputs)
        except Exception as e:
            raise self._model_error(model, e) from None

    async def _run_batched(self, arrival: Arrival, loaded: LoadedVersion, model: str, sig: Signature,
                           inputs: dict[str, np.ndarray], context) -> dict[str, np.ndarray]:
        done = asyncio.get_running_loop().create_future()
        remaining = context.time_remaining()
        job = InferJob(loaded, model, sig, inputs, on_done=lambda j, result, err: self.bridge.post(settle, done, err, result),
                       deadline=None if remaining is None else self.clock() + remaining)
        try:
            arrival.put(job)
            return await done
        except asyncio.CancelledError:
            job.cancel()
            raise
        except Exception as e:
            raise self._model_error(model, e) from None

    def _model_error(self, model: str, e: Exception) -> KServeError:
        """What a model run's failure tells the client."""
        if isinstance(e, KServeError):
            return e
        if isinstance(e, OrtInvalidArgument):
            return invalid(f"{model}: {e}")
        for kind, code in QUEUE_STATUS.items():
            if isinstance(e, kind):
                return KServeError(code, f"{model}: {e}")
        return self._internal(f"{model} inference failed: {e}")

    def _inputs(self, loaded: LoadedVersion, model: str, sig: Signature, request: service_pb2.ModelInferRequest,
                max_batch: int) -> tuple[dict[str, np.ndarray], list[str]]:
        """(checked inputs by name, the outputs asked for: [] for all)."""
        specs = sig.inputs
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise KServeError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        inputs = {}
        for k, tensor in enumerate(request.inputs):
            name, datatype, rank = tensor.name, tensor.datatype, len(tensor.shape)  # each read builds a new object
            spec = specs.get(name)
            if spec is None:
                raise KServeError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"unknown input {name[:60]!r} of {model}; inputs: {', '.join(specs)}")
            if name in inputs:
                raise invalid(f"input {name} is given twice")
            if datatype != spec.datatype:
                raise KServeError(grpc.StatusCode.INVALID_ARGUMENT, f"input {name} is {spec.datatype}, not {datatype[:40]}")
            if rank != len(spec.shape):
                raise invalid(f"input {name} has shape {list(tensor.shape)}; the model takes {list(spec.shape)}")
            arr = decode_input(tensor, raw[k] if raw else None)
            if any(s >= 0 and s != d for s, d in zip(spec.shape, arr.shape)):
                raise KServeError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"input {name} has shape {list(arr.shape)}; the model takes {list(spec.shape)}")
            inputs[name] = arr
        if len(inputs) != len(specs):
            missing = sorted(set(specs) - set(inputs))
            raise KServeError(grpc.StatusCode.INVALID_ARGUMENT, f"missing input(s) {', '.join(missing)} of {model}")
        batches = {a.shape[0] for a in inputs.values()}
        if len(batches) > 1:
            raise KServeError(grpc.StatusCode.INVALID_ARGUMENT, f"inputs disagree on the batch size: {sorted(batches)}")
        if 0 in batches:
            raise invalid(f"the batch is empty (batch size 0); send at least one row of {model}")
        if max_batch > 0 and batches and max(batches) > max_batch:
            raise KServeError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"batch size {max(batches)} exceeds {model}'s max_batch_size {max_batch}")
        check_graph_inputs(model, inputs, loaded.stepper)
        wanted = [o.name for o in request.outputs]
        unknown = [n for n in wanted if n not in sig.outputs]
        if unknown:
            raise KServeError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"unknown output(s) {', '.join(sorted(set(unknown)))} of {model}; outputs: {', '.join(sig.outputs)}")
        return inputs, wanted

    def _internal(self, message: str) -> KServeError:
        """A real server fault: logged with its traceback and counted."""
        log.exception(message)
        if self.metrics is not None:
            self.metrics.kserve_internal_errors.inc()
        return KServeError(grpc.StatusCode.INTERNAL, message)

    async def _guard(self, context, fn, request):
        try:
            return fn(request)
        except KServeError as e:
            await context.abort(e.code, str(e))
        except Exception as e:
            e = self._internal(f"{type(request).__name__} failed: {e}")
            await context.abort(e.code, str(e))

    async def _guard_async(self, context, coro, response):
        try:
            await coro
        except KServeError as e:
            await context.abort(e.code, str(e))
        return response


_KSERVE_TYPES: dict[np.dtype, str] = {}


def _kserve_type(dtype: np.dtype) -> str:
    name = _KSERVE_TYPES.get(dtype)
    if name is None:
        name = _KSERVE_TYPES[dtype] = np_to_triton_dtype(dtype)
    return name
