"""Optional LoRA adapters (peft) on a Hugging Face family's policy (`--lora-rank R`).

Training updates only the adapters; the frozen base under them is the reference policy of the
KL term, so no second copy of the model is kept: `reference_logprobs` runs the same model with
the adapters disabled. Export and saving take `merged(model)`, a plain `transformers` model;
`unloaded(model)` gives the base back (the adapters dropped). The built-in family has no LoRA.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from fuseloop.errors import UserError


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
             target_modules: str | list[str] = "all-linear") -> PeftModel:
    """Wraps `model` (in place) with rank-`rank` adapters; only they are trainable. "all-linear"
    is every linear layer but the output head (GPT-2's Conv1D layers included). Refuses a
    model that is not a `transformers` model (the built-in family's)."""
    if rank < 1:
        raise UserError(f"the LoRA rank must be a positive integer, got {rank}")
    if not isinstance(model, PreTrainedModel):
        raise UserError(f"LoRA adapters need a Hugging Face family's policy; a {type(model).__name__} has none: "
                        "train it without --lora-rank (policy.lora_rank = 0)")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=target_modules)
    return get_peft_model(model, config)


def reference_logprobs(model: PeftModel, logprobs: Callable[..., torch.Tensor], *inputs) -> torch.Tensor:
    """`logprobs(model, *inputs)` under the base weights (the adapters switched off)."""
    with torch.no_grad(), model.disable_adapter():
        return logprobs(model, *inputs)


def merged(model: nn.Module) -> nn.Module:
    """The model with its adapters folded into the weights, as a copy (training may go on);
    a model without adapters is returned as it is."""
    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


def unloaded(model: nn.Module) -> nn.Module:
    """The base model under the adapters, the adapters removed (in place: the LoRA model is spent);
    a model without adapters is returned as it is."""
    if isinstance(model, PeftModel):
        return model.unload()
    return model
