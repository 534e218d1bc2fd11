"""Export: a checkpoint's policy and reward model -> ONNX graphs -> a new repository version.

Three graphs, which the checkpoint's model family defines (`ModelFamily.graphs`): prefill, one
decoder step with a KV cache, and the reward model. Triton's config.pbtxt is written through
Triton's own ModelConfig protobuf, not string templates.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from fuseloop.checkpoint import Checkpoint
from fuseloop.families.onnx_export import export_onnx
from fuseloop.preprocessing import save_preprocessor
from fuseloop.repository import MODELS, Manifest, ModelRepository, TensorSpec

ONNX_TO_KSERVE = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32",
                  onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.FLOAT16: "FP16"}
KSERVE_TO_TRITON = {"FP32": mc.TYPE_FP32, "INT64": mc.TYPE_INT64, "INT32": mc.TYPE_INT32, "BOOL": mc.TYPE_BOOL,
                    "FP16": mc.TYPE_FP16}
MAX_BATCH = 64


def swap_weights(template: Path, module: torch.nn.Module, out: Path) -> bool:
    """Writes `template` with `module`'s weights; False when the graph doesn't fit the module
    (a different architecture), in which case the caller traces afresh."""
    model = onnx.load(str(template))
    # Non-persistent buffers (rotary inv_freq, CLIP's position_ids) are initializers too.
    tensors = {**dict(module.named_buffers()), **module.state_dict()}
    state = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    inits = model.graph.initializer
    if not inits or any(i.name not in state or tuple(i.dims) != state[i.name].shape for i in inits):
        return False
    for init in inits:
        init.CopyFrom(onnx.numpy_helper.from_array(state[init.name].astype(np.float32, copy=False)
                                                   if init.data_type == onnx.TensorProto.FLOAT else state[init.name],
                                                   init.name))
    onnx.save(model, str(out))
    return True


def export_graphs(ckpt: Checkpoint, out_dir: Path, templates: dict[str, Path] | None = None) -> dict[str, Path]:
    """Writes model -> ONNX path for the three graphs the checkpoint's family exports. With
    `templates` (the same architecture's graphs, e.g. the parent version's), only the weights are
    swapped in: tracing takes tens of seconds, a swap well under one. The parity check verifies either way."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.policy.eval()
    ckpt.reward.eval()
    paths = {m: out_dir / f"{m}.onnx" for m in MODELS}
    graphs = ckpt.family.graphs(ckpt.policy, ckpt.reward)
    if templates is not None and all(swap_weights(templates[m], graphs[m].module, paths[m]) for m in MODELS):
        return paths
    for m in MODELS:
        export_onnx(graphs[m], paths[m])
    return paths


def graph_signature(path: Path) -> dict[str, list[dict]]:
    """The I/O signature as the ONNX file declares it (-1 for symbolic dimensions)."""
    model = onnx.load(str(path), load_external_data=False)

    def spec(v) -> dict:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(v.name, ONNX_TO_KSERVE[t.elem_type], dims).to_dict()

    return {"inputs": [spec(v) for v in model.graph.input], "outputs": [spec(v) for v in model.graph.output]}


def triton_config(model: str, signature: dict[str, list[dict]], max_queue_delay_us: int = 2000) -> bytes:
    """config.pbtxt through Triton's ModelConfig protobuf. Dims exclude the batch dimension."""
    cfg = mc.ModelConfig(
        name=model, platform="onnxruntime_onnx", max_batch_size=MAX_BATCH,
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=max_queue_delay_us),
        # Two versions loaded at once, so a new one is warmed beside the serving one.
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=2)),
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_AUTO, count=1)],
    )
    for t in signature["inputs"]:
        cfg.input.append(mc.ModelInput(name=t["name"], data_type=KSERVE_TO_TRITON[t["datatype"]], dims=t["shape"][1:]))
    for t in signature["outputs"]:
        cfg.output.append(mc.ModelOutput(name=t["name"], data_type=KSERVE_TO_TRITON[t["datatype"]], dims=t["shape"][1:]))
    return text_format.MessageToString(cfg).encode()


def export_parity(ckpt: Checkpoint, paths: dict[str, Path]) -> float:
    """Max abs difference between ONNX Runtime and PyTorch on example inputs, over all outputs."""
    import onnxruntime as ort

    worst = 0.0
    for model, g in ckpt.family.graphs(ckpt.policy, ckpt.reward, batch=3).items():
        with torch.no_grad():
            expected = g.module(**g.inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        sess = ort.InferenceSession(str(paths[model]), providers=["CPUExecutionProvider"])
        got = sess.run(None, {k: v.numpy() for k, v in g.inputs.items()})
        for out, e in zip(got, expected):
            worst = max(worst, float(np.max(np.abs(out.astype(np.float64) - e.numpy().astype(np.float64)))))
    return worst


def publish(ckpt: Checkpoint, repo: ModelRepository, parent_version: int | None = None,
            metrics: dict | None = None, lineage: dict | None = None, train_config: dict | None = None) -> Manifest:
    """Exports the checkpoint as the repository's next version and returns its manifest;
    `train_config` (the effective TrainConfig) lets anyone retrain the version the same way."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuseloop-export-") as tmp:
        tmp = Path(tmp)
        paths = export_graphs(ckpt, tmp / "onnx", same_architecture_graphs(repo, ckpt))
        signatures = {m: graph_signature(p) for m, p in paths.items()}
        parity = export_parity(ckpt, paths)
        save_preprocessor(ckpt.preprocessor, tmp / "preprocessor")
        ckpt.save(tmp / "checkpoint")
        manifest = Manifest(
            version=0, parent_version=parent_version,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            files={}, signatures=signatures, model_config=ckpt.model_config, family=ckpt.family.name,
            preprocess=_preprocess_dict(ckpt), metrics=dict(metrics or ckpt.metrics),
            lineage=dict(lineage or {"source": "pretrain"}), train_config=dict(train_config or {}),
        )
        manifest.metrics["export_max_abs_diff"] = parity
        manifest.metrics["export_seconds"] = round(time.perf_counter() - t0, 1)
        configs = {m: triton_config(m, signatures[m]) for m in MODELS}
        extra = {"checkpoint": tmp / "checkpoint",
                 **{p.name: p for p in sorted((tmp / "preprocessor").iterdir())}}  # tokenizer, image_processor
        return repo.write_version(repo.next_version(), paths, extra, manifest, configs)


def same_architecture_graphs(repo: ModelRepository, ckpt: Checkpoint) -> dict[str, Path] | None:
    """The newest version's graphs when its family and model config equal the checkpoint's."""
    for version in reversed(repo.versions()):
        manifest = repo.manifest(version)
        if manifest.family == ckpt.family.name and manifest.model_config == ckpt.model_config:
            return {m: repo.model_path(m, version) for m in MODELS}
    return None


def _preprocess_dict(ckpt: Checkpoint) -> dict:
    from dataclasses import asdict

    return asdict(ckpt.preprocessor.config)
