"""Family 1: `transformers.VisionEncoderDecoderModel` (a vision encoder + a text decoder with
cross-attention), loaded from a local directory.

The prompt is the decoder's prefix (chat-templated, left-padded); the image reaches the decoder
through cross-attention only. Graphs:
- encoder: pixel_values (B, 3, H, W) f32 -> encoder_hidden_states (B, N, d) f32 (after the
  model's enc_to_dec projection, when it has one);
- decoder: input_ids (B, T) i64, attention_mask (B, P+T) i64, position_ids (B, T) i64,
  encoder_hidden_states (B, N, d) f32, past (B, 2L, H, P, hd) f32 -> logits (B, T, V) f32,
  present (B, 2L, H, P+T, hd) f32. One graph for prefill (P = 0, T = prompt) and decode (T = 1).
  Cross-attention keys are recomputed from encoder_hidden_states each call, so the only cache is
  the packed self-attention `past` (see hf_layout);
- reward: pixel_values, prompt_ids (B, S), prompt_mask (B, S), response_ids (B, R),
  response_mask (B, R) -> rewards (B,) f32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from transformers import (AutoImageProcessor, AutoTokenizer, DynamicCache, EncoderDecoderCache,
                          VisionEncoderDecoderModel)

from fuseloop.families import hf_layout
from fuseloop.families.hf_layout import empty_past, pack_past, unpack_past
from fuseloop.families.hf_onnx import Graph, dim, export_graphs, greedy_generate, run
from fuseloop.families.hf_reward import HFRewardModel

ENCODER, DECODER, REWARD = "encoder", "decoder", "reward"
OUTPUTS = {ENCODER: ["encoder_hidden_states"], DECODER: ["logits", "present"], REWARD: ["rewards"]}


@dataclass
class EncoderDecoderBundle:
    """A model directory, loaded: the model, its tokenizer and its image processor."""

    model: VisionEncoderDecoderModel
    tokenizer: object
    image_processor: object

    def cache_shape(self) -> tuple[int, int, int]:
        return cache_shape(self.model)

    def inputs(self, images, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel_values, prompt_ids, prompt_mask): chat-templated decoder prefixes, left-padded."""
        pixel_values = self.image_processor(images=images, return_tensors="pt").pixel_values
        texts = [hf_layout.prompt_text(self.tokenizer, p) for p in prompts]
        seqs = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return (pixel_values, *hf_layout.pad(seqs, self.tokenizer.pad_token_id, left=True))

    def responses(self, responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return hf_layout.response_ids(self.tokenizer, responses)

    def save(self, directory: Path) -> None:
        """A directory `from_pretrained` loads (merge LoRA adapters first: `hf_lora.merged`)."""
        for part in (self.model, self.tokenizer, self.image_processor):
            part.save_pretrained(str(directory))


def load(directory: Path) -> EncoderDecoderBundle:
    d = str(directory)
    return EncoderDecoderBundle(VisionEncoderDecoderModel.from_pretrained(d, local_files_only=True),
                                AutoTokenizer.from_pretrained(d, local_files_only=True),
                                AutoImageProcessor.from_pretrained(d, local_files_only=True))


def cache_shape(model: VisionEncoderDecoderModel) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the packed past."""
    c = model.config.decoder
    return c.num_hidden_layers, c.num_attention_heads, c.hidden_size // c.num_attention_heads


def encode(model: VisionEncoderDecoderModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values (B, 3, H, W) -> encoder_hidden_states (B, N, d_decoder), as forward() feeds them."""
    hidden = model.encoder(pixel_values=pixel_values).last_hidden_state
    if hasattr(model, "enc_to_dec_proj"):
        hidden = model.enc_to_dec_proj(hidden)
    return hidden


def decode(model: VisionEncoderDecoderModel, input_ids, attention_mask, position_ids, encoder_hidden_states,
           past: torch.Tensor, lm_head: bool = True):
    """One decoder pass over T new tokens after P cached ones -> (logits or hidden, present)."""
    cache = EncoderDecoderCache(unpack_past(past), DynamicCache())
    decoder = model.decoder if lm_head else model.decoder.base_model
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  encoder_hidden_states=encoder_hidden_states, past_key_values=cache, use_cache=True)
    first = out.logits if lm_head else out.last_hidden_state
    return first, pack_past(out.past_key_values.self_attention_cache)


def hidden_states(model, pixel_values, ids, mask, positions) -> torch.Tensor:
    """Final decoder hidden states (B, S, d) of a whole sequence (the reward model's read-out)."""
    past = empty_past(ids.shape[0], *cache_shape(model))
    hidden, _ = decode(model, ids, mask, positions, encode(model, pixel_values), past, lm_head=False)
    return hidden


