"""Preprocessing, the one copy that training and serving both run.

Images arrive as PNG/JPEG bytes (serving, logged events) or PIL images (pretraining renders);
both go through `image_array`. The config travels in each version's manifest, so a served
model is always fed exactly as it was trained.
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from transformers import PreTrainedTokenizerFast


class InvalidInput(ValueError):
    """The input cannot be used; the message says what was wrong (maps to INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 32
    mean: float = 0.5
    std: float = 0.5
    max_prompt_tokens: int = 24
    max_response_tokens: int = 32
    # Decompression-bomb and abuse limits, checked before pixels are decoded.
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    image_formats: tuple[str, ...] = ("PNG", "JPEG")

    def within(self, max_image_bytes: int, max_image_pixels: int) -> "PreprocessConfig":
        """The same preprocessing with image limits no looser than these (a service's own limits
        may be tighter than the ones a version was trained with)."""
        return replace(self, max_image_bytes=min(self.max_image_bytes, max_image_bytes),
                       max_image_pixels=min(self.max_image_pixels, max_image_pixels))


def decode_image(data: bytes, config: PreprocessConfig) -> Image.Image:
    if not data:
        raise InvalidInput("image is empty: send PNG or JPEG bytes")
    if len(data) > config.max_image_bytes:
        raise InvalidInput(f"image is {len(data)} bytes; the limit is {config.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in config.image_formats:
                raise InvalidInput(f"image format {img.format} is not accepted; use {', '.join(config.image_formats)}")
            # The header's size is known before decoding: refuse bombs without inflating them.
            w, h = img.size
            if w * h > config.max_image_pixels:
                raise InvalidInput(f"image is {w}x{h} = {w * h} pixels; the limit is {config.max_image_pixels}")
            img.load()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(f"image refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:  # its message is the repr of our BytesIO: say what it means
        raise InvalidInput("image could not be decoded as PNG or JPEG: its bytes are no image format") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise InvalidInput(f"image could not be decoded as PNG or JPEG: {e}") from None
    return img


def image_pixels(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """Checked, decoded and normalized: PNG/JPEG bytes -> (3, H, W) float32."""
    return image_array(decode_image(data, config), config)


def image_array(img: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """(3, H, W) float32, resized and normalized."""
    img = img.convert("RGB")
    if img.size != (config.image_size, config.image_size):
        img = img.resize((config.image_size, config.image_size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0
    return ((x - config.mean) / config.std).transpose(2, 0, 1).copy()


class Preprocessor:
    """Turns images, prompts and responses into model inputs, and token ids back into text."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, config: PreprocessConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.pad_id = tokenizer.pad_token_id
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id

    def memoized(self, maxsize: int | None = 4096) -> "Preprocessor":
        """This preprocessor, tokenizing each distinct prompt and response once (LRU of `maxsize`,
        None for unbounded). A tokenizer call costs about 100 µs: serving sees templated prompts
        and re-tokenizes texts it just decoded, and training revisits the same texts every pass."""
        out = copy.copy(self)
        out.prompt_ids = _copying(functools.lru_cache(maxsize)(self.prompt_ids))
        out.response_ids = _copying(functools.lru_cache(maxsize)(self.response_ids))
        return out

    def image(self, image: bytes | Image.Image) -> np.ndarray:
        if isinstance(image, (bytes, bytearray)):
            return image_pixels(image, self.config)
        return image_array(image, self.config)

    def images(self, images: list[bytes | Image.Image]) -> np.ndarray:
        return np.stack([self.image(i) for i in images])

    def prompt_ids(self, prompt: str) -> list[int]:
        if not prompt.strip():
            raise InvalidInput("prompt is empty")
        ids = self.tokenizer.encode(chat_prompt(self.tokenizer, prompt), add_special_tokens=False)
        if len(ids) > self.config.max_prompt_tokens:
            raise InvalidInput(f"prompt is {len(ids)} tokens; the limit is {self.config.max_prompt_tokens}")
        return ids

    def prompts(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both (B, S) int64, right-padded."""
        return self._pad([self.prompt_ids(p) for p in prompts])

    def response_ids(self, response: str) -> list[int]:
        """Response tokens without BOS, ending in EOS, truncated to the response limit."""
        ids = self.tokenizer.encode(response, add_special_tokens=False)[: self.config.max_response_tokens - 1]
        return ids + [self.eos_id]

    def responses(self, responses: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Decoder inputs for scoring: [BOS] + tokens + [EOS], right-padded; (ids, mask)."""
        return self._pad([[self.bos_id] + self.response_ids(r) for r in responses])

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in (self.pad_id, self.bos_id)]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _pad(self, seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return pad_right(seqs, self.pad_id)


def _copying(fn: Callable[[str], list[int]]) -> Callable[[str], list[int]]:
    # Callers may extend the lists they get; the cached ones must stay as they were.
    return lambda text: list(fn(text))


def chat_prompt(tokenizer: PreTrainedTokenizerFast, content: str) -> str:
    """The prompt as the tokenizer's chat template renders it, ready for the answer to follow; the
    text as it is when the tokenizer has no template (the built-in model's). A Hugging Face model's
    checkpoint tokenizer carries its template, so serving and training prompt it as it expects."""
    if not getattr(tokenizer, "chat_template", None):
        return content
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids, mask), both (B, S) int64, right-padded (serving batches use it too)."""
    width = max(1, max(len(s) for s in seqs))
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask
