"""The trainer under torchrun: one round recipe (`Trainer.run_round`), several processes, DDP on gloo.

    torchrun --nproc_per_node 2 -m trainer.distributed --repo R --bus URL --workdir W [--rounds N]
        [--config FILE.toml] [--set NAME=VALUE] [--eval-set FILE.jsonl]

Each rank is one member of the trainer's consumer group, so the group's partitions are shared
between the ranks, and keeps its own dataset store (W/rank-R/dataset.db). The reward model and the
policy train as DistributedDataParallel modules (gradients averaged every step), so parameters
stay identical on every rank; the leader (rank 0) gates, publishes and deploys, the other ranks
wait for its outcome.

Joins stay local. Inference and feedback events are both keyed by session id, and a key picks the
same partition number on every topic with the same partition count: the SQLite bus takes
crc32(key) % partitions, Kafka's default partitioner murmur2(key) % partitions. A rank then holds
both halves of a session if it is given the same partition numbers on both topics:
- Kafka: the default RangeAssignor assigns each topic separately, the same ranges to the same
  (sorted) members, so equal partition counts are enough.
- SQLite bus: members take every n-th (topic, partition) of one list ordered by topic then
  partition, which lines up across topics only when the partition count is a multiple of the
  number of ranks; this is checked at start.
Feedback whose inference event is on another rank would otherwise wait and then be dead-lettered.

Joining: every rank creates its consumer and meets the others at a barrier before anyone polls.
The SQLite bus registers a member when the consumer is created, so the first poll already splits
the partitions. kafka-python joins the group inside poll, so a rank may still read a partition in
its first polls that the rebalance then hands to another rank: it commits only what it still
owns, but it has stored those records too, and the new owner re-reads them (each store dedupes
only its own). The barrier narrows that window without closing it; closing it needs a
"join and wait for the assignment" step in the BusConsumer contract.

Equal step counts: every collective is reached the same number of times on every rank. Signals a
rank lacks but another has get a weight-0 stand-in (zero gradient, same forward/backward); prompts
are borrowed when a rank has none; the KL-budget stop uses the mean over ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.policy_gradient import SequenceLogprobs
from trainer.reward_training import is_heldout
from trainer.round import ProcessGroup, TrainConfig
from trainer.signals import Context, TrainingSet

OUTCOME = ("parent_version", "version", "deployed", "gate", "not_deployed_because", "deploy", "skipped")


class GlooGroup(ProcessGroup):
    """torchrun's processes (env:// rendezvous) on the gloo backend, CPU."""

    def __init__(self, backend: str = "gloo", keepalive: Callable[[], object] | None = None) -> None:
        dist.init_process_group(backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.trained: dict[str, torch.nn.Module] = {}  # the last modules wrapped, "policy" or "reward_model"
        # Called while a reduction waits for slower ranks: a rank done ingesting keeps its bus
        # membership alive, or a rank still polling would take over its partitions.
        self.keepalive = keepalive

    def close(self) -> None:
        dist.destroy_process_group()

    def barrier(self) -> None:
        dist.barrier()

    def wrap(self, module: torch.nn.Module) -> DistributedDataParallel:
        # SequenceLogprobs wraps the policy; anything else wrapped is the reward model, whatever its family.
        policy = isinstance(module, SequenceLogprobs)
        self.trained["policy" if policy else "reward_model"] = module.policy if policy else module
        # Every parameter gets a gradient in every step (no find_unused_parameters needed).
        return DistributedDataParallel(module)

    def _reduce(self, value: float, op: dist.ReduceOp) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        work = dist.all_reduce(t, op=op, async_op=True)
        while self.keepalive is not None and not work.is_completed():
            self.keepalive()
            time.sleep(0.2)
        work.wait()
        return float(t.item())

    def total(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def mean(self, value: float) -> float:
        return self.total(value) / self.world_size

    def highest(self, value: int) -> int:
        return int(self._reduce(value, dist.ReduceOp.MAX))

    def gather(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def align_signals(self, data: TrainingSet, heldout_share: float) -> TrainingSet:
        train_pairs = [p for p in data.pairs if not is_heldout(p[0].request_id, heldout_share)]
        mine = {"pairs": train_pairs[:1], "ratings": data.ratings[:1], "binary": data.binary[:1]}
        everyone = self.gather(mine)
        out = replace(data, pairs=list(data.pairs), ratings=list(data.ratings), binary=list(data.binary))
        for name, items in mine.items():
            donors = [part[name][0] for part in everyone if part[name]]
            if not items and donors:
                getattr(out, name).append(donors[0][:-1] + (0.0,))  # weight 0: a zero gradient, same steps
        return out

    def nonempty(self, contexts: list[Context]) -> list[Context]:
        if min(self.gather(len(contexts))) > 0:
            return contexts
        pool = [c for part in self.gather(contexts[:256]) for c in part]
        return contexts or pool

    def from_leader(self, report: dict) -> dict:
        box = [report if self.is_leader else None]
        dist.broadcast_object_list(box, src=0)
        if self.is_leader:
            return report
        return {**report, **{k: box[0][k] for k in OUTCOME if k in box[0]}, "rank": self.rank}


def state_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_copartitioned(bus, world_size: int) -> None:
    from fuseloop.bus.sqlite import SqliteBus

    if isinstance(bus, SqliteBus) and bus.partitions % world_size:
        raise SystemExit(
            f"the SQLite bus {bus.config.path} has {bus.partitions} partitions; with {world_size} trainer processes a "
            f"session's inference and feedback events would be read by different processes. Use a partition count "
            f"that is a multiple of {world_size} (sqlite:///PATH.db?partitions=N, fixed when the file is created).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="model repository (Triton layout)")
    p.add_argument("--bus", required=True, help="kafka://HOST:PORT?api_version=0.9 or sqlite:///PATH.db")
    p.add_argument("--workdir", required=True, help="rank R keeps its dataset store and reports in WORKDIR/rank-R")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--deploy-to", help="inference service HOST:PORT (admin Deploy) or triton://HOST:PORT")
    p.add_argument("--admin-token", default=os.environ.get("FUSELOOP_ADMIN_TOKEN", ""))
    p.add_argument("--config", help="TOML file setting TrainConfig fields, as `fuseloop train --config`")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="one TrainConfig field, e.g. policy.kl_beta=0.05 (after --config; repeatable)")
    p.add_argument("--eval-set", help="JSONL eval set that the leader's gate scores (as `fuseloop train --eval-set`)")
    p.add_argument("--eval-scorer", help="package.module:function(accepted_answers, answer) -> [0, 1]")
    p.add_argument("--rm-steps", type=int, help="reward-model steps per round")
    p.add_argument("--pg-steps", type=int, help="policy-gradient steps per round")
    p.add_argument("--min-new-feedback", type=int, help="fewer new feedback events (all ranks together): skip")
    p.add_argument("--min-reward-gain", type=float, help="the gate's reward-model margin over serving")
    return p


def rank_config(args: argparse.Namespace, rank: int) -> TrainConfig:
    """The same config as `fuseloop train` builds (--config, the step flags, --set; the last word
    wins), in the rank's own workdir, with the rank's own sampling seeds (the same seed would draw
    the same minibatches and prompts on every rank)."""
    from trainer.cli import train_config

    flags = {"min_new_feedback": args.min_new_feedback, "gate.min_reward_gain": args.min_reward_gain}
    args = argparse.Namespace(**{**vars(args), "set": [f"{k}={v}" for k, v in flags.items() if v is not None]
                                 + list(args.set)})
    config = train_config(args)
    return replace(config, workdir=Path(args.workdir) / f"rank-{rank}",
                   reward=replace(config.reward, seed=config.reward.seed + rank),
                   policy=replace(config.policy, seed=config.policy.seed + rank))


def main(argv: list[str] | None = None) -> int:
    from fuseloop.bus.url import open_bus
    from fuseloop.repository import ModelRepository
    from trainer.deploy import make_deployer
    from trainer.eval_set import EvalSet
    from trainer.round import Trainer

    args = build_parser().parse_args(argv)
    group = GlooGroup()
    rank = group.rank
    torch.manual_seed(0)
    config = rank_config(args, rank)
    # Only the leader gates, so only it reads the eval set.
    eval_set = EvalSet.from_file(Path(args.eval_set), args.eval_scorer) if args.eval_set and group.is_leader \
        else None
    bus = open_bus(args.bus, client_id=f"fuseloop-trainer-{rank}")
    trainer = None
    try:
        check_copartitioned(bus, group.world_size)
        repo = ModelRepository(Path(args.repo))
        deployer = make_deployer(args.deploy_to, args.admin_token, repo) if group.is_leader else None
        trainer = Trainer(config, bus, repo, deployer=deployer, group=group, eval_set=eval_set)
        group.keepalive = lambda: trainer.ingestor.consumer().position()
        for _ in range(args.rounds):
            # Join (or rejoin, after a long round) the group before anyone polls, so the first
            # poll already splits the partitions between all ranks.
            trainer.ingestor.consumer().position()
            group.barrier()
            report = trainer.run_round()
            state = {"rank": rank, "round": report["round"], "version": report.get("version"),
                     "partitions_read": sorted(f"{t}/{p}" for t, p in trainer.store.offsets()),
                     **{f"{name}_sha256": state_sha256(m) for name, m in group.trained.items()}}
            (Path(config.workdir) / f"state-round-{report['round']:03d}.json").write_text(json.dumps(state, indent=2))
            if group.is_leader:
                print(json.dumps(report, indent=2, default=str), flush=True)
        group.barrier()
    finally:
        if trainer is not None:
            trainer.close()
        bus.close()
        group.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
