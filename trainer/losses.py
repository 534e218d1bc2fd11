"""The training losses, one small pure function per signal. Each docstring gives the formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise preference (Bradley-Terry): L = -mean_i w_i * log sigmoid(r_chosen_i - r_rejected_i)."""
    loss = -F.logsigmoid(chosen - rejected)
    return _weighted_mean(loss, weight)


def _weighted_mean(loss: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp(min=1e-8)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Supervised next-token loss: L = -sum_t m_t log p(y_t | y_<t) / sum_t m_t."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    mask = mask.reshape(-1).float()
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)
