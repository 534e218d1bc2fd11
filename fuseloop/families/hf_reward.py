"""A reward model for the Hugging Face families: the policy's backbone with a scalar head.

Like TRL's reward models: r(image, prompt, response) = Linear(d, 1) of the last real token's final
hidden state. The backbone is saved as the `transformers` directory it came from; the head sits
beside it in `reward_head.safetensors`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fuseloop.families.hf_layout import join, last_token_index

HEAD_FILE = "reward_head.safetensors"

# (backbone, pixel_values, ids, mask, position_ids) -> final hidden states (B, S, d)
HiddenFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class HFRewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden: HiddenFn, d_model: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.hidden = hidden
        self.head = nn.Linear(d_model, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module, hidden: HiddenFn, d_model: int) -> "HFRewardModel":
        """A fresh head on a copy of the policy's weights (the policy stays untouched); pass a
        plain `transformers` model (`hf_lora.merged` of a LoRA policy)."""
        return cls(copy.deepcopy(policy), hidden, d_model)

    def forward(self, pixel_values, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
        """prompt (B, S) padded on either side, response + EOS (B, R) right-padded -> rewards (B,)."""
        ids, mask, pos = join(prompt_ids, prompt_mask, response_ids, response_mask)
        hidden = self.hidden(self.backbone, pixel_values, ids, mask, pos)  # (B, S + R, d)
        picked = hidden[torch.arange(ids.shape[0], device=ids.device), last_token_index(mask)]  # (B, d)
        return self.head(picked).squeeze(-1)

    def save(self, directory: Path) -> None:
        self.backbone.save_pretrained(str(directory))
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(Path(directory) / HEAD_FILE))

    def load_head(self, directory: Path) -> "HFRewardModel":
        self.head.load_state_dict(load_file(str(Path(directory) / HEAD_FILE)))
        return self
