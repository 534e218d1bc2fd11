"""`fuseloop bench inference`: the service against its limit and against itself unbatched.

Side by side, in one run, for Generate and Score at each concurrency (closed loop: every client
sends its next request as soon as the previous answer arrives):

- service:   the real server over gRPC (in a subprocess; the load generator is a grpc.aio client here)
- raw:       the same work in process, no gRPC, no threads: preprocess, then ONNX Runtime on batches
             of `concurrency` requests (static batching, the same sampling), back to back. The limit.
- unbatched: the real server with max batch 1 (generation and scoring), over a copy of the
             repository whose config.pbtxt files have no dynamic_batching (ModelInfer per request).
- mlserver:  ModelInfer only: Seldon MLServer (its own venv `.venv-mlserver`, in a subprocess)
             serving the same reward model.onnx with its adaptive batching (32 rows, 5 ms) and
             the same ORT thread count. Skipped, with a line saying so, when the venv is missing.

ModelInfer is KServe v2 on the reward model, one row per request, from tensors prepared once
(the client sends bytes it serialized beforehand, so the load generator costs little); raw
runs those rows through ONNX Runtime in batches of `concurrency`. MLServer gets the same rows
padded to the workload's widest prompt and response: its adaptive batching concatenates requests
along the batch and needs every other dimension equal (fuseloop pads rows itself when it merges).

Generate samples at temperature 1 with a seed per request, so every contender produces the same
tokens (the same work). Numbers are requests/s and latency percentiles in ms. Each cell is measured
in rounds, the contenders taking turns, so other load on a shared machine hits them alike.

`--model hf-encoder-decoder` (or another Hugging Face family, `bench_hf.HF_MODELS`) measures
Generate only (`bench_hf_family` below), with a model of that family built at a given size (or given as a
`save_pretrained` directory) and published into a repository: the service, raw ONNX Runtime over
the same graphs through the family's stepper, and the same weights' `model.generate()` in PyTorch,
batched, greedy; plus the peak RSS of the server and engine processes and the CPU each contender used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fuseloop.repository import REWARD, ModelRepository
from services.inference.process_memory import peak_rss_bytes

PROMPT_COUNT = 64


@dataclass
class BenchConfig:
    repo: Path | None = None
    concurrency: tuple[int, ...] = (1, 8, 32)
    seconds: float = 3.0  # measured per cell and contender, in `rounds` slices
    rounds: int = 3
    warmup_s: float = 0.2  # per slice
    max_new_tokens: int = 0  # 0: the model's limit
    temperature: float = 1.0
    threads: int = 1  # ORT intra-op threads for every contender (the machine has few cores)
    max_batch: int = 32
    rpcs: tuple[str, ...] = ("Generate", "Score", "ModelInfer")
    mlserver_batch: tuple[int, float] = (32, 0.005)  # MLServer's max_batch_size, max_batch_time (s)
    # "builtin", or a Hugging Face family (bench_hf.HF_MODELS): service vs raw ORT vs HF generate()
    model: str = "builtin"
    model_dir: Path | None = None  # an HF family's save_pretrained directory; None: build one of hf_size
    hf_size: tuple[int, int] = (256, 4)  # the built HF model's d_model, layers per stack


@dataclass
class Cell:
    contender: str
    rpc: str
    concurrency: int
    requests: int
    seconds: float
    throughput: float  # requests/s
    p50_ms: float
    p99_ms: float
    tokens_per_s: float = 0.0
    failures: int = 0


@dataclass
class Workload:
    images: list[bytes]
    prompts: list[str]
    responses: list[str]

    @classmethod
    def scenes(cls, n: int = PROMPT_COUNT) -> "Workload":
        from fuseloop.scenes import make_split, png_bytes, render

        examples = make_split("test", n)
        return cls([png_bytes(render(e.scene)) for e in examples], [e.prompt for e in examples],
                   [e.answer for e in examples])

    @classmethod
    def scenes_of_one_length(cls, prompt_ids, n: int = PROMPT_COUNT) -> "Workload":
        """`n` scenes whose prompts all tokenize (with `prompt_ids`) to the most common length, so no
        contender pads a prompt: batched HF generate() gives a left-padded row of the encoder-decoder
        another answer than the row alone, and with unequal answers the contenders do unequal work."""
        from collections import Counter

        w = cls.scenes(8 * n)
        lengths = [len(prompt_ids(p)) for p in w.prompts]
        common = Counter(lengths).most_common(1)[0][0]
        keep = [i for i, length in enumerate(lengths) if length == common][:n]
        return cls([w.images[i] for i in keep], [w.prompts[i] for i in keep], [w.responses[i] for i in keep])


def summarize(contender: str, rpc: str, concurrency: int, latencies: list[float], seconds: float,
              tokens: int = 0, failures: int = 0) -> Cell:
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return Cell(contender, rpc, concurrency, len(latencies), round(seconds, 3), round(len(latencies) / seconds, 1),
                round(float(np.percentile(lat, 50)), 3), round(float(np.percentile(lat, 99)), 3),
                round(tokens / seconds, 1), failures)


# -- raw ONNX Runtime in process -----------------------------------------------------------------
class RawRunner:
    """The lean loop: what the service would cost without gRPC, queues or threads."""

    def __init__(self, repo: ModelRepository, threads: int) -> None:
        from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig

        self.loaded = OnnxRuntime(OnnxRuntimeConfig(intra_op_threads=threads)).load(repo, repo.latest())
        self.pre = self.loaded.preprocessor
        self.eos = self.pre.eos_id

    def generate(self, w: Workload, idx: list[int], max_new: int, temperature: float) -> int:
        """One static batch; returns the number of tokens generated."""
        from fuseloop.sampling import sample_next, sequence_rng

        pre, lv = self.pre, self.loaded
        pixels = pre.images([w.images[i] for i in idx])
        ids, mask = pre.prompts([w.prompts[i] for i in idx])
        state = lv.stepper.prefill(pixels, ids, mask)
        B = len(idx)
        rngs = [sequence_rng(i, 0) for i in idx]
        temp, top_p = np.full(B, temperature), np.ones(B)
        done = np.zeros(B, dtype=bool)
        out = []
        for _ in range(max_new):
            logits = lv.stepper.step(state)
            nxt, _ = sample_next(logits, temp, top_p, np.array([r.random() for r in rngs]))
            out.append(np.where(done, -1, nxt))
            done |= nxt == self.eos
            state.tokens = nxt
            if done.all():
                break
        rows = np.stack(out, axis=1).tolist()
        texts = [pre.decode([t for t in row if t >= 0]) for row in rows]  # as the service answers text
        return sum(len([t for t in row if t >= 0]) for row in rows) if texts is not None else 0

    def reward_rows(self, w: Workload) -> list[dict[str, np.ndarray]]:
        """One reward-model row per example, as a KServe client would send it."""
        rows = []
        for i in range(len(w.prompts)):
            ids, mask = self.pre.prompts([w.prompts[i]])
            rids, rmask = self.pre.responses([w.responses[i]])
            rows.append({"pixel_values": self.pre.images([w.images[i]]), "prompt_ids": ids, "prompt_mask": mask,
                         "response_ids": rids, "response_mask": rmask})
        return rows

    def score_rows(self, rows: list[dict[str, np.ndarray]], idx: list[int]) -> None:
        """The reward model on prepared rows, padded into one batch (what a batching server runs)."""
        from fuseloop.preprocessing import pad_right

        pick = [rows[i] for i in idx]
        ids, mask = pad_right([r["prompt_ids"][0][r["prompt_mask"][0] > 0].tolist() for r in pick], self.pre.pad_id)
        rids, rmask = pad_right([r["response_ids"][0][r["response_mask"][0] > 0].tolist() for r in pick], self.pre.pad_id)
        self.loaded.score(np.concatenate([r["pixel_values"] for r in pick]), ids, mask, rids, rmask)

    def score(self, w: Workload, idx: list[int]) -> None:
        pixels = self.pre.images([w.images[i] for i in idx])
        ids, mask = self.pre.prompts([w.prompts[i] for i in idx])
        rids, rmask = self.pre.responses([w.responses[i] for i in idx])
        self.loaded.score(pixels, ids, mask, rids, rmask)


def run_raw(runner: RawRunner, w: Workload, rpc: str, concurrency: int, seconds: float, warmup_s: float,
            temperature: float, max_new: int, rows: list[dict[str, np.ndarray]]) -> tuple[list[float], int, float]:
    """(latencies, tokens, measured seconds) of one slice: batches of `concurrency`, back to back."""
    latencies, tokens, k = [], 0, 0
    warm_until = time.perf_counter() + warmup_s
    end = warm_until + seconds
    measured_from = None
    while (t0 := time.perf_counter()) < end:
        idx = [(k + j) % len(w.prompts) for j in range(concurrency)]
        k += concurrency
        if rpc == "Generate":
            n = runner.generate(w, idx, max_new, temperature)
        else:
            n = runner.score(w, idx) if rpc == "Score" else runner.score_rows(rows, idx)
        if t0 >= warm_until:
            measured_from = measured_from or t0
            latencies += [time.perf_counter() - t0] * concurrency
            tokens += n or 0
    return latencies, tokens, time.perf_counter() - (measured_from or end)


# -- the service over gRPC -----------------------------------------------------------------------
def _serve(repo: str, max_batch: int, threads: int, port_queue) -> None:
    """Subprocess entry: the server with the given max batch, until terminated."""
    from services.inference.config import InferenceServiceConfig
    from services.inference.runtime import make_runtime
    from services.inference.server import InferenceServer

    async def main() -> None:
        config = InferenceServiceConfig(port=0, max_batch=max_batch, score_max_batch=max_batch, max_queue=1024,
                                        score_max_queue=1024)
        server = InferenceServer(config, make_runtime("onnxruntime", intra_op_threads=threads), ModelRepository(Path(repo)))
        await server.start()
        port_queue.put((server.port, server.engine.pid))
        await server.wait_for_termination()

    asyncio.run(main())


def cpu_seconds(pids: list[int | None]) -> float:
    """User + system CPU time so far of live processes (all their threads); unreadable ones count 0."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, TypeError, ValueError, IndexError):
            pass
    return total


