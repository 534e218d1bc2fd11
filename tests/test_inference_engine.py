"""The continuous-batching engine: sequences join and leave between decode steps without changing
anyone's numbers, each keeps its own sampler, and deadlines, cancellation, full queues, model
failures and two versions at once are handled; plus the batch queue's delay rule and the numpy
sampler agreeing with the torch one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from fuseloop.model import sample_tokens
from fuseloop.repository import ModelRepository
from fuseloop.sampling import filtered_logprobs, sample_next
from fuseloop.scenes import make_split, png_bytes, render
from services.inference.engine import EngineConfig, GenerationEngine, GenerationJob, SequenceSpec
from services.inference.metrics import InferenceMetrics
from services.inference.queueing import Cancelled, DeadlineExceeded, ModelFailure, QueueFull, RequestQueue
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig

EXAMPLES = make_split("test", 6)


@pytest.fixture(scope="module")
def versions(shared_repo_dir):
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    repo = ModelRepository(shared_repo_dir)
    return runtime.load(repo, 1), runtime.load(repo, 2)


class Results:
    """Collects on_done calls; wait() blocks until every job has finished."""

    def __init__(self) -> None:
        self.errors: dict[int, BaseException | None] = {}
        self._cond = threading.Condition()

    def __call__(self, job: GenerationJob, error: BaseException | None) -> None:
        with self._cond:
            self.errors[id(job)] = error
            self._cond.notify_all()

    def wait(self, jobs: list[GenerationJob], timeout: float = 60) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: all(id(j) in self.errors for j in jobs), timeout)

    def error(self, job: GenerationJob) -> BaseException | None:
        return self.errors[id(job)]


def job_for(loaded, example, results, specs=None, **kw) -> GenerationJob:
    pre = loaded.preprocessor
    specs = specs or [SequenceSpec(0.0, 1.0, 32)]
    return GenerationJob(loaded, pre.image(png_bytes(render(example.scene))), pre.prompt_ids(example.prompt), specs,
                         on_done=results, **kw)


def sampled(temperature: float, seed: int, n: int = 1, top_p: float = 1.0) -> list[SequenceSpec]:
    return [SequenceSpec(temperature, top_p, 32, seed, i) for i in range(n)]


def run(engine: GenerationEngine, jobs: list[GenerationJob], results: Results, gap_s: float = 0.0) -> None:
    for job in jobs:
        engine.submit(job)
        time.sleep(gap_s)
    results.wait(jobs)


def test_sequences_joining_mid_flight_get_the_logprobs_pytorch_gives_their_tokens(quick_checkpoint, versions):
    loaded = versions[0]
    results = Results()
    jobs = [job_for(loaded, e, results, sampled(1.3, seed=i, n=2)) for i, e in enumerate(EXAMPLES)]
    with_engine(lambda engine: run(engine, jobs, results, gap_s=0.002))  # staggered: they join and leave at different steps
    pre = loaded.preprocessor
    policy = quick_checkpoint.policy.eval()
    for example, job in zip(EXAMPLES, jobs):
        assert results.error(job) is None
        for seq in job.sequences:
            pixels = torch.from_numpy(pre.image(png_bytes(render(example.scene))))[None]
            ids, mask = pre.prompts([example.prompt])
            inputs = torch.tensor([[pre.bos_id] + seq.token_ids])
            with torch.no_grad():
                logits = policy(pixels, torch.from_numpy(ids), torch.from_numpy(mask), inputs, torch.ones_like(inputs))
            expected = torch.log_softmax(logits[0, :-1] / 1.3, dim=-1).gather(-1, inputs[0, 1:, None])[:, 0]
            np.testing.assert_allclose(seq.logprobs, expected.numpy(), atol=1e-4)


def with_engine(body, config: EngineConfig = EngineConfig(max_batch=8), **kw) -> GenerationEngine:
    engine = GenerationEngine(config, **kw).start()
    try:
        body(engine)
    finally:
        engine.stop()
    return engine


def test_seeded_samples_do_not_depend_on_batch_company(versions):
    loaded = versions[0]

    def sample(together: bool) -> list[list[int]]:
        results = Results()
        jobs = [job_for(loaded, e, results, sampled(1.5, seed=42, n=2)) for e in EXAMPLES]
        if together:
            with_engine(lambda engine: run(engine, jobs, results))
        else:
            for job in jobs:
                with_engine(lambda engine: run(engine, [job], results))
        return [s.token_ids for j in jobs for s in j.sequences]

    alone = sample(together=False)
    assert sample(together=True) == alone
    assert alone[0] != alone[1]  # candidates of one request draw from their own streams


def test_the_batch_never_exceeds_max_batch_and_everyone_finishes(versions):
    loaded = versions[0]
    results = Results()
    metrics = InferenceMetrics()
    jobs = [job_for(loaded, EXAMPLES[i % 6], results, sampled(1.5, seed=i, n=2)) for i in range(10)]
    with_engine(lambda engine: run(engine, jobs, results), EngineConfig(max_batch=4), metrics=metrics)
    assert all(results.error(j) is None for j in jobs)
    buckets = {s.labels["le"]: s.value for s in metrics.batch_size.collect()[0].samples
               if s.name.endswith("_bucket") and s.labels["kind"] == "decode"}
    assert buckets["4.0"] == buckets["+Inf"] > 0  # every decode step had at most 4 rows


def test_two_versions_decode_side_by_side_each_on_its_own_model(versions):
    v1, v2 = versions
    results = Results()
    jobs = [job_for(v, e, results) for e in EXAMPLES for v in (v1, v2)]
    engine = with_engine(lambda engine: run(engine, jobs, results))
    assert not engine.groups
    alone = Results()
    for job in jobs:
        again = job_for(job.loaded, EXAMPLES[jobs.index(job) // 2], alone)
        with_engine(lambda engine: run(engine, [again], alone))
        assert again.sequences[0].token_ids == job.sequences[0].token_ids


def test_a_deadline_passing_mid_generation_drops_only_that_request(versions):
    loaded = versions[0]
    now = [1000.0]
    results = Results()

    def advance_clock(job, items):
        now[0] += 10  # after the first step, time jumps past the deadline

    late = job_for(loaded, EXAMPLES[0], results, sampled(2.0, seed=1), deadline=1005.0, on_tokens=advance_clock)
    fine = job_for(loaded, EXAMPLES[1], results, sampled(2.0, seed=2))
    with_engine(lambda engine: run(engine, [late, fine], results), clock=lambda: now[0])
    assert isinstance(results.error(late), DeadlineExceeded)
    assert len(late.sequences[0].token_ids) == 1
    assert results.error(fine) is None


def test_a_request_whose_deadline_passed_in_the_queue_never_runs(versions):
    results = Results()
    expired = job_for(versions[0], EXAMPLES[0], results, deadline=time.monotonic() - 1)
    with_engine(lambda engine: run(engine, [expired], results))
    assert isinstance(results.error(expired), DeadlineExceeded)
    assert expired.sequences[0].token_ids == [] and expired.started_at is None


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(versions):
    loaded = versions[0]
    results = Results()
    gone = job_for(loaded, EXAMPLES[0], results, sampled(2.0, seed=1), on_tokens=lambda job, items: job.cancel())
    stays = job_for(loaded, EXAMPLES[1], results, sampled(2.0, seed=2))
    with_engine(lambda engine: run(engine, [gone, stays], results))
    assert isinstance(results.error(gone), Cancelled) and len(gone.sequences[0].token_ids) == 1
    assert results.error(stays) is None


def test_a_model_failure_fails_its_request_and_the_engine_keeps_serving(versions):
    loaded = versions[0]
    results = Results()
    bad = GenerationJob(loaded, np.zeros((3, 32, 32), np.float32), [10_000], [SequenceSpec(0.0, 1.0, 4)],
                        on_done=results)  # token id beyond the vocabulary: the encoder's Gather fails
    good = job_for(loaded, EXAMPLES[0], results)
    with_engine(lambda engine: (run(engine, [bad], results), run(engine, [good], results)))
    assert isinstance(results.error(bad), ModelFailure) and "encode" in str(results.error(bad))
    assert results.error(good) is None and good.sequences[0].token_ids


def test_a_full_queue_refuses_with_queue_full(versions):
    engine = GenerationEngine(EngineConfig(max_queue=2))  # not started: nothing drains the queue
    results = Results()
    engine.submit(job_for(versions[0], EXAMPLES[0], results))
    engine.submit(job_for(versions[0], EXAMPLES[0], results))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.submit(job_for(versions[0], EXAMPLES[0], results))


class Item:
    def __init__(self, size: int = 1) -> None:
        self.size, self.deadline, self.enqueued_at, self.cancelled = size, None, 0.0, False


def test_the_queue_delay_waits_only_for_requests_already_on_their_way():
    queue = RequestQueue(capacity=10, max_delay_s=0.5)
    queue.put(Item())
    t0 = time.monotonic()
    batch, _ = queue.take(room=8, block=True, admit_oversized=True)
    assert len(batch) == 1 and time.monotonic() - t0 < 0.25  # nobody else coming: no wait

    on_the_way = queue.arriving()
    queue.put(Item())
    threading.Timer(0.05, lambda: on_the_way.put(Item())).start()
    t0 = time.monotonic()
    batch, _ = queue.take(room=8, block=True, admit_oversized=True)
    assert len(batch) == 2 and 0.04 < time.monotonic() - t0 < 0.45  # waited for it, not the whole delay

    stuck = queue.arriving()  # preprocessing that never finishes: at most the max delay
    queue.put(Item())
    t0 = time.monotonic()
    batch, _ = queue.take(room=8, block=True, admit_oversized=True)
    assert len(batch) == 1 and 0.45 < time.monotonic() - t0 < 2.0
    stuck.__exit__(None, None, None)


def test_the_queue_admits_in_order_what_fits_and_hands_back_expired_requests():
    queue = RequestQueue(capacity=10, max_delay_s=0.0)
    big, small, expired = Item(size=5), Item(size=1), Item()
    expired.deadline = time.monotonic() - 1
    for item in (expired, big, small):
        queue.put(item)
    batch, dropped = queue.take(room=3, block=False, admit_oversized=False)
    assert batch == [] and dropped == [expired]  # the small one does not overtake the big one
    batch, _ = queue.take(room=3, block=False, admit_oversized=True)
    assert batch == [big]  # an idle engine runs an oversized request alone


# -- the numpy sampler is the torch sampler -----------------------------------------------------
def test_greedy_sampling_is_identical_to_torch():
    logits = np.random.default_rng(0).normal(size=(6, 45)).astype(np.float32)
    logits[1, [3, 7]] = 9.0  # a tie: both take the first index
    tokens, logprobs = sample_next(logits, np.zeros(6), np.ones(6), np.zeros(6))
    ref_tokens, ref_logprobs = sample_tokens(torch.from_numpy(logits), temperature=0.0, top_p=1.0)
    assert tokens.tolist() == ref_tokens.tolist() and tokens[1] == 3
    np.testing.assert_allclose(logprobs, ref_logprobs.numpy(), atol=1e-6)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5), (2.0, 0.05)])
def test_sampled_tokens_follow_the_distribution_torch_samples_from(temperature, top_p):
    logits = np.random.default_rng(1).normal(scale=2.0, size=(1, 45)).astype(np.float32)
    logp = filtered_logprobs(logits, np.array([temperature]), np.array([top_p]))[0]
    # Torch's rule: the tokens it can draw and each one's logprob.
    g = torch.Generator().manual_seed(0)
    drawn = {}
    for _ in range(300):
        tok, lp = sample_tokens(torch.from_numpy(logits), temperature, top_p, g)
        drawn[int(tok)] = float(lp)
    for tok, lp in drawn.items():
        assert logp[tok] == pytest.approx(lp, abs=1e-5)
    assert set(np.flatnonzero(np.isfinite(logp))) >= set(drawn)
    # Ours draws with those frequencies (inverse CDF over the same probabilities).
    rng = np.random.default_rng(2)
    n = 4000
    toks, lps = sample_next(np.repeat(logits, n, axis=0), np.full(n, temperature), np.full(n, top_p), rng.random(n))
    freq = np.bincount(toks, minlength=45) / n
    np.testing.assert_allclose(freq, np.exp(logp), atol=0.03)
    np.testing.assert_allclose(lps, logp[toks], atol=1e-6)
    assert np.isfinite(lps).all()
