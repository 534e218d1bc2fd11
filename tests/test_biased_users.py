"""Users with a systematic bias (they like longer answers, right or wrong): the reward model learns
the bias and the policy follows it, so a gate that asked only the reward model would deploy a
candidate that is worse on gold. The eval-set gate refuses it, and the report names that check."""

from __future__ import annotations

from pathlib import Path

from demo.loop import stopped_by, write_gold_eval_set
from demo.simulated_users import UserModel
from fuseloop.bus import TopicConfig
from fuseloop.bus.url import open_bus
from fuseloop.checkpoint import Checkpoint
from fuseloop.repository import ModelRepository
from fuseloop.scenes import SceneTaskConfig, make_split
from tests.traffic_factory import publish_traffic
from trainer.deploy import RecordDeployer
from trainer.gate import GateConfig
from trainer.ingest import IngestConfig
from trainer.policy_gradient import PolicyGradientConfig
from trainer.reward_training import RewardTrainConfig
from trainer.round import TrainConfig, Trainer

# Every judgement of two answers of different lengths goes to the longer one, a single answer longer
# than the right one is judged good, and nobody types a correction: the bias has nothing against it.
LENGTH_LOVERS = UserModel(pair_share=0.4, length_bias=1.0, correction_share=0.0)


def mean_words(answers: list[str]) -> float:
    return sum(len(a.split()) for a in answers) / len(answers)


def test_length_biased_feedback_passes_the_reward_model_and_the_eval_set_gate_refuses_it(
        quick_checkpoint, repo_copy, tmp_path):
    ck, topics = quick_checkpoint, TopicConfig()
    repo = ModelRepository(repo_copy)
    RecordDeployer(repo).deploy(2)
    bus = open_bus(f"sqlite:///{tmp_path / 'bus.db'}", client_id="biased-users-test")
    publish_traffic(bus, topics, ck, requests=200, user_model=LENGTH_LOVERS)
    eval_set = write_gold_eval_set(tmp_path / "eval-set.jsonl", make_split("test", 60),
                                   SceneTaskConfig(image_size=ck.preprocessor.config.image_size))
    # One short round; the KL budget is loose, so the reward model and the eval set are the judges.
    config = TrainConfig(workdir=tmp_path / "work", reward=RewardTrainConfig(steps=30, batch_size=32),
                         policy=PolicyGradientConfig(steps=8, prompts_per_step=16, lr=1e-3),
                         gate=GateConfig(kl_budget=10.0), ingest=IngestConfig(poll_timeout_s=0.3), min_new_feedback=1)
    trainer = Trainer(config, bus, repo, topics, deployer=RecordDeployer(repo), eval_set=eval_set)
    try:
        report = trainer.run_round()
    finally:
        trainer.close()
        bus.close()

    gate = report["gate"]
    assert gate["reward_candidate"] > gate["reward_serving"], gate  # the reward model alone would deploy it ...
    assert gate["gold_candidate"] < gate["gold_serving"], gate  # ... though it is worse on gold
    assert stopped_by(report, None) == ["eval_set"] and not report["deployed"], gate
    assert any(r.startswith("eval-set accuracy") for r in report["not_deployed_because"])
    assert (repo.serving_state().serving, repo.serving_state().canary) == (2, None)
    # What it learned is the users' bias: it answers at greater length than the version serving.
    candidate = Checkpoint.load(Path(config.workdir) / "candidates" / "round-001")
    assert mean_words(eval_set.answers(candidate.family, candidate.policy, candidate.preprocessor)) > \
        mean_words(eval_set.answers(ck.family, ck.policy, ck.preprocessor))
    print(f"reward model {gate['reward_serving']:.3f} -> {gate['reward_candidate']:.3f}, "
          f"gold {gate['gold_serving']:.3f} -> {gate['gold_candidate']:.3f}: stopped by the eval-set gate")
