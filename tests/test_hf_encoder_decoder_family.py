"""The Hugging Face encoder-decoder behind the family interface ("hf-encoder-decoder"): a checkpoint
of it saves and loads as `save_pretrained` directories, `trainer.export.publish` exports it into a
repository, and the inference server serves it through the family's stepper with the engine's
own batching: greedy Generate answers what the torch policy's `generate` answers, and Score what
its reward model says.

The tiny random model (wide init, so greedy answers differ by image and prompt) is built and
published once per session, shared with tests/test_hf_families.py (tests/fixtures_hf.py).
"""

from __future__ import annotations

import copy
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from fuseloop.checkpoint import Checkpoint
from fuseloop.families import DecodeState, family_for
from fuseloop.families.hf_encoder_decoder import HFEncoderDecoderFamily, HFEncoderDecoderStepper, cache_shape
from fuseloop.preprocessing import Preprocessor
from fuseloop.repository import DECODER, ENCODER, MODELS, ModelRepository
from fuseloop.scenes import make_split, png_bytes, render
from fuseloop.v1 import events_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread
from tests.fixtures_hf import MAX_NEW, FamilyRun, assert_cross_attention_is_projected_once
from trainer.export import publish, same_architecture_graphs, swap_weights

EXAMPLES = make_split("validation", 6)


@pytest.fixture(scope="session")
def published(hf_family_runs) -> FamilyRun:
    """The session's encoder-decoder run: its checkpoint (`ckpt`), published as version 1 of `repo`."""
    return hf_family_runs["encoder_decoder"]


@pytest.fixture(scope="module")
def stub(published):
    config = InferenceServiceConfig(port=0, max_queue_delay_ms=1.0)
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    with ServerThread(InferenceServer(config, runtime, published.repo)) as thread:
        with grpc.insecure_channel(thread.address) as channel:
            yield inference_pb2_grpc.InferenceServiceStub(channel)


def torch_inputs(pre: Preprocessor, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels = pre.images([render(e.scene) for e in examples])
    ids, mask = pre.prompts([e.prompt for e in examples])
    return tuple(torch.from_numpy(a) for a in (pixels, ids, mask))


def test_the_family_is_registered_and_the_preprocessor_prompts_as_the_model_expects(published):
    assert isinstance(family_for("hf-encoder-decoder"), HFEncoderDecoderFamily)
    # The checkpoint tokenizer's chat template makes the Preprocessor's prompt ids the decoder
    # prefix hf_encoder_decoder feeds (BOS, prompt, SEP); its pixels are the image processor's.
    bundle = published.bundle
    images, prompts = [render(e.scene) for e in EXAMPLES], [e.prompt for e in EXAMPLES]
    pixels, ids, mask = bundle.inputs(images, prompts)
    pre = published.ckpt.preprocessor
    assert [pre.prompt_ids(p) for p in prompts] == [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    np.testing.assert_array_equal(pre.images(images), pixels.numpy())


def test_a_checkpoint_saves_as_save_pretrained_directories_and_loads_back(published, tmp_path):
    ckpt = published.ckpt
    ckpt.save(tmp_path / "run")
    assert (tmp_path / "run" / "policy" / "model.safetensors").exists()
    back = Checkpoint.load(tmp_path / "run")
    assert back.family.name == "hf-encoder-decoder" and back.model_config == ckpt.model_config
    for name in ("policy", "reward"):
        expected = getattr(ckpt, name).state_dict()
        got = getattr(back, name).state_dict()
        assert set(got) == set(expected) and all(torch.equal(v, expected[k]) for k, v in got.items())
    assert back.preprocessor.prompt_ids(EXAMPLES[0].prompt) == ckpt.preprocessor.prompt_ids(EXAMPLES[0].prompt)


def test_publish_records_the_family_and_onnx_runtime_matches_pytorch(published):
    manifest = published.manifest
    assert manifest.family == "hf-encoder-decoder"
    assert manifest.model_config == published.ckpt.model_config  # so the next version can swap weights in
    assert manifest.metrics["export_max_abs_diff"] < 1e-4


def test_the_encoder_graph_computes_the_cross_attention_cache_the_decoder_graph_only_reads_it(published):
    """The memory is every decoder layer's cross-attention keys and values, image tokens second
    (cross_past (B, N, 2L, H, hd)), as the model's own forward caches them; a decode step holds
    none of the weights that project them, so no step recomputes them over the image tokens."""
    model = published.bundle.model
    pixels, ids, *_ = published.batch(EXAMPLES[:2])
    (cross,) = published.sessions[ENCODER].run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        cache = model(pixel_values=pixels, decoder_input_ids=ids, use_cache=True).past_key_values.cross_attention_cache
    L, H, hd = cache_shape(model.config)
    assert cross.shape[2:] == (2 * L, H, hd) and len(cache.layers) == L
    for i, layer in enumerate(cache.layers):  # (B, H, N, hd) each
        np.testing.assert_allclose(cross[:, :, 2 * i], layer.keys.transpose(1, 2).numpy(), atol=1e-4)
        np.testing.assert_allclose(cross[:, :, 2 * i + 1], layer.values.transpose(1, 2).numpy(), atol=1e-4)
    assert_cross_attention_is_projected_once(published.paths[ENCODER], published.paths[DECODER])


def test_served_greedy_generate_equals_the_torch_policy_and_score_its_reward_model(published, stub):
    ckpt = published.ckpt
    pixels, ids, mask = torch_inputs(ckpt.preprocessor, EXAMPLES)
    with torch.no_grad():
        tokens, _ = ckpt.family.generate(ckpt.policy, pixels, ids, mask, MAX_NEW, temperature=0.0)
    expected = [ckpt.preprocessor.decode(row.tolist()) for row in tokens]
    served = [stub.Generate(inference_pb2.GenerateRequest(
        image=png_bytes(render(e.scene)), prompt=e.prompt,
        sampling=events_pb2.SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))).candidates[0].text
        for e in EXAMPLES]
    assert served == expected
    assert len(set(expected)) > 1  # answers differ by image and prompt: the check has teeth

    r_ids, r_mask = (torch.from_numpy(a) for a in ckpt.preprocessor.responses(expected))
    with torch.no_grad():
        rewards = ckpt.reward(pixels, ids, mask, r_ids, r_mask)
    scored = [stub.Score(inference_pb2.ScoreRequest(image=png_bytes(render(e.scene)), prompt=e.prompt,
                                                    response=text)).reward for e, text in zip(EXAMPLES, expected)]
    np.testing.assert_allclose(scored, rewards.numpy(), atol=1e-4)


def test_concurrent_requests_share_decode_batches_and_get_their_own_answers(stub):
    requests = [inference_pb2.GenerateRequest(image=png_bytes(render(e.scene)), prompt=e.prompt,
                                              sampling=events_pb2.SamplingParams(temperature=0.0)) for e in EXAMPLES]
    alone = [stub.Generate(r).candidates[0].text for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: stub.Generate(r).candidates[0].text, requests))
    assert together == alone


