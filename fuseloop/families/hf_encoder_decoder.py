"""Family 1, "hf-encoder-decoder": `transformers.VisionEncoderDecoderModel` (a vision encoder + a
text decoder with cross-attention), read from and written to `save_pretrained` directories.

The prompt is the decoder's prefix (chat-templated: [BOS] prompt [SEP] for the tiny models,
left-padded); the image reaches the decoder through cross-attention only. Under the family
interface (`HFEncoderDecoderFamily`), the Preprocessor applies the checkpoint tokenizer's chat
template, so served and trained prompt ids are this prefix, right-padded. Graphs (repository names):
- encoder: pixel_values (B, 3, H, W) f32 -> cross_past (B, N, 2L, H, hd) f32: every decoder
  layer's cross-attention keys (at 2i) and values (at 2i + 1) over the N image tokens, computed
  once per image by the decoder's own code (`cross_cache`). Image tokens second, so the engine's
  DecodeState holds it as `memory` (B, M, ...) and pads, joins and drops rows without knowing
  the architecture;
- decoder: input_ids (B, T) i64, attention_mask (B, P+T) i64, position_ids (B, T) i64,
  cross_past (B, N, 2L, H, hd) f32, past (B, 2L, H, P, hd) f32 -> logits (B, T, V) f32,
  present (B, 2L, H, P+T, hd) f32. One graph for the prompt (P = 0) and each decode step (T = 1).
  The cross cache enters as already computed, so no step projects the image tokens again, as
  `generate()` does; `past` is the packed self-attention cache (see hf_layout);
- reward: pixel_values, prompt_ids (B, S), prompt_mask (B, S), response_ids (B, R),
  response_mask (B, R) -> rewards (B,) f32 (prompts padded on either side).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from transformers import (AutoImageProcessor, AutoTokenizer, DynamicCache, EncoderDecoderCache,
                          VisionEncoderDecoderConfig, VisionEncoderDecoderModel)

from fuseloop.families import hf_layout
from fuseloop.families.base import DecodeState, Graph, ModelFamily, Stepper
from fuseloop.families.hf_loading import load_strict
from fuseloop.families.hf_layout import empty_past, left_align, pack_past, positions, unpack_past
from fuseloop.families.hf_onnx import dim
from fuseloop.families.hf_reward import HFRewardModel
from fuseloop.families.onnx_export import export_onnx
from fuseloop.model import sample_loop
from fuseloop.repository import DECODER, ENCODER, REWARD

OUTPUTS = {ENCODER: ["cross_past"], DECODER: ["logits", "present"], REWARD: ["rewards"]}


@dataclass
class EncoderDecoderBundle:
    """A model directory, loaded: the model, its tokenizer and its image processor."""

    model: VisionEncoderDecoderModel
    tokenizer: object
    image_processor: object

    def cache_shape(self) -> tuple[int, int, int]:
        return cache_shape(self.model.config)

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


def cache_shape(config: VisionEncoderDecoderConfig) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the packed past."""
    c = config.decoder
    return c.num_hidden_layers, c.num_attention_heads, c.hidden_size // c.num_attention_heads


