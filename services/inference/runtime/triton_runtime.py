"""NVIDIA Triton (or any KServe v2 gRPC server, e.g. MLServer) behind the runtime interface.

The service and Triton share the model repository directory (the same path on one machine, or
one volume mounted in both): the service verifies a version's checksums and reads its manifest,
tokenizer and config.pbtxt locally, Triton loads the ONNX graphs from the same folders. Every
request names its `model_version`, so a client session never mixes versions and nothing fails
while another version loads (MLServer even fails unversioned requests during a load).

Model control (explicit mode, `--model-control-mode=explicit`), and what Triton allows:

- Triton loads and unloads whole *models*; which of a model's versions are served comes from
  its version policy. RepositoryModelUnload drops every version at once.
- `load(repo, v)` therefore reloads each of the three models with a config override (the
  model's own config.pbtxt, version policy replaced by `specific` = the versions this runtime
  still holds + v). Triton keeps the loaded versions serving during a reload and swaps "without
  any loss in availability"; a failed reload leaves what was loaded as it was. The override also
  lets a rollback load a version that `latest { num_versions: 2 }` would no longer select.
  MLServer ignores load parameters and applies config.pbtxt's policy (latest 2) instead.
- `load(repo, v, graphs)` makes the server serve all three models of v (one version is whole on
  the server, whoever asks); `graphs` only says which of them this runtime waits for, checks and
  warms (the engine process generates, the service scores), and `load_graphs` adds one later.
- `TritonVersion.close()` only tells the runtime the service is done with it: other service
  replicas may still send it traffic, so nothing is unloaded. The next `load` leaves it out of
  the policy (Triton then unloads it); `TritonRuntime.unload_version(v)` does that right away.
- Run one model-controlling runtime per Triton server: another replica's override would drop
  versions it doesn't know about. Other replicas use `model_control=False` (they only wait for
  the version to be ready), as do servers in `none`/`poll` mode.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import grpc
import numpy as np
import tritonclient.grpc as triton
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from fuseloop.repository import MODELS, Manifest, ModelRepository, RepositoryError, TensorSpec
from services.inference.runtime.base import (LoadedVersion, ModelRuntime, RuntimeError_, check_signature, graph_names,
                                             load_preprocessor)

SCHEME = "triton://"
CONFIG_FILE = "config.pbtxt"


@dataclass(frozen=True)
class TritonRuntimeConfig:
    url: str = "127.0.0.1:8001"  # HOST:PORT of Triton's gRPC endpoint
    infer_timeout_s: float = 30.0  # one ModelInfer call, end to end
    load_timeout_s: float = 600.0  # RepositoryModelLoad plus waiting for ModelReady
    ready_poll_s: float = 0.05
    model_control: bool = True  # drive RepositoryModelLoad/Unload; False: only wait for readiness
    pin_versions: bool = True  # load with a `specific` version-policy override (module docstring)
    ssl: bool = False
    root_certificates: str | None = None  # PEM file paths, as tritonclient takes them
    private_key: str | None = None
    certificate_chain: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # e.g. an auth header for a proxy

    @classmethod
    def from_spec(cls, spec: str) -> "TritonRuntimeConfig":
        """`triton://HOST:PORT[?ssl=true&root_certificates=/ca.pem&model_control=false&...]`:
        any field of this class as a query parameter."""
        if not spec.startswith(SCHEME):
            raise ValueError(f"a Triton runtime spec starts with {SCHEME}, got {spec!r}")
        parts = urlsplit(spec)
        if not parts.hostname or not parts.port:
            raise ValueError(f"{spec!r}: give the gRPC endpoint as {SCHEME}HOST:PORT (Triton's default port is 8001)")
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict = {"url": parts.netloc}
        for key, raw in parse_qsl(parts.query, strict_parsing=bool(parts.query)):
            kind = kinds.get(key)
            if kind is None or key in ("url", "headers"):
                raise ValueError(f"{spec!r}: unknown option {key!r}")
            if kind == "bool":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"{spec!r}: {key} must be true or false, got {raw!r}")
                values[key] = raw.lower() in ("true", "1")
            elif kind == "float":
                try:
                    values[key] = float(raw)
                except ValueError:
                    raise ValueError(f"{spec!r}: {key} must be a number of seconds, got {raw!r}") from None
            else:
                values[key] = raw
        return cls(**values)


class TritonError(RuntimeError_):
    """The server refused or failed a call; `code` is its gRPC status (None: client-side)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def _status_code(err: InferenceServerException) -> grpc.StatusCode | None:
    name = (err.status() or "").removeprefix("StatusCode.")
    return grpc.StatusCode.__members__.get(name)


def policy_override(config_path: Path, versions: list[int]) -> str:
    """The model's config.pbtxt as JSON (what RepositoryModelLoad's `config` parameter takes),
    serving exactly `versions`."""
    try:
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    except FileNotFoundError:
        raise RepositoryError(f"{config_path} is missing: the exporter writes one per model") from None
    except text_format.ParseError as e:
        raise RepositoryError(f"{config_path} does not parse as a Triton ModelConfig: {e}") from None
    config.version_policy.Clear()
    config.version_policy.specific.versions.extend(sorted(set(versions)))
    return json_format.MessageToJson(config, preserving_proto_field_name=True, indent=None)


def max_batch_size(config_path: Path) -> int:
    """Triton rejects larger batches; 0 means the graph has no batch dimension (or no config)."""
    try:
        return text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig()).max_batch_size
    except (FileNotFoundError, text_format.ParseError):
        return 0


class TritonVersion(LoadedVersion):
    """One version served by Triton: each call is a ModelInfer pinned to this version."""

    def __init__(self, version: int, manifest: Manifest, preprocessor, runtime: "TritonRuntime",
                 max_batch: dict[str, int], platform: str, graphs: Iterable[str] = MODELS) -> None:
        super().__init__(version, manifest, preprocessor)
        self.runtime = runtime
        self.max_batch = max_batch
        self.platform = platform
        self._specs = {m: {t.name: t for t in manifest.io(m, "inputs")} for m in MODELS}
        self._outputs = {m: [t.name for t in manifest.io(m, "outputs")] for m in MODELS}
        self._requested = {m: [triton.InferRequestedOutput(n) for n in names] for m, names in self._outputs.items()}
        self._graphs = frozenset(graphs)  # those checked ready on the server
        self._closed = False

    @property
    def graphs(self) -> frozenset[str]:
        return self._graphs

    def _open_graph(self, model: str) -> None:
        self.runtime.check_graphs(self.version, self.manifest, [model])
        self._graphs = self._graphs | {model}

    def run(self, model: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if model not in self._graphs:
            raise self.not_loaded(model)
        batch = len(next(iter(feeds.values())))
        limit = self.max_batch.get(model, 0)
        if limit <= 0 or batch <= limit:
            return self._infer_once(model, feeds)
        # Triton refuses batches above max_batch_size; the engine shouldn't have to know it.
        parts = [self._infer_once(model, {k: v[i:i + limit] for k, v in feeds.items()})
                 for i in range(0, batch, limit)]
        return [np.concatenate(outs, axis=0) for outs in zip(*parts)]

    def _infer_once(self, model: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        rt = self.runtime
        specs = self._specs[model]
        try:
            inputs = []
            for name, array in feeds.items():
                tensor = triton.InferInput(name, list(array.shape), specs[name].datatype)
                tensor.set_data_from_numpy(np.ascontiguousarray(array))
                inputs.append(tensor)
            result = rt.client.infer(
                model, inputs, model_version=str(self.version),
                outputs=self._requested[model], client_timeout=rt.config.infer_timeout_s, headers=rt.headers)
        except InferenceServerException as e:
            raise rt.error(f"{model} version {self.version}: inference failed", e) from None
        out = []
        for name in self._outputs[model]:
            array = result.as_numpy(name)
            if array is None:
                raise TritonError(f"{model} version {self.version}: the response lacks output {name!r}")
            # Raw response bytes come back read-only; ORT's arrays are writable, keep it that way.
            out.append(array if array.flags.writeable else array.copy())
        return out

    def is_ready(self) -> bool:
        """The graphs loaded here are ready on the server (False when it is down)."""
        return all(self.runtime.model_ready(m, self.version) for m in self._graphs)

    def metadata(self) -> dict:
        return {**super().metadata(), "runtime": "triton", "url": self.runtime.config.url,
                "platform": self.platform}

    def close(self) -> None:
        """Done with this version here; it stays loaded on the server (module docstring)."""
        if not self._closed:
            self._closed = True
            self.runtime.release(self.version)


class TritonRuntime(ModelRuntime):
    name = "triton"

    def __init__(self, config: TritonRuntimeConfig) -> None:
        self.config = config
        self.client = triton.InferenceServerClient(
            config.url, ssl=config.ssl, root_certificates=config.root_certificates,
            private_key=config.private_key, certificate_chain=config.certificate_chain)
        # Loads and unloads run one at a time; _held has its own lock because close() runs on
        # whichever thread returns a version's last request, and must not wait for a load.
        self._control = threading.Lock()
        self._held_lock = threading.Lock()
        self._held: dict[int, int] = {}  # version -> open TritonVersions of it

    @property
    def headers(self) -> dict[str, str] | None:
        return self.config.headers or None

    @classmethod
    def from_spec(cls, spec: str) -> "TritonRuntime":
        return cls(TritonRuntimeConfig.from_spec(spec))

    # -- errors and health ------------------------------------------------------------------

    def error(self, what: str, err: InferenceServerException) -> TritonError:
        code = _status_code(err)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            what = f"{what}: Triton at {self.config.url} is unreachable or too slow"
        return TritonError(f"{what} ({code.name if code else 'client'}): {err.message()}", code)

    def server_ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready(headers=self.headers, client_timeout=2.0))
        except InferenceServerException:
            return False

    def model_ready(self, model: str, version: int) -> bool:
        # MLServer answers NOT_FOUND for a model it hasn't loaded, Triton `false`: both mean no.
        try:
            return bool(self.client.is_model_ready(model, str(version), headers=self.headers,
                                                   client_timeout=2.0))
        except InferenceServerException:
            return False

    def _require_live(self) -> None:
        try:
            self.client.is_server_live(headers=self.headers, client_timeout=5.0)
        except InferenceServerException as e:
            raise self.error("cannot load a model version", e) from None

    # -- loading ----------------------------------------------------------------------------

    def load(self, repo: ModelRepository, version: int, graphs: Iterable[str] = MODELS) -> TritonVersion:
        graphs = graph_names(graphs)
        # Checked here, before the server touches anything: Triton reads the same folders.
        manifest = repo.verify(version)
        preprocessor = load_preprocessor(repo, version, manifest)
        self._require_live()
        with self._control:
            if self.config.model_control:
                self._apply(repo, sorted(set(self.held_versions()) | {version}))
            platform = self.check_graphs(version, manifest, graphs)
            loaded = TritonVersion(version, manifest, preprocessor, self,
                                   {m: max_batch_size(repo.root / m / CONFIG_FILE) for m in MODELS}, platform, graphs)
            with self._held_lock:
                self._held[version] = self._held.get(version, 0) + 1
        try:
            loaded.warm_up()
        except BaseException:
            loaded.close()
            raise
        return loaded

    def _apply(self, repo: ModelRepository, versions: list[int]) -> None:
        """RepositoryModelLoad of each model, serving `versions` (or config.pbtxt's policy)."""
        for model in MODELS:
            override = policy_override(repo.root / model / CONFIG_FILE, versions) if self.config.pin_versions else None
            try:
                self.client.load_model(model, config=override, headers=self.headers,
                                       client_timeout=self.config.load_timeout_s)
            except InferenceServerException as e:
                raise self.error(f"the server could not load {model} versions {versions}", e) from None

    def check_graphs(self, version: int, manifest: Manifest, models: Iterable[str]) -> str:
        """Waits until `models` of `version` are ready on the server and checks them against the
        manifest; returns the server's platform name."""
        self._wait_ready(version, models)
        return self._check_metadata(version, manifest, models)

    def _wait_ready(self, version: int, models: Iterable[str]) -> None:
        deadline = time.monotonic() + self.config.load_timeout_s
        pending = list(models)
        while pending:
            pending = [m for m in pending if not self.model_ready(m, version)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TritonError(
                    f"version {version} of {', '.join(pending)} is not ready on {self.config.url} after "
                    f"{self.config.load_timeout_s:.0f} s: does the server read the same repository, and does "
                    f"its version policy select version {version}?")
            time.sleep(self.config.ready_poll_s)

    def _check_metadata(self, version: int, manifest: Manifest, models: Iterable[str]) -> str:
        """The server's view of each graph must match what the manifest promises."""
        platform = ""
        for model in models:
            try:
                meta = self.client.get_model_metadata(model, str(version), headers=self.headers,
                                                      client_timeout=10.0)
            except InferenceServerException as e:
                raise self.error(f"no metadata for {model} version {version}", e) from None
            for kind, tensors in (("inputs", meta.inputs), ("outputs", meta.outputs)):
                actual = [TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in tensors]
                check_signature(version, model, manifest.io(model, kind), actual)
            platform = platform or meta.platform
        return platform

    # -- releasing --------------------------------------------------------------------------

    def held_versions(self) -> list[int]:
        """Versions loaded here and not closed yet: what a pinned load keeps serving."""
        with self._held_lock:
            return sorted(self._held)

    def release(self, version: int) -> None:
        """Called by TritonVersion.close(): the next load stops serving it unless loaded again."""
        with self._held_lock:
            count = self._held.get(version, 0) - 1
            if count > 0:
                self._held[version] = count
            else:
                self._held.pop(version, None)

    def unload_version(self, repo: ModelRepository, version: int) -> bool:
        """Stops serving a released version now. Triton can't unload one version of a model:
        each model is reloaded with the versions still held (the others keep serving
        throughout), or unloaded when none are. Returns whether the server dropped it; False on
        a server that ignores load parameters (MLServer), where config.pbtxt's policy rules."""
        if not self.config.model_control:
            raise RuntimeError_("model_control is off: another component decides what Triton serves")
        with self._control:
            keep = self.held_versions()
            if version in keep:
                raise RuntimeError_(f"version {version} is still open here; close() it first")
            if keep:  # a reload returns once the new set serves
                self._apply(repo, keep)
                return not any(self.model_ready(m, version) for m in MODELS)
            for model in MODELS:
                try:
                    self.client.unload_model(model, headers=self.headers,
                                             client_timeout=self.config.load_timeout_s)
                except InferenceServerException as e:
                    raise self.error(f"the server could not unload {model}", e) from None
            # An unload returns before the model is gone.
            deadline = time.monotonic() + self.config.load_timeout_s
            while any(self.model_ready(m, version) for m in MODELS):
                if time.monotonic() > deadline:
                    return False
                time.sleep(self.config.ready_poll_s)
            return True

    def worker_factory(self) -> Callable[[], "TritonRuntime"]:
        # The worker only waits for what this runtime loads; it never loads or unloads on the server.
        return functools.partial(TritonRuntime, replace(self.config, model_control=False))

    def close(self) -> None:
        """Closes the channel; what the server serves stays as it is (other replicas may use it)."""
        self.client.close()

