"""The rollout controller judges a canary from live feedback alone: a per-response score the same
way for both arms, a sequential non-inferiority test, and the decision acted on the serving record
with its evidence in a report."""

from __future__ import annotations

import copy
import json
import random
import shutil

import grpc

import pytest
import torch

from fuseloop.bus import TopicConfig
from fuseloop.bus.url import open_bus
from fuseloop.events import EVENT_SCHEMA_VERSION, new_id, now_ms
from fuseloop.repository import ModelRepository, ServingState
from fuseloop.scenes import GoldOracle, make_examples, png_bytes, render
from fuseloop.v1 import events_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread
from trainer.deploy import RecordDeployer
from trainer.export import publish
from trainer.rollout import PROMOTE, ROLLBACK, WAIT, RolloutConfig, RolloutController, decide, response_scores
from trainer.signals import SignalWeights


def test_each_signal_becomes_a_score_in_zero_one_with_its_weight():
    w = SignalWeights()
    ev = lambda **k: events_pb2.FeedbackEvent(response_id="r", **k)  # noqa: E731
    assert response_scores(ev(thumbs=events_pb2.Thumbs(up=True)), w) == [("r", 1.0, w.thumbs)]
    assert response_scores(ev(rating=events_pb2.Rating(stars=2)), w) == [("r", 0.25, w.rating)]
    assert response_scores(ev(rating=events_pb2.Rating(stars=9)), w) == []
    assert response_scores(ev(correction=events_pb2.Correction(text="x")), w) == [("r", 0.0, w.correction)]
    pref = events_pb2.Preference(chosen_response_id="a", rejected_response_id="b")
    assert response_scores(ev(preference=pref), w) == [("a", 1.0, w.preference), ("b", 0.0, w.preference)]
    copy_ = events_pb2.Implicit(kind=events_pb2.IMPLICIT_COPY)
    assert response_scores(ev(implicit=copy_), w) == [("r", 1.0, w.implicit)]


def test_the_sequential_test_promotes_an_equal_canary_and_rolls_back_a_worse_one():
    cfg = RolloutConfig(margin=0.1, alpha=0.05, max_looks=10)
    rng = random.Random(0)
    good = [float(rng.random() < 0.7) for _ in range(400)]
    same = [float(rng.random() < 0.7) for _ in range(400)]
    bad = [float(rng.random() < 0.2) for _ in range(60)]
    # z = Phi^-1(1 - 0.05 / 20) = 2.807; with 400 per arm, se ~ 0.032: the interval clears -0.1.
    promote = decide(good, same, 1, cfg, canary_version=3, stable_version=2)
    assert promote.action == PROMOTE and promote.interval[0] > -0.1
    rollback = decide(good, bad, 1, cfg, 3, 2)
    assert rollback.action == ROLLBACK and rollback.interval[1] < 0
    few = decide(good[:10], same[:10], 1, cfg, 3, 2)
    assert few.action == WAIT
    assert decide(good[:10], same[:10], 10, cfg, 3, 2).action == ROLLBACK  # out of looks: not shown non-inferior
    assert abs(rollback.difference - (sum(bad) / 60 - sum(good) / 400)) < 1e-12


def broken_checkpoint(ckpt, word: str):
    """A policy that answers `word` whatever it is asked: the final LayerNorm puts out that word's
    embedding (the logits are tied to the embeddings)."""
    broken = copy.deepcopy(ckpt)
    token = broken.preprocessor.tokenizer.convert_tokens_to_ids(word)
    with torch.no_grad():
        ln = broken.policy.decoder.ln
        ln.weight.zero_()
        ln.bias.copy_(broken.policy.decoder.tok.weight[token] * 50)
    return broken


@pytest.fixture(scope="module")
def broken_canary_repo(quick_checkpoint, shared_repo_dir, tmp_path_factory):
    repo_dir = tmp_path_factory.mktemp("rollout") / "repo"
    shutil.copytree(shared_repo_dir, repo_dir)
    repo = ModelRepository(repo_dir)
    vocab = quick_checkpoint.preprocessor.tokenizer.get_vocab()
    word = next(t for t in ("at", "of", "the", "is") if t in vocab)  # never an answer to anything
    manifest = publish(broken_checkpoint(quick_checkpoint, word), repo, parent_version=2)
    return repo, manifest.version, word


