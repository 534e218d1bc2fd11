"""`fuseloop pretrain` then `fuseloop export` produce a Triton-layout repository that loads."""

import json

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from fuseloop.cli import main as cli
from fuseloop.repository import DECODER, ENCODER, MODELS, REWARD, ModelRepository, RepositoryError
from fuseloop.tokenizer import load_tokenizer


def test_quick_pretrain_reports_gold_accuracy_and_leaves_a_plot(quick_run_dir):
    for name in ("checkpoint.json", "policy/config.json", "policy/model.safetensors", "reward/config.json",
                 "reward/model.safetensors", "preprocess.json", "tokenizer"):
        assert (quick_run_dir / name).exists(), name
    assert json.loads((quick_run_dir / "checkpoint.json").read_text())["family"] == "builtin"
    metrics = json.loads((quick_run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["gold_accuracy_greedy"] <= 1.0
    assert metrics["policy_parameters"] > 0
    assert 0.0 < metrics["label_wrong_share"] < 0.5  # deliberately imperfect supervision


def test_the_repository_has_triton_layout_configs_manifest_and_tokenizer(shared_repo_dir):
    repo = ModelRepository(shared_repo_dir)
    assert repo.versions() == [1, 2]
    for model in MODELS:
        cfg = text_format.Parse((shared_repo_dir / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.name == model and cfg.platform == "onnxruntime_onnx"
        assert cfg.HasField("dynamic_batching") and cfg.max_batch_size > 0
        assert (shared_repo_dir / model / "1" / "model.onnx").exists()
    m2 = repo.verify(2)
    assert m2.parent_version == 1
    assert m2.metrics["export_max_abs_diff"] < 1e-4
    assert all(len(d) == 64 for d in m2.files.values())
    assert [t.name for t in m2.io(DECODER, "inputs")] == [
        "input_ids", "position_ids", "attention_mask", "memory", "memory_mask", "past"]
    assert [t.name for t in m2.io(REWARD, "outputs")] == ["reward"]
    assert load_tokenizer(repo.tokenizer_dir(2)).bos_token == "[BOS]"
    assert m2.preprocess_config().image_size == m2.model_config["image_size"]
    assert m2.family == "builtin"


def test_onnx_graphs_declare_their_signatures(shared_repo_dir):
    repo = ModelRepository(shared_repo_dir)
    manifest = repo.manifest(1)
    for model in MODELS:
        sess = ort.InferenceSession(str(repo.model_path(model, 1)), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == [t.name for t in manifest.io(model, "inputs")]


def test_a_tampered_file_fails_verification(repo_copy):
    repo = ModelRepository(repo_copy)
    path = repo.model_path(ENCODER, 2)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RepositoryError, match="checksum mismatch"):
        repo.verify(2)
    repo.verify(1)


def test_a_half_written_version_is_not_listed(repo_copy):
    repo = ModelRepository(repo_copy)
    (repo_copy / ENCODER / "2" / "manifest.json").unlink()
    assert repo.versions() == [1]
    assert repo.next_version() == 3  # the number is still taken


def test_cli_export_adds_a_version_and_models_list_prints_it(quick_run_dir, repo_copy, capsys):
    assert cli(["export", str(quick_run_dir), "--repo", str(repo_copy), "--parent", "2"]) == 0
    assert ModelRepository(repo_copy).versions() == [1, 2, 3]
    capsys.readouterr()
    assert cli(["models", "list", "--repo", str(repo_copy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[0] == "3" for line in lines[1:])
