"""`fuseloop`: one command line for every job. Each area registers its own subcommands;
imports are lazy so `fuseloop --help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _pretrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fuseloop.errors import UserError
    from trainer.pretrain import ModelSource, PretrainConfig, pretrain

    source = ModelSource.parse(args.model)
    cfg = PretrainConfig.for_source(source, quick=args.quick)
    if args.steps is not None:
        if args.steps < 0:
            raise UserError(f"--steps is a number of policy steps, 0 or more, got {args.steps}")
        cfg = replace(cfg, steps=args.steps)
    if args.fusion:
        if not source.builtin:
            raise UserError("--fusion chooses the built-in model's fusion; a model directory brings its own")
        cfg = replace(cfg, model=replace(cfg.model, fusion=args.fusion))
    metrics = pretrain(cfg, Path(args.out), source)
    print(json.dumps(metrics, indent=2))
    print(f"base gold accuracy (greedy, test split): {metrics['gold_accuracy_greedy']:.3f}  -> {args.out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from fuseloop.errors import UserError
    from trainer.pretrain import ModelSource, PretrainConfig, pretrain

    source = ModelSource.parse(args.model)
    if source.builtin:
        raise UserError("import reads a model directory: give hf:DIR (`fuseloop pretrain` builds the built-in model)")
    if args.gold < 0:
        raise UserError(f"--gold is a number of test questions, 0 or more, got {args.gold}")
    metrics = pretrain(PretrainConfig.imported(n_test=args.gold), Path(args.out), source)
    gold = (f", gold accuracy (greedy, {args.gold} test questions) {metrics['gold_accuracy_greedy']:.3f}"
            if args.gold else "")
    print(f"imported {source} as a {metrics['family']} run ({metrics['policy_parameters']:,} policy parameters, "
          f"a fresh reward head{gold}) -> {args.out}; publish it with `fuseloop export {args.out} --repo REPO`")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fuseloop.checkpoint import Checkpoint
    from fuseloop.repository import ModelRepository
    from trainer.export import publish

    manifest = publish(Checkpoint.load(Path(args.run_dir)), ModelRepository(Path(args.repo)), parent_version=args.parent)
    print(f"wrote version {manifest.version} to {args.repo} "
          f"(export {manifest.metrics['export_seconds']} s, max |onnx - torch| {manifest.metrics['export_max_abs_diff']:.2e})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from demo.loop import DemoConfig, run_demo
    from fuseloop.errors import UserError

    out = Path(args.out) if args.out else Path("demo-out") / time.strftime("%Y%m%d-%H%M%S")
    cfg = DemoConfig.for_model(args.model, out, quick=args.quick)
    cfg = replace(cfg, **{k: v for k, v in (("rounds", args.rounds), ("users", args.users), ("bus", args.bus),
                                            ("requests_per_round", args.requests_per_round),
                                            ("canary_percent", args.canary)) if v is not None})
    if args.user_bias is not None:
        if not 0 <= args.user_bias <= 1:
            raise UserError(f"--user-bias is a probability between 0 and 1, got {args.user_bias:g}")
        cfg = replace(cfg, user_model=replace(cfg.user_model, length_bias=args.user_bias))
    if cfg.canary_percent and not 0 < cfg.canary_percent < 100:
        raise UserError(f"--canary is a share of traffic between 0 and 100 percent, got {cfg.canary_percent:g}")
    if args.train_config:
        from fuseloop.config_file import load_toml

        cfg = replace(cfg, train_file=load_toml(Path(args.train_config)))
    # With --json, stdout carries only the final JSON object; the tables go to stderr.
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    result = run_demo(cfg, log=log)
    log(f"gold accuracy {result['base_gold_accuracy']:.3f} -> {result['final_gold_accuracy']:.3f} "
        f"in {result['seconds']:.0f} s; report: {out / 'report.png'}, repository: {out / 'model-repository'}")
    if args.json:
        print(json.dumps(result))
    return 0


# The families `fuseloop demo --model` can build a tiny model of (demo.loop.TINY_BUILDERS; kept
# here as names so that --help does not import transformers).
DEMO_HF_MODELS = ("hf-encoder-decoder", "hf-llava")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuseloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="supervised pretraining of the base policy and initial reward model")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--quick", action="store_true", help="a tiny setting for tests")
    p.add_argument("--model", default="builtin", metavar="SOURCE",
                   help="builtin (default: trained from scratch) or hf:DIR, a local Hugging Face model directory "
                        "(config, safetensors weights, tokenizer, image processor) to fine-tune")
    p.add_argument("--steps", type=int, default=None, help="override the number of policy steps")
    p.add_argument("--fusion", choices=("early", "late", "hybrid"), help="fusion of image and prompt (builtin)")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("import", help="a local Hugging Face model directory as a run directory, as it is "
                                      "(no task training; a fresh reward head), ready for `fuseloop export`")
    p.add_argument("model", metavar="hf:DIR", help="the model directory (config, safetensors weights, tokenizer, "
                                                   "image processor)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--gold", type=int, default=0, metavar="N",
                   help="also measure gold accuracy on N test questions of the built-in task (default: none)")
    p.set_defaults(func=_import)

    p = sub.add_parser("export", help="export a run directory as the next version of a model repository")
    p.add_argument("run_dir")
    p.add_argument("--repo", required=True)
    p.add_argument("--parent", type=int, default=None, help="parent version recorded in the manifest")
    p.set_defaults(func=_export)

    p = sub.add_parser("demo", help="the closed loop on one machine with simulated users")
    p.add_argument("--model", default="builtin", choices=("builtin", *DEMO_HF_MODELS),
                   help="the base: builtin (default), or a tiny Hugging Face model of that family, built locally "
                        "and fine-tuned on the task through `pretrain --model hf:DIR`")
    p.add_argument("--rounds", type=int)
    p.add_argument("--users", type=int, help="concurrent simulated users")
    p.add_argument("--requests-per-round", type=int)
    p.add_argument("--bus", help="default: an embedded SQLite bus; or kafka://HOST:PORT?api_version=0.9")
    p.add_argument("--out", help="output folder (default demo-out/<timestamp>)")
    p.add_argument("--quick", action="store_true", help="small settings (a minute or two)")
    p.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    p.add_argument("--train-config", help="TOML file of TrainConfig fields for the rounds (as `fuseloop train --config`)")
    p.add_argument("--canary", type=float, metavar="PERCENT",
                   help="share of sessions a passing candidate serves on trial first (default 30; 0: deploy at once)")
    p.add_argument("--user-bias", type=float, metavar="P",
                   help="chance a simulated user judges by length (the longer answer wins, right or wrong)")
    p.set_defaults(func=_demo)

    serve = sub.add_parser("serve", help="run a service").add_subparsers(dest="service", required=True)
    bench = sub.add_parser("bench", help="benchmarks, side by side with a baseline").add_subparsers(dest="bench", required=True)

    from services.feedback import cli as feedback_cli
    from services.inference import cli as inference_cli
    from trainer import cli as trainer_cli

    inference_cli.add_serve_parser(serve)
    inference_cli.add_bench_parser(bench)
    feedback_cli.add_serve_parser(serve)
    feedback_cli.add_bench_parser(bench)
    trainer_cli.add_parsers(sub, bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command. Errors the user can fix come out as one line, `error: ...`, with a
    non-zero exit code; anything else is a fault and keeps its traceback."""
    import grpc

    from fuseloop.errors import UserError, rpc_error_line

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        return _fail(str(e), e.exit_code)
    except grpc.RpcError as e:
        target = getattr(args, "server", None) or getattr(args, "deploy_to", None) or "the service"
        return _fail(rpc_error_line(e, target), 1)
    except _broker_errors() as e:
        return _fail(f"cannot reach the Kafka broker of {getattr(args, 'bus', None) or 'the bus'}: {e} "
                     "(is Kafka running, and is the bus URL right?)", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _broker_errors() -> tuple[type[BaseException], ...]:
    """kafka-python's 'no broker answered' errors (its import is only paid when one happens)."""
    try:
        from kafka.errors import KafkaConnectionError, NoBrokersAvailable
    except ImportError:
        return ()
    return (NoBrokersAvailable, KafkaConnectionError)


if __name__ == "__main__":
    sys.exit(main())
