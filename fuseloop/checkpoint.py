"""A run directory: the weights, configs and tokenizer that training produces and export, the
trainer and users' own checkpoints read back.

    checkpoint.json               {"family": ...}: which model family reads the weights
    policy/, reward/, reference/  each as `save_pretrained` writes a model: config.json + model.safetensors
    tokenizer/, image_processor/  AutoTokenizer and AutoImageProcessor load them (the latter: Hugging Face families)
    preprocess.json, metrics.json

Directories written before families (policy.pt, reward.pt, reference.pt and model_config.json)
still load, as the built-in family.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from fuseloop.families import ModelFamily, family_for
from fuseloop.preprocessing import PreprocessConfig, Preprocessor, load_preprocessor, save_preprocessor

POLICY, REWARD, REFERENCE = "policy", "reward", "reference"
INFO = "checkpoint.json"


class Checkpoint:
    """Policy, reward model, frozen reference policy (for the KL term), tokenizer and configs, and
    the family that knows how to run them."""

    def __init__(self, family: ModelFamily, policy: nn.Module, reward: nn.Module, preprocessor: Preprocessor,
                 reference: nn.Module | None = None, metrics: dict | None = None) -> None:
        self.family = family
        self.policy = policy
        self.reward = reward
        self.preprocessor = preprocessor
        self.reference = reference
        self.metrics = metrics or {}

    @property
    def model_config(self) -> dict:
        return self.family.config_of(self.policy)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / INFO).write_text(json.dumps({"family": self.family.name}, indent=2))
        self.family.save(self.policy, directory / POLICY)
        self.family.save(self.reward, directory / REWARD)
        if self.reference is not None:
            self.family.save(self.reference, directory / REFERENCE)
        save_preprocessor(self.preprocessor, directory)
        self.family.save_assets(self.preprocessor, directory / POLICY)
        (directory / "preprocess.json").write_text(json.dumps(asdict(self.preprocessor.config), indent=2))
        (directory / "metrics.json").write_text(json.dumps(self.metrics, indent=2))

    @classmethod
    def load(cls, directory: Path) -> "Checkpoint":
        directory = Path(directory)
        config = PreprocessConfig.from_dict(json.loads((directory / "preprocess.json").read_text()))
        preprocessor = load_preprocessor(directory, config)
        metrics_path = directory / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        if not (directory / INFO).exists():
            return cls._load_state_dicts(directory, preprocessor, metrics)
        family = family_for(json.loads((directory / INFO).read_text()))
        reference = family.load_policy(directory / REFERENCE) if (directory / REFERENCE).is_dir() else None
        return cls(family, family.load_policy(directory / POLICY), family.load_reward(directory / REWARD),
                   preprocessor, reference, metrics)

    @classmethod
    def _load_state_dicts(cls, directory: Path, preprocessor: Preprocessor, metrics: dict) -> "Checkpoint":
        """The layout before families: torch state dicts of the built-in model."""
        family = family_for(None)
        config = json.loads((directory / "model_config.json").read_text())

        def policy_from(path: Path) -> nn.Module:
            policy = family.build(config)
            policy.load_state_dict(torch.load(path, weights_only=True))
            return policy

        policy = policy_from(directory / f"{POLICY}.pt")
        reward = family.reward_model_from_policy(policy)
        reward.load_state_dict(torch.load(directory / f"{REWARD}.pt", weights_only=True))
        reference = policy_from(directory / f"{REFERENCE}.pt") if (directory / f"{REFERENCE}.pt").exists() else None
        return cls(family, policy, reward, preprocessor, reference, metrics)
