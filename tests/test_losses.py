"""Each loss against values computed by hand."""

import math

import pytest
import torch

from trainer.losses import (bradley_terry_loss, kl_penalized_rewards, normalize_rewards, policy_gradient_loss,
                            rating_loss, rloo_advantages, token_cross_entropy, unpaired_binary_loss)


def close(a, b, tol=1e-5):
    return abs(float(a) - b) < tol


def test_bradley_terry():
    # -log sigmoid(2 - 1) = log(1 + e^-1) = 0.313262
    assert close(bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0])), math.log(1 + math.exp(-1)))
    # weighted mean of -log sigmoid(0) = log 2 and -log sigmoid(-1) = 1.313262 with weights 1 and 3
    got = bradley_terry_loss(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0]))
    assert close(got, (math.log(2) + 3 * 1.3132617) / 4)


def test_rating_regression_targets():
    # stars 5 -> target +2, stars 1 -> target -2 (scale 2); r = (1, -1): ((1-2)^2 + (-1+2)^2) / 2 = 1
    assert close(rating_loss(torch.tensor([1.0, -1.0]), torch.tensor([5, 1])), 1.0)
    assert close(rating_loss(torch.tensor([0.5]), torch.tensor([3])), 0.25)


def test_unpaired_binary_kto_style():
    # up: -log sigmoid(1) = 0.313262 ; down: -log sigmoid(-(1)) = 1.313262 ; mean = 0.813262
    assert close(unpaired_binary_loss(torch.tensor([1.0, 1.0]), torch.tensor([1, 0])), (0.3132617 + 1.3132617) / 2)
    # a reference point shifts the logit: r = 1, z0 = 1 -> log 2
    assert close(unpaired_binary_loss(torch.tensor([1.0]), torch.tensor([1]), reference_point=1.0), math.log(2))


def test_token_cross_entropy_ignores_masked_positions():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    targets = torch.tensor([[0, 2]])
    assert close(token_cross_entropy(logits, targets, torch.tensor([[1, 0]])), -math.log(0.5))
    assert close(token_cross_entropy(logits, targets, torch.tensor([[1, 1]])), -(math.log(0.5) + math.log(0.8)) / 2)


def test_rloo_leave_one_out_baseline():
    # rewards (1, 2, 3): baselines (2.5, 2, 1.5) -> advantages (-1.5, 0, 1.5)
    assert torch.allclose(rloo_advantages(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[-1.5, 0.0, 1.5]]))
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([[1.0]]))


def test_kl_penalty_and_policy_gradient():
    logp = torch.tensor([[-0.5, -0.5], [-1.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0], [-1.0, 0.0]])
    # sequence KLs (1.0, 0.0); beta 0.1 -> rewards (1 - 0.1, 2 - 0)
    assert torch.allclose(kl_penalized_rewards(torch.tensor([1.0, 2.0]), logp, ref, 0.1), torch.tensor([0.9, 2.0]))
    # -mean(A * sum logp) with A = (1, -1): -(1 * -1.0 + -1 * -1.0) / 2 = 0
    assert close(policy_gradient_loss(logp, torch.tensor([1.0, -1.0])), 0.0)
    assert close(policy_gradient_loss(logp, torch.tensor([2.0, 0.0])), 1.0)  # -(2 * -1.0 + 0) / 2


def test_reward_normalization():
    out = normalize_rewards(torch.tensor([1.0, 3.0]))
    assert torch.allclose(out, torch.tensor([-1.0, 1.0]), atol=1e-5)
