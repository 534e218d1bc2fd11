"""Recipe: supervised pretraining of the base policy and the initial reward model.

Supervision is deliberately imperfect (a biased annotator, see `BiasedAnnotator`), so the base
is decent but clearly improvable by feedback.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from fuseloop.checkpoint import Checkpoint
from fuseloop.families import ModelFamily, family_for
from fuseloop.model import ModelConfig, count_parameters
from fuseloop.preprocessing import PreprocessConfig, Preprocessor
from fuseloop.scenes import BiasedAnnotator, Example, SceneTaskConfig, alternative_answer, make_split, render, task_texts
from fuseloop.tokenizer import train_tokenizer
from trainer.evaluate import gold_accuracy
from trainer.losses import bradley_terry_loss, token_cross_entropy
from trainer.plots import plot_curves


@dataclass
class PretrainConfig:
    n_train: int = 6000
    n_test: int = 600
    bias_rate: float = 0.7  # share of wrong labels on the annotator's biased conditions
    steps: int = 2000  # fewer leave the base unable to tie a question's shape to the right object
    batch_size: int = 64
    lr: float = 3e-3
    reward_steps: int = 300
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)  # pretraining from scratch builds the built-in family
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    @classmethod
    def quick(cls) -> "PretrainConfig":
        """A tiny setting for tests: seconds, not minutes."""
        return cls(n_train=300, n_test=60, steps=40, reward_steps=20, batch_size=32,
                   model=ModelConfig(d_model=32, n_heads=2, n_decoder_layers=1))


def response_batch(pre: Preprocessor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pre.responses(texts)
    return torch.from_numpy(ids), torch.from_numpy(mask)


class PretrainData:
    """Rendered images and encoded prompts for a list of examples, held as tensors."""

    def __init__(self, pre: Preprocessor, examples: list[Example]) -> None:
        self.examples = examples
        self.pixels = torch.from_numpy(pre.images([render(e.scene) for e in tqdm(examples, desc="render", leave=False)]))
        ids, mask = pre.prompts([e.prompt for e in examples])
        self.prompt_ids, self.prompt_mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def take(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = torch.from_numpy(idx)
        return self.pixels[i], self.prompt_ids[i], self.prompt_mask[i]


def train_policy(family: ModelFamily, policy: nn.Module, pre: Preprocessor, data: PretrainData, labels: list[str],
                 cfg: PretrainConfig, rng: np.random.Generator) -> list[float]:
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    losses = []
    policy.train()
    for _ in (bar := tqdm(range(cfg.steps), desc="pretrain policy")):
        idx = rng.integers(0, len(labels), cfg.batch_size)
        pixels, pids, pmask = data.take(idx)
        ids, mask = response_batch(pre, [labels[i] for i in idx])
        logits = family.token_logits(policy, pixels, pids, pmask, ids[:, :-1], mask[:, :-1])
        loss = token_cross_entropy(logits, ids[:, 1:], mask[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def train_initial_reward(reward: nn.Module, pre: Preprocessor, data: PretrainData, labels: list[str],
                         cfg: PretrainConfig, rng: np.random.Generator) -> list[float]:
    """Labelled answers over alternative answers (Bradley-Terry): inherits the annotator's biases."""
    alt_rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(reward.parameters(), lr=cfg.lr / 2, weight_decay=0.01)
    losses = []
    reward.train()
    for _ in (bar := tqdm(range(cfg.reward_steps), desc="pretrain reward")):
        idx = rng.integers(0, len(labels), cfg.batch_size)
        pixels, pids, pmask = data.take(idx)
        chosen = [labels[i] for i in idx]
        rejected = [alternative_answer(replace(data.examples[i], answer=labels[i]), alt_rng) for i in idx]
        ids, mask = response_batch(pre, chosen + rejected)
        r = reward(pixels.repeat(2, 1, 1, 1), pids.repeat(2, 1), pmask.repeat(2, 1), ids, mask)
        loss = bradley_terry_loss(r[: len(idx)], r[len(idx):])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reward.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def pretrain(cfg: PretrainConfig, out_dir: Path) -> dict:
    """Trains tokenizer, base policy and initial reward model; writes the run directory."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    task = SceneTaskConfig(image_size=cfg.preprocess.image_size)
    tokenizer = train_tokenizer(task_texts(task))
    pre = Preprocessor(tokenizer, cfg.preprocess)
    model_cfg = replace(cfg.model, vocab_size=len(tokenizer), image_size=cfg.preprocess.image_size,
                        max_prompt_tokens=cfg.preprocess.max_prompt_tokens,
                        max_response_tokens=cfg.preprocess.max_response_tokens,
                        pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)

    train = make_split("train", cfg.n_train, task)
    annotator = BiasedAnnotator(bias_rate=cfg.bias_rate)
    label_rng = random.Random(cfg.seed)
    labels = [annotator.label(e, label_rng) for e in train]
    wrong = float(np.mean([l != e.answer for l, e in zip(labels, train)]))
    data = PretrainData(pre, train)

    family = family_for(None)  # pretraining from scratch builds the built-in model
    policy = family.build(model_cfg.to_dict())
    policy_losses = train_policy(family, policy, pre, data, labels, cfg, rng)
    reward = family.reward_model_from_policy(policy)
    reward_losses = train_initial_reward(reward, pre, data, labels, cfg, rng)
    train_s = time.perf_counter() - t0

    test = make_split("test", cfg.n_test, task)
    greedy = gold_accuracy(family, policy, pre, test, temperature=0.0)
    sampled = gold_accuracy(family, policy, pre, test, temperature=1.0)
    metrics = {
        "gold_accuracy_greedy": greedy.accuracy,
        "gold_accuracy_sampled": sampled.accuracy,
        "gold_accuracy_by_kind": greedy.by_kind,
        "label_wrong_share": wrong,
        "policy_parameters": count_parameters(policy),
        "reward_parameters": count_parameters(reward),
        "final_policy_loss": float(np.mean(policy_losses[-20:])),
        "final_reward_loss": float(np.mean(reward_losses[-20:])),
        "train_seconds": round(train_s, 1),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("model", "preprocess")},
    }
    out_dir = Path(out_dir)
    Checkpoint(family, policy, reward, pre, reference=None, metrics=metrics).save(out_dir)
    plot_curves(out_dir / "pretrain.png", "pretraining", {"policy loss": policy_losses, "reward loss (BT)": reward_losses})
    return metrics
