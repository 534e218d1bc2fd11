"""A team's own model (issue 12): `fuseloop pretrain --model hf:DIR` fine-tunes a local Hugging
Face model directory on the task, `fuseloop import hf:DIR` takes it as it is, and `fuseloop export`
publishes the run. A directory that cannot be used is refused in one line naming what is missing,
and nothing is written. Run in process through fuseloop.cli.main, on a tiny encoder-decoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, VisionEncoderDecoderModel

from fuseloop.checkpoint import Checkpoint
from fuseloop.cli import main
from fuseloop.families.tiny import TinyConfig, build_encoder_decoder
from fuseloop.repository import ModelRepository

TINY = TinyConfig(d_model=32, n_heads=2, n_vision_layers=1, n_text_layers=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_encoder_decoder(tmp_path_factory.mktemp("team-model") / "model", TINY)


@pytest.fixture(scope="module")
def imported(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "run"
    assert main(["import", f"hf:{model_dir}", "--out", str(out)]) == 0
    return out


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_pretrain_fine_tunes_a_model_directory_into_a_run_that_from_pretrained_loads(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--model", f"hf:{model_dir}", "--out", str(out), "--quick"]) == 0
    assert "base gold accuracy" in capsys.readouterr().out
    assert json.loads((out / "checkpoint.json").read_text())["family"] == "hf-encoder-decoder"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_source"] == f"hf:{model_dir}" and 0.0 <= metrics["gold_accuracy_greedy"] <= 1.0
    assert metrics["config"]["lr"] < 3e-3  # fine-tuning, not the built-in model's from-scratch rate
    before, after = weights(model_dir), weights(out / "policy")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    ckpt = Checkpoint.load(out)
    assert ckpt.preprocessor.tokenizer.chat_template  # prompts keep the model's own template
    assert ckpt.preprocessor.image_processor is not None
    # Users are never locked in: the fine-tuned policy is a model directory transformers reads.
    model = VisionEncoderDecoderModel.from_pretrained(str(out / "policy"), local_files_only=True)
    assert torch.equal(model.state_dict()["decoder.lm_head.weight"], ckpt.policy.state_dict()["decoder.lm_head.weight"])
    tokenizer = AutoTokenizer.from_pretrained(str(out / "policy"), local_files_only=True)
    assert len(tokenizer) == len(ckpt.preprocessor.tokenizer)


def test_import_takes_the_model_as_it_is_with_a_fresh_reward_head(model_dir, imported):
    assert weights(imported / "policy").keys() == weights(model_dir).keys()
    assert all(torch.equal(v, weights(model_dir)[k]) for k, v in weights(imported / "policy").items())
    assert (imported / "reward" / "reward_head.safetensors").exists()
    metrics = json.loads((imported / "metrics.json").read_text())
    assert "gold_accuracy_greedy" not in metrics  # the team's model, not our task: no gold eval unless asked
    assert metrics["config"]["steps"] == 0 and metrics["final_policy_loss"] is None


def test_an_imported_run_exports_as_version_1(imported, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["export", str(imported), "--repo", str(repo)]) == 0
    assert "wrote version 1" in capsys.readouterr().out
    manifest = ModelRepository(repo).verify(1)
    assert manifest.family == "hf-encoder-decoder" and manifest.metrics["export_max_abs_diff"] < 1e-4


def _broken(model_dir: Path, root: Path, how: str) -> Path:
    d = root / how
    shutil.copytree(model_dir, d)
    config = json.loads((d / "config.json").read_text())
    if how == "architecture":
        config["architectures"] = ["MysteryForVision"]
    elif how == "weights":
        config["decoder"]["n_layer"] = 2  # the safetensors hold one layer
    elif how == "image-processor":
        (d / "preprocessor_config.json").unlink()
    elif how == "tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (d / name).unlink()
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("how, names", [
    ("architecture", "architecture MysteryForVision is not supported"),
    ("weights", "the weights do not match its config.json: missing decoder.transformer.h.1"),
    ("image-processor", "no image processor"),
    ("tokenizer", "no tokenizer"),
])
@pytest.mark.parametrize("command", ["import", "pretrain"])
def test_a_directory_that_is_not_a_supported_model_is_refused_in_one_line_and_nothing_is_written(
        model_dir, tmp_path, capsys, command, how, names):
    d = _broken(model_dir, tmp_path, how)
    out = tmp_path / "run"
    argv = ["import", f"hf:{d}"] if command == "import" else ["pretrain", "--model", f"hf:{d}", "--quick"]
    assert main([*argv, "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and names in err[0], err
    assert str(d) in err[0]
    assert not out.exists()


def test_a_model_that_is_neither_builtin_nor_a_directory_is_named(tmp_path, capsys):
    assert main(["pretrain", "--model", "gpt-4", "--out", str(tmp_path / "a")]) == 1
    assert capsys.readouterr().err.strip() == \
        "error: model 'gpt-4': give builtin or hf:DIR (a local Hugging Face model directory)"
    assert main(["import", f"hf:{tmp_path / 'none'}", "--out", str(tmp_path / "b")]) == 1
    assert "no such model directory" in capsys.readouterr().err
    assert main(["import", "builtin", "--out", str(tmp_path / "c")]) != 0
    assert "give hf:DIR" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")
