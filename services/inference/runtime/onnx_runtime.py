"""ONNX Runtime in process: the embedded default. Uses the CUDA EP when a GPU is really there."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import onnxruntime as ort

from fuseloop.repository import MODELS, ModelRepository, TensorSpec
from services.inference.runtime.base import (LoadedVersion, ModelRuntime, check_signature, graph_names,
                                             load_preprocessor)

ORT_TO_KSERVE = {"tensor(float)": "FP32", "tensor(int64)": "INT64", "tensor(int32)": "INT32",
                 "tensor(bool)": "BOOL", "tensor(float16)": "FP16"}


@dataclass(frozen=True)
class OnnxRuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 0  # 0: ORT decides
    inter_op_threads: int = 1
    # Spinning worker threads cut latency on a dedicated box but steal the CPU from anything
    # sharing it (the demo trains in the same process on 2 cores).
    allow_spinning: bool = True


def session_providers(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError("device=cuda asked for, but this onnxruntime build has no CUDA provider "
                           "(install the .[gpu] extra)")
    return ["CPUExecutionProvider"]


def _specs(args) -> list[TensorSpec]:
    return [TensorSpec(a.name, ORT_TO_KSERVE.get(a.type, a.type),
                       tuple(d if isinstance(d, int) else -1 for d in a.shape)) for a in args]


class OnnxVersion(LoadedVersion):
    """A version's sessions: those loaded with it, and any opened later by `load_graphs`
    (`open_session`: graph name -> its checked session)."""

    def __init__(self, version, manifest, preprocessor,
                 open_session: Callable[[str], ort.InferenceSession]) -> None:
        super().__init__(version, manifest, preprocessor)
        self._open_session = open_session
        self.sessions: dict[str, ort.InferenceSession] = {}

    @property
    def graphs(self) -> frozenset[str]:
        return frozenset(self.sessions)

    def _open_graph(self, model: str) -> None:
        self.sessions[model] = self._open_session(model)

    @property
    def providers(self) -> list[str]:
        # get_available_providers() lists CUDA even without a GPU; what a session got is the truth.
        return next(iter(self.sessions.values())).get_providers() if self.sessions else []

    def run(self, model, inputs):
        try:
            session = self.sessions[model]
        except KeyError:
            raise self.not_loaded(model) from None
        return session.run(None, inputs)

    def metadata(self) -> dict:
        return {**super().metadata(), "providers": self.providers}

    def close(self) -> None:
        # The sessions hold the weights: drop them now, whoever still refers to this object.
        self.sessions = {}


class OnnxRuntime(ModelRuntime):
    name = "onnxruntime"

    def __init__(self, config: OnnxRuntimeConfig = OnnxRuntimeConfig()) -> None:
        self.config = config

    def worker_factory(self) -> Callable[[], "OnnxRuntime"]:
        return functools.partial(OnnxRuntime, self.config)

    def _options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.config.intra_op_threads
        opts.inter_op_num_threads = self.config.inter_op_threads
        opts.log_severity_level = 3
        if not self.config.allow_spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return opts

    def load(self, repo: ModelRepository, version: int, graphs: Iterable[str] = MODELS) -> OnnxVersion:
        graphs = graph_names(graphs)
        manifest = repo.verify(version)
        providers = session_providers(self.config.device)

        def open_session(model: str) -> ort.InferenceSession:
            sess = ort.InferenceSession(str(repo.model_path(model, version)), self._options(), providers=providers)
            check_signature(version, model, manifest.io(model, "inputs"), _specs(sess.get_inputs()))
            check_signature(version, model, manifest.io(model, "outputs"), _specs(sess.get_outputs()))
            return sess

        loaded = OnnxVersion(version, manifest, load_preprocessor(repo, version, manifest), open_session)
        loaded.load_graphs(graphs)
        loaded.warm_up()
        return loaded

