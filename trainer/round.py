"""Recipe: one training round. Consume -> join -> reward model -> policy gradient -> gate ->
publish -> redeploy, with a report, a CSV row and PNG curves. Every step goes through the
checkpoint's model family, so a round runs the same on the built-in model and a Hugging Face
one; with `policy.lora_rank` (Hugging Face families) it trains LoRA adapters and publishes them
merged, so every version and candidate stays a directory `transformers` loads."""

from __future__ import annotations

import copy
import csv
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fuseloop.bus import EventBus, TopicConfig
from fuseloop.checkpoint import Checkpoint
from fuseloop.config_file import to_dict
from fuseloop.errors import UserError
from fuseloop.events import dead_letter
from fuseloop.families import DEFAULT as BUILTIN
from fuseloop.repository import ModelRepository, RepositoryError
from trainer.batches import ContextTensors
from trainer.deploy import Deployer
from trainer.rollout import RolloutConfig
from trainer.eval_set import EvalSet
from trainer.export import publish
from trainer.gate import GateConfig, GoldCheck, run_gate
from trainer.ingest import IngestConfig, Ingestor
from trainer.plots import plot_curves
from trainer.policy_gradient import PolicyGradientConfig, sequence_kl, train_policy
from trainer.reward_training import RewardTrainConfig, is_heldout, train_reward
from trainer.signals import Context, SignalWeights, TrainingSet, build_training_set
from trainer.store import DatasetStore


