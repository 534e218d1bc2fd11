"""`fuseloop serve feedback` and `fuseloop bench feedback`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from fuseloop.tls import add_tls_arguments

PSEUDONYM_KEY_ENV = "FUSELOOP_PSEUDONYM_KEY"
APP_TOKENS_ENV = "FUSELOOP_APP_TOKENS"  # "TOKEN=APP,TOKEN=APP"


def add_cli(subparsers) -> None:
    """Registers `serve feedback` and `bench feedback` under the top-level subparsers, creating
    `serve`/`bench` when no one has yet."""
    add_serve_parser(_nested(subparsers, "serve", "run a service", "service"))
    add_bench_parser(_nested(subparsers, "bench", "benchmarks, side by side with a baseline", "bench"))


def add_serve_parser(serve_subparsers) -> None:
    from fuseloop.bus.url import DEFAULT_BUS_ENV

    p = serve_subparsers.add_parser(
        "feedback",
        help="the gRPC feedback service: validated feedback events into the bus (Kafka or embedded SQLite)",
        description="Apps call it with `authorization: Bearer <app token>`. OK means durable.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--bus", default=None, help=f"kafka://HOST:PORT[,...][?api_version=0.9] or sqlite:///ABS/PATH.db "
                   f"(default: ${DEFAULT_BUS_ENV}, else an SQLite file under ./.fuseloop)")
    p.add_argument("--spool-dir", default=None, help="where events wait while Kafka is away (default: per client id under ~/.local/state)")
    p.add_argument("--spool-max-bytes", type=int, default=1 << 30, help="past this, calls get RESOURCE_EXHAUSTED")
    p.add_argument("--app-token", action="append", default=[], metavar="TOKEN=APP", help="an app's token (repeatable)")
    p.add_argument("--app-tokens-file", default=None, help="lines TOKEN=APP, or a JSON object {token: app}")
    p.add_argument("--pseudonym-key-file", default=None, help=f"secret key for user-id pseudonyms (default: ${PSEUDONYM_KEY_ENV})")
    p.add_argument("--max-text-bytes", type=int, default=8 * 1024)
    p.add_argument("--max-batch", type=int, default=1000)
    p.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    add_tls_arguments(p)
    p.set_defaults(func=serve_feedback_command)


def add_bench_parser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "feedback", help="events/s and ack latency through gRPC into Kafka, next to a raw kafka-python producer"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--seconds", type=float, default=4.0, help="measuring time per row")
    p.add_argument("--batch", type=int, default=100, help="events per SubmitBatch")
    p.add_argument("--batch-concurrency", type=int, default=4, help="SubmitBatch calls in flight")
    p.add_argument("--unary-concurrency", type=int, default=32, help="Submit calls in flight")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each row keeps its best")
    p.set_defaults(func=bench_feedback_command)


def serve_feedback_command(args: argparse.Namespace) -> int:
    from fuseloop.bus import open_bus
    from fuseloop.bus.url import default_bus_url
    from services.feedback.app_tokens import AppTokens
    from fuseloop.tls import tls_from_args
    from services.feedback.server import FeedbackServiceConfig, serve_feedback

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tokens = AppTokens.parse(args.app_token)
        if args.app_tokens_file:
            tokens.update(AppTokens.read_file(args.app_tokens_file))
        if os.environ.get(APP_TOKENS_ENV):
            tokens.update(AppTokens.parse(os.environ[APP_TOKENS_ENV].split(",")))
        if not tokens:
            raise ValueError(f"no app tokens: give --app-token TOKEN=APP, --app-tokens-file or ${APP_TOKENS_ENV}")
        key = _pseudonym_key(args.pseudonym_key_file)
        config = FeedbackServiceConfig(
            app_tokens=tokens, pseudonym_key=key, host=args.host, port=args.port,
            max_text_bytes=args.max_text_bytes, max_batch=args.max_batch,
            max_message_bytes=args.max_message_bytes, metrics_port=args.metrics_port,
            tls=tls_from_args(args.tls_cert, args.tls_key, args.tls_client_ca),
        )
        bus = open_bus(args.bus or default_bus_url(), client_id="fuseloop-feedback",
                       spool_dir=args.spool_dir, spool_max_bytes=args.spool_max_bytes)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve_until_signalled(config, bus, serve_feedback))
    finally:
        bus.close()
    return 0


async def _serve_until_signalled(config, bus, serve) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, bus, stop)


def _pseudonym_key(path: str | None) -> bytes:
    from services.feedback.pseudonym import MIN_KEY_BYTES

    if path:
        key = Path(path).read_bytes().strip()
    elif os.environ.get(PSEUDONYM_KEY_ENV):
        key = os.environ[PSEUDONYM_KEY_ENV].encode()
    else:
        raise ValueError(f"no pseudonym key: give --pseudonym-key-file or set ${PSEUDONYM_KEY_ENV} "
                         f"(at least {MIN_KEY_BYTES} random bytes, e.g. `openssl rand -hex 32`)")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the pseudonym key is {len(key)} bytes; use at least {MIN_KEY_BYTES}")
    return key


def bench_feedback_command(args: argparse.Namespace) -> int:
    from services.feedback.bench import FeedbackBenchConfig, run_bench

    return run_bench(
        FeedbackBenchConfig(seconds=args.seconds, batch=args.batch, batch_concurrency=args.batch_concurrency,
                            unary_concurrency=args.unary_concurrency, rounds=args.rounds),
        as_json=args.json,
    )


def _nested(subparsers, name: str, help: str, dest: str):
    """The subparsers action under `name`, made if missing."""
    parser = subparsers.choices.get(name) or subparsers.add_parser(name, help=help)
    for action in parser._actions:  # argparse offers no public way to find it
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=dest, required=True)
