"""Family 2, "hf-llava": LLaVA-style early fusion, `transformers.LlavaForConditionalGeneration`
(a vision tower, a projector and a causal LM), read from and written to `save_pretrained`
directories with their `LlavaProcessor`.

The prompt carries the image as placeholder tokens, one per image feature (the Preprocessor, like
the processor, expands `<image>` into `config.image_seq_length` of them); the features replace
those tokens' embeddings (`splice`) and the causal LM reads the result. Under the family interface
(`HFLlavaFamily`), the three repository graphs are laid out ONNX-community style, so that prefill
and decode steps share one decoder:
- encoder ("prefill inputs"): pixel_values (B, 3, H, W) f32, prompt_ids (B, S) i64 (placeholders
  expanded), prompt_mask (B, S) i64 -> inputs_embeds (B, S, d) f32: the vision tower and
  projector, the token embeddings, and the splice (padding on either side; its embeddings zeroed);
- decoder: inputs_embeds (B, E, d) f32, input_ids (B, T) i64, attention_mask (B, P+E+T) i64,
  position_ids (B, E+T) i64, past (B, 2L, H_kv, P, hd) f32 -> logits (B, E+T, V) f32, present
  (B, 2L, H_kv, P+E+T, hd) f32. It embeds input_ids itself and reads [inputs_embeds, embed(input_ids)];
  E, T and P may each be 0 (E and T not both);
- reward: pixel_values, prompt_ids (B, S), prompt_mask (B, S), response_ids (B, R),
  response_mask (B, R) -> rewards (B,) f32 (prompts padded on either side).
Serving (`HFLlavaStepper`): prefill runs the encoder, then the decoder over the spliced prompt but
its last token, as embeddings alone (E = S-1, T = 0), into the cache; each step feeds one token by
id alone (E = 0, T = 1). So the last prompt token (the chat template's answer marker, never a
placeholder) is the first step's token, as in the encoder-decoder family, and every step yields the
next response token; the decode state's `memory` is empty (M = 0). The prefill feeds no token by
id (T = 0, not the second-to-last token with T = 1) so that a placeholder is never embedded as a
token, whatever the template. Zero-size axes export and run in ONNX Runtime as they are (the
concatenation with an empty part is the identity), so no second step graph or dummy token is
needed; tests/test_hf_llava_family.py checks both shapes against PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from fuseloop.families import hf_layout
from fuseloop.families.base import DecodeState, Graph, ModelFamily, Stepper
from fuseloop.families.hf_layout import empty_past, pack_past, positions, unpack_past
from fuseloop.families.hf_loading import load_strict
from fuseloop.families.hf_onnx import dim
from fuseloop.families.hf_reward import HFRewardModel
from fuseloop.families.onnx_export import export_onnx
from fuseloop.model import sample_loop
from fuseloop.repository import DECODER, ENCODER, REWARD

OUTPUTS = {ENCODER: ["inputs_embeds"], DECODER: ["logits", "present"], REWARD: ["rewards"]}


@dataclass
class LlavaBundle:
    """A model directory, loaded: the model and its processor (image processor + tokenizer)."""

    model: LlavaForConditionalGeneration
    processor: object

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def cache_shape(self) -> tuple[int, int, int]:
        return cache_shape(self.model.config)

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
    return LlavaBundle(load_strict(LlavaForConditionalGeneration, directory),
                       AutoProcessor.from_pretrained(str(directory), local_files_only=True))


def cache_shape(config: LlavaConfig) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the packed past."""
    c = config.text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_key_value_heads, head_dim


