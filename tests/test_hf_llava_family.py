"""The Hugging Face LLaVA model behind the family interface ("hf-llava"): a checkpoint of it saves
and loads as `save_pretrained` directories (with a `LlavaProcessor`, so `AutoProcessor` reads it),
`trainer.export.publish` exports its three graphs into a repository, and the inference server
serves it through the family's stepper with the engine's own batching: greedy Generate answers
what the torch policy's `generate` answers, which is what `transformers`' own `generate()`
answers, and Score what its reward model says.

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
from transformers import AutoProcessor

from fuseloop.checkpoint import Checkpoint
from fuseloop.families import HF_ARCHITECTURES, DecodeState, family_for
from fuseloop.families import hf_llava
from fuseloop.families.hf_directory import open_model_directory
from fuseloop.families.hf_llava import HFLlavaFamily, HFLlavaStepper, sequence_logprobs
from fuseloop.families.hf_onnx import run
from fuseloop.families.tiny import IMAGE_TOKEN
from fuseloop.preprocessing import Preprocessor
from fuseloop.repository import DECODER, MODELS, ModelRepository
from fuseloop.scenes import make_split, png_bytes, render
from fuseloop.v1 import events_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread
from tests.fixtures_hf import MAX_NEW, FamilyRun
from trainer.export import publish, same_architecture_graphs, swap_weights

EXAMPLES = make_split("validation", 6)


@pytest.fixture(scope="session")
def published(hf_family_runs) -> FamilyRun:
    """The session's llava run: its checkpoint (`ckpt`), published as version 1 of `repo`."""
    return hf_family_runs["llava"]


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


