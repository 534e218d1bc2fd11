"""The model-family interface: everything the engine, runtime, export, trainer and gate need to
know about a model architecture, and nothing more.

A family has two sides:

- `ModelFamily` (training, torch): build or load a policy, save it, teacher-forced logits,
  sequence logprobs, generation, the reward head, and the graphs it exports to ONNX.
- `Stepper` (serving, numpy): over a version's exported graphs, `prefill` a batch of prompts into
  a `DecodeState`, then `step` it one token at a time; and `score` with the reward graph.

Every family exports three graphs under the repository's three names (ENCODER, DECODER, REWARD),
in these roles: prefill (image + prompt -> decode state), one decode step, the reward model. Their
inputs and outputs are the family's own; the manifest records them. An encoder-decoder family
prefills into a cross-attention `memory` and an empty `past`; a decoder-only (LLaVA-style) family
splices the image features into the prompt's embeddings and prefills into a `past` (KV cache) with
an empty `memory`. The engine batches `DecodeState` rows the same way for both. A stepper may run
any of its version's graphs: a family whose decoder also reads the prompt prefills with the
encoder graph, then the step graph over the prompt (memory and past both non-empty).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from fuseloop.repository import DECODER, ENCODER, REWARD

# Runs one exported graph of a loaded version: graph name, inputs by name -> its outputs, in the
# order its signature lists them. ONNX Runtime and Triton each provide one.
GraphRunner = Callable[[str, dict[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class Graph:
    """One graph a family exports: the module traced, well-formed example inputs (by name, in the
    graph's input order; also the parity check's inputs), output names, and dynamic axes as
    `torch.onnx.export(dynamic_shapes=...)` takes them (input name -> {axis: torch.export.Dim})."""

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic_shapes: dict[str, dict[int, Any]]


@dataclass
class DecodeState:
    """Rows being decoded together, batch first. The engine joins, repeats and drops rows with the
    methods below, which know nothing about any family.

    tokens (B,) int64: the token each row feeds next; positions (B,) int64: its position id.
    past: the KV cache, one array (a family stacks its layers' keys and values into it), its
    sequence along `past_axis`, left-padded; past_mask (B, P) int64: 1 where the cache is real.
    memory (B, M, ...): what each row cross-attends to, fixed while it decodes, right-padded;
    memory_mask (B, M) int64. A decoder-only family has M = 0.
    """

    tokens: np.ndarray
    positions: np.ndarray
    past: np.ndarray
    past_mask: np.ndarray
    memory: np.ndarray
    memory_mask: np.ndarray
    past_axis: int = 3

    def __len__(self) -> int:
        return len(self.tokens)

    def _map(self, fn: Callable[[np.ndarray], np.ndarray]) -> "DecodeState":
        # The constructor, not dataclasses.replace: this runs whenever rows join or leave.
        return DecodeState(fn(self.tokens), fn(self.positions), fn(self.past), fn(self.past_mask), fn(self.memory),
                           fn(self.memory_mask), self.past_axis)

    def repeat(self, counts: list[int]) -> "DecodeState":
        """Row i repeated counts[i] times (one row per candidate of a request)."""
        return self._map(lambda v: np.repeat(v, counts, axis=0))

    def take(self, rows: np.ndarray) -> "DecodeState":
        """The rows at the indices `rows`, without the padding that no remaining row needs: cache
        columns on the left and memory columns on the right that every remaining row masks."""
        past_mask, memory_mask = self.past_mask[rows], self.memory_mask[rows]
        real = past_mask.any(axis=0)
        start = int(real.argmax()) if real.any() else real.shape[0]
        used = memory_mask.any(axis=0)
        end = used.shape[0] - int(used[::-1].argmax()) if used.any() else 0
        past = self.past[rows]
        if start:
            past = _slice(past, self.past_axis, start, past.shape[self.past_axis])
        return DecodeState(self.tokens[rows], self.positions[rows], past, past_mask[:, start:],
                           self.memory[rows][:, :end], memory_mask[:, :end], self.past_axis)

    @classmethod
    def concat(cls, states: list["DecodeState"]) -> "DecodeState":
        """Stacks rows: caches left-padded to the longest, memories right-padded to the longest."""
        axis = states[0].past_axis
        P = max(s.past_mask.shape[1] for s in states)
        M = max(s.memory_mask.shape[1] for s in states)
        return cls(
            tokens=np.concatenate([s.tokens for s in states]),
            positions=np.concatenate([s.positions for s in states]),
            past=np.concatenate([_pad(s.past, axis, P, left=True) for s in states]),
            past_mask=np.concatenate([_pad(s.past_mask, 1, P, left=True) for s in states]),
            memory=np.concatenate([_pad(s.memory, 1, M) for s in states]),
            memory_mask=np.concatenate([_pad(s.memory_mask, 1, M) for s in states]),
            past_axis=axis,
        )


def _slice(x: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _pad(x: np.ndarray, axis: int, size: int, left: bool = False) -> np.ndarray:
    """Zero-pads `axis` up to `size` (np.pad is slow for the engine's hot path)."""
    n = x.shape[axis]
    if n >= size:
        return x
    shape = list(x.shape)
    shape[axis] = size
    out = np.zeros(shape, dtype=x.dtype)
    index = [slice(None)] * x.ndim
    index[axis] = slice(size - n, size) if left else slice(0, n)
    out[tuple(index)] = x
    return out


class Stepper(ABC):
    """The serving side of a family over one version's graphs (numpy in, numpy out).

    `feeds`: the input names this stepper gives each graph it runs. A version is loaded only when
    its manifest's graphs take exactly these (`check_feeds`), so a version exported by another
    fuseloop release, whose graphs take other inputs, is refused at load, not at a request."""

    feeds: dict[str, frozenset[str]] = {
        REWARD: frozenset({"pixel_values", "prompt_ids", "prompt_mask", "response_ids", "response_mask"})}

    def __init__(self, model_config: dict, run: GraphRunner) -> None:
        self.model_config = model_config
        self.run = run

    @classmethod
    def check_feeds(cls, signatures: dict[str, dict[str, list[dict]]]) -> list[str]:
        """-> what does not match between `feeds` and a manifest's signatures, one line a graph."""
        problems = []
        for graph, names in sorted(cls.feeds.items()):
            takes = {t["name"] for t in signatures.get(graph, {}).get("inputs", [])}
            if takes != names:
                problems.append(f"{graph} takes {sorted(takes)}, where this release feeds it {sorted(names)}")
        return problems

    @abstractmethod
    def prefill(self, pixel_values: np.ndarray, prompt_ids: np.ndarray, prompt_mask: np.ndarray) -> DecodeState:
        """pixel_values (B, 3, H, W) float32, prompt_ids and prompt_mask (B, S) int64 (right-padded)
        -> one row per prompt, ready for its first `step`. Its `tokens` are what the first step
        feeds: BOS for an encoder-decoder family; a decoder-only family may prefill all but each
        prompt's last token and feed that one, so every step yields the next response token."""

    @abstractmethod
    def step_inputs(self, state: DecodeState, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """The DECODER graph's inputs for one step of `state` (attention_mask: past + the new token)."""

    def step(self, state: DecodeState) -> np.ndarray:
        """Feeds `state.tokens`; returns the logits (B, V) float32 of the token after each. Advances
        `state` in place: the cache and its mask grow by one column, positions by one. The caller
        then sets `state.tokens` to what it sampled. The DECODER graph returns (logits, present)."""
        attention = np.concatenate([state.past_mask, np.ones((len(state), 1), dtype=np.int64)], axis=1)
        logits, present = self.run(DECODER, self.step_inputs(state, attention))
        state.past, state.past_mask = present, attention
        state.positions = state.positions + 1
        return logits[:, -1]

    # -- what the graphs accept: a server checks a client's tensors against these before running
    # a graph for it (KServe ModelInfer). Read them from the model config.
    def vocab_size(self) -> int:
        """Token ids (every `*_ids` input but position_ids) are 0 .. vocab_size - 1."""
        raise NotImplementedError(f"{type(self).__name__} does not say its vocabulary size")

    def max_positions(self) -> int:
        """The text model's position table: position ids are below it, and a sequence it reads
        (past + new tokens, or a prompt and a response joined) is at most this long."""
        raise NotImplementedError(f"{type(self).__name__} does not say its number of positions")

    def max_tokens(self) -> dict[str, int]:
        """Token-id inputs with a position table of their own -> the most tokens each takes (the
        built-in model embeds prompts and responses apart); the others count against
        `max_positions` together. None by default."""
        return {}

    def score(self, pixel_values: np.ndarray, prompt_ids: np.ndarray, prompt_mask: np.ndarray,
              response_ids: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
        """Rewards (B,) float32; response_ids: [BOS] + response + [EOS], right-padded. Every family's
        REWARD graph takes these five inputs."""
        (reward,) = self.run(REWARD, {"pixel_values": pixel_values, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                                      "response_ids": response_ids, "response_mask": response_mask})
        return reward


class ModelFamily(ABC):
    """The training side of a family. Methods take the modules they work on: a family holds no
    weights, so one instance serves every checkpoint of its kind.

    Inputs are the Preprocessor's tensors: pixel_values (B, 3, H, W) float32, prompt_ids and
    prompt_mask (B, S) int64, decoder inputs [BOS] + response (B, T) with their mask, right-padded.
    """

    name: str = "family"
    stepper_class: type[Stepper]

    # -- building, loading, saving -----------------------------------------------------------
    @abstractmethod
    def build(self, config: dict) -> nn.Module:
        """A fresh policy from a config (the dict `config_of` gives)."""

    @abstractmethod
    def config_of(self, policy: nn.Module) -> dict:
        """The policy's architecture as JSON-able config; the manifest records it, and two
        versions with equal configs can share exported graphs."""

    @abstractmethod
    def reward_model_from_policy(self, policy: nn.Module) -> nn.Module:
        """A reward model that starts from the policy's trunk, with a fresh scalar head. Its
        forward(pixel_values, prompt_ids, prompt_mask, response_ids, response_mask) -> (B,) rewards
        (response_ids [BOS] + response + [EOS], right-padded): the trainer and gate call it so."""

    @abstractmethod
    def save(self, module: nn.Module, directory: Path) -> None:
        """Writes a policy or reward model as `save_pretrained` does: config.json + model.safetensors."""

    def save_assets(self, preprocessor: Any, directory: Path) -> None:
        """Beside a policy `save` wrote, what a `from_pretrained` user needs to run it (a Hugging
        Face family: the tokenizer and image processor). The built-in model needs nothing."""

    def preprocess_config(self, policy: nn.Module, tokenizer: Any, config: Any) -> Any:
        """The PreprocessConfig a model directory's policy needs, from the one given (a
        decoder-only family sets its image placeholders). As given by default."""
        return config

    @abstractmethod
    def load_policy(self, directory: Path) -> nn.Module:
        """Reads back what `save` wrote for a policy."""

    @abstractmethod
    def load_reward(self, directory: Path) -> nn.Module:
        """Reads back what `save` wrote for a reward model."""

    # -- training ------------------------------------------------------------------------------
    @abstractmethod
    def token_logits(self, policy: nn.Module, pixel_values: torch.Tensor, prompt_ids: torch.Tensor,
                     prompt_mask: torch.Tensor, input_ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V): position t predicts input_ids[:, t + 1]."""

    def sequence_logprobs(self, policy: nn.Module, pixel_values: torch.Tensor, prompt_ids: torch.Tensor,
                          prompt_mask: torch.Tensor, input_ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        """Per-token log pi(y_t | image, prompt, y_<t) (B, T-1) for inputs [BOS] y_1..y_n, 0 where padding."""
        logits = self.token_logits(policy, pixel_values, prompt_ids, prompt_mask, input_ids, input_mask)[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return logp * input_mask[:, 1:]

    @abstractmethod
    def generate(self, policy: nn.Module, pixel_values: torch.Tensor, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples (greedy at temperature 0) -> tokens (B, T) (EOS included, PAD after it) and their
        logprobs (B, T) under the tempered distribution (0 after EOS)."""

    # -- serving -------------------------------------------------------------------------------
    @abstractmethod
    def graphs(self, policy: nn.Module, reward: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, Graph]:
        """The three graphs to export, by repository name (ENCODER: prefill, DECODER: one step,
        REWARD), with example inputs of `batch` rows drawn with `seed`. Each module's state_dict
        names are its graph's initializers (a later version of the same config swaps weights in)."""

    def stepper(self, model_config: dict, run: GraphRunner) -> Stepper:
        """The serving side over a version's graphs, which `run` executes."""
        return self.stepper_class(model_config, run)

