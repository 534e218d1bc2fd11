"""How token sequences and KV caches are laid out for the Hugging Face families.

Both families (`hf_encoder_decoder`, `hf_llava`) feed a causal text model `prompt + response`:
- the prompt is the chat-templated text (`prompt_text`) ending in the template's answer marker,
  left-padded so that every row's answer starts at the same column; responses end in EOS and
  are right-padded;
- positions count real tokens only (`positions`), as `generate` does for left padding, so a row
  gets the same answer whatever padding its batch needs;
- past key/values travel as ONE tensor per graph, `past` (B, 2L, H_kv, P, hd), layer i's keys at
  2i and values at 2i+1, like the built-in model's, so an engine pads, concatenates and prunes
  it by row without knowing the architecture.
"""

from __future__ import annotations

import json

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedTokenizerBase

from fuseloop.preprocessing import chat_prompt, pad_right


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str, image_token: str | None = None) -> str:
    """The prompt as the model's chat template renders it, ready for the answer to follow, with the
    image token placed as serving places it."""
    return chat_prompt(tokenizer, prompt, image_token or "")


def response_ids(tokenizer: PreTrainedTokenizerBase, responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Response tokens + EOS, right-padded: (ids, mask), both (B, R) int64."""
    seqs = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in responses]
    return pad(seqs, tokenizer.pad_token_id, left=False)


def pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), both (B, S) int64, padded on the left or the right."""
    if not left:
        return tuple(torch.from_numpy(a) for a in pad_right(seqs, pad_id))
    ids, mask = pad_right([s[::-1] for s in seqs], pad_id)
    return torch.from_numpy(ids[:, ::-1].copy()), torch.from_numpy(mask[:, ::-1].copy())


def left_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask) (B, S), as the Preprocessor pads them -> the same rows left-padded."""
    S = mask.shape[1]
    source = (torch.arange(S, device=mask.device) - (S - mask.sum(-1, keepdim=True))) % S  # (B, S)
    return ids.gather(1, source), mask.gather(1, source)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 1/0 mask -> position of each real token among the real ones (0 at padding)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def join(prompt_ids, prompt_mask, response_ids, response_mask):
    """prompt (B, S) and response (B, R) -> ids, mask, position_ids, all (B, S + R)."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    return ids, mask, positions(mask)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) mask -> (B,) index of each row's last real token (TRL's reward read-out)."""
    S = mask.shape[1]
    return (mask.long() * torch.arange(1, S + 1, device=mask.device)).argmax(dim=-1)


def response_logprobs(logits: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """logits (B, S + R, V) over `join(prompt, response)` -> log pi(y_t | x, y_<t) (B, R), 0 at padding.

    Prompts must be left-padded: the token at column S + t is predicted by the logits at column
    S + t - 1, so the prompt's last column (its last real token) predicts the first response token."""
    S = logits.shape[1] - response_ids.shape[1]
    picked = logits[:, S - 1:-1].float().log_softmax(-1)  # (B, R, V)
    return picked.gather(-1, response_ids[..., None]).squeeze(-1) * response_mask


def unpack_past(past: torch.Tensor) -> DynamicCache:
    """(B, 2L, H, P, hd) -> a DynamicCache of L layers."""
    L = past.shape[1] // 2
    return DynamicCache(ddp_cache_data=[(past[:, 2 * i], past[:, 2 * i + 1]) for i in range(L)])


def pack_past(cache: DynamicCache) -> torch.Tensor:
    """A DynamicCache -> (B, 2L, H, P, hd)."""
    return torch.stack([t for layer in cache.layers for t in (layer.keys, layer.values)], dim=1)


def empty_past(batch: int, n_layers: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """A cache holding no tokens yet: (B, 2L, H, 0, hd)."""
    return torch.zeros(batch, 2 * n_layers, n_kv_heads, 0, head_dim)


def config_dict(config: PretrainedConfig, nested: tuple[str, ...]) -> dict:
    """The config as JSON keeps it (so a manifest's copy compares equal), without the fields that
    say where and with what it was saved rather than what it is; `nested` names its sub-configs."""
    def strip(d: dict) -> dict:
        return {k: strip(v) if isinstance(v, dict) and k in nested else v
                for k, v in d.items() if k not in ("_name_or_path", "transformers_version")}
    return json.loads(json.dumps(strip(config.to_dict())))
