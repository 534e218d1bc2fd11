"""The gate before redeploy: the candidate must beat the serving version on held-out prompts by
reward-model score; where there is a labeled eval set (the team's own, `--eval-set`; the demo
writes its gold oracle as one) it must not be worse on it than serving by more than a margin;
and it must stay inside the KL budget. A candidate that fails is kept but not deployed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from fuseloop.families import ModelFamily
from trainer.batches import ContextTensors, tokens_to_inputs
from trainer.signals import Context

GoldCheck = Callable[[nn.Module], float]  # a policy's accuracy on labeled data (evaluation only)


@dataclass(frozen=True)
class GateConfig:
    min_reward_gain: float = 0.0  # candidate's mean RM score must exceed serving's by more than this
    eval_margin: float = 0.0  # on the eval set the candidate may score at most this much below serving
    kl_budget: float = 3.0


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    reward_candidate: float = 0.0
    reward_serving: float = 0.0
    gold_candidate: float | None = None
    gold_serving: float | None = None
    kl: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def mean_greedy_reward(family: ModelFamily, policy: nn.Module, reward: nn.Module, tensors: ContextTensors,
                       contexts: list[Context], batch_size: int = 256) -> float:
    policy.eval()
    reward.eval()
    scores = []
    pre = tensors.pre
    with torch.no_grad():
        for i in range(0, len(contexts), batch_size):
            px, ids, mask = tensors.inputs(contexts[i: i + batch_size])
            tokens, _ = family.generate(policy, px, ids, mask, pre.config.max_response_tokens, 0.0)
            inp, imask = tokens_to_inputs(tokens, pre.bos_id, pre.eos_id)
            scores.append(reward(px, ids, mask, inp, imask))
    return float(torch.cat(scores).mean()) if scores else float("nan")


def run_gate(family: ModelFamily, candidate: nn.Module, serving: nn.Module, reward: nn.Module, tensors: ContextTensors,
             heldout: list[Context], kl: float, cfg: GateConfig, gold: GoldCheck | None = None) -> GateResult:
    res = GateResult(passed=True, kl=kl)
    res.reward_candidate = mean_greedy_reward(family, candidate, reward, tensors, heldout)
    res.reward_serving = mean_greedy_reward(family, serving, reward, tensors, heldout)
    gain = res.reward_candidate - res.reward_serving
    if not gain > cfg.min_reward_gain:
        res.passed = False
        res.reasons.append(f"reward-model score {res.reward_candidate:.3f} does not beat serving "
                           f"{res.reward_serving:.3f} by more than {cfg.min_reward_gain}")
    if gold is not None:
        res.gold_candidate, res.gold_serving = gold(candidate), gold(serving)
        if res.gold_candidate < res.gold_serving - cfg.eval_margin:
            res.passed = False
            res.reasons.append(f"eval-set accuracy {res.gold_candidate:.3f} is below serving's {res.gold_serving:.3f} "
                               f"by more than the margin {cfg.eval_margin:g}")
    if kl > cfg.kl_budget:
        res.passed = False
        res.reasons.append(f"KL to the reference {kl:.3f} is over the budget {cfg.kl_budget}")
    return res
