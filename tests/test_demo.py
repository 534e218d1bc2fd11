"""The main job, small: the closed loop runs through the real services, the model gets better,
the gate never deploys a version that is worse on the gold eval set than the one serving, and a
passing candidate serves a canary share first, promoted or rolled back by its users' feedback."""

import json

import pytest

from fuseloop.cli import main as cli
from fuseloop.repository import ModelRepository


@pytest.mark.timeout(1200)
def test_a_short_demo_improves_the_model_and_deploys_only_improvements(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"base_gold_accuracy", "final_gold_accuracy", "rounds"}
    rounds = result["rounds"]
    assert rounds and all({"gold_accuracy", "kl", "deployed", "events"} <= set(r) for r in rounds)
    first = rounds[0]
    assert first["requests"] >= 500 and first["errors"] == 0
    assert first["events"]["preference"] > 0 and first["events"]["implicit"] > 0
    assert first["kl"] is not None and first["rm_pairwise_accuracy"] is not None  # it trained and was gated
    previous = result["base_gold_accuracy"]
    repo = ModelRepository(out / "model-repository")
    for r in rounds:
        trial = r["canary"]  # every passing candidate goes on trial first
        assert (trial is not None) == (not r["gate"] and not r["skipped"])
        if trial is not None:
            assert trial["canary"] == r["version"] and trial["requests"] > 0
            assert trial["action"] in ("promote", "rollback") and len(trial["interval"]) == 2
            assert trial["n"]["canary"] > 0 and trial["n"]["stable"] > 0
        if r["deployed"]:
            assert r["gold_accuracy"] >= previous  # the eval-set gate: never worse than serving
            assert trial["action"] == "promote" and r["serving"] == r["version"]
            assert repo.manifest(r["version"]).lineage["parent_version"] >= 1
        else:
            assert r["stopped_by"] or r["skipped"], "a candidate that was not deployed says what stopped it"
        previous = r["gold_accuracy"]
    assert any(r["deployed"] for r in rounds), "one round of feedback yields a better, deployed version"
    assert result["final_gold_accuracy"] > result["base_gold_accuracy"]
    assert (out / "report.png").exists() and (out / "trainer" / "rounds.csv").exists()


def test_an_hf_demo_fine_tunes_a_tiny_model_directory_of_its_family_through_hf_dir(tmp_path):
    """`fuseloop demo --model hf-encoder-decoder`: the base is a tiny model written as a model
    directory, pretrained through the same path as a team's own (`pretrain --model hf:DIR`)."""
    from demo.loop import TINY_BUILDERS, DemoConfig, base_source
    from fuseloop.cli import DEMO_HF_MODELS
    from fuseloop.families.hf_directory import open_model_directory
    from trainer.pretrain import PretrainConfig
    from trainer.reward_training import RewardTrainConfig

    assert set(DEMO_HF_MODELS) == set(TINY_BUILDERS)  # --model's choices
    builtin = DemoConfig.for_model("builtin", tmp_path, quick=True)
    assert builtin == DemoConfig.quick(tmp_path)  # the default demo stays as it is
    assert base_source(builtin, tmp_path).builtin
    cfg = DemoConfig.for_model("hf-encoder-decoder", tmp_path, quick=True)
    assert cfg.model == "hf-encoder-decoder" and cfg.pretrain.lr < PretrainConfig().lr
    # A transformer's reward model trains at a lower rate than the built-in one's.
    assert cfg.train["reward"].lr < RewardTrainConfig().lr
    assert cfg.train["reward"].steps == builtin.train["reward"].steps  # quick stays quick
    assert cfg.rounds == builtin.rounds == 1
    full = DemoConfig.for_model("hf-encoder-decoder", tmp_path)
    # The measured full demo: four rounds, corrections weighted as much as the reward.
    assert full.rounds == 4 and full.train["policy"].demo_weight == 1.0
    assert DemoConfig.for_model("builtin", tmp_path).rounds == DemoConfig().rounds
    source = base_source(cfg, tmp_path)
    assert source.directory == tmp_path / "hf-model"
    assert open_model_directory(source.directory).family.name == "hf-encoder-decoder"
