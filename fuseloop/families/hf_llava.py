"""Family 2: LLaVA-style early fusion, `transformers.LlavaForConditionalGeneration` (a vision
tower, a projector and a causal LM), loaded from a local directory with its `LlavaProcessor`.

The processor expands the prompt's `<image>` into one placeholder token per image feature; the
features replace those tokens' embeddings (`splice`), and the causal LM reads the result.
Graphs, in the ONNX-community layout, so prefill and decode steps share one decoder:
- vision: pixel_values (B, 3, H, W) f32 -> image_features (B, N, d) f32 (after the projector);
- embed: input_ids (B, S) i64 -> inputs_embeds (B, S, d) f32;
- decoder: inputs_embeds (B, T, d) f32, attention_mask (B, P+T) i64, position_ids (B, T) i64,
  past (B, 2L, H_kv, P, hd) f32 -> logits (B, T, V) f32, present (B, 2L, H_kv, P+T, hd) f32;
- reward: pixel_values, prompt_ids (B, S) (placeholders expanded), prompt_mask (B, S),
  response_ids (B, R), response_mask (B, R) -> rewards (B,) f32.
Prefill: embeds = splice_numpy(ids, embed(ids), vision(pixels)), then decoder with P = 0; each
decode step: decoder(embed(token)) with the packed past (see hf_layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from fuseloop.families import hf_layout
from fuseloop.families.hf_layout import empty_past, pack_past, unpack_past
from fuseloop.families.base import Graph
from fuseloop.families.hf_onnx import dim, greedy_generate, run
from fuseloop.families.hf_reward import HFRewardModel
from fuseloop.families.onnx_export import export_onnx

VISION, EMBED, DECODER, REWARD = "vision", "embed", "decoder", "reward"
OUTPUTS = {VISION: ["image_features"], EMBED: ["inputs_embeds"], DECODER: ["logits", "present"], REWARD: ["rewards"]}


@dataclass
class LlavaBundle:
    """A model directory, loaded: the model and its processor (image processor + tokenizer)."""

    model: LlavaForConditionalGeneration
    processor: object

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def cache_shape(self) -> tuple[int, int, int]:
        return cache_shape(self.model)

    def inputs(self, images, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel_values, prompt_ids, prompt_mask): chat-templated prompts with the image's
        placeholders expanded, left-padded."""
        texts = [hf_layout.prompt_text(self.tokenizer, p, self.processor.image_token) for p in prompts]
        enc = self.processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")
        return enc["pixel_values"], enc["input_ids"], enc["attention_mask"]

    def responses(self, responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return hf_layout.response_ids(self.tokenizer, responses)

    def save(self, directory: Path) -> None:
        """A directory `from_pretrained` loads (merge LoRA adapters first: `hf_lora.merged`)."""
        self.model.save_pretrained(str(directory))
        self.processor.save_pretrained(str(directory))


def load(directory: Path) -> LlavaBundle:
    d = str(directory)
    return LlavaBundle(AutoModelForImageTextToText.from_pretrained(d, local_files_only=True),
                       AutoProcessor.from_pretrained(d, local_files_only=True))


def cache_shape(model: LlavaForConditionalGeneration) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the packed past."""
    c = model.config.text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_key_value_heads, head_dim


def image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values -> projected features (B, N, d), as `get_image_features` computes them, but as
    one batched tensor (that returns a per-image list, which does not export with a dynamic batch)."""
    c = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    layers = c.vision_feature_layer if isinstance(c.vision_feature_layer, (list, tuple)) else [c.vision_feature_layer]
    start = 1 if c.vision_feature_select_strategy == "default" else 0  # "default" drops CLS
    selected = torch.cat([hidden[i][:, start:] for i in layers], dim=-1)
    return model.model.multi_modal_projector(selected)


def splice(input_ids: torch.Tensor, inputs_embeds: torch.Tensor, features: torch.Tensor, image_token_id: int):
    """Puts row b's k-th image feature at its k-th placeholder token (one image per row).

    A gather rather than `masked_scatter`, so it exports; same result when each row holds N
    placeholders."""
    is_image = input_ids == image_token_id  # (B, S)
    k = (is_image.long().cumsum(-1) - 1).clamp(0, features.shape[1] - 1)  # (B, S)
    picked = torch.gather(features, 1, k[..., None].expand(-1, -1, features.shape[-1]))  # (B, S, d)
    return torch.where(is_image[..., None], picked.to(inputs_embeds.dtype), inputs_embeds)


def splice_numpy(input_ids: np.ndarray, inputs_embeds: np.ndarray, features: np.ndarray,
                 image_token_id: int) -> np.ndarray:
    """`splice` for an engine feeding the ONNX graphs."""
    is_image = input_ids == image_token_id
    out = inputs_embeds.copy()
    for b in range(len(out)):
        n = int(is_image[b].sum())
        out[b, is_image[b]] = features[b, :n]
    return out


def decode(model: LlavaForConditionalGeneration, inputs_embeds, attention_mask, position_ids, past: torch.Tensor,
           lm_head: bool = True):
    """One causal-LM pass over T new embeddings after P cached ones -> (logits or hidden, present)."""
    out = model.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, past_key_values=unpack_past(past), use_cache=True)
    hidden = out.last_hidden_state
    return (model.lm_head(hidden) if lm_head else hidden), pack_past(out.past_key_values)


