"""The model repository: NVIDIA Triton's layout, plus fuseloop's per-version manifest.

    <root>/fuseloop_encoder/<v>/model.onnx     image + prompt -> fused memory
    <root>/fuseloop_encoder/<v>/manifest.json  the version's manifest (below)
    <root>/fuseloop_encoder/<v>/tokenizer/     AutoTokenizer.from_pretrained loads it
    <root>/fuseloop_encoder/<v>/checkpoint/    the PyTorch weights, so the trainer can warm-start
    <root>/fuseloop_decoder/<v>/model.onnx     one decoder step with KV cache
    <root>/fuseloop_reward/<v>/model.onnx      reward model: (image, prompt, response) -> scalar
    <root>/<model>/config.pbtxt                Triton ModelConfig (dynamic batching)

A fused version is the same number across the three models. Every model family exports these
three, in the roles prefill, decode step and reward (fuseloop.families). The manifest, kept where
preprocessing happens (the encoder), records a sha256 for every file of the version, the model
family, the tokenizer and preprocessing config, the I/O signatures, training metrics, the parent
version and the lineage of the data it learned from. Serving refuses a version that doesn't match it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fuseloop.errors import UserError
from fuseloop.preprocessing import PreprocessConfig

log = logging.getLogger(__name__)

ENCODER, DECODER, REWARD = "fuseloop_encoder", "fuseloop_decoder", "fuseloop_reward"
MODELS = (ENCODER, DECODER, REWARD)
MANIFEST = "manifest.json"
SERVING_STATE = "serving.json"
MODEL_FILE = "model.onnx"
FORMAT_VERSION = 1


class RepositoryError(UserError):
    """The repository or a version in it is missing, malformed or fails verification."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe v2 / Triton names: FP32, INT64, ...
    shape: tuple[int, ...]  # -1 for dynamic, batch dimension included

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["datatype"], tuple(d["shape"]))


@dataclass
class Manifest:
    version: int
    parent_version: int | None
    created_at: str
    files: dict[str, str]  # path relative to the repository root -> sha256
    signatures: dict[str, dict[str, list[dict]]]  # model -> {"inputs": [...], "outputs": [...]}
    model_config: dict
    preprocess: dict
    metrics: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)  # offsets and event counts it learned from
    train_config: dict = field(default_factory=dict)  # the effective TrainConfig of the round that made it
    format_version: int = FORMAT_VERSION
    # the model family whose graphs these are (fuseloop.families); manifests from before families mean "builtin"
    family: str = "builtin"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        return cls(**json.loads(text))

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def io(self, model: str, kind: str) -> list[TensorSpec]:
        return [TensorSpec.from_dict(t) for t in self.signatures[model][kind]]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelRepository:
    """Reads and writes versions under one root. Writes are atomic per model folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def version_dir(self, model: str, version: int) -> Path:
        return self.root / model / str(version)

    def versions(self) -> list[int]:
        """Complete versions (all three models present, with a manifest), ascending."""
        enc = self.root / ENCODER
        if not enc.is_dir():
            return []
        out = []
        for d in enc.iterdir():
            if d.name.isdigit() and (d / MANIFEST).exists() and all(
                (self.version_dir(m, int(d.name)) / MODEL_FILE).exists() for m in MODELS
            ):
                out.append(int(d.name))
        return sorted(out)

    def latest(self) -> int | None:
        v = self.versions()
        return v[-1] if v else None

    def next_version(self) -> int:
        existing = [int(d.name) for m in MODELS if (self.root / m).is_dir()
                    for d in (self.root / m).iterdir() if d.name.isdigit()]
        return max(existing, default=0) + 1

    def manifest(self, version: int) -> Manifest:
        path = self.version_dir(ENCODER, version) / MANIFEST
        if not path.exists():
            raise RepositoryError(f"version {version} has no manifest at {path}")
        try:
            return Manifest.from_json(path.read_text())
        except (ValueError, TypeError) as e:
            raise RepositoryError(f"version {version}: manifest is malformed: {e}") from None

    def model_path(self, model: str, version: int) -> Path:
        return self.version_dir(model, version) / MODEL_FILE

    def tokenizer_dir(self, version: int) -> Path:
        return self.version_dir(ENCODER, version) / "tokenizer"

    def verify(self, version: int) -> Manifest:
        """Checks every file's sha256 against the manifest; raises RepositoryError on a mismatch."""
        manifest = self.manifest(version)
        for rel, digest in sorted(manifest.files.items()):
            path = self.root / rel
            if not path.exists():
                raise RepositoryError(f"version {version}: {rel} is missing")
            actual = sha256_file(path)
            if actual != digest:
                raise RepositoryError(f"version {version}: checksum mismatch for {rel} "
                                      f"(manifest {digest[:12]}..., file {actual[:12]}...)")
        return manifest

    @property
    def serving_state_path(self) -> Path:
        return self.root / SERVING_STATE

    def serving_state(self) -> "ServingState":
        return ServingState.read(self.serving_state_path)

    def checkpoint_dir(self, version: int) -> Path:
        return self.version_dir(ENCODER, version) / "checkpoint"

    def write_version(self, version: int, staged: dict[str, Path], extra_dirs: dict[str, Path], manifest: Manifest,
                      triton_configs: dict[str, bytes]) -> Manifest:
        """Copies staged ONNX files (model -> path) and extra folders (name -> path, e.g. tokenizer,
        checkpoint) into the version, fills checksums, and writes the manifest last so a
        half-written version is never listed."""
        if version in self.versions():
            raise RepositoryError(f"version {version} already exists in {self.root}")
        files = {}
        for model in MODELS:
            vdir = self.version_dir(model, version)
            vdir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(staged[model], vdir / MODEL_FILE)
            files[f"{model}/{version}/{MODEL_FILE}"] = sha256_file(vdir / MODEL_FILE)
            config_path = self.root / model / "config.pbtxt"
            config_path.write_bytes(triton_configs[model])
        for name, src in extra_dirs.items():
            dst = self.version_dir(ENCODER, version) / name
            shutil.copytree(src, dst, dirs_exist_ok=True)
            for p in sorted(dst.rglob("*")):
                if p.is_file():
                    files[str(p.relative_to(self.root))] = sha256_file(p)
        manifest.files = files
        manifest.version = version
        tmp = self.version_dir(ENCODER, version) / (MANIFEST + ".tmp")
        tmp.write_text(manifest.to_json())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(self.version_dir(ENCODER, version) / MANIFEST)
        return manifest


class ServingChangeRefused(UserError, ValueError):
    """A change the serving record cannot take as asked (e.g. a canary of the serving version)."""


class ServingConflict(UserError):
    """The serving record changed between reading it and writing it (another replica or the
    trainer deployed meanwhile): read it again and retry."""


@dataclass
class ServingState:
    """The fleet's desired state: which version serves, the one before it (for rollback) and the
    deploy history. One record, `serving.json` in the shared repository: every inference replica
    watches it and converges on it; admin Deploy/Rollback, `fuseloop models --repo` and the trainer
    change it (`update`), never one replica alone. `generation` grows by one on every change, so
    a reader can tell a new decision from the one it already acted on."""

    serving: int | None = None
    previous: int | None = None
    history: list[int] = field(default_factory=list)
    generation: int = 0
    canary: int | None = None  # a version on trial beside `serving`, for a sticky share of traffic
    canary_percent: float = 0.0
    canary_since_ms: int = 0  # when the trial began: its evidence is what was served since

    def to_json(self) -> str:
        return json.dumps({"serving": self.serving, "previous": self.previous, "history": self.history,
                           "generation": self.generation, "canary": self.canary,
                           "canary_percent": self.canary_percent, "canary_since_ms": self.canary_since_ms}, indent=2)

    def deployed(self, version: int, history_limit: int = 50) -> "ServingState":
        """The record after `version` is made to serve to everyone (the serving one becomes
        `previous`). A canary ends: promoted when it is `version`, replaced otherwise."""
        if version == self.serving and self.canary is None:
            return self
        if version == self.serving:
            return self.without_canary()
        return ServingState(serving=version, previous=self.serving,
                            history=(self.history + [version])[-history_limit:], generation=self.generation)

    def with_canary(self, version: int, percent: float, since_ms: int) -> "ServingState":
        if not 0 < percent < 100:
            raise ServingChangeRefused(f"a canary's share must be between 0 and 100 percent, got {percent:g}")
        if self.serving is None:
            raise ServingChangeRefused("the serving record names no serving version yet: deploy one first, "
                                       "then put another on trial beside it")
        if version == self.serving:
            raise ServingChangeRefused(f"version {version} already serves everyone; a canary must be another version")
        if version == self.canary:
            return replace(self, canary_percent=float(percent))
        return replace(self, canary=version, canary_percent=float(percent), canary_since_ms=since_ms)

    def without_canary(self) -> "ServingState":
        return replace(self, canary=None, canary_percent=0.0, canary_since_ms=0)

    @classmethod
    def read(cls, path: Path) -> "ServingState":
        """An absent or unreadable file reads as 'nothing deployed yet'."""
        try:
            d = json.loads(Path(path).read_text())
            return cls(d.get("serving"), d.get("previous"), [int(v) for v in d.get("history", [])],
                       int(d.get("generation", 0)), d.get("canary"), float(d.get("canary_percent", 0.0)),
                       int(d.get("canary_since_ms", 0)))
        except FileNotFoundError:
            return cls()
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("ignoring unreadable serving state %s: %s", path, e)
            return cls()

    def write(self, path: Path) -> None:
        """Atomic replace, so a crash never leaves a half-written state file, and a watcher never
        reads one."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def update(cls, path: Path, change: Callable[["ServingState"], "ServingState"],
               expect_generation: int | None = None) -> "ServingState":
        """Read-change-write under an exclusive lock (`flock` on `serving.json.lock`: it excludes
        other open files, so threads as well as processes; Linux's NFS client maps it to a lock the
        server enforces), so concurrent deploys through different replicas serialize instead of
        losing one. `expect_generation`: refuse (ServingConflict) if
        the record moved on since the caller read it."""
        path = Path(path)
        with open(path.with_name(path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = cls.read(path)
                if expect_generation is not None and current.generation != expect_generation:
                    raise ServingConflict(f"the serving record changed meanwhile (generation {current.generation}, "
                                          f"expected {expect_generation}): serving {current.serving}; try again")
                new = change(current)
                if new == current:
                    return current
                new = replace(new, generation=current.generation + 1)
                new.write(path)
                return new
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
