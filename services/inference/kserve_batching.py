"""Dynamic batching of KServe ModelInfer calls, as Triton does for a model whose config.pbtxt has
`dynamic_batching`: concurrent requests for one version share one graph run of up to
`max_batch_size` rows, each answered with exactly its own rows.

Rows of different lengths share a run only where the graph makes padding invisible: a `<x>_ids`
input with a `<x>_mask` partner (padded with 0s, which mask it out), and only in graphs whose
outputs have no dynamic dimension past the batch, so there is nothing to trim back (the reward
model: (B,) rewards). Everything else is grouped by its exact shapes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from fuseloop.repository import TensorSpec
from services.inference.batching import BatchJob
from services.inference.runtime.base import LoadedVersion



@dataclass(frozen=True)
class Signature:
    """One graph's I/O as the manifest declares it, looked up once per loaded version."""
    inputs: dict[str, TensorSpec]
    outputs: tuple[str, ...]
    masks: dict[str, str]  # padded input -> its mask (dim 1 padded together); empty: group by shape
    padded: frozenset[str]  # the inputs above and their masks

    @classmethod
    def of(cls, loaded: LoadedVersion, model: str) -> "Signature":
        inputs = {t.name: t for t in loaded.manifest.io(model, "inputs")}
        outputs = loaded.manifest.io(model, "outputs")
        masks = {}
        if all(d >= 0 for t in outputs for d in t.shape[1:]):
            for name, t in inputs.items():
                mask = inputs.get(name.removesuffix("_ids") + "_mask") if name.endswith("_ids") else None
                if mask is not None and len(t.shape) == len(mask.shape) == 2 and t.shape[1] < 0:
                    masks[name] = mask.name
        return cls(inputs, tuple(t.name for t in outputs), masks, frozenset(masks) | frozenset(masks.values()))


class Signatures:
    """Signature per (loaded version, model); entries go with their version."""

    def __init__(self) -> None:
        self._cache: weakref.WeakKeyDictionary[LoadedVersion, dict[str, Signature]] = weakref.WeakKeyDictionary()

    def get(self, loaded: LoadedVersion, model: str) -> Signature:
        per_model = self._cache.get(loaded)
        if per_model is None:
            per_model = self._cache[loaded] = {}
        sig = per_model.get(model)
        if sig is None:
            sig = per_model[model] = Signature.of(loaded, model)
        return sig


def run_model(loaded: LoadedVersion, model: str, inputs: dict[str, np.ndarray],
              output_names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """One graph of a loaded version, by tensor names (the manifest's signature)."""
    outputs = loaded.run(model, inputs)
    return dict(zip(output_names or [t.name for t in loaded.manifest.io(model, "outputs")], outputs))


class InferJob(BatchJob):
    """One ModelInfer's checked inputs. Its key: the version, the model, and the shapes past the
    batch dimension of every input that cannot be padded."""

    def __init__(self, loaded: LoadedVersion, model: str, signature: Signature, inputs: dict[str, np.ndarray],
                 on_done: Callable, deadline: float | None = None) -> None:
        padded = signature.padded
        key: Hashable = (loaded, model, tuple((n, a.shape[1:]) for n, a in inputs.items() if n not in padded))
        super().__init__(key, len(next(iter(inputs.values()))), on_done, deadline)
        self.loaded = loaded
        self.model = model
        self.signature = signature
        self.inputs = inputs


def merge(jobs: list[InferJob], pad_id: int) -> dict[str, np.ndarray]:
    """The jobs' inputs stacked along the batch; padded inputs filled to the longest row (ids with
    pad_id, masks with 0)."""
    sig = jobs[0].signature
    masks = set(sig.masks.values())
    rows = sum(j.size for j in jobs)
    out = {}
    for name in jobs[0].inputs:
        parts = [j.inputs[name] for j in jobs]
        width = max(p.shape[1] for p in parts) if name in sig.padded else None
        if width is None or all(p.shape[1] == width for p in parts):
            out[name] = np.concatenate(parts)
            continue
        buf = np.full((rows, width), 0 if name in masks else pad_id, dtype=parts[0].dtype)
        start = 0
        for p in parts:
            buf[start:start + len(p), :p.shape[1]] = p
            start += len(p)
        out[name] = buf
    return out


def _alone(job: InferJob) -> dict[str, np.ndarray] | Exception:
    try:
        return run_model(job.loaded, job.model, job.inputs, job.signature.outputs)
    except Exception as e:  # handed to this request's handler, which says whose fault it was
        return e


def infer_jobs(key: Hashable, jobs: list[InferJob]) -> list[dict[str, np.ndarray] | Exception]:
    """One graph run for all the jobs; each gets its own rows. If the merged run fails, every job
    runs alone, so a request the graph refuses fails by itself."""
    if len(jobs) == 1:
        return [_alone(jobs[0])]
    first = jobs[0]
    try:
        outputs = run_model(first.loaded, first.model, merge(jobs, first.loaded.preprocessor.pad_id),
                            first.signature.outputs)
    except Exception:
        return [_alone(j) for j in jobs]
    results, start = [], 0
    for job in jobs:
        results.append({name: arr[start:start + job.size] for name, arr in outputs.items()})
        start += job.size
    return results
