"""Recipe: supervised pretraining of the base policy and the initial reward model.

One recipe for every model source: the base policy comes from a `ModelSource` (the built-in model,
built with a tokenizer trained on the task, or a team's own Hugging Face model directory, opened as
it is), then the same steps: SFT on the annotator's labels, a reward model on the policy's trunk
trained Bradley-Terry, gold evaluation, a checkpoint run directory. With no steps at all it is
`fuseloop import`: the model as it came, with a fresh reward head.

Supervision is deliberately imperfect (a biased annotator, see `BiasedAnnotator`), so the base
is decent but clearly improvable by feedback.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from fuseloop.checkpoint import Checkpoint
from fuseloop.errors import UserError
from fuseloop.families import ModelFamily, family_for
from fuseloop.families.hf_directory import OpenedModel, open_model_directory
from fuseloop.families.hf_loading import ModelDirectoryError
from fuseloop.model import ModelConfig, count_parameters
from fuseloop.preprocessing import PreprocessConfig, Preprocessor
from fuseloop.scenes import BiasedAnnotator, Example, SceneTaskConfig, alternative_answer, make_split, render, task_texts
from fuseloop.tokenizer import train_tokenizer
from trainer.evaluate import gold_accuracy
from trainer.losses import bradley_terry_loss, token_cross_entropy
from trainer.plots import plot_curves


HF_PREFIX = "hf:"


class ModelSourceError(UserError):
    """The model source cannot be used (not builtin or hf:DIR, or a directory that does not open)."""

    exit_code = 1


@dataclass(frozen=True)
class ModelSource:
    """Where the base policy comes from: `directory` None is the built-in model (built from
    PretrainConfig.model, with a tokenizer trained on the task), else a local Hugging Face model
    directory (config, safetensors weights, tokenizer, image processor), read as it is."""

    directory: Path | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelSource":
        """ "builtin" or "hf:DIR" (the command line's --model)."""
        if text == "builtin":
            return cls()
        if text.startswith(HF_PREFIX) and text[len(HF_PREFIX):]:
            return cls(Path(text[len(HF_PREFIX):]))
        raise ModelSourceError(f"model {text!r}: give builtin or hf:DIR (a local Hugging Face model directory)")

    @property
    def builtin(self) -> bool:
        return self.directory is None

    def __str__(self) -> str:
        return "builtin" if self.builtin else f"{HF_PREFIX}{self.directory}"


@dataclass
class PretrainConfig:
    n_train: int = 6000
    n_test: int = 600
    bias_rate: float = 0.7  # share of wrong labels on the annotator's biased conditions
    steps: int = 2000  # fewer leave the base unable to tie a question's shape to the right object
    batch_size: int = 64
    lr: float = 3e-3
    reward_steps: int = 300
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)  # pretraining from scratch builds the built-in family
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    @classmethod
    def quick(cls) -> "PretrainConfig":
        """A tiny setting for tests: seconds, not minutes."""
        return cls(n_train=300, n_test=60, steps=40, reward_steps=20, batch_size=32,
                   model=ModelConfig(d_model=32, n_heads=2, n_decoder_layers=1))

    @classmethod
    def for_source(cls, source: ModelSource, quick: bool = False) -> "PretrainConfig":
        """The defaults that suit a source. A pretrained transformer is fine-tuned, not trained
        from scratch: the built-in model's 3e-3 would wreck what it knows, so a Hugging Face model
        gets a tenth of it, with warmup (OneCycleLR) as before."""
        if source.builtin:
            return cls.quick() if quick else cls()
        if quick:
            return cls(n_train=200, n_test=40, steps=20, reward_steps=10, batch_size=16, lr=3e-4)
        return cls(lr=3e-4)

    @classmethod
    def imported(cls, n_test: int = 0) -> "PretrainConfig":
        """No task training at all (`fuseloop import`): the model as it is and a fresh reward
        head; gold accuracy on `n_test` test questions only when asked (0: none)."""
        return cls(n_train=0, n_test=n_test, steps=0, reward_steps=0)


