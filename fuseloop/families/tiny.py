"""Tiny Hugging Face vision-language models for the built-in task, built locally from config classes.

Two families, each written as a directory that `transformers` loads with `local_files_only=True`:
- encoder-decoder: `VisionEncoderDecoderModel` (ViT encoder, GPT-2 decoder with cross-attention);
- llava: `LlavaForConditionalGeneration` (CLIP vision tower, projector, Llama causal LM), with a
  `LlavaProcessor`.
Both share a word-level tokenizer trained on the task's texts (`fuseloop.tokenizer`) plus two
special tokens: `[SEP]` ends the prompt (the response follows it) and, for llava, `<image>`.
The prompt template is the tokenizer's chat template, so the family code formats prompts the way
any Hugging Face model asks for, and a real model's own template works the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GPT2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTImageProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from fuseloop.preprocessing import PreprocessConfig
from fuseloop.scenes import task_texts
from fuseloop.tokenizer import train_tokenizer

SEP = "[SEP]"
IMAGE_TOKEN = "<image>"
# BOS, then the user's text, then SEP where the answer starts. Rendered by `apply_chat_template`.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %} " + SEP + "{% endif %}")


@dataclass(frozen=True)
class TinyConfig:
    """Sizes shared by both families (about 0.4M parameters each at the defaults)."""

    d_model: int = 96
    n_heads: int = 4
    n_kv_heads: int = 2  # llava's Llama uses grouped-query attention; GPT-2 has n_heads
    n_vision_layers: int = 2
    n_text_layers: int = 2
    patch_size: int = 8
    max_positions: int = 128
    init_std: float = 0.02  # transformers' initializer_range; larger makes a random model's answers vary
    seed: int = 0


def task_tokenizer(extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The task's word-level tokenizer, with SEP (and `extra_special`) and the chat template."""
    tokenizer = train_tokenizer(task_texts())
    tokenizer.add_special_tokens({"sep_token": SEP, "additional_special_tokens": list(extra_special)})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _processor_kwargs(pre: PreprocessConfig) -> dict:
    # Same pixels as fuseloop.preprocessing.image_array: RGB, bilinear resize, /255, (x - mean) / std.
    return dict(do_resize=True, resample=Image.BILINEAR, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=[pre.mean] * 3, image_std=[pre.std] * 3)


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    # GPT-2 and Llama default to ids of a 50k/32k vocabulary; a small one needs its own.
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def build_encoder_decoder(directory: Path, cfg: TinyConfig = TinyConfig(),
                          pre: PreprocessConfig = PreprocessConfig()) -> Path:
    """Writes a tiny ViT + GPT-2 `VisionEncoderDecoderModel`, its tokenizer and image processor."""
    torch.manual_seed(cfg.seed)
    tokenizer = task_tokenizer()
    ids = _special_ids(tokenizer)
    encoder = ViTConfig(image_size=pre.image_size, patch_size=cfg.patch_size, hidden_size=cfg.d_model,
                        num_hidden_layers=cfg.n_vision_layers, num_attention_heads=cfg.n_heads,
                        intermediate_size=2 * cfg.d_model, initializer_range=cfg.init_std)
    decoder = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.max_positions, n_embd=cfg.d_model,
                         n_layer=cfg.n_text_layers, n_head=cfg.n_heads, add_cross_attention=True,
                         is_decoder=True, initializer_range=cfg.init_std, **ids)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config.update(**ids, decoder_start_token_id=tokenizer.bos_token_id)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    size = {"height": pre.image_size, "width": pre.image_size}
    ViTImageProcessor(size=size, **_processor_kwargs(pre)).save_pretrained(str(directory))
    return directory


def build_llava(directory: Path, cfg: TinyConfig = TinyConfig(), pre: PreprocessConfig = PreprocessConfig()) -> Path:
    """Writes a tiny CLIP + Llama `LlavaForConditionalGeneration` and its `LlavaProcessor`."""
    torch.manual_seed(cfg.seed)
    tokenizer = task_tokenizer((IMAGE_TOKEN,))
    ids = _special_ids(tokenizer)
    n_patches = (pre.image_size // cfg.patch_size) ** 2
    vision = CLIPVisionConfig(image_size=pre.image_size, patch_size=cfg.patch_size, hidden_size=cfg.d_model,
                              intermediate_size=2 * cfg.d_model, num_hidden_layers=cfg.n_vision_layers,
                              num_attention_heads=cfg.n_heads, projection_dim=cfg.d_model,
                              initializer_range=cfg.init_std)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=2 * cfg.d_model,
                       num_hidden_layers=cfg.n_text_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_positions,
                       tie_word_embeddings=True, initializer_range=cfg.init_std, **ids)
    # "default" drops CLIP's CLS token: one image token per patch.
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         image_seq_length=n_patches, **ids)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.update(**ids, suppress_tokens=[config.image_token_id])  # answers hold no placeholder
    model.save_pretrained(str(directory))
    image_processor = CLIPImageProcessor(size={"shortest_edge": pre.image_size}, do_center_crop=True,
                                         crop_size={"height": pre.image_size, "width": pre.image_size},
                                         do_convert_rgb=True, **_processor_kwargs(pre))
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                   vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE).save_pretrained(str(directory))
    return directory