def _base(model: nn.Module) -> LlavaForConditionalGeneration:
    """The transformers model under a peft wrapper (its adapters stay in place), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


def prompt_embeds(model: LlavaForConditionalGeneration, pixel_values, prompt_ids, prompt_mask) -> torch.Tensor:
    """The encoder graph: image features spliced into the prompt's token embeddings (B, S, d),
    zero at padding (which the decoder's mask hides anyway)."""
    embeds = splice(prompt_ids, model.get_input_embeddings()(prompt_ids), image_features(model, pixel_values),
                    model.config.image_token_id)
    return embeds * prompt_mask[..., None].to(embeds.dtype)


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
    past = empty_past(ids.shape[0], *cache_shape(model.config))
    hidden, _ = decode(model, embeds, mask, positions, past, lm_head=False)
    return hidden


def sequence_logprobs(model: nn.Module, pixel_values, prompt_ids, prompt_mask, response_ids, response_mask):
    """log pi(y_t | image, prompt, y_<t) (B, R), 0 at padding, through the model's own forward
    (so a peft-wrapped model works as is). Prompts left-padded."""
    ids, mask, pos = hf_layout.join(prompt_ids, prompt_mask, response_ids, response_mask)
    logits = model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, position_ids=pos).logits
    return hf_layout.response_logprobs(without_placeholder(logits, _base(model).config.image_token_id),
                                       response_ids, response_mask)


def suppress_placeholder(model: LlavaForConditionalGeneration) -> None:
    """Makes the model's own `generate()` (a `from_pretrained` user's) answer as fuseloop does:
    its generation config suppresses the image placeholder (`without_placeholder`)."""
    config = model.generation_config
    config.suppress_tokens = sorted(set(config.suppress_tokens or []) | {model.config.image_token_id})


def without_placeholder(logits: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The policy's distribution over answer tokens: never the image placeholder (an answer that
    held it would splice a second image when scored). Generation, serving and the trainer's
    log-probs all use it."""
    return logits.index_fill(-1, torch.tensor([image_token_id], device=logits.device), float("-inf"))


def reward_model(policy: LlavaForConditionalGeneration) -> HFRewardModel:
    return HFRewardModel.from_policy(policy, hidden_states, policy.config.text_config.hidden_size)


def load_reward(directory: Path) -> HFRewardModel:
    backbone = load_strict(LlavaForConditionalGeneration, directory)
    return HFRewardModel(backbone, hidden_states, backbone.config.text_config.hidden_size).load_head(directory)


def left_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded on either side (the Preprocessor pads right) -> the same rows left-padded, so
    every row's last prompt token sits in the last column."""
    order = torch.argsort(mask, dim=1, stable=True)  # padding first, then the real tokens in order
    return ids.gather(1, order), mask.gather(1, order)


# -- graphs --------------------------------------------------------------------------------------

class EncoderGraph(nn.Module):
    """pixel_values, prompt_ids, prompt_mask -> inputs_embeds: the prompt as the decoder reads it."""

    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values, prompt_ids, prompt_mask):
        return prompt_embeds(self.model, pixel_values, prompt_ids, prompt_mask)


class DecoderGraph(nn.Module):
    """[inputs_embeds (B, E, d), embed(input_ids) (B, T, d)] after P cached tokens -> logits
    (B, E+T, V), present (B, 2L, H_kv, P+E+T, hd)."""

    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, input_ids, attention_mask, position_ids, past):
        embeds = torch.cat([inputs_embeds, self.model.get_input_embeddings()(input_ids)], dim=1)
        return decode(self.model, embeds, attention_mask, position_ids, past)


def graph_modules(bundle: LlavaBundle, reward: HFRewardModel) -> dict[str, nn.Module]:
    """The module each graph traces; their state_dict names are the graphs' initializers."""
    return {ENCODER: EncoderGraph(bundle.model), DECODER: DecoderGraph(bundle.model), REWARD: reward}