class CpuMeter:
    """The cores each contender used over its slices, by concurrency: the CPU seconds of its
    processes over the wall seconds. When other jobs share the machine, tokens per CPU-second
    compare contenders that got unequal shares of it."""

    def __init__(self) -> None:
        self._used: dict[tuple[str, int], list[float]] = {}  # (contender, c) -> [cpu s, wall s]

    def wrap(self, name: str, pids: list[int | None], fn):
        """`fn(rpc, c)`, metered as `name` over the processes `pids`."""
        def run(rpc: str, c: int):
            cpu0, t0 = cpu_seconds(pids), time.perf_counter()
            out = fn(rpc, c)
            used = self._used.setdefault((name, c), [0.0, 0.0])
            used[0] += cpu_seconds(pids) - cpu0
            used[1] += time.perf_counter() - t0
            return out
        return run

    def cores(self) -> list[dict]:
        return [{"contender": n, "concurrency": c, "cores": round(cpu / wall, 2) if wall else None}
                for (n, c), (cpu, wall) in self._used.items()]


class ServerProcess:
    def __init__(self, repo: Path, max_batch: int, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.ports = ctx.Queue()
        # Not a daemon: the server starts its engine process.
        self.process = ctx.Process(target=_serve, args=(str(repo), max_batch, threads, self.ports))
        self.engine_pid: int | None = None

    def __enter__(self) -> str:
        self.process.start()
        port, self.engine_pid = self.ports.get(timeout=120)
        return f"127.0.0.1:{port}"

    @property
    def pids(self) -> list[int | None]:
        return [self.process.pid, self.engine_pid]

    def peak_rss(self) -> dict[str, int | None]:
        """Peak RSS in bytes so far of the server process and of its engine process."""
        return {"server": peak_rss_bytes(self.process.pid),
                "engine": peak_rss_bytes(self.engine_pid) if self.engine_pid else None}

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(10)


async def _load(address: str, w: Workload, rpc: str, concurrency: int, seconds: float, warmup_s: float,
                temperature: float, max_new: int) -> tuple[list[float], int, float, int]:
    import grpc

    from fuseloop.v1 import events_pb2, inference_pb2, inference_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        latencies: list[float] = []
        counters = {"tokens": 0, "failures": 0, "next": 0}
        warm_until = time.perf_counter() + warmup_s
        end = warm_until + seconds

        async def client() -> None:
            while (t0 := time.perf_counter()) < end:
                i = counters["next"] % len(w.prompts)
                counters["next"] += 1
                try:
                    if rpc == "Generate":
                        r = await stub.Generate(inference_pb2.GenerateRequest(
                            image=w.images[i], prompt=w.prompts[i],
                            sampling=events_pb2.SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=i)))
                        n = sum(c.num_tokens for c in r.candidates)
                    else:
                        await stub.Score(inference_pb2.ScoreRequest(image=w.images[i], prompt=w.prompts[i],
                                                                    response=w.responses[i]))
                        n = 0
                except grpc.aio.AioRpcError:
                    counters["failures"] += 1
                    continue
                if t0 >= warm_until:
                    latencies.append(time.perf_counter() - t0)
                    counters["tokens"] += n

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return latencies, counters["tokens"], time.perf_counter() - warm_until, counters["failures"]


def kserve_requests(rows: list[dict[str, np.ndarray]]) -> list[bytes]:
    """Serialized ModelInferRequests for the reward model, raw tensor contents."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for row in rows:
        req = service_pb2.ModelInferRequest(model_name=REWARD)
        for name, arr in row.items():
            req.inputs.add(name=name, datatype=np_to_triton_dtype(arr.dtype), shape=arr.shape)
            req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
        out.append(req.SerializeToString())
    return out


async def _load_kserve(address: str, requests: list[bytes], concurrency: int, seconds: float,
                       warmup_s: float) -> tuple[list[float], int, float, int]:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        # Bytes in, bytes out: the client neither builds nor parses messages while it measures.
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        latencies: list[float] = []
        counters = {"failures": 0, "next": 0}
        warm_until = time.perf_counter() + warmup_s
        end = warm_until + seconds

        async def client() -> None:
            while (t0 := time.perf_counter()) < end:
                i = counters["next"] % len(requests)
                counters["next"] += 1
                try:
                    await infer(requests[i])
                except grpc.aio.AioRpcError:
                    counters["failures"] += 1
                    continue
                if t0 >= warm_until:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return latencies, 0, time.perf_counter() - warm_until, counters["failures"]


def without_dynamic_batching(repo_dir: Path, out: Path) -> Path:
    """A copy of the repository whose models run each KServe request on its own."""
    import shutil

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.copytree(repo_dir, out, symlinks=True)
    for path in out.glob("*/config.pbtxt"):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        config.ClearField("dynamic_batching")
        path.write_text(text_format.MessageToString(config))
    return out


def same_widths(rows: list[dict[str, np.ndarray]], pad_id: int) -> list[dict[str, np.ndarray]]:
    """The rows with every `<x>_ids`/`<x>_mask` pair right-padded to the widest row (pad_id, 0)."""
    widths = {n: max(r[n].shape[1] for r in rows) for n in rows[0] if n.endswith("_ids")}
    out = []
    for r in rows:
        row = dict(r)
        for ids, width in widths.items():
            mask, extra = ids.removesuffix("_ids") + "_mask", ((0, 0), (0, width - r[ids].shape[1]))
            row[ids], row[mask] = np.pad(r[ids], extra, constant_values=pad_id), np.pad(r[mask], extra)
        out.append(row)
    return out


def reward_only(repo_dir: Path, out: Path, threads: int) -> Path:
    """A repository holding just the reward model (the same model.onnx files, linked), with the
    bench's ORT thread count in its config.pbtxt (which the MLServer runtime honours)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    src, dst = repo_dir / REWARD, out / REWARD
    dst.mkdir(parents=True)
    for version in (p for p in src.iterdir() if p.is_dir()):
        (dst / version.name).mkdir()
        for f in version.iterdir():
            (dst / version.name / f.name).symlink_to(f.resolve())
    config = text_format.Parse((src / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config.parameters["intra_op_thread_count"].string_value = str(threads)
    (dst / "config.pbtxt").write_text(text_format.MessageToString(config))
    return out


def mlserver_contender(repo_dir: Path, tmp: Path, cfg: BenchConfig) -> contextlib.AbstractContextManager:
    """MLServer over the reward model, or a context yielding None (with a line saying why) without it."""
    from services.inference.runtime.mlserver_launcher import DEFAULT_VENV, MLServerProcess, mlserver_executable

    if "ModelInfer" not in cfg.rpcs:
        return contextlib.nullcontext()
    if mlserver_executable(DEFAULT_VENV) is None:
        print(f"mlserver contender skipped: no MLServer venv {DEFAULT_VENV} (run `make mlserver`)", file=sys.stderr)
        return contextlib.nullcontext()
    return MLServerProcess(reward_only(repo_dir, tmp / "mlserver-repo", cfg.threads),
                           adaptive_batching=cfg.mlserver_batch)


# -- the run -------------------------------------------------------------------------------------
def quick_repository(root: Path) -> Path:
    from fuseloop.checkpoint import Checkpoint
    from trainer.export import publish
    from trainer.pretrain import PretrainConfig, pretrain

    print("no --repo: pretraining a quick model (about a minute)...", file=sys.stderr)
    pretrain(PretrainConfig.quick(), root / "run")
    publish(Checkpoint.load(root / "run"), ModelRepository(root / "repo"))
    return root / "repo"


def measure(contenders: dict, rpc: str, c: int, rounds: int) -> list[Cell]:
    """One cell per contender (name -> fn(rpc, c) -> (latencies, tokens, seconds, failures) of one
    slice), measured in `rounds` slices, the contenders taking turns in rotating order."""
    names = list(contenders)
    totals = {name: ([], 0, 0.0, 0) for name in names}
    for r in tqdm(range(rounds), desc=f"{rpc} c={c}", leave=False, file=sys.stderr):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            lat, tok, sec, fail = contenders[name](rpc, c)
            acc = totals[name]
            totals[name] = (acc[0] + lat, acc[1] + tok, acc[2] + sec, acc[3] + fail)
    return [summarize(name, rpc, c, lat, sec, tok, fail) for name, (lat, tok, sec, fail) in totals.items()]


def bench(cfg: BenchConfig) -> dict:
    """Every cell is measured in `rounds` slices, the contenders taking turns (in rotating order),
    so that load from other processes on a shared machine hits all of them alike."""
    if cfg.model != "builtin":
        return bench_hf_family(cfg)
    with tempfile.TemporaryDirectory(prefix="fuseloop-bench-") as tmp:
        repo_dir = cfg.repo or quick_repository(Path(tmp))
        w = Workload.scenes()
        runner = RawRunner(ModelRepository(repo_dir), cfg.threads)
        model_max = runner.pre.config.max_response_tokens
        max_new = min(cfg.max_new_tokens or model_max, model_max)
        slice_s = cfg.seconds / cfg.rounds
        cells: list[Cell] = []
        rows = runner.reward_rows(w)
        requests = kserve_requests(rows)
        padded_requests = kserve_requests(same_widths(rows, runner.pre.pad_id))
        unbatched_repo = without_dynamic_batching(repo_dir, Path(tmp) / "unbatched-repo")

        def load(address: str, rpc: str, c: int, infer_requests: list[bytes] = requests):
            if rpc == "ModelInfer":
                return asyncio.run(_load_kserve(address, infer_requests, c, slice_s, cfg.warmup_s))
            return asyncio.run(_load(address, w, rpc, c, slice_s, cfg.warmup_s, cfg.temperature, max_new))

        with ServerProcess(repo_dir, cfg.max_batch, cfg.threads) as service, \
                ServerProcess(unbatched_repo, 1, cfg.threads) as unbatched, \
                mlserver_contender(repo_dir, Path(tmp), cfg) as mlserver:
            contenders = {
                "service": lambda rpc, c: load(service, rpc, c),
                "raw": lambda rpc, c: (*run_raw(runner, w, rpc, c, slice_s, cfg.warmup_s, cfg.temperature, max_new,
                                                rows), 0),
                "unbatched": lambda rpc, c: load(unbatched, rpc, c),
            }
            if mlserver is not None:
                contenders["mlserver"] = lambda rpc, c: load(mlserver.url, rpc, c, padded_requests)
            for rpc in cfg.rpcs:
                names = [n for n in contenders if n != "mlserver" or rpc == "ModelInfer"]
                for c in cfg.concurrency:
                    cells += measure({n: contenders[n] for n in names}, rpc, c, cfg.rounds)
    return {"config": _config_dict(cfg, max_new), "cells": [asdict(c) for c in cells], "goals": goals(cells)}


def _config_dict(cfg: BenchConfig, max_new: int) -> dict:
    return {**asdict(cfg), "repo": str(cfg.repo) if cfg.repo else None,
            "model_dir": str(cfg.model_dir) if cfg.model_dir else None, "max_new_tokens": max_new}


HF_GENERATE = "hf-generate"
# The goals for a Hugging Face family, reported as ratios (not asserted): the service's
# Generate tokens/s at the top concurrency over each contender's.
HF_TARGETS = {HF_GENERATE: 3.0, "raw": 0.8}


def bench_hf_family(cfg: BenchConfig) -> dict:
    """Generate for a Hugging Face family, side by side: the service over gRPC; raw ONNX Runtime in
    process over the same graphs (the family's stepper: prefill, then steps, batches of
    `concurrency`); and `model.generate()` in PyTorch on the same weights, batched the same way,
    what a user would run instead. All greedy, up to max_new_tokens, EOS not suppressed (the
    service has no option for it): the same weights, greedy, and prompts of one token length give
    every contender the same answers, so the same tokens per request (printed, to check), and the
    goals compare tokens/s. Peak RSS of the server and engine processes comes with the cells."""
    from fuseloop.errors import UserError
    from services.inference.bench_hf import HFBenchModel, HFGenerate, build_model, publish_model

    if cfg.repo is not None and cfg.model_dir is None:
        raise UserError(f"--model {cfg.model} --repo needs --model-dir, the save_pretrained directory that the "
                        "repository's latest version was published from (HF generate() loads it)")
    spec = HFBenchModel(cfg.model, *cfg.hf_size)
    with tempfile.TemporaryDirectory(prefix="fuseloop-bench-") as tmp:
        model_dir = cfg.model_dir or build_model(spec, Path(tmp) / "model")
        if cfg.repo is None:
            print(f"publishing {model_dir} as a repository version (ONNX export)...", file=sys.stderr)
        repo_dir = cfg.repo or publish_model(cfg.model, model_dir, Path(tmp) / "repo")
        runner = RawRunner(ModelRepository(repo_dir), cfg.threads)
        hf = HFGenerate(cfg.model, model_dir, cfg.threads)
        w = Workload.scenes_of_one_length(runner.pre.prompt_ids)
        model_max = runner.pre.config.max_response_tokens
        max_new = min(cfg.max_new_tokens or model_max, model_max)
        slice_s = cfg.seconds / cfg.rounds
        server = ServerProcess(repo_dir, cfg.max_batch, cfg.threads)
        with server as address:
            def batched(contender):
                return lambda rpc, c: (*run_raw(contender, w, rpc, c, slice_s, cfg.warmup_s, 0.0, max_new, []), 0)

            contenders = {
                "service": lambda rpc, c: asyncio.run(_load(address, w, rpc, c, slice_s, cfg.warmup_s, 0.0, max_new)),
                "raw": batched(runner),
                HF_GENERATE: batched(hf),
            }
            # The service's CPU: the server, its engine and the load generator (this process).
            meter = CpuMeter()
            pids = {"service": [os.getpid(), *server.pids], "raw": [os.getpid()], HF_GENERATE: [os.getpid()]}
            contenders = {name: meter.wrap(name, pids[name], fn) for name, fn in contenders.items()}
            cells = [cell for c in cfg.concurrency for cell in measure(contenders, "Generate", c, cfg.rounds)]
            rss = server.peak_rss()
    model = {"family": cfg.model, "built": None if cfg.model_dir else spec.describe(), "parameters": hf.parameters,
             "prompt_tokens": len(runner.pre.prompt_ids(w.prompts[0])), "max_new_tokens": max_new}
    return {"config": _config_dict(cfg, max_new), "model": model, "cells": [asdict(c) for c in cells],
            "goals": goals_hf(cells), "peak_rss_bytes": rss, "cores_used": meter.cores()}


def goals_hf(cells: list[Cell]) -> dict:
    """service tokens/s over each other contender's, at the lowest and the top concurrency."""
    out = {}
    for c in sorted({min(x.concurrency for x in cells), max(x.concurrency for x in cells)}):
        at = {x.contender: x for x in cells if x.rpc == "Generate" and x.concurrency == c}
        svc = at.get("service")
        for name in (HF_GENERATE, "raw"):
            if svc and name in at and at[name].tokens_per_s > 0:
                ratio = svc.tokens_per_s / at[name].tokens_per_s
                out[f"generate_c{c}_service_over_{name.replace('-', '_')}"] = round(ratio, 3)
    return out


def _hf_lines(result: dict) -> list[str]:
    """The HF bench's extra lines: the model, tokens per request, peak RSS, the goals met or not."""
    m = result["model"]
    cells = [Cell(**c) for c in result["cells"]]
    lines = [f"model: {m['built'] or m['family'] + ' from ' + str(result['config']['model_dir'])}, "
             f"{m['parameters'] / 1e6:.2f}M parameters; prompts of {m['prompt_tokens']} tokens, greedy, up to "
             f"{m['max_new_tokens']} new tokens (EOS not suppressed; compare tokens/s)"]
    for c in sorted({x.concurrency for x in cells}):
        per = ", ".join(f"{x.contender} {x.tokens_per_s / x.throughput:.1f}" for x in cells
                        if x.concurrency == c and x.throughput > 0)
        lines.append(f"tokens/request at {c} clients: {per}")
    tokens_per_s = {(x.contender, x.concurrency): x.tokens_per_s for x in cells}
    for c in sorted({x.concurrency for x in cells}):
        used = [u for u in result.get("cores_used", []) if u["concurrency"] == c and u["cores"]]
        per = ", ".join(f"{u['contender']} {u['cores']:.2f} | {tokens_per_s.get((u['contender'], c), 0) / u['cores']:.0f}"
                        for u in used)
        if per:
            lines.append(f"cores used | tokens per CPU-second at {c} clients: {per}")
    rss = {k: f"{v / 2**20:.0f} MiB" if v else "unknown" for k, v in result["peak_rss_bytes"].items()}
    lines.append(f"peak RSS: server process {rss['server']}, engine process {rss['engine']}")
    top = max(x.concurrency for x in cells)
    for name, target in HF_TARGETS.items():
        ratio = result["goals"].get(f"generate_c{top}_service_over_{name.replace('-', '_')}")
        if ratio is not None:
            verdict = "met" if ratio >= target else "NOT met"
            lines.append(f"goal: service >= {target:g}x {name} at {top} clients: {ratio:.2f}x ({verdict})")
    return lines


def goals(cells: list[Cell]) -> dict:
    def get(contender: str, rpc: str, c: int) -> Cell | None:
        return next((x for x in cells if (x.contender, x.rpc, x.concurrency) == (contender, rpc, c)), None)

    out = {}
    top = max(x.concurrency for x in cells)
    for rpc in ("Score", "ModelInfer"):
        svc, unb = get("service", rpc, top), get("unbatched", rpc, top)
        raw1, raw_top = get("raw", rpc, 1), get("raw", rpc, top)
        if svc and unb:
            out[f"{rpc.lower()}_c{top}_service_over_unbatched"] = round(svc.throughput / unb.throughput, 3)
        if svc and raw_top:
            out[f"{rpc.lower()}_c{top}_service_over_raw_batch{top}"] = round(svc.throughput / raw_top.throughput, 3)
        if svc and raw1:
            out[f"{rpc.lower()}_c{top}_service_over_raw_batch1"] = round(svc.throughput / raw1.throughput, 3)
        if svc and (mls := get("mlserver", rpc, top)):
            out[f"{rpc.lower()}_c{top}_service_over_mlserver"] = round(svc.throughput / mls.throughput, 3)
    svc, raw, unb = get("service", "Generate", top), get("raw", "Generate", top), get("unbatched", "Generate", top)
    if svc and raw and unb:
        out[f"generate_c{top}_service_over_raw"] = round(svc.throughput / raw.throughput, 3)
        out[f"generate_c{top}_service_over_unbatched"] = round(svc.throughput / unb.throughput, 3)
    s1, r1 = get("service", "Generate", 1), get("raw", "Generate", 1)
    if s1 and r1:
        out["generate_c1_p50_ms_over_raw"] = round(s1.p50_ms - r1.p50_ms, 3)
    return out


def table(result: dict) -> str:
    cells = [Cell(**c) for c in result["cells"]]
    lines = []
    for rpc in dict.fromkeys(x.rpc for x in cells):
        names = list(dict.fromkeys(x.contender for x in cells if x.rpc == rpc))
        lines.append(f"\n{rpc} (requests/s | p50 ms | p99 ms{' | tokens/s' if rpc == 'Generate' else ''})")
        lines.append(f"{'concurrency':>12} " + " ".join(f"{name:>34}" for name in names))
        for c in sorted({x.concurrency for x in cells}):
            row = []
            for name in names:
                x = next((x for x in cells if (x.contender, x.rpc, x.concurrency) == (name, rpc, c)), None)
                text = "" if x is None else f"{x.throughput:8.1f} |{x.p50_ms:7.2f} |{x.p99_ms:7.2f}"
                if x is not None and rpc == "Generate":
                    text += f" |{x.tokens_per_s:7.0f}"
                if x is not None and x.failures:
                    text += f" ({x.failures} failed)"
                row.append(f"{text:>34}")
            lines.append(f"{c:>12} " + " ".join(row))
    if "model" in result:
        lines += [""] + _hf_lines(result)
    lines.append("\ngoals: " + json.dumps(result["goals"]))
    return "\n".join(lines)


def run_bench(cfg: BenchConfig, as_json: bool = False) -> int:
    result = bench(cfg)
    print(json.dumps(result) if as_json else table(result))
    return 0
