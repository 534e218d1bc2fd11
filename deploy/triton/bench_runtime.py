"""Per-call latency of the Triton runtime against ONNX Runtime in process, same version, same inputs.

    .venv/bin/python deploy/triton/bench_runtime.py --repo runs/model_repository            # MLServer
    .venv/bin/python deploy/triton/bench_runtime.py --repo runs/model_repository --url 127.0.0.1:8001

Without --url it starts MLServer (`make mlserver`) on the repository. The baseline is ONNX Runtime
on CPU in this process: what the gRPC hop and the server cost on top of the graphs themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuseloop.repository import ModelRepository  # noqa: E402
from services.inference.runtime.base import LoadedVersion  # noqa: E402
from services.inference.runtime.mlserver_launcher import MLServerProcess  # noqa: E402
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig  # noqa: E402
from services.inference.runtime.triton_runtime import TritonRuntime, TritonRuntimeConfig  # noqa: E402


def calls(loaded: LoadedVersion, batch: int, past_len: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    pre = loaded.preprocessor
    size = pre.config.image_size
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    ids = rng.integers(4, len(pre.tokenizer), (batch, pre.config.max_prompt_tokens // 2)).astype(np.int64)
    mask = np.ones_like(ids)
    stepper = loaded.stepper
    state = stepper.prefill(pixels, ids, mask)
    for _ in range(past_len):
        stepper.step(state)
    # `step` replaces the state's arrays rather than writing into them: a shallow copy starts each call afresh.
    return {"encode": lambda: stepper.prefill(pixels, ids, mask),
            "decode_step": lambda: stepper.step(dataclasses.replace(state)),
            "score": lambda: loaded.score(pixels, ids, mask, ids, mask)}


def percentiles(fn, n: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def run(repo: ModelRepository, url: str, batches: list[int], past_len: int, n: int) -> None:
    version = repo.latest()
    contenders = {"onnxruntime": OnnxRuntime(OnnxRuntimeConfig(device="cpu")).load(repo, version),
                  "triton": TritonRuntime(TritonRuntimeConfig(url=url)).load(repo, version)}
    rows = []
    cells = [(b, name) for b in batches for name in ("encode", "decode_step", "score")]
    for batch, name in tqdm(cells, desc="bench", leave=False):
        row = [name, batch]
        for loaded in contenders.values():
            row += percentiles(calls(loaded, batch, past_len)[name], n)
        rows.append(row)
    print(f"version {version}, {n} calls per cell, decode_step after {past_len} cached tokens; ms")
    print(f"{'call':12} {'batch':>5} {'ort p50':>8} {'ort p99':>8} {'triton p50':>10} {'triton p99':>10} {'x p50':>6}")
    for name, batch, op50, op99, tp50, tp99 in rows:
        print(f"{name:12} {batch:5d} {op50:8.2f} {op99:8.2f} {tp50:10.2f} {tp99:10.2f} {tp50 / op50:6.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, type=Path)
    p.add_argument("--url", default=None, help="Triton gRPC HOST:PORT (default: start MLServer on --repo)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--past", type=int, default=16, help="cached tokens before the measured decode step")
    p.add_argument("-n", type=int, default=300, help="calls per cell")
    args = p.parse_args()
    repo = ModelRepository(args.repo)
    batches = [int(b) for b in args.batches.split(",")]
    if args.url:
        run(repo, args.url, batches, args.past, args.n)
    else:
        with MLServerProcess(args.repo, load_models_at_startup=False) as server:
            run(repo, server.url, batches, args.past, args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
