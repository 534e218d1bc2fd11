"""The model-family interface: the registry, the decode state the engine batches for every family,
and checkpoints in the save_pretrained layout (config.json + model.safetensors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fuseloop.checkpoint import Checkpoint
from fuseloop.errors import UserError
from fuseloop.families import FAMILIES, DecodeState, family_for
from fuseloop.families.builtin import BuiltinFamily, BuiltinStepper
from fuseloop.repository import DECODER, ENCODER, MANIFEST, MODELS, REWARD, Manifest, ModelRepository, RepositoryError
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig


def test_a_family_is_found_by_name_manifest_or_config_and_old_records_mean_builtin():
    assert isinstance(family_for("builtin"), BuiltinFamily)
    assert isinstance(family_for({"family": "builtin", "d_model": 32}), BuiltinFamily)
    assert isinstance(family_for({"d_model": 32}), BuiltinFamily)  # a config from before families
    old = {"version": 1, "parent_version": None, "created_at": "", "files": {}, "signatures": {},
           "model_config": {}, "preprocess": {}}  # a manifest written before families
    manifest = Manifest.from_json(json.dumps(old))
    assert manifest.family == "builtin" and isinstance(family_for(manifest), BuiltinFamily)
    with pytest.raises(UserError, match="unknown model family 'gpt-7'; known: .*builtin"):
        family_for("gpt-7")
    assert set(FAMILIES) >= {"builtin"}


def _state(past_len: int, real: list[int], memory_len: int, used: list[int], value: float) -> DecodeState:
    """Rows whose cache holds `real[i]` real entries (left-padded) and whose memory `used[i]` (right-padded)."""
    B = len(real)
    past_mask = np.array([[0] * (past_len - r) + [1] * r for r in real], dtype=np.int64)
    memory_mask = np.array([[1] * u + [0] * (memory_len - u) for u in used], dtype=np.int64)
    return DecodeState(tokens=np.arange(B, dtype=np.int64), positions=np.array(real, dtype=np.int64),
                       past=np.full((B, 2, 1, past_len, 3), value, dtype=np.float32) * past_mask[:, None, None, :, None],
                       past_mask=past_mask, memory=np.full((B, memory_len, 4), value, dtype=np.float32) * memory_mask[..., None],
                       memory_mask=memory_mask, past_axis=3)


def test_rows_join_with_caches_left_padded_and_memories_right_padded_then_shed_unneeded_padding():
    running = _state(past_len=5, real=[5, 3], memory_len=2, used=[2, 2], value=1.0)
    joining = _state(past_len=0, real=[0], memory_len=4, used=[3], value=2.0).repeat([2])  # two candidates
    group = DecodeState.concat([running, joining])
    assert len(group) == 4 and group.past.shape == (4, 2, 1, 5, 3) and group.memory.shape == (4, 4, 4)
    assert group.past_mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1], [0] * 5, [0] * 5]
    assert group.memory_mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert (group.past[:2] == running.past).all() and (group.memory[2:, :3] == 2.0).all()

    rest = group.take(np.array([1, 2]))  # the longest cache and memory's only user leave
    assert rest.tokens.tolist() == [1, 0] and rest.positions.tolist() == [3, 0]
    assert rest.past_mask.tolist() == [[1, 1, 1], [0, 0, 0]] and rest.past.shape == (2, 2, 1, 3, 3)
    assert (rest.past[0] == 1.0).all() and rest.memory_mask.shape == (2, 3)
    assert len(group.take(np.array([], dtype=np.int64))) == 0


def test_a_decoder_only_state_with_no_memory_batches_the_same_way():
    """LLaVA-style: the prompt (image features spliced in) is the cache; there is no memory."""
    a = DecodeState(tokens=np.array([7]), positions=np.array([4]), past=np.ones((1, 4, 2, 6), np.float32),
                    past_mask=np.array([[1, 1, 0, 1, 1, 1]]), memory=np.zeros((1, 0, 8), np.float32),
                    memory_mask=np.zeros((1, 0), np.int64), past_axis=3)
    b = DecodeState(tokens=np.array([9]), positions=np.array([2]), past=np.ones((1, 4, 2, 2), np.float32),
                    past_mask=np.array([[1, 1]]), memory=np.zeros((1, 0, 8), np.float32),
                    memory_mask=np.zeros((1, 0), np.int64), past_axis=3)
    both = DecodeState.concat([a, b])
    assert both.past.shape == (2, 4, 2, 6) and both.memory.shape == (2, 0, 8)
    assert both.past_mask.tolist() == [[1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]  # a's hole stays masked
    assert both.take(np.array([1])).past_mask.tolist() == [[1, 1]]


def test_a_checkpoint_saves_as_save_pretrained_does_and_loads_back_the_same_weights(quick_checkpoint, tmp_path):
    quick_checkpoint.save(tmp_path / "run")
    for part in ("policy", "reward"):
        config = json.loads((tmp_path / "run" / part / "config.json").read_text())
        assert config["family"] == "builtin" and config["d_model"] == quick_checkpoint.model_config["d_model"]
        assert set(load_file(str(tmp_path / "run" / part / "model.safetensors"))) == set(
            getattr(quick_checkpoint, part).state_dict())
    back = Checkpoint.load(tmp_path / "run")
    assert back.family.name == "builtin" and back.model_config == quick_checkpoint.model_config
    for name, module in (("policy", back.policy), ("reward", back.reward)):
        expected = getattr(quick_checkpoint, name).state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in module.state_dict().items())


def test_a_run_directory_of_torch_state_dicts_from_before_families_still_loads(quick_checkpoint, tmp_path):
    old = tmp_path / "old"
    quick_checkpoint.save(old)
    for part in ("policy", "reward"):  # rewrite it as the old layout had it
        torch.save(getattr(quick_checkpoint, part).state_dict(), old / f"{part}.pt")
    (old / "model_config.json").write_text(json.dumps(quick_checkpoint.model_config))
    for stale in ("checkpoint.json", "policy/config.json", "policy/model.safetensors",
                  "reward/config.json", "reward/model.safetensors"):
        (old / stale).unlink()
    back = Checkpoint.load(old)
    assert back.family.name == "builtin" and back.reference is None
    expected = quick_checkpoint.reward.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in back.reward.state_dict().items())


def test_the_builtin_family_exports_three_graphs_whose_example_inputs_run(quick_checkpoint):
    ckpt = quick_checkpoint
    graphs = ckpt.family.graphs(ckpt.policy, ckpt.reward, batch=3)
    assert list(graphs) == list(MODELS)
    with torch.no_grad():
        memory, memory_mask = graphs[ENCODER].module(**graphs[ENCODER].inputs)
        logits, present = graphs[DECODER].module(**graphs[DECODER].inputs)
        reward = graphs[REWARD].module(**graphs[REWARD].inputs)
    assert memory.shape[0] == logits.shape[0] == reward.shape[0] == 3
    assert graphs[DECODER].outputs == ["logits", "present"] and graphs[REWARD].outputs == ["reward"]
    step = graphs[DECODER].inputs
    assert present.shape[3] == step["past"].shape[3] + step["input_ids"].shape[1]


def test_sequence_logprobs_are_the_teacher_forced_logprobs_of_the_tokens_given(quick_checkpoint):
    ckpt, family = quick_checkpoint, quick_checkpoint.family
    pre = ckpt.preprocessor
    graphs = family.graphs(ckpt.policy, ckpt.reward, batch=2)
    px, ids, mask = (graphs[ENCODER].inputs[k] for k in ("pixel_values", "prompt_ids", "prompt_mask"))
    resp, rmask = (torch.from_numpy(a) for a in pre.responses(["red", "a large blue circle at top left"]))
    with torch.no_grad():
        logp = family.sequence_logprobs(ckpt.policy, px, ids, mask, resp, rmask)
        logits = family.token_logits(ckpt.policy, px, ids, mask, resp, rmask)
    assert logp.shape == (2, resp.shape[1] - 1)
    by_hand = torch.log_softmax(logits[0, 0], -1)[resp[0, 1]]
    assert torch.isclose(logp[0, 0], by_hand) and (logp[0, rmask[0, 1:] == 0] == 0).all()


def test_the_runtime_serves_a_version_with_its_manifests_family_and_refuses_an_unknown_one(repo_copy):
    repo = ModelRepository(repo_copy)
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    assert isinstance(runtime.load(repo, 1).stepper, BuiltinStepper)
    path = repo.version_dir(ENCODER, 2) / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "family": "gpt-7"}))
    with pytest.raises(RepositoryError, match="version 2: unknown model family 'gpt-7'; known: .*builtin"):
        runtime.load(repo, 2)


def test_a_version_whose_graphs_take_other_inputs_than_its_family_feeds_is_refused_at_load(repo_copy):
    """A version exported by another release (the encoder-decoder family's decoder once took
    `encoder_hidden_states`, now the cross-attention cache) is refused when it loads, naming the
    inputs and how to re-export it, instead of failing on its first request."""
    repo = ModelRepository(repo_copy)
    path = repo.version_dir(ENCODER, 2) / MANIFEST
    manifest = json.loads(path.read_text())
    inputs = manifest["signatures"][DECODER]["inputs"]
    manifest["signatures"][DECODER]["inputs"] = [
        {**t, "name": "encoder_hidden_states"} if t["name"] == "memory" else t for t in inputs]
    path.write_text(json.dumps(manifest))
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    with pytest.raises(RepositoryError, match=r"version 2 was exported by another fuseloop release for the builtin "
                       r"family: fuseloop_decoder takes \[.*'encoder_hidden_states'.*\], where this release feeds it "
                       r"\[.*'memory'.*\]\. Export its checkpoint again"):
        runtime.load(repo, 2)
    for name in FAMILIES:  # each family says what it feeds each graph it runs
        feeds = family_for(name).stepper_class.feeds
        assert set(feeds) == set(MODELS) and all(feeds.values())
