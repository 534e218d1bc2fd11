"""ONNX export of the Hugging Face families' graphs, and running them with ONNX Runtime."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fuseloop.families.hf_layout import empty_past, positions

OPSET = 20
MAX_DIM = 4096


def dim(name: str, min: int = 1) -> torch.export.Dim:
    return torch.export.Dim(name, min=min, max=MAX_DIM)


class Graph(torch.nn.Module):
    """`fn(model, *inputs)` as one module to export (by default the model itself); its weights
    are the model's."""

    def __init__(self, model: torch.nn.Module, fn: Callable | None = None) -> None:
        super().__init__()
        self.model = model
        self.fn = fn if fn is not None else (lambda m, *inputs: m(*inputs))

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


def export_graph(graph: Graph, inputs: dict[str, torch.Tensor], outputs: list[str], dynamic: dict[str, dict],
                 path: Path, external_data: bool = False) -> Path:
    """torch.onnx.export (dynamo) of `graph(*inputs.values())`; the input names are `inputs`' keys.

    Example inputs must not use size 1 (or 0) on a dynamic axis: torch.export specializes it.
    `external_data=True` writes the weights to a file beside the graph (`model.onnx.data`).
    Leaves the graph's model in eval mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    graph.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # optimize=False keeps weights as initializers named after their parameters.
        program = torch.onnx.export(graph, args=tuple(inputs.values()), f=None, input_names=list(inputs),
                                    output_names=outputs, dynamic_shapes={"inputs": tuple(dynamic[n] for n in inputs)},
                                    dynamo=True, opset_version=OPSET, verbose=False, optimize=False)
    program.save(str(path), external_data=external_data)
    return path


def export_graphs(graphs: dict[str, Graph], inputs: dict[str, dict], outputs: dict[str, list[str]],
                  dynamic: dict[str, dict], out_dir: Path, external_data: bool = False) -> dict[str, Path]:
    """Exports each named graph to `out_dir/<name>.onnx`; returns name -> path."""
    return {name: export_graph(graphs[name], inputs[name], outputs[name], dynamic[name], out_dir / f"{name}.onnx",
                               external_data) for name in outputs}


def session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, **inputs: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """Runs an ORT session on named inputs (torch tensors are converted)."""
    feed = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return sess.run(None, feed)


# (input_ids (B, T), attention_mask (B, P+T), position_ids (B, T), past) -> (logits (B, T, V), present)
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def greedy_generate(step: StepFn, prompt_ids: np.ndarray, prompt_mask: np.ndarray, cache_shape: tuple[int, int, int],
                    max_new_tokens: int, eos_id: int, pad_id: int) -> np.ndarray:
    """Greedy decoding over a family's graphs: one prefill of the left-padded prompts, then one
    step per token with the packed past. Returns (B, <= max_new_tokens) tokens, EOS included,
    PAD after it (as `generate` pads finished rows)."""
    mask = prompt_mask.astype(np.int64)
    past = empty_past(len(mask), *cache_shape).numpy()
    logits, past = step(prompt_ids, mask, positions(torch.from_numpy(mask)).numpy(), past)
    nxt_pos = mask.sum(-1)  # (B,)
    done = np.zeros(len(mask), dtype=bool)
    out = []
    for _ in range(max_new_tokens):
        tok = np.where(done, pad_id, logits[:, -1].argmax(-1)).astype(np.int64)
        out.append(tok)
        done |= tok == eos_id
        if done.all():
            break
        mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
        logits, past = step(tok[:, None], mask, nxt_pos[:, None], past)
        nxt_pos = nxt_pos + 1
    return np.stack(out, axis=1)
