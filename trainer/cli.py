"""Trainer commands: `train`, `rollout watch`, `models list|deploy|rollback`, `bench train`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fuseloop.errors import UserError

DEFAULT_WORKDIR = ".fuseloop/trainer"


def train_config(args: argparse.Namespace):
    """TrainConfig from --config, then the step flags, then each --set (the last word wins)."""
    from fuseloop.config_file import apply_overrides, build, load_toml
    from trainer.round import TrainConfig

    values = load_toml(Path(args.config)) if args.config else {}
    if args.workdir is not None:
        values["workdir"] = args.workdir
    flags = {"reward.steps": getattr(args, "rm_steps", None), "policy.steps": getattr(args, "pg_steps", None),
             "ingest.poll_records": getattr(args, "ingest_batch", None),
             "policy.lora_rank": getattr(args, "lora_rank", None)}
    values = apply_overrides(values, [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.set))
    config = build(TrainConfig, values, base=TrainConfig(workdir=Path(DEFAULT_WORKDIR)))
    if config.policy.lora_rank < 0:
        raise UserError(f"--lora-rank (policy.lora_rank) is a positive rank, or 0 for no LoRA; "
                        f"got {config.policy.lora_rank}")
    return config


def _train(args: argparse.Namespace) -> int:
    from fuseloop.config_file import to_toml
    from fuseloop.repository import ModelRepository
    from trainer.deploy import make_deployer
    from trainer.eval_set import EvalSet
    from trainer.rollout import RolloutController
    from trainer.round import Trainer
    from trainer.schedule import Schedule, StopSignals, parse_duration, pending_feedback, run_scheduled

    config = train_config(args)
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    scheduled = args.every is not None or args.when_feedback is not None
    max_rounds = args.rounds if args.rounds is not None else (None if scheduled else 1)
    # One-shot mode runs its rounds back to back, as before.
    schedule = (Schedule(every_s=parse_duration(args.every) if args.every else None,
                         when_feedback=args.when_feedback, max_rounds=max_rounds)
                if scheduled else Schedule(every_s=0.0, max_rounds=max_rounds))
    if not Path(args.repo).is_dir():
        raise UserError(f"the model repository {args.repo} does not exist: run `fuseloop export` into it first")
    bus, topics = _bus_and_topics(args, "fuseloop-trainer")
    repo = ModelRepository(Path(args.repo))
    eval_set = EvalSet.from_file(Path(args.eval_set), args.eval_scorer) if args.eval_set else None
    try:  # a config the repository's model can't train (LoRA on the built-in model) is refused here
        trainer = Trainer(config, bus, repo, topics, deployer=make_deployer(args.deploy_to, args.admin_token, repo),
                          eval_set=eval_set)
    except BaseException:
        bus.close()
        raise
    # Scheduled, the trainer also judges its canaries between rounds (as `fuseloop rollout watch` does).
    judge = RolloutController(bus, repo, topics, config.rollout, config.weights, report_dir=config.workdir) \
        if scheduled else None
    metrics, registry = _trainer_metrics(args.metrics_port)
    try:
        with StopSignals() as signals:
            if scheduled:
                print(f"trainer waiting for rounds ({_describe(schedule)})", file=sys.stderr, flush=True)
            run_scheduled(trainer.run_round, lambda: pending_feedback(trainer.ingestor.consumer(), topics.feedback),
                          schedule, signals, metrics,
                          on_report=lambda r: print(json.dumps(r, indent=2, default=str), flush=True),
                          tick=(lambda: _print_decision(judge.step())) if judge else (lambda: None))
    finally:
        if judge is not None:
            judge.close()
        trainer.close()
        bus.close()
        if registry is not None:
            registry.stop_http()
    return 0


def _bus_and_topics(args: argparse.Namespace, client_id: str):
    from fuseloop.bus import TopicConfig
    from fuseloop.bus.url import open_bus

    try:
        bus = open_bus(args.bus, client_id=client_id)
    except ValueError as e:  # a malformed bus URL
        raise UserError(str(e)) from None
    return bus, TopicConfig(args.inference_topic, args.feedback_topic, args.dead_letter_topic)


def _print_decision(decision) -> None:
    if decision is not None and decision.action != "wait":
        print(json.dumps({"rollout": decision.to_dict()}, indent=2), flush=True)


def _rollout(args: argparse.Namespace) -> int:
    from fuseloop.repository import ModelRepository
    from trainer.rollout import RolloutController
    from trainer.schedule import StopSignals, parse_duration

    config = train_config(args)
    if not Path(args.repo).is_dir():
        raise UserError(f"the model repository {args.repo} does not exist")
    interval = parse_duration(args.interval)
    bus, topics = _bus_and_topics(args, "fuseloop-rollout")
    judge = RolloutController(bus, ModelRepository(Path(args.repo)), topics, config.rollout, config.weights,
                              report_dir=config.workdir)
    try:
        with StopSignals() as signals:
            while not signals.stop.is_set():
                decision = judge.step()
                if decision is not None:
                    print(json.dumps(decision.to_dict()), flush=True)
                    if args.once and decision.action != "wait":
                        return 0
                signals.stop.wait(interval)
    finally:
        judge.close()
        bus.close()
    return 0


def _trainer_metrics(port: int | None):
    if port is None:
        return None, None
    from fuseloop.metrics import MetricsRegistry
    from trainer.schedule import TrainerMetrics

    registry = MetricsRegistry()
    metrics = TrainerMetrics(registry)
    bound = registry.serve_http("0.0.0.0", port)
    print(f"trainer metrics on :{bound}/metrics", file=sys.stderr, flush=True)
    return metrics, registry


def _describe(schedule) -> str:
    parts = ([f"every {schedule.every_s:g} s"] if schedule.every_s is not None else []) + \
            ([f"when {schedule.when_feedback} feedback events wait"] if schedule.when_feedback is not None else [])
    return " or ".join(parts) + "; SIGTERM stops after the running round"


def _models(args: argparse.Namespace) -> int:
    from fuseloop.repository import ModelRepository
    from trainer.deploy import AdminDeployer, RecordDeployer

    if args.action == "list":
        if args.server:
            for v in AdminDeployer(args.server, args.admin_token).list_models().versions:
                print(f"{'*' if v.serving else ' '} {v.version:>4}  parent {v.parent_version or '-':>4}  {v.created_at}")
            return 0
        if not args.repo:
            raise UserError("models list needs --repo REPO_DIR or --server HOST:PORT")
        repo = ModelRepository(Path(args.repo))
        serving = repo.serving_state().serving
        print(f"  {'version':>7}  {'parent':>6}  {'created':25}  {'gold/metrics'}")
        for v in repo.versions():
            m = repo.manifest(v)
            key = {k: m.metrics[k] for k in ("gold_accuracy_greedy", "round", "kl") if k in m.metrics}
            print(f"{'*' if v == serving else ' '} {v:>7}  {m.parent_version or '-':>6}  {m.created_at:25}  {json.dumps(key)}")
        return 0
    if not (args.server or args.repo):
        raise UserError(f"models {args.action} needs --repo REPO_DIR (the fleet's serving record) "
                        "or --server HOST:PORT (an inference replica)")
    if args.action == "deploy" and not (args.version or "").isdigit():
        raise UserError(f"models deploy needs a version number, e.g. `fuseloop models deploy 7`, got {args.version!r}")
    deployer = (AdminDeployer(args.server, args.admin_token) if args.server
                else RecordDeployer(ModelRepository(Path(args.repo))))
    if args.action == "rollback":
        print(deployer.rollback())
    elif args.canary is not None:
        if not 0 < args.canary < 100:
            raise UserError(f"--canary is a share of traffic between 0 and 100 percent, got {args.canary:g}")
        print(deployer.canary(int(args.version), args.canary))
    else:
        print(deployer.deploy(int(args.version)))
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from trainer.bench import main as bench_main

    return bench_main(json_output=args.json, checkpoint=args.checkpoint, seeds=args.seeds)


def add_parsers(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    token = os.environ.get("FUSELOOP_ADMIN_TOKEN", "")
    p = sub.add_parser("train", help="consume feedback, retrain, gate, publish and redeploy")
    p.add_argument("--repo", required=True, help="model repository (Triton layout)")
    p.add_argument("--bus", required=True, help="kafka://HOST:PORT?api_version=0.9 or sqlite:///PATH.db")
    p.add_argument("--deploy-to", help="default: the repository's serving record, which every replica follows; "
                                       "or an inference service HOST:PORT (admin Deploy), triton://HOST:PORT, "
                                       "or `none` (publish only)")
    p.add_argument("--admin-token", default=token, help="admin token (default: $FUSELOOP_ADMIN_TOKEN)")
    p.add_argument("--workdir", default=None, help=f"the trainer's dataset store, reports, plots (default {DEFAULT_WORKDIR})")
    p.add_argument("--rounds", type=int, default=None, help="rounds to run (default 1; scheduled: until a signal)")
    p.add_argument("--config", help="TOML file setting TrainConfig fields, nested: [policy] kl_beta = 0.05")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override one field, e.g. policy.kl_beta=0.05 (repeatable; wins over --config)")
    p.add_argument("--eval-set", help="JSONL of {image | image_base64, prompt, answers[, match]}: the gate refuses a "
                                      "candidate worse on it than serving by more than gate.eval_margin")
    p.add_argument("--eval-scorer", help="package.module:function(accepted_answers, answer) -> [0, 1], "
                                         "instead of matching answers")
    p.add_argument("--print-config", action="store_true", help="print the effective config as TOML and exit")
    p.add_argument("--every", help="scheduled: a round at least this often (90s, 10m, 2h) until SIGTERM")
    p.add_argument("--when-feedback", type=int, help="scheduled: a round once this many feedback events wait")
    p.add_argument("--metrics-port", type=int, help="serve the trainer's Prometheus /metrics on this port")
    p.add_argument("--rm-steps", type=int, help="reward-model steps per round")
    p.add_argument("--pg-steps", type=int, help="policy-gradient steps per round")
    p.add_argument("--lora-rank", type=int, metavar="R",
                   help="train rank-R LoRA adapters instead of every weight (Hugging Face families; the reference "
                        "policy is the base under them; versions are published merged)")
    p.add_argument("--inference-topic", default="fuseloop.inference")
    p.add_argument("--feedback-topic", default="fuseloop.feedback")
    p.add_argument("--dead-letter-topic", default="fuseloop.dead-letter")
    p.add_argument("--ingest-batch", type=int, help="records per poll (and per durable store transaction)")
    p.set_defaults(func=_train)

    p = sub.add_parser("rollout", help="judge canaries from live feedback: promote or roll back")
    p.add_argument("action", choices=("watch",))
    p.add_argument("--repo", required=True, help="model repository whose serving record holds the canary")
    p.add_argument("--bus", required=True, help="kafka://HOST:PORT?api_version=0.9 or sqlite:///PATH.db")
    p.add_argument("--interval", default="5s", help="how often to read new events and look (default 5s)")
    p.add_argument("--once", action="store_true", help="stop after the first promote or rollback")
    p.add_argument("--workdir", default=None, help=f"where rollout-decisions.jsonl goes (default {DEFAULT_WORKDIR})")
    p.add_argument("--config", help="TOML file with a [rollout] table (margin, alpha, min_samples, ...)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="e.g. rollout.margin=0.02")
    p.add_argument("--inference-topic", default="fuseloop.inference")
    p.add_argument("--feedback-topic", default="fuseloop.feedback")
    p.add_argument("--dead-letter-topic", default="fuseloop.dead-letter")
    p.set_defaults(func=_rollout)

    p = sub.add_parser("models", help="list, deploy and roll back model versions")
    p.add_argument("action", choices=("list", "deploy", "rollback"))
    p.add_argument("version", nargs="?", help="the version, for deploy")
    p.add_argument("--repo", help="model repository: list it, or deploy/roll back by changing its serving record")
    p.add_argument("--server", help="inference service HOST:PORT")
    p.add_argument("--canary", type=float, metavar="PERCENT",
                   help="deploy: put the version on trial for this sticky share of traffic (rollback ends it)")
    p.add_argument("--admin-token", default=token, help="admin token (default: $FUSELOOP_ADMIN_TOKEN)")
    p.set_defaults(func=_models)

    p = bench.add_parser("train", help="reward-model training vs TRL's RewardTrainer")
    p.add_argument("--json", action="store_true")
    p.add_argument("--checkpoint", help="run directory of a base policy (default: pretrain one, cached)")
    p.add_argument("--seeds", type=int, default=1, help="training runs per contender (accuracy is noisy)")
    p.set_defaults(func=_bench_train)