def response_batch(pre: Preprocessor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pre.responses(texts)
    return torch.from_numpy(ids), torch.from_numpy(mask)


class PretrainData:
    """Rendered images and encoded prompts for a list of examples, held as tensors."""

    def __init__(self, pre: Preprocessor, examples: list[Example]) -> None:
        self.examples = examples
        self.pixels = torch.from_numpy(pre.images([render(e.scene) for e in tqdm(examples, desc="render", leave=False)]))
        ids, mask = pre.prompts([e.prompt for e in examples])
        self.prompt_ids, self.prompt_mask = torch.from_numpy(ids), torch.from_numpy(mask)

    def take(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = torch.from_numpy(idx)
        return self.pixels[i], self.prompt_ids[i], self.prompt_mask[i]


def train_policy(family: ModelFamily, policy: nn.Module, pre: Preprocessor, data: PretrainData, labels: list[str],
                 cfg: PretrainConfig, rng: np.random.Generator) -> list[float]:
    if cfg.steps == 0:  # OneCycleLR needs a step
        return []
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    losses = []
    policy.train()
    for _ in (bar := tqdm(range(cfg.steps), desc="pretrain policy")):
        idx = rng.integers(0, len(labels), cfg.batch_size)
        pixels, pids, pmask = data.take(idx)
        ids, mask = response_batch(pre, [labels[i] for i in idx])
        logits = family.token_logits(policy, pixels, pids, pmask, ids[:, :-1], mask[:, :-1])
        loss = token_cross_entropy(logits, ids[:, 1:], mask[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def train_initial_reward(reward: nn.Module, pre: Preprocessor, data: PretrainData, labels: list[str],
                         cfg: PretrainConfig, rng: np.random.Generator) -> list[float]:
    """Labelled answers over alternative answers (Bradley-Terry): inherits the annotator's biases."""
    alt_rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(reward.parameters(), lr=cfg.lr / 2, weight_decay=0.01)
    losses = []
    reward.train()
    for _ in (bar := tqdm(range(cfg.reward_steps), desc="pretrain reward")):
        idx = rng.integers(0, len(labels), cfg.batch_size)
        pixels, pids, pmask = data.take(idx)
        chosen = [labels[i] for i in idx]
        rejected = [alternative_answer(replace(data.examples[i], answer=labels[i]), alt_rng) for i in idx]
        ids, mask = response_batch(pre, chosen + rejected)
        r = reward(pixels.repeat(2, 1, 1, 1), pids.repeat(2, 1), pmask.repeat(2, 1), ids, mask)
        loss = bradley_terry_loss(r[: len(idx)], r[len(idx):])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reward.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def open_source(source: ModelSource, cfg: PretrainConfig) -> OpenedModel:
    """The builtin: a tokenizer trained on the task's texts and a fresh FusedPolicy of cfg.model.
    hf:DIR: the directory's family, policy and preprocessor (its own tokenizer, chat template and
    image processor); refused with what is missing before anything is trained or written."""
    if not source.builtin:
        try:
            return open_model_directory(source.directory, cfg.preprocess)
        except ModelDirectoryError as e:  # a UserError already; the command exits 1 for a bad source
            raise ModelSourceError(str(e)) from None
    task = SceneTaskConfig(image_size=cfg.preprocess.image_size)
    tokenizer = train_tokenizer(task_texts(task))
    model_cfg = replace(cfg.model, vocab_size=len(tokenizer), image_size=cfg.preprocess.image_size,
                        max_prompt_tokens=cfg.preprocess.max_prompt_tokens,
                        max_response_tokens=cfg.preprocess.max_response_tokens,
                        pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    family = family_for(None)
    return OpenedModel(family, family.build(model_cfg.to_dict()), Preprocessor(tokenizer, cfg.preprocess))


def pretrain(cfg: PretrainConfig, out_dir: Path, source: ModelSource = ModelSource()) -> dict:
    """Opens the source's base model (the builtin: trains its tokenizer, builds the policy), then
    the same steps for every source: SFT of the policy, the initial reward model, gold accuracy
    (n_test > 0); writes the run directory. Nothing is written when the source does not open."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    base = open_source(source, cfg)
    family, policy, pre = base.family, base.policy, base.preprocessor
    task = SceneTaskConfig(image_size=pre.config.image_size)

    train = make_split("train", cfg.n_train, task) if cfg.n_train else []
    annotator = BiasedAnnotator(bias_rate=cfg.bias_rate)
    label_rng = random.Random(cfg.seed)
    labels = [annotator.label(e, label_rng) for e in train]
    wrong = float(np.mean([l != e.answer for l, e in zip(labels, train)])) if train else None
    policy_losses, reward_losses = [], []
    if cfg.steps or cfg.reward_steps:
        data = PretrainData(pre, train)
        policy_losses = train_policy(family, policy, pre, data, labels, cfg, rng)
    reward = family.reward_model_from_policy(policy)
    if cfg.reward_steps:
        reward_losses = train_initial_reward(reward, pre, data, labels, cfg, rng)
    train_s = time.perf_counter() - t0

    metrics = {"model_source": str(source), "family": family.name}
    if cfg.n_test:
        test = make_split("test", cfg.n_test, task)
        greedy = gold_accuracy(family, policy, pre, test, temperature=0.0)
        sampled = gold_accuracy(family, policy, pre, test, temperature=1.0)
        metrics |= {"gold_accuracy_greedy": greedy.accuracy, "gold_accuracy_sampled": sampled.accuracy,
                    "gold_accuracy_by_kind": greedy.by_kind}
    metrics |= {
        "label_wrong_share": wrong,
        "policy_parameters": count_parameters(policy),
        "reward_parameters": count_parameters(reward),
        "final_policy_loss": _tail_mean(policy_losses),
        "final_reward_loss": _tail_mean(reward_losses),
        "train_seconds": round(train_s, 1),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("model", "preprocess")},
    }
    out_dir = Path(out_dir)
    Checkpoint(family, policy, reward, pre, reference=None, metrics=metrics).save(out_dir)
    if policy_losses or reward_losses:
        plot_curves(out_dir / "pretrain.png", "pretraining",
                    {"policy loss": policy_losses, "reward loss (BT)": reward_losses})
    return metrics


def _tail_mean(losses: list[float]) -> float | None:
    return float(np.mean(losses[-20:])) if losses else None
