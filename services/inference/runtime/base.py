"""The runtime contract: load a version, run a batch, report metadata.

Batching, deadlines, health, metrics and protocols are the service's job, written once above
this interface; ONNX Runtime (in process) and Triton (over gRPC) sit behind it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from fuseloop.errors import UserError
from fuseloop.families import Stepper, family_for
from fuseloop.preprocessing import Preprocessor
from fuseloop.preprocessing import load_preprocessor as read_preprocessor
from fuseloop.repository import ENCODER, Manifest, ModelRepository, RepositoryError, TensorSpec


class RuntimeError_(Exception):
    """A runtime could not load or run a model version (distinct from bad client input)."""


class LoadedVersion(ABC):
    """One fused model version, loaded and ready: its graphs run by name (`run`), and the family's
    stepper over them, which the engine prefills and steps, and scoring scores with."""

    def __init__(self, version: int, manifest: Manifest, preprocessor: Preprocessor) -> None:
        self.version = version
        self.manifest = manifest
        self.preprocessor = preprocessor
        try:
            family = family_for(manifest)
        except UserError as e:  # e.g. a version written by a newer fuseloop
            raise RepositoryError(f"version {version}: {e}") from None
        self.stepper: Stepper = family.stepper(manifest.model_config, self.run)

    @abstractmethod
    def run(self, model: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One graph, its inputs by name -> its outputs in the manifest's order."""

    def score(self, pixel_values: np.ndarray, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
              response_ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
        """-> rewards (B,) float32."""
        return self.stepper.score(pixel_values, prompt_ids, prompt_mask, response_ids, response_mask)

    def warm_up(self) -> None:
        """One call through each graph, so the first real request doesn't pay for initialization."""
        pre = self.preprocessor
        size = pre.config.image_size
        pixels = np.zeros((1, 3, size, size), dtype=np.float32)
        ids = np.array([[pre.bos_id]], dtype=np.int64)
        mask = np.ones((1, 1), dtype=np.int64)
        self.stepper.step(self.stepper.prefill(pixels, ids, mask))
        self.score(pixels, ids, mask, ids, mask)

    def metadata(self) -> dict:
        return {"version": self.version, "parent_version": self.manifest.parent_version,
                "signatures": self.manifest.signatures, "metrics": self.manifest.metrics}

    def close(self) -> None:
        """Releases the version's resources."""


class ModelRuntime(ABC):
    name: str = "runtime"

    @abstractmethod
    def load(self, repo: ModelRepository, version: int) -> LoadedVersion:
        """Verifies the version against its manifest, loads and warms it. Raises RepositoryError
        when the artifact doesn't match its manifest."""

    @abstractmethod
    def worker_factory(self) -> Callable[[], "ModelRuntime"]:
        """A picklable recipe for the runtime another process (the engine process) uses to serve the
        versions this one loads: the same settings, but it leaves the choice of what is loaded to
        this one."""

    def close(self) -> None:
        """Releases everything."""


def check_signature(version: int, model: str, expected: list[TensorSpec], actual: list[TensorSpec]) -> None:
    """Names, datatypes and ranks must match what the manifest promises."""
    exp = {t.name: t for t in expected}
    act = {t.name: t for t in actual}
    if set(exp) != set(act):
        raise RepositoryError(f"version {version}: {model} tensors {sorted(act)} differ from the manifest's {sorted(exp)}")
    for name, t in exp.items():
        a = act[name]
        if a.datatype != t.datatype or len(a.shape) != len(t.shape):
            raise RepositoryError(f"version {version}: {model}.{name} is {a.datatype}{list(a.shape)}, "
                                  f"the manifest says {t.datatype}{list(t.shape)}")


def load_preprocessor(repo: ModelRepository, version: int, manifest: Manifest) -> Preprocessor:
    return read_preprocessor(repo.version_dir(ENCODER, version), manifest.preprocess_config())