def encode(model: VisionEncoderDecoderModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values (B, 3, H, W) -> encoder_hidden_states (B, N, d_decoder), as forward() feeds them."""
    hidden = model.encoder(pixel_values=pixel_values).last_hidden_state
    if hasattr(model, "enc_to_dec_proj"):
        hidden = model.enc_to_dec_proj(hidden)
    return hidden


def cross_cache(model: VisionEncoderDecoderModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values (B, 3, H, W) -> cross_past (B, N, 2L, H, hd): each decoder layer's
    cross-attention keys and values over the image tokens. The decoder's own code computes them
    (whatever its architecture): one pass over a dummy token fills an empty cross-attention cache."""
    hidden = encode(model, pixel_values)
    dummy = torch.zeros(hidden.shape[0], 1, dtype=torch.long, device=hidden.device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    model.decoder.base_model(input_ids=dummy, attention_mask=torch.ones_like(dummy), encoder_hidden_states=hidden,
                             past_key_values=cache, use_cache=True)
    return pack_past(cache.cross_attention_cache).permute(0, 3, 1, 2, 4)  # (B, 2L, H, N, hd) -> image tokens 2nd


def decode(model: VisionEncoderDecoderModel, input_ids, attention_mask, position_ids, cross_past, past: torch.Tensor,
           lm_head: bool = True):
    """One decoder pass over T new tokens after P cached ones, cross-attending through the cached
    cross_past (B, N, 2L, H, hd) -> (logits or hidden, present)."""
    cache = EncoderDecoderCache(unpack_past(past), unpack_past(cross_past.permute(0, 2, 3, 1, 4)))
    cache.is_updated = {i: True for i in range(cross_past.shape[2] // 2)}  # the blocks read it, never project
    # The blocks run cross-attention only when given encoder states; with the cache marked
    # computed they read no more than its shape, so a zero-width view of it stands in.
    placeholder = cross_past[:, :, 0, 0, :0]  # (B, N, 0)
    return _decoder(model, input_ids, attention_mask, position_ids, placeholder, cache, lm_head)


def _decoder(model, input_ids, attention_mask, position_ids, encoder_hidden_states, cache: EncoderDecoderCache,
             lm_head: bool):
    decoder = model.decoder if lm_head else model.decoder.base_model
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  encoder_hidden_states=encoder_hidden_states, past_key_values=cache, use_cache=True)
    first = out.logits if lm_head else out.last_hidden_state
    return first, pack_past(out.past_key_values.self_attention_cache)


def hidden_states(model, pixel_values, ids, mask, positions) -> torch.Tensor:
    """Final decoder hidden states (B, S, d) of a whole sequence (the reward model's read-out)."""
    # One pass: the image tokens are projected once either way, so straight from the encoder's states.
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    hidden, _ = _decoder(model, ids, mask, positions, encode(model, pixel_values), cache, lm_head=False)
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
    backbone = load_strict(VisionEncoderDecoderModel, directory)
    return HFRewardModel(backbone, hidden_states, backbone.config.decoder.hidden_size).load_head(directory)


def example_inputs(bundle: EncoderDecoderBundle, batch: int = 2,
                   prompt_len: int = 5, past_len: int = 3, new_len: int = 2, seed: int = 0) -> dict[str, dict]:
    """Random, well-formed inputs for each graph, with padded rows (export examples and parity)."""
    g = torch.Generator().manual_seed(seed)
    c = bundle.model.config
    L, H, hd = bundle.cache_shape()
    size = c.encoder.image_size
    V = c.decoder.vocab_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    with torch.no_grad():
        cross = cross_cache(bundle.model, pixels)
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    mask[0, :1] = 0  # a left-padded cache row
    prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left-padded prompt
    response_mask = torch.ones(batch, 4, dtype=torch.long)
    response_mask[-1, -2:] = 0
    return {
        ENCODER: dict(pixel_values=pixels),
        DECODER: dict(input_ids=torch.randint(4, V, (batch, new_len), generator=g), attention_mask=mask,
                      position_ids=hf_layout.positions(mask)[:, past_len:], cross_past=cross,
                      past=torch.randn(batch, 2 * L, H, past_len, hd, generator=g)),
        REWARD: dict(pixel_values=pixels, prompt_ids=torch.randint(4, V, (batch, prompt_len), generator=g),
                     prompt_mask=prompt_mask, response_ids=torch.randint(4, V, (batch, 4), generator=g),
                     response_mask=response_mask),
    }


class EncoderGraph(nn.Module):
    """pixel_values -> cross_past: the decoder's cross-attention keys and values, the memory."""

    def __init__(self, model: VisionEncoderDecoderModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return cross_cache(self.model, pixel_values)


class DecoderGraph(nn.Module):
    """T new tokens after P cached ones -> logits (B, T, V), present (B, 2L, H, P+T, hd)."""

    def __init__(self, model: VisionEncoderDecoderModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, cross_past, past):
        return decode(self.model, input_ids, attention_mask, position_ids, cross_past, past)


def graph_modules(bundle: EncoderDecoderBundle, reward: HFRewardModel) -> dict[str, nn.Module]:
    """The module each graph traces; their state_dict names are the graphs' initializers."""
    return {ENCODER: EncoderGraph(bundle.model), DECODER: DecoderGraph(bundle.model), REWARD: reward}


def graphs(bundle: EncoderDecoderBundle, reward: HFRewardModel, **example) -> dict[str, Graph]:
    """The three graphs with example inputs (`example_inputs`' keywords) and dynamic axes."""
    B, S, T, R, N = dim("batch"), dim("prompt"), dim("new"), dim("response"), dim("image_tokens")
    P = dim("past", min=0)
    dynamic = {
        ENCODER: {"pixel_values": {0: B}},
        DECODER: {"input_ids": {0: B, 1: T}, "attention_mask": {0: B, 1: torch.export.Dim.AUTO},
                  "position_ids": {0: B, 1: T}, "cross_past": {0: B, 1: N}, "past": {0: B, 3: P}},
        REWARD: {"pixel_values": {0: B}, "prompt_ids": {0: B, 1: S}, "prompt_mask": {0: B, 1: S},
                 "response_ids": {0: B, 1: R}, "response_mask": {0: B, 1: R}},
    }
    modules, inputs = graph_modules(bundle, reward), example_inputs(bundle, **example)
    return {name: Graph(modules[name], inputs[name], OUTPUTS[name], dynamic[name]) for name in OUTPUTS}


def export(bundle: EncoderDecoderBundle, reward: HFRewardModel, out_dir: Path,
           external_data: bool = False) -> dict[str, Path]:
    """Writes the three graphs to out_dir/<name>.onnx; returns graph name -> path.
    (Merge LoRA adapters first: `hf_lora.merged`.)"""
    return {name: export_onnx(g, out_dir / f"{name}.onnx", external_data) for name, g in graphs(bundle, reward).items()}


def onnx_generate(sessions: dict, bundle: EncoderDecoderBundle, pixel_values: np.ndarray, prompt_ids: np.ndarray,
                  prompt_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy answers (B, T) from the exported graphs (ORT sessions by graph name), through the
    family's stepper as the engine runs it. Prompts left- or right-padded."""
    stepper = HFEncoderDecoderStepper(config_dict(bundle.model.config), lambda name, feed: sessions[name].run(None, feed))
    pixel_values, prompt_ids, prompt_mask = (np.asarray(a) for a in (pixel_values, prompt_ids, prompt_mask))
    state = stepper.prefill(pixel_values, *_right_aligned(prompt_ids, prompt_mask))

    def step(tokens: torch.Tensor) -> torch.Tensor:
        state.tokens = tokens.numpy()
        return torch.from_numpy(stepper.step(state))

    tok = bundle.tokenizer
    tokens, _ = sample_loop(step, torch.from_numpy(state.tokens), max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                            temperature=0.0)
    return tokens.numpy()


def _right_aligned(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows padded on either side -> right-padded, as the Preprocessor pads them."""
    order = np.argsort(1 - mask, axis=1, kind="stable")  # real tokens first, in order
    return np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)


# -- the family interface ------------------------------------------------------------------------

def config_dict(config: VisionEncoderDecoderConfig) -> dict:
    return hf_layout.config_dict(config, ("encoder", "decoder"))


class HFEncoderDecoderStepper(Stepper):
    """Prefill: the encoder graph makes the memory (the cross-attention cache, `cross_past`), then
    the decoder graph reads each prompt but its last token (the chat template's answer marker)
    into the cache; the first step feeds that last token, so every step yields the next response
    token. Memory and past both non-empty."""

    feeds = {**Stepper.feeds, ENCODER: frozenset({"pixel_values"}),
             DECODER: frozenset({"attention_mask", "cross_past", "input_ids", "past", "position_ids"})}


    def __init__(self, model_config: dict, run) -> None:
        super().__init__(model_config, run)
        config = VisionEncoderDecoderConfig.from_dict(model_config)
        self.cache_shape = cache_shape(config)
        # The text decoder's, whatever its architecture calls them (attribute_map: GPT-2's n_positions).
        self._vocab_size, self._max_positions = config.decoder.vocab_size, config.decoder.max_position_embeddings

    def vocab_size(self) -> int:
        return self._vocab_size

    def max_positions(self) -> int:
        return self._max_positions

    def prefill(self, pixel_values, prompt_ids, prompt_mask) -> DecodeState:
        (memory,) = self.run(ENCODER, {"pixel_values": pixel_values})
        ids, mask = (t.numpy() for t in left_align(torch.from_numpy(prompt_ids), torch.from_numpy(prompt_mask)))
        B = len(ids)
        prefix, prefix_mask = ids[:, :-1], mask[:, :-1]
        past = empty_past(B, *self.cache_shape).numpy()
        if prefix.shape[1]:  # a one-token prompt (BOS alone) leaves the cache empty
            _, past = self.run(DECODER, {"input_ids": prefix, "attention_mask": prefix_mask,
                                         "position_ids": positions(torch.from_numpy(prefix_mask)).numpy(),
                                         "cross_past": memory, "past": past})
        return DecodeState(tokens=ids[:, -1].copy(), positions=prefix_mask.sum(-1), past=past,
                           past_mask=prefix_mask.copy(), memory=memory,
                           memory_mask=np.ones(memory.shape[:2], dtype=np.int64), past_axis=3)

    def step_inputs(self, state: DecodeState, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        # The decoder graph cross-attends to all of memory (the cross cache): a fixed-size image encoder fills it.
        return {"input_ids": state.tokens[:, None], "attention_mask": attention_mask,
                "position_ids": state.positions[:, None], "cross_past": state.memory, "past": state.past}


class HFEncoderDecoderFamily(ModelFamily):
    """The interface's [BOS] + response inputs: the prompt's own last token (the template's answer
    marker) already starts the answer, so the decoder reads prompt + response and the leading BOS
    is dropped. The reward model reads the interface's inputs as they are (BOS included), in
    training and serving alike."""

    name = "hf-encoder-decoder"
    stepper_class = HFEncoderDecoderStepper

    # -- building, loading, saving -----------------------------------------------------------
    def build(self, config: dict) -> VisionEncoderDecoderModel:
        return VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_dict(config))

    def config_of(self, policy: nn.Module) -> dict:
        return config_dict(policy.config)

    def reward_model_from_policy(self, policy: nn.Module) -> HFRewardModel:
        return reward_model(policy)

    def save(self, module: nn.Module, directory: Path) -> None:
        if isinstance(module, HFRewardModel):
            module.save(directory)
        else:
            module.save_pretrained(str(directory))

    def save_assets(self, preprocessor, directory: Path) -> None:
        preprocessor.tokenizer.save_pretrained(str(directory))
        if preprocessor.image_processor is not None:
            preprocessor.image_processor.save_pretrained(str(directory))

    def load_policy(self, directory: Path) -> VisionEncoderDecoderModel:
        return load_strict(VisionEncoderDecoderModel, directory)

    def load_reward(self, directory: Path) -> HFRewardModel:
        return load_reward(directory)

    # -- training ------------------------------------------------------------------------------
    def token_logits(self, policy, pixel_values, prompt_ids, prompt_mask, input_ids, input_mask) -> torch.Tensor:
        prompt_ids, prompt_mask = left_align(prompt_ids, prompt_mask)
        ids, mask, pos = hf_layout.join(prompt_ids, prompt_mask, input_ids[:, 1:], input_mask[:, 1:])
        logits = policy(pixel_values=pixel_values, decoder_input_ids=ids, decoder_attention_mask=mask,
                        decoder_position_ids=pos).logits
        return logits[:, prompt_ids.shape[1] - 1:]  # the prompt's last token predicts input_ids[:, 1]

    def generate(self, policy, pixel_values, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, top_p=1.0,
                 generator=None):
        ids, mask = left_align(prompt_ids, prompt_mask)
        memory = cross_cache(policy, pixel_values)  # projected once per image, as serving does
        past = empty_past(len(ids), *cache_shape(policy.config)).to(memory)
        if ids.shape[1] > 1:
            _, past = decode(policy, ids[:, :-1], mask[:, :-1], positions(mask[:, :-1]), memory, past)
        mask, pos = mask[:, :-1], mask[:, :-1].sum(-1, keepdim=True)

        def step(token: torch.Tensor) -> torch.Tensor:
            nonlocal past, mask, pos
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, past = decode(policy, token[:, None], mask, pos, memory, past)
            pos = pos + 1
            return logits[:, -1]

        c = policy.config.decoder
        return sample_loop(step, ids[:, -1], max_new_tokens, c.eos_token_id, c.pad_token_id, temperature, top_p,
                           generator)

    # -- serving -------------------------------------------------------------------------------
    def graphs(self, policy: nn.Module, reward: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, Graph]:
        # The graphs and their example inputs read only the model, not the tokenizer or image processor.
        return graphs(EncoderDecoderBundle(policy, None, None), reward, batch=batch, seed=seed)