def test_a_broken_canary_is_rolled_back_from_live_feedback_alone(broken_canary_repo, tmp_path):
    repo, broken, word = broken_canary_repo
    topics = TopicConfig()
    bus = open_bus(f"sqlite:///{tmp_path / 'bus.db'}", client_id="rollout-test")
    server = ServerThread(InferenceServer(
        InferenceServiceConfig(port=0, admin_token="t", max_queue=1024),
        OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1)), repo, bus=bus)).start()
    controller = RolloutController(bus, repo, topics, RolloutConfig(min_samples=30, look_every=20),
                                   report_dir=tmp_path / "reports")
    try:
        RecordDeployer(repo).deploy(2)
        RecordDeployer(repo).canary(broken, 50)
        oracle, rng = GoldOracle(), random.Random(1)
        # Colour questions: the ones the small shared model answers right at all (about 15%).
        examples = [e for e in make_examples(3000, seed=77) if e.kind == "colour"][:700]
        images = [png_bytes(render(e.scene)) for e in examples]
        decision, served = None, {"2": 0, str(broken): 0}
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for i, example in enumerate(examples):
                session = f"user-{rng.randrange(10_000)}"
                reply = stub.Generate(inference_pb2.GenerateRequest(image=images[i], prompt=example.prompt,
                                                                    session_id=session))
                served[reply.model_version] += 1
                answer = reply.candidates[0]
                # Users rate what they read: a wrong answer mostly gets 1-2 stars, a right one 4-5.
                good = oracle.score(example, answer.text) >= 0.5
                stars = rng.choice((4, 5)) if good == (rng.random() > 0.05) else rng.choice((1, 2))
                fb = events_pb2.FeedbackEvent(schema_version=EVENT_SCHEMA_VERSION, event_id=new_id(),
                                              response_id=answer.response_id, session_id=session,
                                              timestamp_ms=now_ms(), rating=events_pb2.Rating(stars=stars))
                bus.publish(topics.feedback, session.encode(), fb.SerializeToString())
                if i % 20 == 19:
                    decision = controller.step()
                    if decision is not None and decision.action != WAIT:
                        break
        assert decision is not None and decision.action == ROLLBACK, decision
        record = repo.serving_state()
        assert (record.serving, record.canary) == (2, None)
        assert 0 < decision.canary_requests <= served[str(broken)]
        assert decision.mean["canary"] < decision.mean["stable"] and decision.interval[1] < 0
        report = [json.loads(line) for line in (tmp_path / "reports" / "rollout-decisions.jsonl").read_text().splitlines()]
        assert report[-1]["action"] == ROLLBACK and report[-1]["n"]["canary"] >= 20
        print(f"broken canary {broken} (answers {word!r}) rolled back after serving {decision.canary_requests} "
              f"requests: {decision.reason}")
    finally:
        controller.close()
        server.stop()
        bus.close()


def test_a_trial_that_ends_undecided_at_its_bound_rolls_the_canary_back(repo_copy, tmp_path):
    repo = ModelRepository(repo_copy)
    RecordDeployer(repo).deploy(1)
    RecordDeployer(repo).canary(2, 30)
    bus = open_bus(f"sqlite:///{tmp_path / 'bus.db'}", client_id="rollout-test")
    controller = RolloutController(bus, repo, TopicConfig(), report_dir=tmp_path)
    try:
        assert controller.step() is None  # no evidence yet: no look is due
        decision = controller.conclude()  # the caller's bound (requests, seconds) is reached
    finally:
        controller.close()
        bus.close()
    assert decision.action == ROLLBACK and decision.n == {"stable": 0, "canary": 0}
    assert "not shown non-inferior" in decision.reason
    assert (repo.serving_state().serving, repo.serving_state().canary) == (1, None)
    assert controller.conclude() is None  # no canary left to judge
