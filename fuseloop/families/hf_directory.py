"""A team's own model, from a local Hugging Face model directory (as `save_pretrained` writes it):
which family reads it, its policy, and its preprocessing (its own tokenizer and image processor).
Nothing is fetched from a hub. A directory that cannot be used is refused with what is missing."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch.nn as nn
from PIL import Image

from fuseloop.families import HF_ARCHITECTURES, ModelFamily, family_for
from fuseloop.families.hf_loading import ModelDirectoryError, quiet_transformers
from fuseloop.preprocessing import PreprocessConfig, Preprocessor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class OpenedModel:
    family: ModelFamily
    policy: nn.Module
    preprocessor: Preprocessor


def family_of_directory(directory: Path) -> ModelFamily:
    """The family whose architecture config.json names; refuses a directory without one, or an
    architecture no family reads."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirectoryError(f"{directory}: no such model directory")
    path = directory / "config.json"
    if not path.exists():
        raise ModelDirectoryError(f"{directory} is not a Hugging Face model directory: it has no config.json "
                                  "(write one with save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirectoryError(f"{path} is not valid JSON: {e}") from None
    named = list(config.get("architectures") or [])
    for architecture in named:
        if architecture in HF_ARCHITECTURES:
            return family_for(HF_ARCHITECTURES[architecture])
    what = ", ".join(named) or f"model_type {config.get('model_type')!r}"
    raise ModelDirectoryError(f"{directory}: architecture {what} is not supported; supported: "
                              f"{', '.join(sorted(HF_ARCHITECTURES))}")


def open_model_directory(directory: Path, preprocess: PreprocessConfig = PreprocessConfig()) -> OpenedModel:
    """Family, policy and preprocessor of a model directory; `preprocess` gives the limits (the
    image size comes from the image processor, image placeholders from the family)."""
    directory = Path(directory)
    family = family_of_directory(directory)
    tokenizer = load_tokenizer(directory)
    image_processor = load_image_processor(directory)
    policy = family.load_policy(directory)
    config = family.preprocess_config(policy, tokenizer, replace(preprocess, image_size=_pixels_size(image_processor)))
    try:
        return OpenedModel(family, policy, Preprocessor(tokenizer, config, image_processor))
    except ValueError as e:  # the chat template (chat_content_form)
        raise ModelDirectoryError(f"{directory}: {e}") from None


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise ModelDirectoryError(f"{directory}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                  "save it beside the model with tokenizer.save_pretrained")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelDirectoryError(f"{directory}: the tokenizer does not load: {e}") from None
    if not tokenizer.chat_template:
        tokenizer.chat_template = processor_chat_template(directory)
    # Padding and the response's leading marker need ids; tokenizers such as GPT-2's have none.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ModelDirectoryError(f"{directory}: the tokenizer has no end-of-sequence token (eos_token)")
    return tokenizer


def processor_chat_template(directory: Path) -> str | None:
    """The processor's chat template where the tokenizer has none: checkpoints saved by older
    transformers keep it in chat_template.json or processor_config.json (llava-hf's do), which
    AutoTokenizer does not read, and a prompt without its template is silently another prompt."""
    for name in ("chat_template.json", "processor_config.json"):
        path = directory / name
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except (ValueError, AttributeError):
                raise ModelDirectoryError(f"{path}: not a JSON object") from None
            if isinstance(template, str) and template:
                return template
    return None


def load_image_processor(directory: Path):
    from transformers import AutoImageProcessor

    try:
        with quiet_transformers():
            return AutoImageProcessor.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError):  # transformers' message points at the hub, not at the directory
        raise ModelDirectoryError(f"{directory}: no image processor (preprocessor_config.json or processor_config.json); "
                                  "save it beside the model with image_processor.save_pretrained") from None


def _pixels_size(image_processor) -> int:
    """The side of the square pixels the image processor makes (what the vision tower takes)."""
    pixels = image_processor(images=Image.new("RGB", (64, 48)), return_tensors="np")["pixel_values"]
    return int(pixels.shape[-1])
