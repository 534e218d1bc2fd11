"""The fused policy: every fusion mode works, and the KV-cached step equals a full pass."""

import pytest
import torch

from fuseloop.model import FusedPolicy, ModelConfig, RewardModel, generate


def _inputs(cfg: ModelConfig, B=3, S=5):
    g = torch.Generator().manual_seed(0)
    px = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(4, cfg.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, -2:] = 0
    return px, ids, mask


@pytest.mark.parametrize("fusion", ["early", "late", "hybrid"])
def test_each_fusion_mode_encodes_and_generates(fusion):
    cfg = ModelConfig(fusion=fusion, d_model=32, n_heads=2)
    policy = FusedPolicy(cfg).eval()
    px, ids, mask = _inputs(cfg)
    memory, memory_mask = policy.encoder(px, ids, mask)
    assert memory.shape == (3, cfg.n_image_tokens + 5, 32)
    assert memory_mask[:, : cfg.n_image_tokens].all()
    tokens, logps = generate(policy, px, ids, mask, max_new_tokens=6, temperature=1.0)
    assert tokens.shape[0] == 3 and tokens.shape[1] <= 6
    assert (logps <= 0).all()


def test_cached_decoding_equals_one_full_pass():
    cfg = ModelConfig(d_model=32, n_heads=2)
    policy = FusedPolicy(cfg).eval()
    px, ids, mask = _inputs(cfg)
    memory, memory_mask = policy.encoder(px, ids, mask)
    seq = torch.randint(4, cfg.vocab_size, (3, 6))
    full, _ = policy.decode_step(seq, torch.arange(6).expand(3, 6), torch.ones(3, 6, dtype=torch.long),
                                 memory, memory_mask, policy.decoder.empty_past(3))
    past, steps = policy.decoder.empty_past(3), []
    for t in range(6):
        logits, past = policy.decode_step(seq[:, t:t + 1], torch.full((3, 1), t), torch.ones(3, t + 1, dtype=torch.long),
                                          memory, memory_mask, past)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert past.shape == (3, 2 * cfg.n_decoder_layers, cfg.n_heads, 6, cfg.head_dim)


def test_left_padded_cache_rows_are_ignored():
    cfg = ModelConfig(d_model=32, n_heads=2)
    policy = FusedPolicy(cfg).eval()
    px, ids, mask = _inputs(cfg, B=1)
    memory, memory_mask = policy.encoder(px, ids, mask)
    seq = torch.randint(4, cfg.vocab_size, (1, 3))
    plain, _ = policy.decode_step(seq, torch.arange(3)[None], torch.ones(1, 3, dtype=torch.long), memory, memory_mask,
                                  policy.decoder.empty_past(1))
    junk = torch.randn(1, 2 * cfg.n_decoder_layers, cfg.n_heads, 2, cfg.head_dim)  # two padded cache slots
    padded, _ = policy.decode_step(seq, torch.arange(3)[None], torch.tensor([[0, 0, 1, 1, 1]]), memory, memory_mask, junk)
    assert torch.allclose(plain, padded, atol=1e-5)


def test_reward_model_shares_the_policy_trunk_and_scores_each_response():
    cfg = ModelConfig(d_model=32, n_heads=2)
    policy = FusedPolicy(cfg)
    rm = RewardModel.from_policy(policy)
    assert torch.equal(rm.encoder.stem[0].weight, policy.encoder.stem[0].weight)
    px, ids, mask = _inputs(cfg)
    resp = torch.randint(4, cfg.vocab_size, (3, 4))
    rmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    assert rm(px, ids, mask, resp, rmask).shape == (3,)


def test_unknown_fusion_is_refused():
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig(fusion="sideways")
