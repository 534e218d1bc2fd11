"""RLOO policy-gradient updates of a family's policy against the reward model, with a KL penalty
to the reference (pre-RL) policy, reward normalization and a hard KL budget.

Full fine-tuning trains every weight against a frozen reference model. With LoRA
(`lora_rank`, Hugging Face families: fuseloop/families/hf_lora.py) only the adapters train and
the reference is the same model with its adapters switched off (`reference` None)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from fuseloop.families import ModelFamily
from trainer.batches import ContextTensors, tokens_to_inputs
from trainer.losses import (kl_penalized_rewards, normalize_rewards, policy_gradient_loss, rloo_advantages,
                            token_cross_entropy)
from trainer.signals import Context


@dataclass(frozen=True)
class PolicyGradientConfig:
    steps: int = 40
    prompts_per_step: int = 32
    samples_per_prompt: int = 4  # k, for the leave-one-out baseline
    lr: float = 3e-4
    temperature: float = 1.0
    kl_beta: float = 0.1
    kl_budget: float = 3.0  # nats per response, mean over a batch; updates stop past it
    demo_weight: float = 0.5  # supervised term on corrections
    demo_batch: int = 16
    seed: int = 0
    lora_rank: int = 0  # > 0: train rank-r LoRA adapters only (Hugging Face families); 0: every weight


class SequenceLogprobs(torch.nn.Module):
    """The policy's per-token logprobs as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, family: ModelFamily, policy: nn.Module) -> None:
        super().__init__()
        self.family = family
        self.policy = policy

    def forward(self, pixel_values, prompt_ids, prompt_mask, input_ids, input_mask):
        return self.family.sequence_logprobs(self.policy, pixel_values, prompt_ids, prompt_mask, input_ids, input_mask)


LogprobsFn = Callable[..., torch.Tensor]  # (pixel_values, prompt_ids, prompt_mask, input_ids, input_mask) -> (B, T-1)


def reference_logprobs(family: ModelFamily, policy: nn.Module, reference: nn.Module | None) -> LogprobsFn:
    """log pi_ref of the KL term, without gradients: the frozen `reference` model's, or with
    `reference` None, the LoRA `policy`'s own base weights (its adapters off: no second copy)."""
    if reference is not None:
        reference.eval()

        def frozen(*inputs) -> torch.Tensor:
            with torch.no_grad():
                return family.sequence_logprobs(reference, *inputs)
        return frozen
    from fuseloop.families import hf_lora  # peft loads only for LoRA rounds

    return lambda *inputs: hf_lora.reference_logprobs(policy, family.sequence_logprobs, *inputs)


def sequence_kl(family: ModelFamily, policy: nn.Module, reference: nn.Module | None, tensors: ContextTensors,
                contexts: list[Context], temperature: float = 1.0, samples: int = 2, seed: int = 0) -> float:
    """Monte-Carlo KL(pi || pi_ref) per response: mean over samples of sum_t log pi - log pi_ref
    (`reference` None: the LoRA policy's base, as in `reference_logprobs`)."""
    gen = torch.Generator().manual_seed(seed)
    px, ids, mask = tensors.inputs(contexts)
    px, ids, mask = px.repeat(samples, 1, 1, 1), ids.repeat(samples, 1), mask.repeat(samples, 1)
    pre = tensors.pre
    policy.eval()
    with torch.no_grad():
        tokens, _ = family.generate(policy, px, ids, mask, pre.config.max_response_tokens, temperature, 1.0, gen)
        inp, imask = tokens_to_inputs(tokens, pre.bos_id, pre.eos_id)
        logp = family.sequence_logprobs(policy, px, ids, mask, inp, imask)
    ref = reference_logprobs(family, policy, reference)(px, ids, mask, inp, imask)
    return float((logp - ref).sum(dim=-1).mean())


def train_policy(family: ModelFamily, policy: nn.Module, reference: nn.Module | None, reward: nn.Module,
                 contexts: list[Context], demos: list[tuple[Context, str]], tensors: ContextTensors,
                 cfg: PolicyGradientConfig, wrap=lambda m: m, reduce_mean=lambda v: v) -> dict:
    """Returns per-step curves (reward, kl, loss) and why it stopped. Updates the policy's
    trainable weights (a LoRA policy's: its adapters; `reference` None: their base is the
    reference). Under DDP, `reduce_mean` averages a float over the processes, so all of them stop
    at the same step.

    The policy stays in eval mode: dropout off (as TRL's RLOO trainer does), so log pi of a sampled
    response is taken under the distribution it was sampled from, and the KL to a reference equal
    to the policy is 0, not dropout noise. (The built-in model has no dropout; GPT-2's is 0.1.)"""
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    scorer = wrap(SequenceLogprobs(family, policy))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    ref_logprobs = reference_logprobs(family, policy, reference)
    policy.eval()
    reward.eval()
    pre = tensors.pre
    curves = {"reward": [], "kl": [], "loss": []}
    stopped = "steps done"
    for _ in (bar := tqdm(range(cfg.steps), desc="policy gradient (RLOO)", leave=False)):
        batch = [contexts[rng.randrange(len(contexts))] for _ in range(cfg.prompts_per_step)]
        k = cfg.samples_per_prompt
        px, ids, mask = tensors.inputs(batch)
        px, ids, mask = px.repeat_interleave(k, 0), ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        with torch.no_grad():
            tokens, _ = family.generate(policy, px, ids, mask, pre.config.max_response_tokens, cfg.temperature, 1.0, gen)
            inp, imask = tokens_to_inputs(tokens, pre.bos_id, pre.eos_id)
            rewards = reward(px, ids, mask, inp, imask)
        ref_logp = ref_logprobs(px, ids, mask, inp, imask)
        logp = scorer(px, ids, mask, inp, imask)
        kl = (logp.detach() - ref_logp).sum(dim=-1)  # (N*k,)
        shaped = kl_penalized_rewards(normalize_rewards(rewards), logp.detach(), ref_logp, cfg.kl_beta)
        adv = rloo_advantages(shaped.view(-1, k)).view(-1)
        loss = policy_gradient_loss(logp, adv)
        if demos and cfg.demo_weight > 0:
            d = [demos[rng.randrange(len(demos))] for _ in range(cfg.demo_batch)]
            dpx, dids, dmask = tensors.inputs([c for c, _ in d])
            rids, rmask = tensors.responses([t for _, t in d])
            logits = family.token_logits(policy, dpx, dids, dmask, rids[:, :-1], rmask[:, :-1])
            loss = loss + cfg.demo_weight * token_cross_entropy(logits, rids[:, 1:], rmask[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        curves["reward"].append(float(rewards.mean()))
        curves["kl"].append(float(kl.mean()))
        curves["loss"].append(float(loss.detach()))
        bar.set_postfix(reward=f"{curves['reward'][-1]:.3f}", kl=f"{curves['kl'][-1]:.3f}")
        if reduce_mean(float(np.mean(curves["kl"][-3:]))) > cfg.kl_budget:
            stopped = f"KL budget {cfg.kl_budget} reached"
            break
    return {"curves": curves, "stopped": stopped, "steps": len(curves["loss"])}
