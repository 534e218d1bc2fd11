"""Gold evaluation of a policy on task examples (used by pretraining, the gate and the demo;
the oracle never feeds a training loss)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from fuseloop.families import ModelFamily
from fuseloop.preprocessing import Preprocessor
from fuseloop.scenes import Example, GoldOracle, render


@dataclass
class GoldReport:
    accuracy: float
    by_kind: dict[str, float]
    answers: list[str]


def example_batches(examples: list[Example], batch_size: int):
    for i in range(0, len(examples), batch_size):
        yield examples[i: i + batch_size]


def encode_examples(pre: Preprocessor, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels = torch.from_numpy(pre.images([render(e.scene) for e in examples]))
    ids, mask = pre.prompts([e.prompt for e in examples])
    return pixels, torch.from_numpy(ids), torch.from_numpy(mask)


def policy_answers(family: ModelFamily, policy: nn.Module, pre: Preprocessor, examples: list[Example],
                   temperature: float = 0.0, seed: int = 0, batch_size: int = 256) -> list[str]:
    policy.eval()
    gen = torch.Generator().manual_seed(seed)
    answers = []
    for batch in example_batches(examples, batch_size):
        pixels, ids, mask = encode_examples(pre, batch)
        tokens, _ = family.generate(policy, pixels, ids, mask, pre.config.max_response_tokens, temperature, 1.0, gen)
        answers += [pre.decode(row.tolist()) for row in tokens]
    return answers


def gold_accuracy(family: ModelFamily, policy: nn.Module, pre: Preprocessor, examples: list[Example],
                  temperature: float = 0.0, oracle: GoldOracle | None = None, seed: int = 0) -> GoldReport:
    """Share of fully correct answers, greedy by default."""
    oracle = oracle or GoldOracle()
    answers = policy_answers(family, policy, pre, examples, temperature, seed)
    correct = np.array([oracle.correct(e, a) for e, a in zip(examples, answers)], dtype=np.float64)
    by_kind = {k: float(correct[[e.kind == k for e in examples]].mean())
               for k in sorted({e.kind for e in examples})}
    return GoldReport(float(correct.mean()), by_kind, answers)
