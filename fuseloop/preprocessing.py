"""Preprocessing, the one copy that training and serving both run.

Images arrive as PNG/JPEG bytes (serving, logged events) or PIL images (pretraining renders);
both are checked by `decode_image`, then turned into pixels by the model's own Hugging Face image
processor when it has one, else by `image_array`. Prompts go through the tokenizer's chat template;
a decoder-only VLM's prompt gets its image placeholders here too (`image_token`). The config
travels in each version's manifest, and the tokenizer and image processor in its folder
(`save_preprocessor` / `load_preprocessor`), so a served model is always fed exactly as it was trained.
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from transformers import AutoImageProcessor, PreTrainedTokenizerFast

from fuseloop.tokenizer import load_tokenizer, save_tokenizer

TOKENIZER_DIR, IMAGE_PROCESSOR_DIR = "tokenizer", "image_processor"


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
    # Early-fusion (LLaVA-style) models: the prompt starts with this token, expanded into
    # `image_tokens` placeholders whose embeddings the image features replace. "" for none.
    image_token: str = ""
    image_tokens: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        """From its JSON form (a manifest's, a checkpoint's preprocess.json)."""
        return cls(**{**d, "image_formats": tuple(d.get("image_formats", cls.image_formats))})

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

    def __init__(self, tokenizer: PreTrainedTokenizerFast, config: PreprocessConfig,
                 image_processor: object | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.image_processor = image_processor  # a Hugging Face model's own; None: `image_array`
        self.pad_id = tokenizer.pad_token_id
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token) if config.image_token else None
        self.chat_form = chat_content_form(tokenizer, config.image_token)

    def memoized(self, maxsize: int | None = 4096) -> "Preprocessor":
        """This preprocessor, tokenizing each distinct prompt and response once (LRU of `maxsize`,
        None for unbounded). A tokenizer call costs about 100 µs: serving sees templated prompts
        and re-tokenizes texts it just decoded, and training revisits the same texts every pass."""
        out = copy.copy(self)
        out.prompt_ids = _copying(functools.lru_cache(maxsize)(self.prompt_ids))
        out.response_ids = _copying(functools.lru_cache(maxsize)(self.response_ids))
        return out

    def image(self, image: bytes | Image.Image) -> np.ndarray:
        """(3, H, W) float32 pixels of PNG/JPEG bytes (checked first) or a PIL image."""
        if isinstance(image, (bytes, bytearray)):
            image = decode_image(image, self.config)
        if self.image_processor is None:
            return image_array(image, self.config)
        pixels = self.image_processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"]
        return np.asarray(pixels[0], dtype=np.float32)

    def images(self, images: list[bytes | Image.Image]) -> np.ndarray:
        return np.stack([self.image(i) for i in images])

    def prompt_ids(self, prompt: str) -> list[int]:
        """The chat-templated prompt's ids (with its image placeholders, for an early-fusion model);
        the length limit counts the text, not the placeholders."""
        if not prompt.strip():
            raise InvalidInput("prompt is empty")
        token = self.config.image_token
        if token and token in prompt:
            raise InvalidInput(f"prompt contains the image token {token!r}; the service places the image itself")
        ids = self.tokenizer.encode(chat_prompt(self.tokenizer, prompt, token, self.chat_form), add_special_tokens=False)
        text = len(ids) - (1 if token else 0)
        if text > self.config.max_prompt_tokens:
            raise InvalidInput(f"prompt is {text} tokens; the limit is {self.config.max_prompt_tokens}")
        if token:
            at = ids.index(self.image_token_id)
            ids[at:at + 1] = [self.image_token_id] * self.config.image_tokens
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


def save_preprocessor(pre: Preprocessor, directory: Path) -> None:
    """Writes the tokenizer (directory/tokenizer) and the image processor, if any
    (directory/image_processor), as `save_pretrained` does; the config travels separately."""
    save_tokenizer(pre.tokenizer, Path(directory) / TOKENIZER_DIR)
    if pre.image_processor is not None:
        pre.image_processor.save_pretrained(str(Path(directory) / IMAGE_PROCESSOR_DIR))


def load_preprocessor(directory: Path, config: PreprocessConfig) -> Preprocessor:
    """Reads back what `save_preprocessor` wrote."""
    directory = Path(directory)
    images = directory / IMAGE_PROCESSOR_DIR
    image_processor = AutoImageProcessor.from_pretrained(str(images), local_files_only=True) if images.is_dir() else None
    return Preprocessor(load_tokenizer(directory / TOKENIZER_DIR), config, image_processor)


def _copying(fn: Callable[[str], list[int]]) -> Callable[[str], list[int]]:
    # Callers may extend the lists they get; the cached ones must stay as they were.
    return lambda text: list(fn(text))


# How a chat template takes the user's turn (`chat_content_form`).
NO_TEMPLATE, TEXT, PARTS = "none", "text", "parts"
_PROBE = "fuseloop probe 7"


def chat_content_form(tokenizer: PreTrainedTokenizerFast, image_token: str = "") -> str:
    """How the tokenizer's chat template takes a user turn: NO_TEMPLATE (none: the text as it is),
    TEXT (a string, as text-only templates and the tiny models' take it) or PARTS (a list of content
    parts, `[{"type": "image"}, {"type": "text", "text": ...}]`, as vision-language processors'
    templates take it, e.g. llava-hf's, which renders a string turn as nothing at all).

    Decided once, by rendering a probe both ways: a form is usable when the probe's text comes out
    (a text-only template renders parts as their Python repr, so parts count only where they render
    as the string does, or where the string does not render). With an image token, parts are used
    only if the template places the image itself, exactly once; else the text form, with the
    token put before the text. Raises ValueError when neither form renders the prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return NO_TEMPLATE
    as_text = _render(tokenizer, _PROBE)
    as_parts = _render(tokenizer, [{"type": "text", "text": _PROBE}])
    text_ok = as_text is not None and _PROBE in as_text
    parts_ok = as_parts is not None and _PROBE in as_parts and (not text_ok or as_parts == as_text)
    if image_token and parts_ok:
        with_image = _render(tokenizer, _parts(_PROBE, image_token))
        if with_image is not None and with_image.count(image_token) == 1:
            return PARTS
        parts_ok = False
    if text_ok:
        return TEXT
    if parts_ok:
        return PARTS
    raise ValueError("the chat template renders neither a user turn given as a string nor one given as content "
                     "parts ([{'type': 'text', 'text': ...}]) with the prompt's text in it"
                     + (f", nor places the image token {image_token!r}" if image_token else ""))


def chat_prompt(tokenizer: PreTrainedTokenizerFast, text: str, image_token: str = "", form: str | None = None) -> str:
    """The prompt as the tokenizer's chat template renders it, ready for the answer to follow, with
    the image token (for an early-fusion model) where the template or, for a text template, the
    start of the turn puts it; the text as it is when the tokenizer has no template (the built-in
    model's). A Hugging Face model's checkpoint tokenizer carries its template, so serving and
    training prompt it as it expects. `form`: `chat_content_form`'s answer, if known."""
    form = chat_content_form(tokenizer, image_token) if form is None else form
    if form == PARTS:
        return _apply(tokenizer, _parts(text, image_token))
    content = f"{image_token} {text}" if image_token else text
    return content if form == NO_TEMPLATE else _apply(tokenizer, content)


def _parts(text: str, image_token: str) -> list[dict]:
    return ([{"type": "image"}] if image_token else []) + [{"type": "text", "text": text}]


def _apply(tokenizer: PreTrainedTokenizerFast, content: str | list[dict]) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def _render(tokenizer: PreTrainedTokenizerFast, content: str | list[dict]) -> str | None:
    """The probe's rendering, or None where the template fails on that form (a template may
    index, filter or test the content in any way, and jinja raises many types)."""
    try:
        return _apply(tokenizer, content)
    except Exception:
        return None


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids, mask), both (B, S) int64, right-padded (serving batches use it too)."""
    width = max(1, max(len(s) for s in seqs))
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask
