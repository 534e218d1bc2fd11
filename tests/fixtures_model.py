"""The quick model and repository most tests share: pretrained once per test session."""

from __future__ import annotations

from pathlib import Path

from fuseloop.checkpoint import Checkpoint
from fuseloop.cli import main as cli
from fuseloop.repository import ModelRepository
from trainer.export import publish


def build_quick_run(run_dir: Path) -> Checkpoint:
    """Through the command line, as a user would: `fuseloop pretrain --out RUN_DIR --quick`."""
    assert cli(["pretrain", "--out", str(run_dir), "--quick"]) == 0
    return Checkpoint.load(run_dir)


def build_repo(ckpt: Checkpoint, repo_dir: Path, versions: int = 2) -> ModelRepository:
    """A repository with `versions` versions of the same weights (v2 is v1's child), for swaps."""
    repo = ModelRepository(repo_dir)
    parent = None
    for _ in range(versions):
        parent = publish(ckpt, repo, parent_version=parent).version
    return repo
