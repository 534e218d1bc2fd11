"""A run directory: the PyTorch weights, configs and tokenizer that training produces and
export, the trainer and users' own checkpoints read back."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from fuseloop.model import FusedPolicy, ModelConfig, RewardModel
from fuseloop.preprocessing import PreprocessConfig, Preprocessor
from fuseloop.tokenizer import load_tokenizer, save_tokenizer

POLICY, REWARD, REFERENCE = "policy.pt", "reward.pt", "reference.pt"


class Checkpoint:
    """Policy, reward model, frozen reference policy (for the KL term), tokenizer and configs."""

    def __init__(self, policy: FusedPolicy, reward: RewardModel, preprocessor: Preprocessor,
                 reference: FusedPolicy | None = None, metrics: dict | None = None) -> None:
        self.policy = policy
        self.reward = reward
        self.preprocessor = preprocessor
        self.reference = reference
        self.metrics = metrics or {}

    @property
    def model_config(self) -> ModelConfig:
        return self.policy.cfg

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.policy.state_dict(), directory / POLICY)
        torch.save(self.reward.state_dict(), directory / REWARD)
        if self.reference is not None:
            torch.save(self.reference.state_dict(), directory / REFERENCE)
        save_tokenizer(self.preprocessor.tokenizer, directory / "tokenizer")
        (directory / "model_config.json").write_text(json.dumps(self.model_config.to_dict(), indent=2))
        (directory / "preprocess.json").write_text(json.dumps(asdict(self.preprocessor.config), indent=2))
        (directory / "metrics.json").write_text(json.dumps(self.metrics, indent=2))

    @classmethod
    def load(cls, directory: Path) -> "Checkpoint":
        directory = Path(directory)
        cfg = ModelConfig(**json.loads((directory / "model_config.json").read_text()))
        pre = json.loads((directory / "preprocess.json").read_text())
        pre["image_formats"] = tuple(pre["image_formats"])
        preprocessor = Preprocessor(load_tokenizer(directory / "tokenizer"), PreprocessConfig(**pre))
        policy = FusedPolicy(cfg)
        policy.load_state_dict(torch.load(directory / POLICY, weights_only=True))
        reward = RewardModel(cfg)
        reward.load_state_dict(torch.load(directory / REWARD, weights_only=True))
        reference = None
        if (directory / REFERENCE).exists():
            reference = FusedPolicy(cfg)
            reference.load_state_dict(torch.load(directory / REFERENCE, weights_only=True))
        metrics_path = directory / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        return cls(policy, reward, preprocessor, reference, metrics)
