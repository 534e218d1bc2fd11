"""Reward-model retraining on every signal, warm-started; held-out pairwise accuracy and calibration."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from trainer.batches import ContextTensors
from trainer.losses import bradley_terry_loss, rating_loss, unpaired_binary_loss
from trainer.signals import TrainingSet


@dataclass(frozen=True)
class RewardTrainConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    heldout_share: float = 0.15
    seed: int = 0


def is_heldout(request_id: str, share: float) -> bool:
    """Held out by request, stably across rounds (a request's pairs never straddle the split)."""
    return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def split(items: list, share: float) -> tuple[list, list]:
    train = [x for x in items if not is_heldout(x[0].request_id, share)]
    held = [x for x in items if is_heldout(x[0].request_id, share)]
    return train, held


def score_pairs(reward: torch.nn.Module, tensors: ContextTensors, pairs: list, batch_size: int = 256) -> np.ndarray:
    """r(chosen) - r(rejected) for each pair."""
    reward.eval()
    diffs = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i: i + batch_size]
            ctx = [p[0] for p in chunk]
            px, ids, mask = tensors.inputs(ctx)
            rids, rmask = tensors.responses([p[1] for p in chunk] + [p[2] for p in chunk])
            r = reward(px.repeat(2, 1, 1, 1), ids.repeat(2, 1), mask.repeat(2, 1), rids, rmask)
            diffs.append((r[: len(chunk)] - r[len(chunk):]).numpy())
    return np.concatenate(diffs) if diffs else np.zeros(0)


def calibration_error(diffs: np.ndarray, bins: int = 5) -> float:
    """Expected calibration error of P(chosen > rejected) = sigmoid(diff) against the observed
    preference (always 1 for the chosen side), on symmetrized pairs."""
    if len(diffs) == 0:
        return float("nan")
    p = 1.0 / (1.0 + np.exp(-np.concatenate([diffs, -diffs])))
    y = np.concatenate([np.ones_like(diffs), np.zeros_like(diffs)])
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (p >= lo) & (p < hi) if hi < 1 else (p >= lo)
        if sel.any():
            ece += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(ece)


def evaluate_pairs(reward: torch.nn.Module, tensors: ContextTensors, pairs: list) -> dict:
    diffs = score_pairs(reward, tensors, pairs)
    if len(diffs) == 0:
        return {"heldout_pairs": 0, "pairwise_accuracy": float("nan"), "calibration_ece": float("nan")}
    return {"heldout_pairs": int(len(diffs)), "pairwise_accuracy": float((diffs > 0).mean()),
            "calibration_ece": calibration_error(diffs)}


def _sample(items: list, n: int, rng: random.Random) -> list:
    return [items[rng.randrange(len(items))] for _ in range(n)] if items else []


def train_reward(reward: torch.nn.Module, data: TrainingSet, tensors: ContextTensors, cfg: RewardTrainConfig,
                 wrap=lambda m: m) -> dict:
    """Warm-started retrain. Each step draws a minibatch per signal and sums the weighted losses.
    `wrap` lets the caller put the model under DistributedDataParallel."""
    pairs_train, pairs_held = split(data.pairs, cfg.heldout_share)
    before = evaluate_pairs(reward, tensors, pairs_held)
    rng = random.Random(cfg.seed)
    model = wrap(reward)
    opt = torch.optim.AdamW(reward.parameters(), lr=cfg.lr, weight_decay=0.01)
    sources = [(name, items) for name, items in (("pairs", pairs_train), ("ratings", data.ratings),
                                                 ("binary", data.binary)) if items]
    losses = []
    if not sources:
        return {"steps": 0, "loss": [], "before": before, "after": before}
    per_source = max(8, cfg.batch_size // len(sources))
    reward.train()
    for _ in (bar := tqdm(range(cfg.steps), desc="reward model", leave=False)):
        total = 0.0
        for name, items in sources:
            batch = _sample(items, per_source, rng)
            ctx = [b[0] for b in batch]
            px, ids, mask = tensors.inputs(ctx)
            w = torch.tensor([b[-1] for b in batch], dtype=torch.float32)
            if name == "pairs":
                rids, rmask = tensors.responses([b[1] for b in batch] + [b[2] for b in batch])
                r = model(px.repeat(2, 1, 1, 1), ids.repeat(2, 1), mask.repeat(2, 1), rids, rmask)
                total = total + bradley_terry_loss(r[: len(batch)], r[len(batch):], w)
            else:
                rids, rmask = tensors.responses([b[1] for b in batch])
                r = model(px, ids, mask, rids, rmask)
                target = torch.tensor([b[2] for b in batch])
                total = total + (rating_loss(r, target, weight=w) if name == "ratings"
                                 else unpaired_binary_loss(r, target, weight=w))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(reward.parameters(), 1.0)
        opt.step()
        losses.append(float(total.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    after = evaluate_pairs(reward, tensors, pairs_held)
    return {"steps": cfg.steps, "loss": losses, "before": before, "after": after,
            "train_pairs": len(pairs_train)}
