"""`fuseloop bench train`: reward-model training, fuseloop's loop vs TRL's `RewardTrainer`, in one run.

Same preference pairs (scenes task; gold-ordered, with simulated-user label noise on the training
side only), same initial weights, batch size, learning rate, optimizer (AdamW, weight decay 0.01,
constant lr, grad-norm clip 1.0) and number of training examples. Both are scored by the same
function (`evaluate_pairs`) on the same held-out pairs, split by request as the trainer splits.

The initial reward model is the family's `reward_model_from_policy` of a supervised base policy, a fresh head
(as pretraining builds the first reward model): from a fresh trunk neither learns image grounding
within a few epochs. The base policy is pretrained once (300 steps) and cached, or given with
--checkpoint. What still differs: `train_reward` draws minibatches with replacement, TRL walks
shuffled epochs; transformers' AdamW exempts biases and LayerNorm weights from weight decay.
Held-out accuracy after a few epochs moves by several points with the training order alone, so
compare accuracies over several seeds (--seeds N).

How TRL is fed: `RewardTrainer` calls `model(**batch)` and reads `.logits` (chosen rows first,
then rejected rows). `TRLRewardModel` is a thin `transformers.PreTrainedModel` around our
reward model, and a collator adds the image and prompt tensors to TRL's padded (chosen; rejected)
response ids, pre-tokenized as TRL's own preprocessing does. `compute_loss` is TRL's, unchanged.

Timing: wall seconds are end to end from pairs to trained model. fuseloop's include its two
held-out evaluations (before/after, part of `train_reward`); TRL's include building the dataset
and the trainer (accelerate set-up). examples/s = training examples / wall seconds.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from demo.simulated_users import UserModel
from fuseloop.checkpoint import Checkpoint
from fuseloop.model import count_parameters
from fuseloop.preprocessing import Preprocessor, pad_right
from fuseloop.scenes import BiasedAnnotator, GoldOracle, alternative_answer, make_split, png_bytes, render
from trainer.batches import ContextTensors
from trainer.reward_training import RewardTrainConfig, evaluate_pairs, is_heldout, split, train_reward
from trainer.signals import Context, TrainingSet

TRL_MISSING = ("TRL is not installed, so there is no baseline to compare with. Install the bench extra:\n"
               "  .venv/bin/pip install -c constraints.txt -e '.[bench]'")


@dataclass(frozen=True)
class BenchConfig:
    n_examples: int = 3000  # scenes questions, one preference pair each
    heldout_share: float = 0.15
    label_noise: float = UserModel().noise  # training pairs flipped, as simulated users do
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    base_steps: int = 300  # supervised steps of the cached base policy (default architecture)


# -- data ------------------------------------------------------------------------------------------

def preference_pairs(cfg: BenchConfig) -> TrainingSet:
    """One pair per validation-split question: the gold answer over a wrong one (the annotator's
    typical confusion where it has one, else another well-formed answer). Held-out pairs stay
    gold-ordered; training pairs are flipped with probability `label_noise`."""
    rng = random.Random(cfg.seed)
    oracle, annotator = GoldOracle(), BiasedAnnotator()
    out = TrainingSet()
    for i, ex in enumerate(make_split("validation", cfg.n_examples)):
        wrong = annotator.confusion(ex) if annotator.biased(ex) and rng.random() < 0.5 else alternative_answer(ex, rng)
        if oracle.score(ex, wrong) >= oracle.score(ex, ex.answer):
            continue
        ctx = Context(ex.prompt, png_bytes(render(ex.scene)), request_id=f"bench-{cfg.seed}-{i}")
        chosen, rejected = ex.answer, wrong
        if not is_heldout(ctx.request_id, cfg.heldout_share) and rng.random() < cfg.label_noise:
            chosen, rejected = rejected, chosen
        out.pairs.append((ctx, chosen, rejected, 1.0))
    out.counts["preference"] = len(out.pairs)
    return out


def base_checkpoint(cfg: BenchConfig, checkpoint: str | None) -> Checkpoint:
    """The given run directory, else a base policy pretrained once and cached."""
    if checkpoint:
        return Checkpoint.load(Path(checkpoint))
    from trainer.pretrain import PretrainConfig, pretrain

    pcfg = PretrainConfig(n_train=3000, n_test=60, steps=cfg.base_steps, reward_steps=1, seed=cfg.seed)
    key = hashlib.sha256(repr(pcfg).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fuseloop" / f"bench-train-base-{key}"
    if not (cache / "metrics.json").exists():
        print(f"pretraining the base policy once ({cfg.base_steps} steps) into {cache}", file=sys.stderr)
        pretrain(pcfg, cache)
    return Checkpoint.load(cache)


# -- the two contenders ------------------------------------------------------------------------------

def run_fuseloop(reward: torch.nn.Module, pre: Preprocessor, data: TrainingSet, cfg: BenchConfig, n_train: int,
                 seed: int) -> dict:
    steps = math.ceil(cfg.epochs * n_train / cfg.batch_size)
    rcfg = RewardTrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, heldout_share=cfg.heldout_share,
                             seed=seed)
    t0 = time.perf_counter()
    result = train_reward(reward, data, ContextTensors(pre), rcfg)
    wall = time.perf_counter() - t0
    return {"examples": steps * cfg.batch_size, "steps": steps, "wall_s": wall,
            "final_loss": float(np.mean(result["loss"][-10:]))}


def run_trl(reward: torch.nn.Module, pre: Preprocessor, train_pairs: list, cfg: BenchConfig, seed: int,
            workdir: str) -> dict:
    import datasets
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutput
    from trl import RewardConfig, RewardTrainer

    class TRLRewardModel(PreTrainedModel):
        """Our reward model as the sequence classifier TRL expects: logits (B, 1)."""

        config_class = PretrainedConfig
        main_input_name = "input_ids"

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__(PretrainedConfig(num_labels=1))
            self.inner = inner  # no post_init(): it would re-initialize the shared weights

        def forward(self, input_ids, attention_mask, pixel_values, prompt_ids, prompt_mask, **_):
            r = self.inner(pixel_values, prompt_ids, prompt_mask, input_ids, attention_mask)
            return SequenceClassifierOutput(logits=r[:, None])

    contexts = [p[0] for p in train_pairs]
    tensors = ContextTensors(pre)

    def collate(examples: list[dict]) -> dict:
        """TRL's layout (chosen rows, then rejected rows) plus the image and prompt of each row."""
        n = len(examples)
        ids, mask = pad_right([e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples], pre.pad_id)
        pids, pmask = pad_right([e["prompt_ids"] for e in examples], pre.pad_id)
        px = tensors.pixels([contexts[e["idx"]] for e in examples])
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "pixel_values": px.repeat(2, 1, 1, 1), "prompt_ids": torch.from_numpy(pids).repeat(2, 1),
                "prompt_mask": torch.from_numpy(pmask).repeat(2, 1)} if n else {}

    t0 = time.perf_counter()
    # Tokenized up front, as TRL's own preprocessing does, with the serving tokenization.
    response_ids = lambda text: [pre.bos_id] + pre.response_ids(text)  # noqa: E731
    dataset = datasets.Dataset.from_dict({
        "idx": list(range(len(train_pairs))),
        "prompt_ids": [pre.prompt_ids(c.prompt) for c in contexts],
        "chosen_ids": [response_ids(p[1]) for p in train_pairs],
        "rejected_ids": [response_ids(p[2]) for p in train_pairs],
    })
    args = RewardConfig(
        output_dir=workdir, per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr, lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0,
        optim="adamw_torch", seed=seed, data_seed=seed, use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", remove_unused_columns=False, dataloader_num_workers=0,
        disable_dropout=False, max_length=None, gradient_checkpointing=False, bf16=False)  # RewardConfig: bf16 on
    model = TRLRewardModel(reward)
    trainer = RewardTrainer(model=model, args=args, data_collator=collate, train_dataset=dataset,
                            processing_class=pre.tokenizer)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its final metrics: keep stdout for ours
        out = trainer.train()
    wall = time.perf_counter() - t0
    return {"examples": cfg.epochs * len(train_pairs), "steps": out.global_step, "wall_s": wall,
            "train_loop_s": out.metrics.get("train_runtime"), "final_loss": out.training_loss}


