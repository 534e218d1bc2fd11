"""The fused image+text -> text policy and the reward model that shares its trunk.

Reads top to bottom: attention and blocks, the config, the encoders and fusion, the decoder
(one `step` with a KV cache serves training, generation and the ONNX export alike), the
policy, the reward model, and torch generation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NEG_INF = -1e9  # additive mask value; finite so fully-masked rows stay NaN-free in ONNX too


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.hd = n_heads, d // n_heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) attends to k, v (B, H, S, hd); bias (B, 1|H, T, S) additive."""
        B, T, _ = x.shape
        q = self.heads(self.q(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd) + bias  # (B, H, T, S)
        y = att.softmax(dim=-1) @ v  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class EncoderBlock(nn.Module):
    """Bidirectional self-attention over a padded sequence."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(d), Attention(d, n_heads), nn.LayerNorm(d), MLP(d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        k, v = self.attn.project_kv(h)
        x = x + self.attn.attend(h, k, v, bias)
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    """Causal self-attention with a KV cache, cross-attention to the fused memory, MLP."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(d), Attention(d, n_heads)
        self.ln2, self.cross_attn = nn.LayerNorm(d), Attention(d, n_heads)
        self.ln3, self.mlp = nn.LayerNorm(d), MLP(d)

    def forward(self, x, past_k, past_v, self_bias, memory, memory_bias):
        h = self.ln1(x)
        k, v = self.self_attn.project_kv(h)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, H, P+T, hd)
        x = x + self.self_attn.attend(h, k, v, self_bias)
        mk, mv = self.cross_attn.project_kv(memory)
        x = x + self.cross_attn.attend(self.ln2(x), mk, mv, memory_bias)
        return x + self.mlp(self.ln3(x)), k, v


@dataclass
class ModelConfig:
    vocab_size: int = 64
    image_size: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_image_layers: int = 1
    n_prompt_layers: int = 1
    n_fusion_layers: int = 1
    n_decoder_layers: int = 2
    fusion: str = "hybrid"  # early | late | hybrid
    max_prompt_tokens: int = 24
    max_response_tokens: int = 32
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        if self.fusion not in ("early", "late", "hybrid"):
            raise ValueError(f"fusion must be early, late or hybrid, not {self.fusion!r}")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads")

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // 8) ** 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def init_weights(module: nn.Module) -> None:
    # Small init (GPT-2 style): with tied embeddings, unit-variance embeddings give huge logits.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 1/0 key mask -> (B, 1, 1, S) additive bias."""
    return (1.0 - mask.to(torch.float32))[:, None, None, :] * NEG_INF


class FusedEncoder(nn.Module):
    """Image encoder + prompt encoder + fusion -> memory (B, M, d) and its mask (B, M).

    early: one joint stack over [image; prompt] tokens. late: separate stacks, concatenated
    (the decoder's cross-attention does all the fusing). hybrid: separate stacks, then joint layers.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        # Conv stem: 32x32 -> 16x16 -> 4x4 tokens (one per 8x8 patch).
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(32, d, 4, stride=4))
        self.image_pos = nn.Parameter(torch.zeros(1, cfg.n_image_tokens, d))
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.prompt_pos = nn.Parameter(torch.zeros(1, cfg.max_prompt_tokens, d))
        self.modality = nn.Parameter(torch.zeros(2, d))
        separate = cfg.fusion != "early"
        self.image_layers = nn.ModuleList(EncoderBlock(d, cfg.n_heads) for _ in range(cfg.n_image_layers if separate else 0))
        self.prompt_layers = nn.ModuleList(EncoderBlock(d, cfg.n_heads) for _ in range(cfg.n_prompt_layers if separate else 0))
        joint = {"early": cfg.n_image_layers + cfg.n_fusion_layers, "late": 0, "hybrid": cfg.n_fusion_layers}[cfg.fusion]
        self.fusion_layers = nn.ModuleList(EncoderBlock(d, cfg.n_heads) for _ in range(joint))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.image_pos, std=0.02)
        nn.init.normal_(self.prompt_pos, std=0.02)

    def forward(self, pixel_values: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        B, S = prompt_ids.shape
        img = self.stem(pixel_values).flatten(2).transpose(1, 2) + self.image_pos + self.modality[0]  # (B, N, d)
        txt = self.tok(prompt_ids) + self.prompt_pos[:, :S] + self.modality[1]  # (B, S, d)
        img_mask = torch.ones(B, img.shape[1], dtype=prompt_mask.dtype, device=prompt_mask.device)
        for layer in self.image_layers:
            img = layer(img, padding_bias(img_mask))
        for layer in self.prompt_layers:
            txt = layer(txt, padding_bias(prompt_mask))
        memory = torch.cat([img, txt], dim=1)  # (B, M = N + S, d)
        memory_mask = torch.cat([img_mask, prompt_mask], dim=1)
        for layer in self.fusion_layers:
            memory = layer(memory, padding_bias(memory_mask))
        return self.ln(memory), memory_mask


class TextDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(cfg.max_response_tokens + 1, d)
        self.blocks = nn.ModuleList(DecoderBlock(d, cfg.n_heads) for _ in range(cfg.n_decoder_layers))
        self.ln = nn.LayerNorm(d)

    def empty_past(self, batch: int, device=None) -> torch.Tensor:
        c = self.cfg
        return torch.zeros(batch, 2 * c.n_decoder_layers, c.n_heads, 0, c.head_dim, device=device)

    def step(self, input_ids, position_ids, attention_mask, memory, memory_mask, past):
        """One decoder pass over T new tokens after P cached ones.

        input_ids, position_ids: (B, T); attention_mask: (B, P+T), 1 for real keys (left padding
        of the cache is allowed); memory (B, M, d), memory_mask (B, M); past (B, 2L, H, P, hd)
        holding layer i's keys at 2i and values at 2i+1 (batch first, as Triton batches).
        Returns hidden (B, T, d) and present (B, 2L, H, P+T, hd).
        """
        T = input_ids.shape[1]
        P = past.shape[3]
        x = self.tok(input_ids) + self.pos(position_ids)
        # New token t may see cached keys and new keys up to itself.
        causal = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)  # (T, P+T)
        allowed = causal[None, :, :] & attention_mask[:, None, :].bool()  # (B, T, P+T)
        self_bias = ((~allowed).to(torch.float32) * NEG_INF)[:, None]  # (B, 1, T, P+T)
        memory_bias = padding_bias(memory_mask)
        presents = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, past[:, 2 * i], past[:, 2 * i + 1], self_bias, memory, memory_bias)
            presents += [k, v]
        return self.ln(x), torch.stack(presents, dim=1)


class FusedPolicy(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = FusedEncoder(cfg)
        self.decoder = TextDecoder(cfg)
        self.apply(init_weights)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.decoder.tok.weight.T  # tied embeddings

    def decode_step(self, input_ids, position_ids, attention_mask, memory, memory_mask, past):
        hidden, present = self.decoder.step(input_ids, position_ids, attention_mask, memory, memory_mask, past)
        return self.logits(hidden), present

    def forward(self, pixel_values, prompt_ids, prompt_mask, input_ids, input_mask) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for decoder inputs [BOS] + response (right-padded)."""
        memory, memory_mask = self.encoder(pixel_values, prompt_ids, prompt_mask)
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        logits, _ = self.decode_step(input_ids, positions, input_mask, memory, memory_mask,
                                     self.decoder.empty_past(B, input_ids.device))
        return logits