def example_inputs(bundle: LlavaBundle, batch: int = 2, prompt_len: int = 5, past_len: int = 3, new_len: int = 4,
                   seed: int = 0, embeds_len: int | None = None) -> dict[str, dict]:
    """Random, well-formed inputs for each graph, with padded rows (export examples and parity).
    Prompts hold the image's N placeholders, then `prompt_len` text tokens; the decoder reads
    `new_len` new tokens, the first `embeds_len` (default half) of them as embeddings."""
    g = torch.Generator().manual_seed(seed)
    c = bundle.model.config
    L, H, hd = cache_shape(c)
    V, d, n_image, image_id = c.text_config.vocab_size, c.text_config.hidden_size, c.image_seq_length, c.image_token_id
    pad_id = c.text_config.pad_token_id or 0

    def text(*shape):
        ids = torch.randint(4, V, shape, generator=g)
        return ids.masked_fill(ids == image_id, 4)

    pixels = torch.randn(batch, 3, c.vision_config.image_size, c.vision_config.image_size, generator=g)
    E = new_len // 2 if embeds_len is None else embeds_len
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    mask[0, :1] = 0  # a left-padded cache row
    prompt_ids = torch.cat([text(batch, 2), torch.full((batch, n_image), image_id), text(batch, prompt_len)], dim=1)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_ids[0, :2], prompt_mask[0, :2] = pad_id, 0  # row 0 left-padded
    if batch > 1:  # row 1 right-padded, as the Preprocessor pads
        prompt_ids[1], prompt_mask[1] = prompt_ids[1].roll(-2), prompt_mask[1].roll(-2)
        prompt_ids[1, -2:], prompt_mask[1, -2:] = pad_id, 0
    response_mask = torch.ones(batch, 4, dtype=torch.long)
    response_mask[-1, -2:] = 0
    return {
        ENCODER: dict(pixel_values=pixels, prompt_ids=prompt_ids, prompt_mask=prompt_mask),
        DECODER: dict(inputs_embeds=0.02 * torch.randn(batch, E, d, generator=g), input_ids=text(batch, new_len - E),
                      attention_mask=mask, position_ids=hf_layout.positions(mask)[:, past_len:],
                      past=torch.randn(batch, 2 * L, H, past_len, hd, generator=g)),
        REWARD: dict(pixel_values=pixels, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                     response_ids=text(batch, 4), response_mask=response_mask),
    }


def graphs(bundle: LlavaBundle, reward: HFRewardModel, **example) -> dict[str, Graph]:
    """The three graphs with example inputs (`example_inputs`' keywords) and dynamic axes."""
    B, S, R = dim("batch"), dim("prompt"), dim("response")
    E, T, P = dim("embeds", min=0), dim("new", min=0), dim("past", min=0)
    dynamic = {
        ENCODER: {"pixel_values": {0: B}, "prompt_ids": {0: B, 1: S}, "prompt_mask": {0: B, 1: S}},
        DECODER: {"inputs_embeds": {0: B, 1: E}, "input_ids": {0: B, 1: T},
                  "attention_mask": {0: B, 1: torch.export.Dim.AUTO}, "position_ids": {0: B, 1: torch.export.Dim.AUTO},
                  "past": {0: B, 3: P}},
        REWARD: {"pixel_values": {0: B}, "prompt_ids": {0: B, 1: S}, "prompt_mask": {0: B, 1: S},
                 "response_ids": {0: B, 1: R}, "response_mask": {0: B, 1: R}},
    }
    modules, inputs = graph_modules(bundle, reward), example_inputs(bundle, **example)
    return {name: Graph(modules[name], inputs[name], OUTPUTS[name], dynamic[name]) for name in OUTPUTS}


def export(bundle: LlavaBundle, reward: HFRewardModel, out_dir: Path, external_data: bool = False) -> dict[str, Path]:
    """Writes the three graphs to out_dir/<name>.onnx; returns graph name -> path.
    (Merge LoRA adapters first: `hf_lora.merged`.)"""
    return {name: export_onnx(g, out_dir / f"{name}.onnx", external_data) for name, g in graphs(bundle, reward).items()}


