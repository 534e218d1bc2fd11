"""`fuseloop bench train`: its data and its refusal to run without the TRL baseline (the benchmark
itself is a script, not a test)."""

from __future__ import annotations

import sys

from fuseloop.scenes import make_split
from trainer.bench import BenchConfig, main, preference_pairs
from trainer.reward_training import is_heldout


def test_without_trl_the_bench_says_how_to_install_the_baseline(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError
    assert main() == 2
    err = capsys.readouterr().err
    assert "TRL is not installed" in err and "pip install -c constraints.txt -e '.[bench]'" in err


def test_pairs_prefer_the_gold_answer_and_only_training_pairs_carry_label_noise():
    cfg = BenchConfig(n_examples=600)
    data = preference_pairs(cfg)
    gold = {f"bench-{cfg.seed}-{i}": e.answer for i, e in enumerate(make_split("validation", cfg.n_examples))}
    held = [p for p in data.pairs if is_heldout(p[0].request_id, cfg.heldout_share)]
    train = [p for p in data.pairs if not is_heldout(p[0].request_id, cfg.heldout_share)]
    assert held and all(chosen == gold[ctx.request_id] for ctx, chosen, _, _ in held)
    flipped = sum(rejected == gold[ctx.request_id] for ctx, _, rejected, _ in train) / len(train)
    assert 0.04 < flipped < 0.18  # label_noise 0.1
    assert all(chosen != rejected for _, chosen, rejected, _ in data.pairs)
