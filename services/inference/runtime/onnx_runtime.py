"""ONNX Runtime in process: the embedded default. Uses the CUDA EP when a GPU is really there."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import onnxruntime as ort

from fuseloop.repository import ENCODER, MODELS, ModelRepository, TensorSpec
from services.inference.runtime.base import LoadedVersion, ModelRuntime, check_signature, load_preprocessor

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
    def __init__(self, version, manifest, preprocessor, sessions: dict[str, ort.InferenceSession]) -> None:
        super().__init__(version, manifest, preprocessor)
        self.sessions = sessions

    @property
    def providers(self) -> list[str]:
        # get_available_providers() lists CUDA even without a GPU; what a session got is the truth.
        return self.sessions[ENCODER].get_providers()

    def run(self, model, inputs):
        return self.sessions[model].run(None, inputs)

    def metadata(self) -> dict:
        return {**super().metadata(), "providers": self.providers}


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

    def load(self, repo: ModelRepository, version: int) -> OnnxVersion:
        manifest = repo.verify(version)
        providers = session_providers(self.config.device)
        sessions = {}
        for model in MODELS:
            sess = ort.InferenceSession(str(repo.model_path(model, version)), self._options(), providers=providers)
            check_signature(version, model, manifest.io(model, "inputs"), _specs(sess.get_inputs()))
            check_signature(version, model, manifest.io(model, "outputs"), _specs(sess.get_outputs()))
            sessions[model] = sess
        loaded = OnnxVersion(version, manifest, load_preprocessor(repo, version, manifest), sessions)
        loaded.warm_up()
        return loaded

