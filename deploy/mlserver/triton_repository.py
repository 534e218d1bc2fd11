"""MLServer model repository that reads a Triton-layout model repository directly.

    <root>/<model>/config.pbtxt            (optional, as with Triton's ONNX auto-complete)
    <root>/<model>/<version>/model.onnx    (+ model.onnx.data when the weights are a side file)

MLServer's own repository wants a `model-settings.json` per model version. This one derives
the settings from the folders and config.pbtxt on every list/find, so that, as with Triton
in explicit model-control mode, RepositoryModelLoad(name) picks up version folders written
after the server started, and drops versions that are gone or outside the version policy.

Selected with settings.json:
    "model_repository_implementation": "triton_repository.TritonModelRepository",
    "model_repository_implementation_args": {"triton_root": "/path/to/model_repository"}
(`root` is always MLServer's settings folder, hence a separate argument.) An optional
`"adaptive_batching": {"max_batch_size": 32, "max_batch_time": 0.005}` there turns on MLServer's
own batching for every model (Triton's `dynamic_batching` has no MLServer equivalent per model).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional

import tritonclient
from google.protobuf import text_format
from mlserver.errors import MLServerError, ModelNotFound
from mlserver.logging import logger
from mlserver.repository import ModelRepository
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import MetadataTensor

RUNTIME = "onnx_runtime.OnnxRuntimeModel"
PLATFORM = "onnxruntime_onnx"
# Triton's onnxruntime backend parameters that OnnxRuntimeModel understands.
_THREAD_PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count")


def _load_model_config_pb2():
    # `import tritonclient.grpc.model_config_pb2` would run tritonclient/grpc/__init__.py, whose
    # service_pb2 clashes with MLServer's own `inference.*` messages; model_config.proto alone
    # does not, so load just that file.
    path = os.path.join(os.path.dirname(tritonclient.__file__), "grpc", "model_config_pb2.py")
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_config_pb2 = _load_model_config_pb2()


def read_model_config(model_dir: str):
    """config.pbtxt of a model folder, or an empty config when there is none (auto-complete)."""
    config = model_config_pb2.ModelConfig()
    path = os.path.join(model_dir, "config.pbtxt")
    if os.path.isfile(path):
        with open(path) as f:
            text_format.Parse(f.read(), config)
    return config


def select_versions(available: List[int], policy) -> List[int]:
    """The versions Triton would serve under `policy` (a ModelVersionPolicy message)."""
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return sorted(available)
    if kind == "specific":
        return sorted(set(available) & set(policy.specific.versions))
    # Triton's default: latest { num_versions: 1 }.
    keep = policy.latest.num_versions if kind == "latest" else 1
    return sorted(available)[-keep:] if keep > 0 else []


def _declared_tensors(model: str, tensors, max_batch_size: int) -> List[MetadataTensor]:
    """config.pbtxt input/output sections as Triton reports them in ModelMetadata: the batch
    dimension (-1) first when max_batch_size > 0, TYPE_STRING as BYTES."""
    batch = [-1] if max_batch_size > 0 else []
    declared = []
    for tensor in tensors:
        datatype = model_config_pb2.DataType.Name(tensor.data_type).removeprefix("TYPE_")
        try:
            declared.append(MetadataTensor(
                name=tensor.name,
                datatype="BYTES" if datatype == "STRING" else datatype,
                shape=batch + list(tensor.dims),
            ))
        except ValueError as err:
            raise MLServerError(f"'{model}': {tensor.name} has unsupported type {datatype}") from err
    return declared


class TritonModelRepository(ModelRepository):
    def __init__(self, root: str, triton_root: Optional[str] = None,
                 adaptive_batching: Optional[Dict[str, float]] = None):
        self._root = os.path.abspath(triton_root or root)
        # ModelSettings' max_batch_size / max_batch_time (seconds); none: each request alone.
        self._batching = dict(adaptive_batching or {})

    async def list(self) -> List[ModelSettings]:
        found: List[ModelSettings] = []
        for name in sorted(os.listdir(self._root)):
            if not os.path.isdir(os.path.join(self._root, name)):
                continue
            try:
                found.extend(self._model_settings(name))
            except MLServerError as err:
                # One broken model must not hide the others from the index.
                logger.warning(f"Skipping model '{name}': {err}")
        return found

    async def find(self, name: str) -> List[ModelSettings]:
        if not os.path.isdir(os.path.join(self._root, name)):
            raise ModelNotFound(name)
        selected = self._model_settings(name)
        if not selected:
            raise MLServerError(
                f"model '{name}' has no version folder with its model file that the version "
                f"policy selects (in {os.path.join(self._root, name)})",
                status_code=404,
            )
        return selected

    def _model_settings(self, name: str) -> List[ModelSettings]:
        model_dir = os.path.join(self._root, name)
        try:
            config = read_model_config(model_dir)
        except text_format.ParseError as err:
            raise MLServerError(f"config.pbtxt of '{name}' does not parse: {err}") from err
        if config.name and config.name != name:
            raise MLServerError(f"config.pbtxt names '{config.name}' but sits in folder '{name}'")
        if config.platform not in ("", PLATFORM) or config.backend not in ("", "onnxruntime"):
            raise MLServerError(
                f"model '{name}' is for {config.platform or config.backend}; "
                f"this server only runs {PLATFORM}"
            )

        filename = config.default_model_filename or "model.onnx"
        available = [
            int(entry)
            for entry in os.listdir(model_dir)
            if entry.isdigit() and os.path.isfile(os.path.join(model_dir, entry, filename))
        ]
        versions = select_versions(available, config.version_policy)
        extra = {
            key: config.parameters[key].string_value
            for key in _THREAD_PARAMETERS
            if key in config.parameters
        }
        extra["max_batch_size"] = config.max_batch_size
        inputs = _declared_tensors(name, config.input, config.max_batch_size)
        outputs = _declared_tensors(name, config.output, config.max_batch_size)
        return [
            ModelSettings(
                name=name,
                implementation=RUNTIME,
                platform=PLATFORM,
                inputs=inputs,
                outputs=outputs,
                **self._batching,
                # Triton's ModelMetadata lists the served versions here.
                versions=[str(v) for v in versions],
                parameters=ModelParameters(
                    uri=os.path.join(model_dir, str(version), filename),
                    version=str(version),
                    extra=extra,
                ),
            )
            for version in versions
        ]