def hidden_states(model, pixel_values, ids, mask, positions) -> torch.Tensor:
    """Final hidden states (B, S, d) of a whole sequence (the reward model's read-out)."""
    embeds = splice(ids, model.get_input_embeddings()(ids), image_features(model, pixel_values),
                    model.config.image_token_id)
    past = empty_past(ids.shape[0], *cache_shape(model))
    hidden, _ = decode(model, embeds, mask, positions, past, lm_head=False)
    return hidden


def sequence_logprobs(model: nn.Module, pixel_values, prompt_ids, prompt_mask, response_ids, response_mask):
    """log pi(y_t | image, prompt, y_<t) (B, R), 0 at padding, through the model's own forward
    (so a peft-wrapped model works as is). Prompts left-padded."""
    ids, mask, pos = hf_layout.join(prompt_ids, prompt_mask, response_ids, response_mask)
    logits = model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, position_ids=pos).logits
    return hf_layout.response_logprobs(logits, response_ids, response_mask)


def reward_model(policy: LlavaForConditionalGeneration) -> HFRewardModel:
    return HFRewardModel.from_policy(policy, hidden_states, policy.config.text_config.hidden_size)


def load_reward(directory: Path) -> HFRewardModel:
    backbone = AutoModelForImageTextToText.from_pretrained(str(directory), local_files_only=True)
    return HFRewardModel(backbone, hidden_states, backbone.config.text_config.hidden_size).load_head(directory)


class VisionGraph(nn.Module):
    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return image_features(self.model, pixel_values)


class EmbedGraph(nn.Module):
    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class DecoderGraph(nn.Module):
    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        return decode(self.model, inputs_embeds, attention_mask, position_ids, past)


def graph_modules(bundle: LlavaBundle, reward: HFRewardModel) -> dict[str, nn.Module]:
    """The module each graph traces; their state_dict names are the graphs' initializers."""
    m = bundle.model
    return {VISION: VisionGraph(m), EMBED: EmbedGraph(m), DECODER: DecoderGraph(m), REWARD: reward}


