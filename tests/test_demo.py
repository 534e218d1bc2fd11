"""The main job, small: the closed loop improves the gold accuracy and deploys a new version."""

import json

from fuseloop.cli import main as cli
from fuseloop.repository import ModelRepository


def test_a_short_demo_improves_gold_accuracy_and_deploys_a_new_version(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"base_gold_accuracy", "final_gold_accuracy", "rounds"}
    rounds = result["rounds"]
    assert rounds and all({"gold_accuracy", "kl", "deployed", "events"} <= set(r) for r in rounds)
    assert any(r["deployed"] for r in rounds)
    assert result["final_gold_accuracy"] > result["base_gold_accuracy"]
    assert sum(rounds[0]["events"].values()) > 0 and rounds[0]["errors"] == 0
    repo = ModelRepository(out / "model-repository")
    assert len(repo.versions()) >= 2
    assert repo.serving_state().serving == repo.latest()
    assert repo.manifest(repo.latest()).lineage["parent_version"] == 1
    assert (out / "report.png").exists()
