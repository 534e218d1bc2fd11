"""Next-token sampling in numpy, for serving: the same rule as `fuseloop.model.sample_tokens` (torch).

Temperature 0 is greedy (argmax of the raw logits, first index on ties, as torch.argmax), with the
logprob under the untempered softmax. Otherwise logits are divided by the temperature, nucleus
filtering keeps the smallest prefix of the sorted distribution whose mass reaches top_p (a token is
dropped when the mass *before* it already exceeds top_p), and the logprob is under that filtered,
renormalized distribution: what the trainer reads as log pi(token | prefix).

Each row has its own temperature, top_p and random generator, so sequences batched together keep
independent, reproducible samples.
"""

from __future__ import annotations

import random

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def filtered_logprobs(logits: np.ndarray, temperature: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """(B, V) logits -> (B, V) log-probabilities of the tempered, nucleus-filtered distribution
    (-inf for dropped tokens). Rows with temperature <= 0 get the untempered distribution."""
    logits = np.asarray(logits, dtype=np.float64)
    t = np.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    filt = (top_p < 1.0) & (temperature > 0)  # greedy ignores top_p, as in torch
    if np.any(filt):
        order = np.argsort(-scaled, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(scaled, order, axis=-1)
        probs = np.exp(log_softmax(sorted_logits))
        drop = (np.cumsum(probs, axis=-1) - probs) > top_p[:, None]
        drop &= filt[:, None]
        sorted_logits = np.where(drop, -np.inf, sorted_logits)
        np.put_along_axis(scaled, order, sorted_logits, axis=-1)
    return log_softmax(scaled)


def sample_next(logits: np.ndarray, temperature: np.ndarray, top_p: np.ndarray,
                uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One token per row: logits (B, V); temperature, top_p, uniforms (B,), uniforms in [0, 1)
    (the caller draws them from each sequence's own generator; ignored for greedy rows).
    Returns tokens (B,) int64 and their logprobs (B,) float32."""
    logits = np.asarray(logits)
    temperature = np.asarray(temperature, dtype=np.float64)
    greedy = temperature <= 0
    if greedy.all():  # the common serving case: no sorting, no cumulative sums
        tokens = np.argmax(logits, axis=-1).astype(np.int64)
        x = logits.astype(np.float64)
        top = np.take_along_axis(x, tokens[:, None], axis=-1)[:, 0]
        lse = top + np.log(np.sum(np.exp(x - top[:, None]), axis=-1))
        return tokens, (top - lse).astype(np.float32)
    top_p = np.asarray(top_p, dtype=np.float64)
    logp = filtered_logprobs(logits, temperature, top_p)
    # Inverse CDF: the first token whose cumulative mass exceeds u; dropped tokens add no mass.
    cdf = np.cumsum(np.exp(logp), axis=-1)
    u = np.asarray(uniforms, dtype=np.float64)[:, None] * cdf[:, -1:]
    sampled = np.minimum(np.sum(cdf <= u, axis=-1), logits.shape[-1] - 1)
    tokens = np.where(greedy, np.argmax(logits, axis=-1), sampled).astype(np.int64)
    return tokens, np.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0].astype(np.float32)


def sequence_rng(seed: int | None, index: int) -> random.Random:
    """The uniform stream of candidate `index` of a request seeded with `seed`: reproducible and
    distinct per candidate (string seeds hash with SHA-512, the same in every process). A stdlib
    generator: one draw per token per sequence, where numpy's per-call overhead would dominate."""
    if seed is None:
        return random.Random()
    return random.Random(f"fuseloop:{int(seed)}:{int(index)}")
