"""The built-in family: fuseloop/model.py's fused encoder-decoder (`FusedPolicy`) and its reward
model, behind the family interface. It prefills into a cross-attention memory and an empty cache."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fuseloop.families.base import DecodeState, Graph, ModelFamily, Stepper
from fuseloop.model import FusedPolicy, ModelConfig, RewardModel, generate
from fuseloop.repository import DECODER, ENCODER, REWARD

CONFIG, WEIGHTS = "config.json", "model.safetensors"


class EncoderGraph(nn.Module):
    """Prefill: image + prompt -> fused memory (B, M, d) and its mask (B, M)."""

    def __init__(self, policy: FusedPolicy) -> None:
        super().__init__()
        self.encoder = policy.encoder

    def forward(self, pixel_values, prompt_ids, prompt_mask):
        return self.encoder(pixel_values, prompt_ids, prompt_mask)


class DecoderStepGraph(nn.Module):
    """One decoder pass with a KV cache -> logits (B, T, V), present (B, 2L, H, P+T, hd)."""

    def __init__(self, policy: FusedPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, position_ids, attention_mask, memory, memory_mask, past):
        return self.policy.decode_step(input_ids, position_ids, attention_mask, memory, memory_mask, past)


class BuiltinStepper(Stepper):
    feeds = {**Stepper.feeds, ENCODER: frozenset({"pixel_values", "prompt_ids", "prompt_mask"}),
             DECODER: frozenset({"attention_mask", "input_ids", "memory", "memory_mask", "past", "position_ids"})}

    def prefill(self, pixel_values, prompt_ids, prompt_mask) -> DecodeState:
        memory, memory_mask = self.run(ENCODER, {"pixel_values": pixel_values, "prompt_ids": prompt_ids,
                                                 "prompt_mask": prompt_mask})
        c = self.model_config
        B = len(memory)
        return DecodeState(
            tokens=np.full(B, int(c["bos_id"]), dtype=np.int64), positions=np.zeros(B, dtype=np.int64),
            past=np.zeros((B, 2 * c["n_decoder_layers"], c["n_heads"], 0, c["d_model"] // c["n_heads"]), dtype=np.float32),
            past_mask=np.zeros((B, 0), dtype=np.int64), memory=memory, memory_mask=memory_mask, past_axis=3)

    def vocab_size(self) -> int:
        return int(self.model_config["vocab_size"])

    def max_positions(self) -> int:
        return int(self.model_config["max_response_tokens"]) + 1  # the decoder's table: BOS + response

    def max_tokens(self) -> dict[str, int]:
        c = self.model_config
        return {"prompt_ids": int(c["max_prompt_tokens"]), "response_ids": int(c["max_response_tokens"]) + 1}

    def step_inputs(self, state: DecodeState, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": state.tokens[:, None], "position_ids": state.positions[:, None],
                "attention_mask": attention_mask, "memory": state.memory, "memory_mask": state.memory_mask,
                "past": state.past}


class BuiltinFamily(ModelFamily):
    name = "builtin"
    stepper_class = BuiltinStepper

    # -- building, loading, saving -----------------------------------------------------------
    def build(self, config: dict) -> FusedPolicy:
        return FusedPolicy(model_config(config))

    def config_of(self, policy: nn.Module) -> dict:
        return policy.cfg.to_dict()

    def reward_model_from_policy(self, policy: nn.Module) -> RewardModel:
        return RewardModel.from_policy(policy)

    def save(self, module: nn.Module, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        kind = "reward" if isinstance(module, RewardModel) else "policy"
        (directory / CONFIG).write_text(json.dumps({"family": self.name, "kind": kind, **module.cfg.to_dict()}, indent=2))
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(directory / WEIGHTS))

    def load_policy(self, directory: Path) -> FusedPolicy:
        return self._load(FusedPolicy, Path(directory))

    def load_reward(self, directory: Path) -> RewardModel:
        return self._load(RewardModel, Path(directory))

    def _load(self, cls, directory: Path):
        module = cls(model_config(json.loads((directory / CONFIG).read_text())))
        module.load_state_dict(load_file(str(directory / WEIGHTS)))
        return module

    # -- training ------------------------------------------------------------------------------
    def token_logits(self, policy, pixel_values, prompt_ids, prompt_mask, input_ids, input_mask) -> torch.Tensor:
        return policy(pixel_values, prompt_ids, prompt_mask, input_ids, input_mask)

    def generate(self, policy, pixel_values, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, top_p=1.0,
                 generator=None):
        return generate(policy, pixel_values, prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, generator)

    # -- serving -------------------------------------------------------------------------------
    def graphs(self, policy: FusedPolicy, reward: RewardModel, batch: int = 2, seed: int = 0,
               prompt_len: int = 5, past_len: int = 3) -> dict[str, Graph]:
        """Example inputs exercise padding: a masked prompt token, a left-padded cache row and a
        shorter response."""
        cfg = policy.cfg
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
        prompt_ids = torch.randint(4, cfg.vocab_size, (batch, prompt_len), generator=g)
        prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long)
        prompt_mask[0, -1] = 0
        with torch.no_grad():
            memory, memory_mask = policy.encoder(pixels, prompt_ids, prompt_mask)
        T = 2  # not 1: torch.export would specialize a size-1 dimension
        step = dict(
            input_ids=torch.randint(4, cfg.vocab_size, (batch, T), generator=g),
            position_ids=torch.full((batch, T), past_len, dtype=torch.long),
            attention_mask=torch.ones(batch, past_len + T, dtype=torch.long),
            memory=memory, memory_mask=memory_mask,
            past=torch.randn(batch, 2 * cfg.n_decoder_layers, cfg.n_heads, past_len, cfg.head_dim, generator=g),
        )
        step["attention_mask"][0, 0] = 0
        resp_len = 4
        response_ids = torch.randint(4, cfg.vocab_size, (batch, resp_len), generator=g)
        response_mask = torch.ones(batch, resp_len, dtype=torch.long)
        response_mask[-1, -1] = 0
        encoder = dict(pixel_values=pixels, prompt_ids=prompt_ids, prompt_mask=prompt_mask)
        B, S, N, M, R = (torch.export.Dim(n, min=1, max=4096) for n in ("batch", "prompt", "new", "memory", "resp"))
        P = torch.export.Dim("past", min=0, max=4096)
        prompt_axes = {"pixel_values": {0: B}, "prompt_ids": {0: B, 1: S}, "prompt_mask": {0: B, 1: S}}
        return {
            ENCODER: Graph(EncoderGraph(policy), encoder, ["memory", "memory_mask"], prompt_axes),
            DECODER: Graph(DecoderStepGraph(policy), step, ["logits", "present"],
                           {"input_ids": {0: B, 1: N}, "position_ids": {0: B, 1: N},
                            "attention_mask": {0: B, 1: torch.export.Dim.AUTO}, "memory": {0: B, 1: M},
                            "memory_mask": {0: B, 1: M}, "past": {0: B, 3: P}}),
            REWARD: Graph(reward, dict(encoder, response_ids=response_ids, response_mask=response_mask), ["reward"],
                          {**prompt_axes, "response_ids": {0: B, 1: R}, "response_mask": {0: B, 1: R}}),
        }


def model_config(config: dict) -> ModelConfig:
    """A ModelConfig from a dict that may carry other keys (config.json's family and kind)."""
    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in config.items() if k in names})