def test_rows_prefilled_apart_decode_together_as_they_do_alone(published):
    """The engine's DecodeState joins this family's rows (a prompt cache and a memory each) with
    the logic it uses for every family; each row's logits stay its own."""
    sessions = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1)).load(published.repo, 1)
    stepper = sessions.stepper
    assert isinstance(stepper, HFEncoderDecoderStepper)
    pixels, ids, mask = (t.numpy() for t in torch_inputs(published.ckpt.preprocessor, EXAMPLES[:3]))
    first = stepper.prefill(pixels[:1], ids[:1], mask[:1])
    first.tokens = stepper.step(first).argmax(-1)  # one row is a token ahead when the others join
    rest = stepper.prefill(pixels[1:], ids[1:], mask[1:])
    assert first.past.shape[3] != rest.past.shape[3]  # prompts of different lengths: caches padded
    group = DecodeState.concat([first, rest])
    together = stepper.step(group)
    np.testing.assert_allclose(together[:1], stepper.step(first), atol=1e-4)
    np.testing.assert_allclose(together[1:], stepper.step(rest), atol=1e-4)
    kept = group.take(np.array([1, 2]))
    np.testing.assert_allclose(stepper.step(kept), stepper.step(rest), atol=1e-4)


def test_a_later_version_of_the_same_architecture_swaps_its_weights_into_the_parents_graphs(published, tmp_path):
    repo = ModelRepository(shutil.copytree(published.repo.root, tmp_path / "repo"))
    ckpt = published.ckpt
    policy = copy.deepcopy(ckpt.policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    child = Checkpoint(ckpt.family, policy, ckpt.family.reward_model_from_policy(policy).eval(), ckpt.preprocessor)
    templates = same_architecture_graphs(repo, child)
    graphs = child.family.graphs(child.policy, child.reward)
    assert all(swap_weights(templates[m], graphs[m].module, tmp_path / f"{m}.onnx") for m in MODELS)
    manifest = publish(child, repo, parent_version=1)
    assert manifest.metrics["export_max_abs_diff"] < 1e-4  # ONNX Runtime on the child's weights == the child