# -- the run ----------------------------------------------------------------------------------------

def warm_up() -> None:
    """One-off costs neither contender should carry: the first AdamW imports torch._dynamo (seconds)."""
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.zeros(1)
    torch.optim.AdamW([p]).step()


def run(cfg: BenchConfig, workdir: str, checkpoint: str | None = None, seeds: int = 1) -> dict:
    """Each contender trains `seeds` times from the same initial weights (training-order seeds
    cfg.seed, cfg.seed + 1, ...), alternating, so load drift on the machine hits both alike."""
    base = base_checkpoint(cfg, checkpoint)
    data = preference_pairs(cfg)
    train_pairs, held_pairs = split(data.pairs, cfg.heldout_share)
    torch.manual_seed(cfg.seed)
    init, pre = base.family.reward_model_from_policy(base.policy), base.preprocessor
    warm_up()
    print(f"{len(train_pairs)} training pairs ({cfg.label_noise:.0%} flipped), {len(held_pairs)} held-out pairs; "
          f"reward model {count_parameters(init):,} parameters; {cfg.epochs} epochs, batch {cfg.batch_size}, "
          f"lr {cfg.lr}; {seeds} seed(s)", file=sys.stderr)
    before = evaluate_pairs(init, ContextTensors(pre), held_pairs)["pairwise_accuracy"]
    runs: dict[str, list[dict]] = {"fuseloop": [], "trl": []}
    for seed in range(cfg.seed, cfg.seed + seeds):
        for name, contender in runs.items():
            model = copy.deepcopy(init)
            torch.manual_seed(seed)
            if name == "fuseloop":
                r = run_fuseloop(model, pre, data, cfg, len(train_pairs), seed)
            else:
                r = run_trl(model, pre, train_pairs, cfg, seed, workdir)
            heldout = evaluate_pairs(model, ContextTensors(pre), held_pairs)
            contender.append({**r, "seed": seed, "heldout_pairwise_accuracy": heldout["pairwise_accuracy"],
                              "heldout_calibration_ece": heldout["calibration_ece"]})
    return {"config": asdict(cfg), "train_pairs": len(train_pairs), "heldout_pairs": len(held_pairs),
            "heldout_accuracy_before": before, "torch_threads": torch.get_num_threads(),
            "results": {name: summarize(rs) for name, rs in runs.items()}}


