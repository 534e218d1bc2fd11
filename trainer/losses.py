"""The training losses, one small pure function per signal. Each docstring gives the formula.

r denotes reward-model scores, w per-example weights (default 1); means are weighted means
sum_i w_i l_i / sum_i w_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weighted_mean(loss: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp(min=1e-8)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise preference (Bradley-Terry): l_i = -log sigmoid(r_chosen_i - r_rejected_i)."""
    return _weighted_mean(-F.logsigmoid(chosen - rejected), weight)


def rating_loss(reward: torch.Tensor, stars: torch.Tensor, scale: float = 2.0,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Ratings as regression: l_i = (r_i - scale * (stars_i - 3) / 2)^2, so 1 star -> -scale,
    3 -> 0, 5 -> +scale."""
    target = scale * (stars.to(reward.dtype) - 3.0) / 2.0
    return _weighted_mean((reward - target) ** 2, weight)


def unpaired_binary_loss(reward: torch.Tensor, label: torch.Tensor, reference_point: float = 0.0,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Thumbs and implicit signals, unpaired and binary (KTO-style reference point z0):
    l_i = -log sigmoid(r_i - z0) if label_i = 1, else -log sigmoid(z0 - r_i)."""
    sign = 2.0 * label.to(reward.dtype) - 1.0
    return _weighted_mean(-F.logsigmoid(sign * (reward - reference_point)), weight)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Supervised next-token loss (pretraining, corrections as demonstrations):
    L = -sum_t m_t log p(y_t | y_<t) / sum_t m_t."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    mask = mask.reshape(-1).float()
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out baseline over k samples per prompt; rewards (N, k):
    A_ij = r_ij - (1 / (k - 1)) * sum_{l != j} r_il."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def kl_penalized_rewards(rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Sequence rewards with a KL penalty to the reference policy:
    r'_i = r_i - beta * sum_t (log pi(y_it) - log pi_ref(y_it)); logp, ref_logp (..., T) masked with 0."""
    return rewards - beta * (logp - ref_logp).sum(dim=-1)


def policy_gradient_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE: L = -mean_i A_i * sum_t log pi(y_it | x_i, y_i<t); the advantage is a constant."""
    return -(advantages.detach() * logp.sum(dim=-1)).mean()


def normalize_rewards(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Whitening over the batch: (r - mean(r)) / (std(r) + eps)."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
