"""The runtime contract: load a version, run a batch, report metadata.

Batching, deadlines, health, metrics and protocols are the service's job, written once above
this interface; ONNX Runtime (in process) and Triton (over gRPC) sit behind it.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import numpy as np

from fuseloop.errors import UserError
from fuseloop.families import Stepper, family_for
from fuseloop.preprocessing import Preprocessor
from fuseloop.preprocessing import load_preprocessor as read_preprocessor
from fuseloop.repository import DECODER, ENCODER, MODELS, REWARD, Manifest, ModelRepository, RepositoryError, TensorSpec

# The graphs each kind of work runs (their roles in fuseloop.families.base): a process loads only
# those of the work it does, so the engine process and the server don't both hold every graph.
GENERATION_GRAPHS = (ENCODER, DECODER)  # the stepper's prefill and step
SCORING_GRAPHS = (REWARD,)  # the stepper's score


class RuntimeError_(Exception):
    """A runtime could not load or run a model version (distinct from bad client input)."""


def graph_names(graphs: Iterable[str]) -> tuple[str, ...]:
    """`graphs` checked against the repository's names, in its order."""
    wanted = set(graphs)
    unknown = wanted - set(MODELS)
    if unknown:
        raise ValueError(f"unknown graph(s) {', '.join(sorted(unknown))}; graphs: {', '.join(MODELS)}")
    return tuple(m for m in MODELS if m in wanted)


class LoadedVersion(ABC):
    """One fused model version, loaded and ready: those of its graphs this process loaded
    (`graphs`) run by name (`run`), and the family's stepper over them, which the engine prefills
    and steps, and scoring scores with. More graphs load on demand (`load_graphs`)."""

    def __init__(self, version: int, manifest: Manifest, preprocessor: Preprocessor) -> None:
        self.version = version
        self.manifest = manifest
        self.preprocessor = preprocessor
        self._graph_lock = threading.Lock()
        try:
            family = family_for(manifest)
        except UserError as e:  # e.g. a version written by a newer fuseloop
            raise RepositoryError(f"version {version}: {e}") from None
        if problems := family.stepper_class.check_feeds(manifest.signatures):
            raise RepositoryError(
                f"version {version} was exported by another fuseloop release for the {family.name} family: "
                f"{'; '.join(problems)}. Export its checkpoint again (`fuseloop export "
                f"REPO/{ENCODER}/{version}/checkpoint --repo REPO`): that publishes it as a new version")
        self.stepper: Stepper = family.stepper(manifest.model_config, self.run)

    @abstractmethod
    def run(self, model: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One loaded graph, its inputs by name -> its outputs in the manifest's order."""

    @property
    @abstractmethod
    def graphs(self) -> frozenset[str]:
        """The graphs loaded here."""

    @abstractmethod
    def _open_graph(self, model: str) -> None:
        """Loads one more graph of this version (checked against the manifest)."""

    def load_graphs(self, graphs: Iterable[str]) -> None:
        """Loads those of `graphs` not loaded yet; blocking (call it off the event loop). Raises
        RepositoryError when a graph doesn't match the manifest."""
        with self._graph_lock:  # two first requests for a graph load it once
            for model in graph_names(graphs):
                if model not in self.graphs:
                    self._open_graph(model)

    def not_loaded(self, model: str) -> RuntimeError_:
        return RuntimeError_(f"version {self.version}: graph {model} is not loaded in this process "
                             f"(loaded: {', '.join(sorted(self.graphs)) or 'none'})")

    def score(self, pixel_values: np.ndarray, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
              response_ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
        """-> rewards (B,) float32."""
        return self.stepper.score(pixel_values, prompt_ids, prompt_mask, response_ids, response_mask)

    def warm_up(self) -> None:
        """One call through each loaded graph's work (generation, scoring), so the first real
        request doesn't pay for initialization."""
        pre = self.preprocessor
        size = pre.config.image_size
        pixels = np.zeros((1, 3, size, size), dtype=np.float32)
        ids = np.array([[pre.bos_id]], dtype=np.int64)
        mask = np.ones((1, 1), dtype=np.int64)
        if self.graphs.issuperset(GENERATION_GRAPHS):
            self.stepper.step(self.stepper.prefill(pixels, ids, mask))
        if self.graphs.issuperset(SCORING_GRAPHS):
            self.score(pixels, ids, mask, ids, mask)

    def metadata(self) -> dict:
        return {"version": self.version, "parent_version": self.manifest.parent_version,
                "signatures": self.manifest.signatures, "metrics": self.manifest.metrics}

    def close(self) -> None:
        """Releases the version's resources."""


class ModelRuntime(ABC):
    name: str = "runtime"

    @abstractmethod
    def load(self, repo: ModelRepository, version: int, graphs: Iterable[str] = MODELS) -> LoadedVersion:
        """Verifies the version against its manifest, loads `graphs` of it (default: all) and warms
        them. Raises RepositoryError when the artifact doesn't match its manifest, ValueError for
        an unknown graph name."""

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