class RewardModel(nn.Module):
    """The fused trunk with a scalar head: r(image, prompt, response), read at the last real token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = FusedEncoder(cfg)
        self.decoder = TextDecoder(cfg)
        self.head = nn.Linear(cfg.d_model, 1)
        self.apply(init_weights)

    @classmethod
    def from_policy(cls, policy: FusedPolicy) -> "RewardModel":
        rm = cls(policy.cfg)
        rm.encoder.load_state_dict(policy.encoder.state_dict())
        rm.decoder.load_state_dict(policy.decoder.state_dict())
        return rm

    def forward(self, pixel_values, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
        """response_ids: [BOS] + response + [EOS], right-padded; returns (B,) rewards."""
        memory, memory_mask = self.encoder(pixel_values, prompt_ids, prompt_mask)
        B, T = response_ids.shape
        positions = torch.arange(T, device=response_ids.device).expand(B, T)
        hidden, _ = self.decoder.step(response_ids, positions, response_mask, memory, memory_mask,
                                      self.decoder.empty_past(B, response_ids.device))
        last = (response_mask.sum(dim=1) - 1).clamp(min=0)  # (B,)
        picked = hidden[torch.arange(B), last]  # (B, d)
        return self.head(picked).squeeze(-1)


@torch.no_grad()
def generate(
    policy: FusedPolicy,
    pixel_values: torch.Tensor,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples (or, at temperature 0, greedily decodes) responses.

    Returns tokens (B, T) (EOS included, PAD after it) and their logprobs (B, T) under the
    tempered distribution (0 after EOS).
    """
    cfg = policy.cfg
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    memory, memory_mask = policy.encoder(pixel_values, prompt_ids, prompt_mask)
    past = policy.decoder.empty_past(B, device)
    t = 0

    def step(token: torch.Tensor) -> torch.Tensor:
        nonlocal past, t
        positions = torch.full((B, 1), t, dtype=torch.long, device=device)
        mask = torch.ones(B, t + 1, dtype=torch.long, device=device)
        logits, past = policy.decode_step(token[:, None], positions, mask, memory, memory_mask, past)
        t += 1
        return logits[:, -1]

    first = torch.full((B,), cfg.bos_id, dtype=torch.long, device=device)
    return sample_loop(step, first, min(max_new_tokens, cfg.max_response_tokens), cfg.eos_id, cfg.pad_id,
                       temperature, top_p, generator)


def sample_loop(step: Callable[[torch.Tensor], torch.Tensor], first: torch.Tensor, max_new_tokens: int, eos_id: int,
                pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling loop of every family's `generate`: `step(tokens (B,))` feeds one token per row
    (advancing its own cache) and returns the logits (B, V) of the next; `first` is what the first
    step feeds. -> tokens (B, T) (EOS included, PAD after it), logprobs (B, T) (0 after EOS)."""
    token, done = first, torch.zeros(len(first), dtype=torch.bool, device=first.device)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        nxt, logp = sample_tokens(step(token).float(), temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        logps.append(torch.where(done, torch.zeros_like(logp), logp))
        tokens.append(nxt)
        done = done | (nxt == eos_id)
        token = nxt
        if bool(done.all()):
            break
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator=None):
    """logits (B, V) -> (token (B,), logprob (B,)) under temperature and nucleus filtering."""
    if temperature <= 0:
        logp = torch.log_softmax(logits, dim=-1)
        tok = logits.argmax(dim=-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    logp = torch.log_softmax(logits, dim=-1)
    tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
