"""Trainer commands: `train`, `models list|deploy|rollback`, `bench train`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fuseloop.bus.url import open_bus
    from fuseloop.repository import ModelRepository
    from trainer.deploy import make_deployer
    from trainer.round import TrainConfig, Trainer

    config = TrainConfig(workdir=Path(args.workdir))
    if args.rm_steps is not None:
        config = replace(config, reward=replace(config.reward, steps=args.rm_steps))
    if args.pg_steps is not None:
        config = replace(config, policy=replace(config.policy, steps=args.pg_steps))
    if args.ingest_batch is not None:
        config = replace(config, ingest=replace(config.ingest, poll_records=args.ingest_batch))
    from fuseloop.bus import TopicConfig

    topics = TopicConfig(args.inference_topic, args.feedback_topic, args.dead_letter_topic)
    bus = open_bus(args.bus, client_id="fuseloop-trainer")
    trainer = Trainer(config, bus, ModelRepository(Path(args.repo)), topics,
                      deployer=make_deployer(args.deploy_to, args.admin_token))
    try:
        for _ in range(args.rounds):
            report = trainer.run_round()
            print(json.dumps(report, indent=2, default=str))
    finally:
        trainer.close()
        bus.close()
    return 0


def _models(args: argparse.Namespace) -> int:
    from fuseloop.repository import ModelRepository
    from trainer.deploy import AdminDeployer

    if args.action == "list":
        if args.server:
            for v in AdminDeployer(args.server, args.admin_token).list_models().versions:
                print(f"{'*' if v.serving else ' '} {v.version:>4}  parent {v.parent_version or '-':>4}  {v.created_at}")
            return 0
        if not args.repo:
            raise SystemExit("models list needs --repo REPO_DIR or --server HOST:PORT")
        repo = ModelRepository(Path(args.repo))
        serving = repo.serving_state().serving
        print(f"  {'version':>7}  {'parent':>6}  {'created':25}  {'gold/metrics'}")
        for v in repo.versions():
            m = repo.manifest(v)
            key = {k: m.metrics[k] for k in ("gold_accuracy_greedy", "round", "kl") if k in m.metrics}
            print(f"{'*' if v == serving else ' '} {v:>7}  {m.parent_version or '-':>6}  {m.created_at:25}  {json.dumps(key)}")
        return 0
    if not args.server:
        raise SystemExit(f"models {args.action} needs --server HOST:PORT (the inference service)")
    deployer = AdminDeployer(args.server, args.admin_token)
    print(deployer.deploy(int(args.version)) if args.action == "deploy" else deployer.rollback())
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from trainer.bench import main as bench_main

    return bench_main(json_output=args.json, checkpoint=args.checkpoint, seeds=args.seeds)


def add_parsers(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    token = os.environ.get("FUSELOOP_ADMIN_TOKEN", "")
    p = sub.add_parser("train", help="consume feedback, retrain, gate, publish and redeploy")
    p.add_argument("--repo", required=True, help="model repository (Triton layout)")
    p.add_argument("--bus", required=True, help="kafka://HOST:PORT?api_version=0.9 or sqlite:///PATH.db")
    p.add_argument("--deploy-to", help="inference service HOST:PORT (admin Deploy) or triton://HOST:PORT")
    p.add_argument("--admin-token", default=token, help="admin token (default: $FUSELOOP_ADMIN_TOKEN)")
    p.add_argument("--workdir", default=".fuseloop/trainer", help="the trainer's dataset store, reports, plots")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--rm-steps", type=int, help="reward-model steps per round")
    p.add_argument("--pg-steps", type=int, help="policy-gradient steps per round")
    p.add_argument("--inference-topic", default="fuseloop.inference")
    p.add_argument("--feedback-topic", default="fuseloop.feedback")
    p.add_argument("--dead-letter-topic", default="fuseloop.dead-letter")
    p.add_argument("--ingest-batch", type=int, help="records per poll (and per durable store transaction)")
    p.set_defaults(func=_train)

    p = sub.add_parser("models", help="list, deploy and roll back model versions")
    p.add_argument("action", choices=("list", "deploy", "rollback"))
    p.add_argument("version", nargs="?", help="the version, for deploy")
    p.add_argument("--repo", help="model repository, for list")
    p.add_argument("--server", help="inference service HOST:PORT")
    p.add_argument("--admin-token", default=token, help="admin token (default: $FUSELOOP_ADMIN_TOKEN)")
    p.set_defaults(func=_models)

    p = bench.add_parser("train", help="reward-model training vs TRL's RewardTrainer")
    p.add_argument("--json", action="store_true")
    p.add_argument("--checkpoint", help="run directory of a base policy (default: pretrain one, cached)")
    p.add_argument("--seeds", type=int, default=1, help="training runs per contender (accuracy is noisy)")
    p.set_defaults(func=_bench_train)