def onnx_generate(sessions: dict, bundle: LlavaBundle, pixel_values: np.ndarray, prompt_ids: np.ndarray,
                  prompt_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy answers (B, T) from the exported graphs (ORT sessions by graph name), through the
    family's stepper as the engine runs it. Prompts left- or right-padded."""
    stepper = HFLlavaStepper(config_dict(bundle.model.config), lambda name, feed: sessions[name].run(None, feed))
    state = stepper.prefill(*(np.asarray(a) for a in (pixel_values, prompt_ids, prompt_mask)))

    def step(tokens: torch.Tensor) -> torch.Tensor:
        state.tokens = tokens.numpy()
        return torch.from_numpy(stepper.step(state))

    tok = bundle.tokenizer
    tokens, _ = sample_loop(step, torch.from_numpy(state.tokens), max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                            temperature=0.0)
    return tokens.numpy()


# -- the family interface ------------------------------------------------------------------------

def config_dict(config: LlavaConfig) -> dict:
    return hf_layout.config_dict(config, ("text_config", "vision_config"))


class HFLlavaStepper(Stepper):
    """Prefill: the encoder graph splices the image into the prompt's embeddings; the decoder graph
    reads them, but the last token's, into the cache. The first step feeds that last token by id.
    Past non-empty, memory empty (M = 0)."""

    feeds = {**Stepper.feeds, ENCODER: frozenset({"pixel_values", "prompt_ids", "prompt_mask"}),
             DECODER: frozenset({"attention_mask", "input_ids", "inputs_embeds", "past", "position_ids"})}


    def __init__(self, model_config: dict, run) -> None:
        super().__init__(model_config, run)
        config = LlavaConfig.from_dict(model_config)
        self.cache_shape = cache_shape(config)
        c = config.text_config
        self.d_model, self._vocab_size, self._max_positions = c.hidden_size, c.vocab_size, c.max_position_embeddings
        self.image_token_id = config.image_token_id

    def vocab_size(self) -> int:
        """Token ids (prompt_ids, input_ids, response_ids) are below this (placeholders included)."""
        return self._vocab_size

    def max_positions(self) -> int:
        """The text model's position table: the image's placeholders, prompt and response together."""
        return self._max_positions

    def prefill(self, pixel_values, prompt_ids, prompt_mask) -> DecodeState:
        ids, mask = (t.numpy() for t in left_padded(torch.from_numpy(prompt_ids), torch.from_numpy(prompt_mask)))
        (embeds,) = self.run(ENCODER, {"pixel_values": pixel_values, "prompt_ids": ids, "prompt_mask": mask})
        B = len(ids)
        prefix_mask = mask[:, :-1]
        past = empty_past(B, *self.cache_shape).numpy()
        if prefix_mask.shape[1]:  # a one-token prompt (BOS alone) leaves the cache empty
            _, past = self.run(DECODER, {"inputs_embeds": np.ascontiguousarray(embeds[:, :-1]),
                                         "input_ids": np.zeros((B, 0), np.int64), "attention_mask": prefix_mask,
                                         "position_ids": positions(torch.from_numpy(prefix_mask)).numpy(),
                                         "past": past})
        return DecodeState(tokens=ids[:, -1].copy(), positions=prefix_mask.sum(-1), past=past,
                           past_mask=prefix_mask.copy(), memory=np.zeros((B, 0, self.d_model), np.float32),
                           memory_mask=np.zeros((B, 0), np.int64), past_axis=3)

    def step(self, state: DecodeState) -> np.ndarray:
        logits = super().step(state)  # as `without_placeholder`
        logits[:, self.image_token_id] = -np.inf
        return logits

    def step_inputs(self, state: DecodeState, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        return {"inputs_embeds": np.zeros((len(state), 0, self.d_model), np.float32),
                "input_ids": state.tokens[:, None], "attention_mask": attention_mask,
                "position_ids": state.positions[:, None], "past": state.past}


class HFLlavaFamily(ModelFamily):
    """The interface's [BOS] + response inputs: the prompt's own last token (the template's answer
    marker) already starts the answer, so the causal LM reads prompt + response and the leading
    BOS is dropped. The reward model reads the interface's inputs as they are (BOS included), in
    training and serving alike."""

    name = "hf-llava"
    stepper_class = HFLlavaStepper

    # -- building, loading, saving -----------------------------------------------------------
    def build(self, config: dict) -> LlavaForConditionalGeneration:
        return LlavaForConditionalGeneration(LlavaConfig.from_dict(config))

    def config_of(self, policy: nn.Module) -> dict:
        return config_dict(_base(policy).config)

    def reward_model_from_policy(self, policy: nn.Module) -> HFRewardModel:
        return reward_model(policy)

    def save(self, module: nn.Module, directory: Path) -> None:
        if isinstance(module, HFRewardModel):
            module.save(directory)
        else:
            suppress_placeholder(_base(module))
            module.save_pretrained(str(directory))

    def save_assets(self, preprocessor, directory: Path) -> None:
        """A `LlavaProcessor` (tokenizer, image processor, image token and how many placeholders it
        expands into), so `AutoProcessor.from_pretrained(directory)` prompts the model as we do."""
        tokenizer = preprocessor.tokenizer
        if preprocessor.image_processor is None:
            tokenizer.save_pretrained(str(directory))
            return
        config = LlavaConfig.from_pretrained(str(directory), local_files_only=True)  # `save` wrote it
        v, strategy = config.vision_config, config.vision_feature_select_strategy
        # The processor counts (side / patch)^2 + extra placeholders, less one for "default" (CLS dropped).
        extra = config.image_seq_length - (v.image_size // v.patch_size) ** 2 + (strategy == "default")
        LlavaProcessor(image_processor=preprocessor.image_processor, tokenizer=tokenizer, patch_size=v.patch_size,
                       vision_feature_select_strategy=strategy,
                       image_token=tokenizer.convert_ids_to_tokens(config.image_token_id),
                       num_additional_image_tokens=extra,
                       chat_template=getattr(tokenizer, "chat_template", None)).save_pretrained(str(directory))

    def preprocess_config(self, policy: nn.Module, tokenizer, config):
        c = _base(policy).config
        return replace(config, image_token=tokenizer.convert_ids_to_tokens(c.image_token_id),
                       image_tokens=c.image_seq_length)

    def load_policy(self, directory: Path) -> LlavaForConditionalGeneration:
        return load_strict(LlavaForConditionalGeneration, directory)

    def load_reward(self, directory: Path) -> HFRewardModel:
        return load_reward(directory)

    # -- training ------------------------------------------------------------------------------
    def token_logits(self, policy, pixel_values, prompt_ids, prompt_mask, input_ids, input_mask) -> torch.Tensor:
        prompt_ids, prompt_mask = left_padded(prompt_ids, prompt_mask)
        ids, mask, pos = hf_layout.join(prompt_ids, prompt_mask, input_ids[:, 1:], input_mask[:, 1:])
        logits = policy(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, position_ids=pos).logits
        logits = without_placeholder(logits, _base(policy).config.image_token_id)
        return logits[:, prompt_ids.shape[1] - 1:]  # the prompt's last token predicts input_ids[:, 1]

    def generate(self, policy, pixel_values, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, top_p=1.0,
                 generator=None):
        model = _base(policy)
        ids, mask = left_padded(prompt_ids, prompt_mask)
        embeds = prompt_embeds(model, pixel_values, ids, mask)
        past = empty_past(len(ids), *cache_shape(model.config)).to(embeds)
        if ids.shape[1] > 1:
            _, past = decode(model, embeds[:, :-1], mask[:, :-1], positions(mask[:, :-1]), past)
        mask, pos = mask[:, :-1], mask[:, :-1].sum(-1, keepdim=True)
        embed = model.get_input_embeddings()
        image_token_id = model.config.image_token_id

        def step(token: torch.Tensor) -> torch.Tensor:
            nonlocal past, mask, pos
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, past = decode(model, embed(token[:, None]), mask, pos, past)
            pos = pos + 1
            return without_placeholder(logits[:, -1], image_token_id)

        c = model.config.text_config
        return sample_loop(step, ids[:, -1], max_new_tokens, c.eos_token_id, c.pad_token_id, temperature, top_p,
                           generator)

    # -- serving -------------------------------------------------------------------------------
    def graphs(self, policy: nn.Module, reward: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, Graph]:
        # The graphs and their example inputs read only the model, not the processor.
        return graphs(LlavaBundle(_base(policy), None), reward, batch=batch, seed=seed)