def summarize(runs: list[dict]) -> dict:
    acc = [r["heldout_pairwise_accuracy"] for r in runs]
    wall = sum(r["wall_s"] for r in runs)
    return {"examples": runs[0]["examples"], "steps": runs[0]["steps"], "wall_s": wall / len(runs),
            "examples_per_s": sum(r["examples"] for r in runs) / wall,
            "heldout_pairwise_accuracy": float(np.mean(acc)), "accuracy_by_seed": acc,
            "heldout_calibration_ece": float(np.mean([r["heldout_calibration_ece"] for r in runs])), "runs": runs}


def print_table(report: dict) -> None:
    n, seeds = report["heldout_pairs"], len(report["results"]["fuseloop"]["runs"])
    print(f"reward-model training: {report['train_pairs']} pairs x {report['config']['epochs']} epochs, "
          f"batch {report['config']['batch_size']}, lr {report['config']['lr']}, {seeds} seed(s); held-out {n} pairs "
          f"(accuracy before training {report['heldout_accuracy_before']:.3f})")
    print(f"{'':10} {'examples':>9} {'steps':>6} {'wall s':>8} {'examples/s':>11} {'held-out acc':>13} {'ECE':>6}"
          f"  {'acc by seed' if seeds > 1 else ''}")
    for name, r in report["results"].items():
        by_seed = " ".join(f"{a:.3f}" for a in r["accuracy_by_seed"]) if seeds > 1 else ""
        print(f"{name:10} {r['examples']:>9} {r['steps']:>6} {r['wall_s']:>8.1f} {r['examples_per_s']:>11.0f} "
              f"{r['heldout_pairwise_accuracy']:>13.3f} {r['heldout_calibration_ece']:>6.3f}  {by_seed}")
    ours, trl = report["results"]["fuseloop"], report["results"]["trl"]
    se = math.sqrt(0.25 / n)  # binomial, at most
    print(f"fuseloop / TRL: throughput x{ours['examples_per_s'] / trl['examples_per_s']:.2f}, held-out accuracy "
          f"{ours['heldout_pairwise_accuracy'] - trl['heldout_pairwise_accuracy']:+.3f} (one run's standard error "
          f"<= {se:.3f} from the held-out size alone; the training order moves it more: --seeds N averages)")


def main(json_output: bool = False, checkpoint: str | None = None, seeds: int = 1) -> int:
    try:
        import trl  # noqa: F401
    except ImportError:
        print(TRL_MISSING, file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fuseloop-bench-train-") as workdir:
        report = run(BenchConfig(), workdir, checkpoint, seeds)
    if json_output:
        print(json.dumps(report, default=float))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--checkpoint", help="run directory of a base policy (default: pretrain one, cached)")
    parser.add_argument("--seeds", type=int, default=1, help="training runs per contender (accuracy is noisy)")
    args = parser.parse_args()
    raise SystemExit(main(args.json, args.checkpoint, args.seeds))