def example_inputs(bundle: LlavaBundle, batch: int = 2, prompt_len: int = 5, past_len: int = 3, new_len: int = 2,
                   seed: int = 0) -> dict[str, dict]:
    """Random, well-formed inputs for each graph, with padded rows (export examples and parity).
    Reward prompts hold the image's N placeholders, then `prompt_len` text tokens."""
    g = torch.Generator().manual_seed(seed)
    c = bundle.model.config
    L, H, hd = bundle.cache_shape()
    size = c.vision_config.image_size
    d = c.text_config.hidden_size
    n_image = c.image_seq_length
    text = lambda *shape: torch.randint(4, bundle.image_token_id, shape, generator=g)  # noqa: E731
    pixels = torch.randn(batch, 3, size, size, generator=g)
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    mask[0, :1] = 0  # a left-padded cache row
    prompt_ids = torch.cat([torch.full((batch, n_image), bundle.image_token_id), text(batch, prompt_len)], dim=1)
    prompt_ids = torch.cat([torch.full((batch, 2), bundle.tokenizer.pad_token_id), prompt_ids], dim=1)
    prompt_mask = (torch.arange(prompt_ids.shape[1]) >= 2).long().expand(batch, -1).clone()
    prompt_mask[1:, :2] = 1  # only row 0 is left-padded
    prompt_ids[1:, :2] = text(batch - 1, 2)
    response_mask = torch.ones(batch, 4, dtype=torch.long)
    response_mask[-1, -2:] = 0
    return {
        VISION: dict(pixel_values=pixels),
        EMBED: dict(input_ids=text(batch, prompt_len)),
        DECODER: dict(inputs_embeds=0.02 * torch.randn(batch, new_len, d, generator=g), attention_mask=mask,
                      position_ids=hf_layout.positions(mask)[:, past_len:],
                      past=torch.randn(batch, 2 * L, H, past_len, hd, generator=g)),
        REWARD: dict(pixel_values=pixels, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                     response_ids=text(batch, 4), response_mask=response_mask),
    }


def graphs(bundle: LlavaBundle, reward: HFRewardModel, **example) -> dict[str, Graph]:
    """The four graphs with example inputs (`example_inputs`' keywords) and dynamic axes."""
    B, S, T, R = dim("batch"), dim("prompt"), dim("new"), dim("response")
    P = dim("past", min=0)
    dynamic = {
        VISION: {"pixel_values": {0: B}},
        EMBED: {"input_ids": {0: B, 1: S}},
        DECODER: {"inputs_embeds": {0: B, 1: T}, "attention_mask": {0: B, 1: torch.export.Dim.AUTO},
                  "position_ids": {0: B, 1: T}, "past": {0: B, 3: P}},
        REWARD: {"pixel_values": {0: B}, "prompt_ids": {0: B, 1: S}, "prompt_mask": {0: B, 1: S},
                 "response_ids": {0: B, 1: R}, "response_mask": {0: B, 1: R}},
    }
    modules, inputs = graph_modules(bundle, reward), example_inputs(bundle, **example)
    return {name: Graph(modules[name], inputs[name], OUTPUTS[name], dynamic[name]) for name in OUTPUTS}


def export(bundle: LlavaBundle, reward: HFRewardModel, out_dir: Path, external_data: bool = False) -> dict[str, Path]:
    """Writes vision.onnx, embed.onnx, decoder.onnx and reward.onnx; returns graph name -> path.
    (Merge LoRA adapters first: `hf_lora.merged`.)"""
    return {name: export_onnx(g, out_dir / f"{name}.onnx", external_data) for name, g in graphs(bundle, reward).items()}


def onnx_generate(sessions: dict, bundle: LlavaBundle, pixel_values: np.ndarray, prompt_ids: np.ndarray,
                  prompt_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy answers (B, T) from the exported graphs (ORT sessions by graph name)."""
    (features,) = run(sessions[VISION], pixel_values=pixel_values)

    def step(ids, mask, pos, past):
        (embeds,) = run(sessions[EMBED], input_ids=ids)
        embeds = splice_numpy(ids, embeds, features, bundle.image_token_id)  # only the prefill holds placeholders
        return run(sessions[DECODER], inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past=past)

    tok = bundle.tokenizer
    return greedy_generate(step, prompt_ids, prompt_mask, bundle.cache_shape(),
                           max_new_tokens, tok.eos_token_id, tok.pad_token_id)