@dataclass(frozen=True)
class TrainConfig:
    workdir: Path
    ingest: IngestConfig = field(default_factory=IngestConfig)
    weights: SignalWeights = field(default_factory=SignalWeights)
    reward: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    policy: PolicyGradientConfig = field(default_factory=PolicyGradientConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    prompt_window_rounds: int = 3  # policy-gradient prompts come from this many recent rounds
    max_prompts: int = 4000
    heldout_share: float = 0.15
    join_grace_rounds: int = 1  # feedback whose response is still unknown after this many rounds: dead letter
    min_new_feedback: int = 20  # fewer new feedback events: no training this round


def refuse_lora_for(family: str, rank: int) -> None:
    """LoRA adapters are peft's, on a `transformers` policy: the built-in family has none."""
    if family == BUILTIN:
        raise UserError(f"--lora-rank {rank} (policy.lora_rank): the built-in model has no LoRA adapters, only Hugging "
                        "Face families do; train it in full without --lora-rank, or import a Hugging Face model")


class ProcessGroup:
    """The processes that run a round together; this one is a single process, where every hook is
    the identity. Under torchrun, `trainer.distributed.GlooGroup` makes them collectives."""

    rank, world_size = 0, 1

    @property
    def is_leader(self) -> bool:
        """The one process that gates, publishes and deploys."""
        return self.rank == 0

    def wrap(self, module):
        return module

    def total(self, value: float) -> float:
        return value

    def mean(self, value: float) -> float:
        return value

    def highest(self, value: int) -> int:
        return value

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order."""
        return [obj]

    def align_signals(self, data: TrainingSet, heldout_share: float) -> TrainingSet:
        """The same reward-model sources on every process (so they take the same steps)."""
        return data

    def nonempty(self, contexts: list[Context]) -> list[Context]:
        """Prompts for policy-gradient steps on every process."""
        return contexts

    def from_leader(self, report: dict) -> dict:
        """The round's outcome (gate, version, deploy) as the leader decided it."""
        return report


def merge_lineage(parts: list[dict]) -> dict:
    """Each process's ingest record merged: partitions are disjoint, counts add up."""
    out = {"offsets_from": {}, "offsets_to": {}, "feedback_counts": Counter(), "inference_events": 0,
           "store_offsets": {}}
    for part in parts:
        for key in ("offsets_from", "offsets_to", "store_offsets"):
            out[key].update(part[key])
        out["feedback_counts"].update(part["feedback_counts"])
        out["inference_events"] += part["inference_events"]
    return {k: dict(sorted(v.items())) if isinstance(v, dict) else v for k, v in out.items()}


class Trainer:
    def __init__(self, config: TrainConfig, bus: EventBus, repo: ModelRepository, topics: TopicConfig = TopicConfig(),
                 deployer: Deployer | None = None, gold: GoldCheck | None = None,
                 group: ProcessGroup = ProcessGroup(), eval_set: EvalSet | None = None) -> None:
        self.config, self.bus, self.repo, self.topics = config, bus, repo, topics
        self.deployer, self.gold, self.group, self.eval_set = deployer, gold, group, eval_set
        Path(config.workdir).mkdir(parents=True, exist_ok=True)
        if config.policy.lora_rank and (latest := repo.latest()) is not None:
            refuse_lora_for(repo.manifest(latest).family or BUILTIN, config.policy.lora_rank)
        self.store = DatasetStore(Path(config.workdir) / "dataset.db")
        self.ingestor = Ingestor(bus, self.store, topics, config.ingest)

    def close(self) -> None:
        self.ingestor.close()
        self.store.close()

    def base_version(self) -> int:
        state = self.repo.serving_state()
        version = state.serving or self.repo.latest()
        if version is None:
            raise RepositoryError(f"no version in {self.repo.root}: run `fuseloop pretrain` and `fuseloop export` first")
        return version

    def run_round(self) -> dict:
        t0 = time.perf_counter()
        round_ = self.group.highest(self.store.last_round()) + 1
        ingest = self.ingestor.ingest(round_, gather=self.group.gather)
        report: dict = {"round": round_, "config": to_dict(self.config), "ingest": ingest.to_dict()}
        data = build_training_set(self.store, self.store.feedback())
        self._settle_unjoined(data.unjoined, round_, report)
        report["signals"] = data.report()
        new_feedback = int(self.group.total(ingest.feedback_events))
        base = self.base_version()
        report.update(parent_version=base, deployed=False, version=None)
        if new_feedback < self.config.min_new_feedback:
            report["skipped"] = f"{new_feedback} new feedback events (< {self.config.min_new_feedback}): nothing to learn"
            return self._finish(round_, report, t0)

        ckpt = Checkpoint.load(self.repo.checkpoint_dir(base))
        policy, reference, serving_policy = self._policies(ckpt)
        tensors = ContextTensors(ckpt.preprocessor)

        timings = report.setdefault("timings", {"ingest": round(ingest.seconds, 1)})
        t = time.perf_counter()
        rm = train_reward(ckpt.reward, self.group.align_signals(data, self.config.reward.heldout_share), tensors,
                          self.config.reward, wrap=self.group.wrap)
        timings["reward_model"], t = round(time.perf_counter() - t, 1), time.perf_counter()
        report["reward_model"] = {k: v for k, v in rm.items() if k != "loss"}

        since = max(1, round_ - self.config.prompt_window_rounds + 1)
        contexts = self.group.nonempty(
            [Context(p, img, rid) for rid, p, img in self.store.requests(since, self.config.max_prompts)])
        train_ctx = [c for c in contexts if not is_heldout(c.request_id, self.config.heldout_share)]
        held_ctx = [c for c in contexts if is_heldout(c.request_id, self.config.heldout_share)] or contexts[:32]
        pg = train_policy(ckpt.family, policy, reference, ckpt.reward, train_ctx or contexts, data.demos, tensors,
                          self.config.policy, wrap=self.group.wrap, reduce_mean=self.group.mean)
        kl = self.group.mean(sequence_kl(ckpt.family, policy, reference, tensors, held_ctx))
        if serving_policy is None:  # LoRA: the candidate is merged; the base under it is what serves
            from fuseloop.families import hf_lora

            policy, serving_policy = hf_lora.merged(policy), hf_lora.unloaded(policy)
            reference = ckpt.reference
        timings["policy"], t = round(time.perf_counter() - t, 1), time.perf_counter()
        report["policy"] = {"steps": pg["steps"], "stopped": pg["stopped"], "kl": kl,
                            "reward_first": pg["curves"]["reward"][0], "reward_last": pg["curves"]["reward"][-1]}
        ing = ingest.to_dict()
        lineage_parts = self.group.gather({
            "offsets_from": ing["offsets_from"], "offsets_to": ing["offsets_to"], "feedback_counts": dict(data.counts),
            "inference_events": ingest.inference_events,
            "store_offsets": {f"{t}/{p}": o for (t, p), o in sorted(self.store.offsets().items())}})
        held_all = [c for part in self.group.gather(held_ctx) for c in part]
        if not self.group.is_leader:  # the leader gates and publishes; _finish waits for its outcome
            return self._finish(round_, report, t0)
        gate = run_gate(ckpt.family, policy, serving_policy, ckpt.reward, tensors, held_all, kl, self.config.gate,
                        self._labeled_check(ckpt))
        report["gate"] = gate.to_dict()
        timings["gate"], t = round(time.perf_counter() - t, 1), time.perf_counter()
        workdir = Path(self.config.workdir)
        plot_curves(workdir / f"round-{round_:03d}.png", f"round {round_}",
                    {"reward-model loss": rm["loss"], "policy reward": pg["curves"]["reward"],
                     "KL to reference": pg["curves"]["kl"]})
        candidate = Checkpoint(ckpt.family, policy, ckpt.reward, ckpt.preprocessor, reference,
                               metrics={"round": round_, "gate": gate.to_dict(), "kl": kl,
                                        "reward_model": report["reward_model"]})
        if not gate.passed:
            candidate.save(workdir / "candidates" / f"round-{round_:03d}")
            report["not_deployed_because"] = gate.reasons
            return self._finish(round_, report, t0)

        lineage = {"round": round_, "parent_version": base, "new_feedback_events": new_feedback,
                   **merge_lineage(lineage_parts)}
        manifest = publish(candidate, self.repo, parent_version=base, metrics=candidate.metrics, lineage=lineage,
                           train_config=report["config"])
        report["version"] = manifest.version
        timings["export"], t = round(time.perf_counter() - t, 1), time.perf_counter()
        if self.deployer is not None:
            percent = self.config.rollout.canary_percent
            # A canary serves a share of live traffic until the rollout controller promotes or ends it.
            report["deploy"] = (self.deployer.canary(manifest.version, percent) if percent
                                else self.deployer.deploy(manifest.version))
            report["deployed"] = True
            report["canary"] = bool(percent)
            timings["deploy"] = round(time.perf_counter() - t, 1)
        return self._finish(round_, report, t0)

    def _policies(self, ckpt: Checkpoint) -> tuple:
        """(policy to train, KL reference, serving policy for the gate). In full: the checkpoint's
        policy, its frozen reference (or a copy of the policy) and a copy of the policy. With LoRA:
        the policy with adapters, reference None (the adapters off) and serving None (after
        training, the base under the adapters): no copy of the weights while training."""
        rank = self.config.policy.lora_rank
        if not rank:
            reference = ckpt.reference if ckpt.reference is not None else copy.deepcopy(ckpt.policy)
            return ckpt.policy, reference, copy.deepcopy(ckpt.policy)
        refuse_lora_for(ckpt.family.name, rank)
        from fuseloop.families import hf_lora  # peft loads only for LoRA rounds

        return hf_lora.add_lora(ckpt.policy, rank), None, None

    def _settle_unjoined(self, unjoined, round_: int, report: dict) -> None:
        """Feedback whose response is still unknown after the grace period goes to the dead letters."""
        expired = [r for r in unjoined if r.round <= round_ - self.config.join_grace_rounds]
        for row in expired:
            reason = f"response_id of {row.kind} feedback was never logged by the inference service"
            self.bus.publish(self.topics.dead_letter, row.event_id.encode(),
                             dead_letter(row.payload, self.topics.feedback, reason, row.event_id))
        self.store.begin()
        for row in expired:
            self.store.add_dead_letter(self.topics.feedback, "unjoinable feedback", row.event_id, round_)
        self.store.delete_feedback([r.key for r in expired])
        self.store.commit()
        report["unjoined_dead_lettered"] = len(expired)
        report["unjoined_waiting"] = len(unjoined) - len(expired)

    def _labeled_check(self, ckpt: Checkpoint) -> GoldCheck | None:
        """Accuracy on labeled data for the gate: a given check, or the eval set, through the
        checkpoint's own family and preprocessing."""
        if self.gold is not None:
            return self.gold
        if self.eval_set is not None:
            eval_set = self.eval_set
            return lambda policy: eval_set.accuracy(ckpt.family, policy, ckpt.preprocessor)
        return None

    def _finish(self, round_: int, report: dict, t0: float) -> dict:
        report = self.group.from_leader(report)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        if (self.gold is not None or self.eval_set is not None) and "gold_accuracy" not in report:
            served = self.base_version() if not report["deployed"] else report["version"]
            served_ckpt = Checkpoint.load(self.repo.checkpoint_dir(served))
            report["gold_accuracy"] = self._labeled_check(served_ckpt)(served_ckpt.policy)
        self.store.save_round(round_, report)
        self._write_metrics(report)
        return report

    def _write_metrics(self, report: dict) -> None:
        workdir = Path(self.config.workdir)
        row = {"round": report["round"], "version": report.get("version"), "deployed": report["deployed"],
               "events": report["ingest"]["records"], "feedback": report["ingest"]["feedback_events"],
               "rm_pairwise_accuracy": report.get("reward_model", {}).get("after", {}).get("pairwise_accuracy"),
               "kl": report.get("policy", {}).get("kl"), "gold_accuracy": report.get("gold_accuracy"),
               "seconds": report["seconds"]}
        path = workdir / "rounds.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        (workdir / f"round-{report['round']:03d}.json").write_text(json.dumps(report, indent=2, default=str))
        rows = list(csv.DictReader(open(path)))

        def col(name: str) -> list[float]:
            return [float(r[name]) if r[name] not in ("", "None") else float("nan") for r in rows]

        plot_curves(workdir / "rounds.png", "training rounds",
                    {"gold accuracy": col("gold_accuracy"), "KL to reference": col("kl"),
                     "RM held-out pairwise acc.": col("rm_pairwise_accuracy")}, xlabel="round")
