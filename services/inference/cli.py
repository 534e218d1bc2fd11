"""`fuseloop serve inference` and `fuseloop bench inference`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from fuseloop.tls import add_tls_arguments

ADMIN_TOKEN_ENV = "FUSELOOP_ADMIN_TOKEN"


def add_serve_parser(serve_subparsers) -> None:
    p = serve_subparsers.add_parser("inference", help="the gRPC inference service (+ admin, KServe v2, health, metrics)")
    p.add_argument("--repo", required=True, help="model repository directory (Triton layout)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--runtime", default="onnxruntime", help="onnxruntime | triton://HOST:PORT")
    p.add_argument("--bus", default=None, help="event bus URL for inference events (kafka://... or sqlite:///...)")
    p.add_argument("--admin-token", default=None, help=f"admin API token (default: ${ADMIN_TOKEN_ENV})")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting before RESOURCE_EXHAUSTED")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: ORT decides)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--spool-dir", default=None, help="where inference events wait while Kafka is away")
    add_tls_arguments(p)
    p.set_defaults(func=serve_inference)


def add_bench_parser(bench_subparsers) -> None:
    from services.inference.bench_hf import HF_MODELS

    p = bench_subparsers.add_parser(
        "inference", help="service vs raw ONNX Runtime vs unbatched (and MLServer for ModelInfer), by concurrency; "
                          "for a Hugging Face family, Generate: service vs raw ONNX Runtime vs HF generate()")
    p.add_argument("--model", default="builtin", choices=("builtin", *HF_MODELS),
                   help="builtin: the built-in model (--repo, or a quick pretrain); a Hugging Face family: its model, "
                        "built at --d-model/--layers (or --model-dir), published into a temporary repository")
    p.add_argument("--model-dir", default=None,
                   help="with an HF --model: its save_pretrained directory (default: build a random one)")
    p.add_argument("--d-model", type=int, default=256, help="with an HF --model and no --model-dir: the width built")
    p.add_argument("--layers", type=int, default=4, help="with an HF --model and no --model-dir: layers per stack")
    p.add_argument("--repo", default=None, help="model repository (default: pretrain a quick model first; with an "
                                                "HF --model: the one --model-dir was published to, default: publish it)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--concurrency", default=None, help="comma-separated client concurrencies (default 1,8,32; "
                                                       "1,32 for an HF --model)")
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per cell and contender")
    p.add_argument("--rounds", type=int, default=3, help="slices per cell; contenders take turns between them")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the model's limit")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads, for every contender (torch's for HF generate())")
    p.add_argument("--rpcs", default="Generate,Score,ModelInfer", help="comma-separated RPCs to measure")
    p.set_defaults(func=bench_inference)


def serve_inference(args: argparse.Namespace) -> int:
    from fuseloop.bus import open_bus
    from fuseloop.tls import tls_from_args
    from fuseloop.repository import ModelRepository
    from services.inference.config import InferenceServiceConfig
    from services.inference.runtime import make_runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.repo).is_dir():
        print(f"error: the repository {args.repo} does not exist", file=sys.stderr)
        return 2
    try:
        runtime = make_runtime(args.runtime, intra_op_threads=args.threads, device=args.device)
        config = InferenceServiceConfig(
            host=args.host, port=args.port, metrics_port=args.metrics_port,
            admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None,
            max_batch=args.max_batch, max_queue_delay_ms=args.max_queue_delay_ms, max_queue=args.max_queue,
            tls=tls_from_args(args.tls_cert, args.tls_key, args.tls_client_ca))
        # Each service keeps its own spool (events wait there while Kafka is away).
        bus = open_bus(args.bus, client_id="fuseloop-inference", spool_dir=args.spool_dir) if args.bus else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, runtime, ModelRepository(Path(args.repo)), bus))
    finally:
        if bus is not None:
            bus.close()
        runtime.close()
    return 0


async def _serve(config, runtime, repo, bus) -> None:
    from services.inference.server import InferenceServer

    server = InferenceServer(config, runtime, repo, bus)
    await server.start(wait_ready=False)
    print(f"inference service on {server.address}"
          + (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def bench_inference(args: argparse.Namespace) -> int:
    from services.inference.bench import BenchConfig, run_bench

    hf = args.model != "builtin"
    levels = tuple(int(c) for c in (args.concurrency or ("1,32" if hf else "1,8,32")).split(",") if c.strip())
    return run_bench(BenchConfig(repo=Path(args.repo) if args.repo else None, concurrency=levels,
                                 seconds=args.seconds, rounds=args.rounds, max_new_tokens=args.max_new_tokens,
                                 threads=args.threads, rpcs=("Generate",) if hf else
                                 tuple(r.strip() for r in args.rpcs.split(",") if r.strip()),
                                 model=args.model, model_dir=Path(args.model_dir) if args.model_dir else None,
                                 hf_size=(args.d_model, args.layers)),
                     as_json=args.json)
