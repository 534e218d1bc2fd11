"""Model runtimes behind one interface (`base.ModelRuntime`); `make_runtime` picks one from a spec."""

from __future__ import annotations

from services.inference.runtime.base import ModelRuntime

TRITON_SCHEME = "triton://"


def make_runtime(spec: str, *, intra_op_threads: int = 0, device: str = "auto") -> ModelRuntime:
    """"onnxruntime" (in process; the ORT options apply) or "triton://HOST:PORT[?options]"."""
    if spec in ("onnxruntime", "ort", ""):
        from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig

        return OnnxRuntime(OnnxRuntimeConfig(device=device, intra_op_threads=intra_op_threads))
    if spec.startswith(TRITON_SCHEME):
        from services.inference.runtime.triton_runtime import TritonRuntime

        return TritonRuntime.from_spec(spec)  # ValueError for a malformed spec
    raise ValueError(f"unknown runtime {spec!r}: use onnxruntime or {TRITON_SCHEME}HOST:PORT")
