"""The Hugging Face families' graphs with ONNX Runtime: dynamic axes, sessions, a greedy loop
(export itself: `onnx_export.export_onnx`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fuseloop.families.hf_layout import empty_past, positions

MAX_DIM = 4096


def dim(name: str, min: int = 1) -> torch.export.Dim:
    return torch.export.Dim(name, min=min, max=MAX_DIM)


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