def sequence_logprobs(model: nn.Module, pixel_values, prompt_ids, prompt_mask, response_ids, response_mask):
    """log pi(y_t | image, prompt, y_<t) (B, R), 0 at padding, through the model's own forward
    (so a peft-wrapped model works as is). Prompts left-padded."""
    ids, mask, pos = hf_layout.join(prompt_ids, prompt_mask, response_ids, response_mask)
    logits = model(pixel_values=pixel_values, decoder_input_ids=ids, decoder_attention_mask=mask,
                   decoder_position_ids=pos).logits
    return hf_layout.response_logprobs(logits, response_ids, response_mask)


def reward_model(policy: VisionEncoderDecoderModel) -> HFRewardModel:
    return HFRewardModel.from_policy(policy, hidden_states, policy.config.decoder.hidden_size)


def load_reward(directory: Path) -> HFRewardModel:
    backbone = VisionEncoderDecoderModel.from_pretrained(str(directory), local_files_only=True)
    return HFRewardModel(backbone, hidden_states, backbone.config.decoder.hidden_size).load_head(directory)


def example_inputs(bundle: EncoderDecoderBundle, reward: HFRewardModel | None = None, batch: int = 2,
                   prompt_len: int = 5, past_len: int = 3, new_len: int = 2, seed: int = 0) -> dict[str, dict]:
    """Random, well-formed inputs for each graph, with padded rows (export examples and parity)."""
    g = torch.Generator().manual_seed(seed)
    c = bundle.model.config
    L, H, hd = bundle.cache_shape()
    size = c.encoder.image_size
    V = c.decoder.vocab_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    with torch.no_grad():
        enc = encode(bundle.model, pixels)
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    mask[0, :1] = 0  # a left-padded cache row
    prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left-padded prompt
    response_mask = torch.ones(batch, 4, dtype=torch.long)
    response_mask[-1, -2:] = 0
    return {
        ENCODER: dict(pixel_values=pixels),
        DECODER: dict(input_ids=torch.randint(4, V, (batch, new_len), generator=g), attention_mask=mask,
                      position_ids=hf_layout.positions(mask)[:, past_len:], encoder_hidden_states=enc,
                      past=torch.randn(batch, 2 * L, H, past_len, hd, generator=g)),
        REWARD: dict(pixel_values=pixels, prompt_ids=torch.randint(4, V, (batch, prompt_len), generator=g),
                     prompt_mask=prompt_mask, response_ids=torch.randint(4, V, (batch, 4), generator=g),
                     response_mask=response_mask),
    }


def graph_modules(bundle: EncoderDecoderBundle, reward: HFRewardModel) -> dict[str, Graph]:
    return {ENCODER: Graph(bundle.model, encode), DECODER: Graph(bundle.model, decode), REWARD: Graph(reward)}



def export(bundle: EncoderDecoderBundle, reward: HFRewardModel, out_dir: Path,
           external_data: bool = False) -> dict[str, Path]:
    """Writes encoder.onnx, decoder.onnx and reward.onnx; returns graph name -> path.
    (Merge LoRA adapters first: `hf_lora.merged`.)"""
    B, S, T, R, N = dim("batch"), dim("prompt"), dim("new"), dim("response"), dim("image_tokens")
    P = dim("past", min=0)
    dynamic = {
        ENCODER: {"pixel_values": {0: B}},
        DECODER: {"input_ids": {0: B, 1: T}, "attention_mask": {0: B, 1: torch.export.Dim.AUTO},
                  "position_ids": {0: B, 1: T}, "encoder_hidden_states": {0: B, 1: N}, "past": {0: B, 3: P}},
        REWARD: {"pixel_values": {0: B}, "prompt_ids": {0: B, 1: S}, "prompt_mask": {0: B, 1: S},
                 "response_ids": {0: B, 1: R}, "response_mask": {0: B, 1: R}},
    }
    return export_graphs(graph_modules(bundle, reward), example_inputs(bundle), OUTPUTS, dynamic, out_dir,
                         external_data)


def onnx_generate(sessions: dict, bundle: EncoderDecoderBundle, pixel_values: np.ndarray, prompt_ids: np.ndarray,
                  prompt_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy answers (B, T) from the exported graphs (ORT sessions by graph name)."""
    (enc,) = run(sessions[ENCODER], pixel_values=pixel_values)

    def step(ids, mask, pos, past):
        return run(sessions[DECODER], input_ids=ids, attention_mask=mask, position_ids=pos,
                   encoder_hidden_states=enc, past=past)

    tok = bundle.tokenizer
    return greedy_generate(step, prompt_ids, prompt_mask, bundle.cache_shape(),
                           max_new_tokens, tok.eos_token_id, tok.pad_token_id)
