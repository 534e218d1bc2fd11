"""MLServer runtime that serves one version of an ONNX model with ONNX Runtime (CPU).

Runs inside the MLServer side venv (`make mlserver`), never in the main venv: mlserver and
tritonclient.grpc register the same `inference.*` protobuf symbols and cannot share a process.

Model settings come from `triton_repository.TritonModelRepository`: `parameters.uri` is the
`.onnx` file inside a Triton-layout version folder (its `model.onnx.data` side file, if any,
is found by ONNX Runtime next to it); `inputs`/`outputs` are config.pbtxt's declarations, if
any; `parameters.extra` carries max_batch_size and the Triton ONNX backend's thread settings.
Inputs and outputs are matched by name, any KServe v2 datatype ONNX Runtime has a numpy type
for, batched up to max_batch_size.
"""

from __future__ import annotations

import asyncio
from typing import Dict, List, Optional

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError, InvalidModelURI, MLServerError
from mlserver.types import (
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    RequestInput,
    ResponseOutput,
)
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

# ONNX Runtime's type strings -> KServe v2 datatypes (the names Triton reports too).
_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _v2_datatype(ort_type: str) -> str:
    try:
        return _ORT_TO_V2[ort_type]
    except KeyError:
        raise MLServerError(f"ONNX tensor type {ort_type} has no KServe v2 datatype") from None


def _v2_shape(ort_shape: List) -> List[int]:
    # Symbolic ("batch") and unknown (None) dimensions are dynamic: -1, as Triton reports them.
    return [d if isinstance(d, int) and d >= 0 else -1 for d in ort_shape]


def _datatype_name(datatype) -> str:
    # MLServer's pydantic models hold either the Datatype enum or its value.
    return getattr(datatype, "value", datatype)


def _shape_fits(shape: List[int], declared: List[int]) -> bool:
    return len(shape) == len(declared) and all(d == -1 or d == s for s, d in zip(shape, declared))


def _check_declared(model: str, kind: str, declared: List[MetadataTensor],
                    graph: List[MetadataTensor], exact: bool) -> None:
    in_graph = {t.name: _datatype_name(t.datatype) for t in graph}
    for tensor in declared:
        if tensor.name not in in_graph:
            raise MLServerError(
                f"config.pbtxt of '{model}' declares {kind} '{tensor.name}', "
                f"the ONNX graph has {sorted(in_graph)}"
            )
        if _datatype_name(tensor.datatype) != in_graph[tensor.name]:
            raise MLServerError(
                f"config.pbtxt of '{model}' declares {kind} '{tensor.name}' as "
                f"{_datatype_name(tensor.datatype)}, the ONNX graph has {in_graph[tensor.name]}"
            )
    missing = sorted(set(in_graph) - {t.name for t in declared})
    if exact and missing:
        raise MLServerError(f"config.pbtxt of '{model}' lacks the graph's {kind}s {missing}")


class OnnxRuntimeModel(MLModel):
    """One ONNX Runtime session; MLServer keeps one instance per loaded model version."""

    async def load(self) -> bool:
        params = self.settings.parameters
        path: Optional[str] = params.uri if params else None
        if not path:
            raise InvalidModelURI(self.name, path)
        extra = (params.extra or {}) if params else {}

        options = ort.SessionOptions()
        # Same knobs (and meaning: 0 = ORT default) as Triton's onnxruntime backend parameters.
        options.intra_op_num_threads = int(extra.get("intra_op_thread_count", 0))
        options.inter_op_num_threads = int(extra.get("inter_op_thread_count", 0))
        # Session creation reads and optimises the whole graph: keep the event loop serving
        # the versions already loaded meanwhile.
        self._session = await asyncio.to_thread(
            ort.InferenceSession, path, options, providers=["CPUExecutionProvider"]
        )

        graph_inputs = [
            MetadataTensor(name=i.name, datatype=_v2_datatype(i.type), shape=_v2_shape(i.shape))
            for i in self._session.get_inputs()
        ]
        graph_outputs = [
            MetadataTensor(name=o.name, datatype=_v2_datatype(o.type), shape=_v2_shape(o.shape))
            for o in self._session.get_outputs()
        ]
        # Like Triton: config.pbtxt's input/output sections (already in self.inputs/outputs,
        # batch dimension included) are what the server reports and checks requests against;
        # without them (auto-complete) the graph's own signature is.
        if self.inputs:
            _check_declared(self.name, "input", self.inputs, graph_inputs, exact=True)
        else:
            self.inputs = graph_inputs
        if self.outputs:
            _check_declared(self.name, "output", self.outputs, graph_outputs, exact=False)
        else:
            self.outputs = graph_outputs
        self._declared_inputs: Dict[str, MetadataTensor] = {t.name: t for t in self.inputs}
        self._output_names = [t.name for t in self.outputs]
        self._max_batch_size = int(extra.get("max_batch_size", 0))
        return True

    async def unload(self) -> bool:
        self._session = None
        return True

    def _decode(self, request_input: RequestInput) -> np.ndarray:
        declared = self._declared_inputs.get(request_input.name)
        if declared is None:
            raise InferenceError(
                f"model '{self.name}' has no input '{request_input.name}'; "
                f"inputs are {sorted(self._declared_inputs)}"
            )
        wanted, got = _datatype_name(declared.datatype), _datatype_name(request_input.datatype)
        if got != wanted:
            raise InferenceError(
                f"input '{request_input.name}' must be {wanted}, got {got}"
            )
        if not _shape_fits(list(request_input.shape), declared.shape):
            raise InferenceError(
                f"input '{request_input.name}' must have shape {declared.shape} (-1 = any), "
                f"got {list(request_input.shape)}"
            )
        if wanted == "BYTES":
            # NumpyCodec reads BYTES as fixed-width byte rows; ONNX string tensors want objects.
            data = request_input.data.root
            items = [x.decode() if isinstance(x, bytes) else x for x in data]
            return np.array(items, dtype=object).reshape(request_input.shape)
        return NumpyCodec.decode_input(request_input)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: self._decode(i) for i in payload.inputs}
        if self._max_batch_size > 0:
            too_big = [n for n, a in feeds.items() if a.ndim and a.shape[0] > self._max_batch_size]
            if too_big:
                raise InferenceError(
                    f"batch size {feeds[too_big[0]].shape[0]} of '{too_big[0]}' exceeds "
                    f"max_batch_size {self._max_batch_size} of model '{self.name}'"
                )
        missing = sorted(set(self._declared_inputs) - set(feeds))
        if missing:
            raise InferenceError(f"model '{self.name}' is missing inputs {missing}")

        wanted = [o.name for o in payload.outputs] if payload.outputs else self._output_names
        unknown = sorted(set(wanted) - set(self._output_names))
        if unknown:
            raise InferenceError(
                f"model '{self.name}' has no outputs {unknown}; outputs are {self._output_names}"
            )

        try:
            # ONNX Runtime releases the GIL while it runs: a thread lets requests overlap.
            results = await asyncio.to_thread(self._session.run, wanted, feeds)
        except InvalidArgument as err:
            raise InferenceError(f"model '{self.name}' rejected the request: {err}") from err

        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[self._encode(name, array) for name, array in zip(wanted, results)],
        )

    @staticmethod
    def _encode(name: str, array: np.ndarray) -> ResponseOutput:
        output = NumpyCodec.encode_output(name, array)
        # NumpyCodec pads 1-D shapes to [N, 1]; a v2 client expects the graph's own shape.
        output.shape = list(array.shape)
        return output