def assert_same_prompts(pre: Preprocessor, processor) -> None:
    """The Preprocessor's prompt ids and pixels are what the model's LlavaProcessor makes."""
    images, prompts = [render(e.scene) for e in EXAMPLES], [e.prompt for e in EXAMPLES]
    texts = [processor.tokenizer.apply_chat_template([{"role": "user", "content": f"{processor.image_token} {p}"}],
                                                     tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = processor(images=images, text=texts, padding=True, return_tensors="np")
    assert [pre.prompt_ids(p) for p in prompts] == [row[m.astype(bool)].tolist()
                                                    for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    np.testing.assert_array_equal(pre.images(images), enc["pixel_values"])


def test_the_family_is_registered_and_the_preprocessor_prompts_as_the_llava_processor_does(published):
    assert isinstance(family_for("hf-llava"), HFLlavaFamily)
    assert HF_ARCHITECTURES["LlavaForConditionalGeneration"] == "hf-llava"
    pre, config = published.ckpt.preprocessor, published.bundle.model.config
    # preprocess_config: "<image>" becomes one placeholder per image feature.
    assert (pre.config.image_token, pre.config.image_tokens) == (IMAGE_TOKEN, config.image_seq_length)
    assert pre.prompt_ids(EXAMPLES[0].prompt).count(config.image_token_id) == config.image_seq_length
    assert_same_prompts(pre, published.bundle.processor)
    # The limits a server checks a client's tensors against, from a manifest's model config.
    stepper = HFLlavaFamily().stepper(published.manifest.model_config, run=None)
    assert stepper.vocab_size() == len(pre.tokenizer)
    assert stepper.max_positions() == config.text_config.max_position_embeddings


def test_a_checkpoint_saves_as_save_pretrained_directories_and_loads_back(published, tmp_path):
    ckpt = published.ckpt
    ckpt.save(tmp_path / "run")
    policy_dir = tmp_path / "run" / "policy"
    assert (policy_dir / "model.safetensors").exists()
    # save_assets wrote a LlavaProcessor: transformers alone prompts the saved policy as we do...
    processor = AutoProcessor.from_pretrained(str(policy_dir), local_files_only=True)
    assert type(processor).__name__ == "LlavaProcessor"
    assert_same_prompts(ckpt.preprocessor, processor)
    # ...and so does fuseloop opening it as a team's own model directory.
    opened = open_model_directory(policy_dir)
    assert opened.family.name == "hf-llava" and opened.preprocessor.config == ckpt.preprocessor.config
    assert opened.preprocessor.prompt_ids(EXAMPLES[1].prompt) == ckpt.preprocessor.prompt_ids(EXAMPLES[1].prompt)

    back = Checkpoint.load(tmp_path / "run")
    assert back.family.name == "hf-llava" and back.model_config == ckpt.model_config
    for name in ("policy", "reward"):
        expected = getattr(ckpt, name).state_dict()
        got = getattr(back, name).state_dict()
        assert set(got) == set(expected) and all(torch.equal(v, expected[k]) for k, v in got.items())
    assert back.preprocessor.config == ckpt.preprocessor.config
    assert back.preprocessor.prompt_ids(EXAMPLES[0].prompt) == ckpt.preprocessor.prompt_ids(EXAMPLES[0].prompt)


def test_publish_records_the_family_and_onnx_runtime_matches_pytorch(published):
    manifest = published.manifest
    assert manifest.family == "hf-llava"
    assert manifest.model_config == published.ckpt.model_config  # so the next version can swap weights in
    assert manifest.preprocess_config() == published.ckpt.preprocessor.config
    assert manifest.metrics["export_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("embeds_len,new_len,past_len", [(6, 6, 0), (0, 1, 7), (3, 5, 4)])
def test_one_decoder_graph_reads_embeddings_ids_or_both(published, embeds_len, new_len, past_len):
    """The prefill's shape (embeddings alone, no cache), a step's (one id alone) and both at once:
    the published decoder graph equals PyTorch at every real position."""
    bundle = published.bundle
    feed = hf_llava.example_inputs(bundle, batch=3, past_len=past_len, new_len=new_len, embeds_len=embeds_len,
                                   seed=past_len)[DECODER]
    with torch.no_grad():
        logits, present = hf_llava.DecoderGraph(bundle.model)(**feed)
    got_logits, got_present = run(published.sessions[DECODER], **feed)
    real = feed["attention_mask"].bool().numpy()
    assert got_logits.shape == (3, new_len, logits.shape[-1]) and got_present.shape[3] == past_len + new_len
    np.testing.assert_allclose(got_logits[real[:, past_len:]], logits.numpy()[real[:, past_len:]], atol=1e-4)
    np.testing.assert_allclose(np.moveaxis(got_present, 3, 1)[real], np.moveaxis(present.numpy(), 3, 1)[real],
                               atol=1e-4)


def test_token_logits_take_the_interfaces_bos_and_response_inputs(published):
    """sequence_logprobs over [BOS] + response + [EOS] (right-padded prompts) are the model's own
    log-probs of response + [EOS] after the prompt, and those `generate` reports for its tokens."""
    ckpt = published.ckpt
    pixels, ids, mask = torch_inputs(ckpt.preprocessor, EXAMPLES[:4])
    responses = ["red", "top left", "two", "a small blue circle at top left"]
    r_ids, r_mask = (torch.from_numpy(a) for a in ckpt.preprocessor.responses(responses))
    with torch.no_grad():
        ours = ckpt.family.sequence_logprobs(ckpt.policy, pixels, ids, mask, r_ids, r_mask)
        left_ids, left_mask = (t.to(ids) for t in published.bundle.inputs([render(e.scene) for e in EXAMPLES[:4]],
                                                                          [e.prompt for e in EXAMPLES[:4]])[1:])
        theirs = sequence_logprobs(ckpt.policy, pixels, left_ids, left_mask, r_ids[:, 1:], r_mask[:, 1:])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    # generate's log-probs are those of the tokens it returns, as the trainer reads them back.
    with torch.no_grad():
        tokens, logp = ckpt.family.generate(ckpt.policy, pixels, ids, mask, MAX_NEW, temperature=0.0)
        is_eos = tokens == ckpt.preprocessor.eos_id
        real = ((is_eos.long().cumsum(1) - is_eos.long()) == 0).long()  # up to and including EOS
        inputs = torch.cat([torch.full_like(tokens[:, :1], ckpt.preprocessor.bos_id), tokens], dim=1)
        again = ckpt.family.sequence_logprobs(ckpt.policy, pixels, ids, mask, inputs,
                                              torch.cat([torch.ones_like(real[:, :1]), real], dim=1))
    torch.testing.assert_close(again, logp * real, atol=1e-5, rtol=1e-4)


def test_served_greedy_generate_equals_torch_and_transformers_generate_and_score_its_reward_model(published, stub):
    ckpt = published.ckpt
    pre = ckpt.preprocessor
    pixels, ids, mask = torch_inputs(pre, EXAMPLES)
    with torch.no_grad():
        tokens, _ = ckpt.family.generate(ckpt.policy, pixels, ids, mask, MAX_NEW, temperature=0.0)
    for i in range(len(EXAMPLES)):  # transformers' own generate(), one unpadded prompt at a time
        prompt = ids[i:i + 1, mask[i].bool()]
        with torch.no_grad():
            theirs = published.generate(ckpt.policy, pixels[i:i + 1], prompt, MAX_NEW)[0, prompt.shape[1]:].tolist()
        assert tokens[i, :len(theirs)].tolist() == theirs, EXAMPLES[i].prompt
        assert (tokens[i, len(theirs):] == pre.pad_id).all()
    expected = [pre.decode(row.tolist()) for row in tokens]
    served = [stub.Generate(inference_pb2.GenerateRequest(
        image=png_bytes(render(e.scene)), prompt=e.prompt,
        sampling=events_pb2.SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))).candidates[0].text
        for e in EXAMPLES]
    assert served == expected
    assert len(set(expected)) > 1  # answers differ by image and prompt: the check has teeth

    r_ids, r_mask = (torch.from_numpy(a) for a in pre.responses(expected))
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


def test_a_prompt_that_places_the_image_itself_is_refused_with_invalid_argument(stub):
    request = inference_pb2.GenerateRequest(image=png_bytes(render(EXAMPLES[0].scene)),
                                            prompt=f"{IMAGE_TOKEN} {EXAMPLES[0].prompt}")
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and IMAGE_TOKEN in err.value.details()


def test_rows_prefilled_apart_decode_together_as_they_do_alone(published):
    """The engine's DecodeState joins this family's rows (a prompt cache each, no memory) with the
    logic it uses for every family; each row's logits stay its own."""
    loaded = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1)).load(published.repo, 1)
    stepper = loaded.stepper
    assert isinstance(stepper, HFLlavaStepper)
    pixels, ids, mask = (t.numpy() for t in torch_inputs(published.ckpt.preprocessor, EXAMPLES[:3]))
    first = stepper.prefill(pixels[:1], ids[:1], mask[:1])
    assert first.memory.shape[1] == 0 and first.past.shape[3] == mask[0].sum() - 1
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
