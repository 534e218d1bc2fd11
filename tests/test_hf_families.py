"""Hugging Face vision-language families (issue 12): tiny models built from config classes and
loaded with local_files_only, their ONNX graphs against PyTorch, greedy ONNX generation against
`generate`, the reward model, sequence log-probs and LoRA.

Each family runs the pipeline once per session (tests/fixtures_hf.py): build -> LoRA steps on the
task -> merge -> save -> reload -> publish (`trainer.export.publish`, the family interface's
export, which tests/test_hf_encoder_decoder_family.py and tests/test_hf_llava_family.py serve).
Every test reads from that one run. The
models are random, initialized wide (init_std) so that their greedy answers differ by image and
prompt, which gives the token-for-token checks their teeth without spending time on training.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, \
    VisionEncoderDecoderModel

from fuseloop.families import hf_layout, hf_llava, hf_lora
from fuseloop.families.hf_onnx import run
from fuseloop.families.tiny import IMAGE_TOKEN
from fuseloop.preprocessing import PreprocessConfig, Preprocessor
from fuseloop.scenes import make_split, render
from tests.fixtures_hf import FAMILIES, MAX_NEW, FamilyRun

@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request, hf_family_runs) -> FamilyRun:
    return hf_family_runs[request.param]


def examples(n: int, split: str = "validation"):
    return make_split(split, n)


# -- building and loading ----------------------------------------------------------------------

def test_tiny_models_load_back_with_local_files_only(family):
    d = str(family.base_dir)
    if family.name == "llava":
        model = AutoModelForImageTextToText.from_pretrained(d, local_files_only=True)
        processor = AutoProcessor.from_pretrained(d, local_files_only=True)
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
        assert type(model).__name__ == "LlavaForConditionalGeneration"
        assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_id
        text_config = model.config.text_config
    else:
        model = VisionEncoderDecoderModel.from_pretrained(d, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(d, local_files_only=True)
        assert model.config.decoder_start_token_id == tokenizer.bos_token_id
        text_config = model.config.decoder
    assert 200_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    # A small vocabulary needs its own special ids, not GPT-2's or Llama's defaults.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(text_config, key) == getattr(model.generation_config, key) == getattr(tokenizer, key)
    assert text_config.vocab_size == len(tokenizer)
    # The processor feeds the model exactly the pixels fuseloop's own preprocessing makes.
    images = [render(e.scene) for e in examples(3)]
    ours = Preprocessor(tokenizer, PreprocessConfig()).images(images)
    np.testing.assert_array_equal(image_processor(images=images, return_tensors="np").pixel_values, ours)


@pytest.mark.parametrize("family", ["llava"], indirect=True)
def test_llava_processor_expands_the_image_into_one_token_per_feature(family):
    pixels, ids, mask, _, _ = family.batch(examples(2))
    n_image = (ids == family.bundle.image_token_id).sum(dim=1)
    features = hf_llava.image_features(family.bundle.model, pixels)
    assert n_image.tolist() == [features.shape[1]] * 2
    with torch.no_grad():
        theirs = family.bundle.model.get_image_features(pixels, vision_feature_layer=-1,
                                                        vision_feature_select_strategy="default").pooler_output
    torch.testing.assert_close(features, torch.stack(list(theirs)))


# -- graphs ------------------------------------------------------------------------------------

CASES = [  # batch, prompt length, past length, new tokens
    (1, 3, 0, 3), (2, 5, 3, 2), (3, 7, 6, 1), (3, 4, 9, 4),
]


@pytest.mark.parametrize("batch,prompt_len,past_len,new_len", CASES)
def test_every_graph_matches_pytorch(family, batch, prompt_len, past_len, new_len):
    inputs = family.module.example_inputs(family.bundle, batch=batch, prompt_len=prompt_len, past_len=past_len,
                                          new_len=new_len, seed=batch * 100 + past_len)
    modules = family.module.graph_modules(family.bundle, family.reward)
    for name, feed in inputs.items():
        with torch.no_grad():
            expected = modules[name](*feed.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = run(family.sessions[name], **feed)
        assert len(got) == len(expected), name
        if name == family.module.DECODER:
            # Only real positions are ever read: a padded query attends to nothing.
            real = feed["attention_mask"].bool().numpy()
            np.testing.assert_allclose(got[0][real[:, past_len:]], expected[0].numpy()[real[:, past_len:]], atol=1e-4)
            present = np.moveaxis(got[1], 3, 1)[real]  # (real keys, 2L, H, hd)
            np.testing.assert_allclose(present, np.moveaxis(expected[1].numpy(), 3, 1)[real], atol=1e-4)
        else:
            for g, e in zip(got, expected):
                np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


def test_greedy_onnx_generation_equals_generate(family):
    exs = examples(5)
    pixels, ids, mask, _, _ = family.batch(exs)
    assert len(set(mask.sum(1).tolist())) > 1  # rows of different prompt lengths, left-padded
    tokens = family.module.onnx_generate(family.sessions, family.bundle, pixels.numpy(), ids.numpy(), mask.numpy(),
                                         MAX_NEW)
    pad = family.bundle.tokenizer.pad_token_id
    answers = set()
    for i in range(len(exs)):
        real = mask[i].bool()
        with torch.no_grad():
            theirs = family.generate(family.bundle.model, pixels[i:i + 1], ids[i:i + 1, real], MAX_NEW)[0]
        theirs = theirs[int(real.sum()):].tolist()
        assert tokens[i, :len(theirs)].tolist() == theirs, exs[i].prompt
        assert (tokens[i, len(theirs):] == pad).all()
        answers.add(tuple(theirs))
    assert len(answers) > 1  # answers differ by image and prompt: the check has teeth


# -- reward model, log-probs ------------------------------------------------------------------

def test_reward_graph_equals_torch_and_ignores_padding(family):
    exs = examples(4)
    responses = ["red", "top left", "a small blue circle at top left and a large red square at bottom right", "two"]
    batch = family.batch(exs, responses)
    with torch.no_grad():
        rewards = family.reward(*batch)
        alone = torch.cat([family.reward(*family.batch([e], [r])) for e, r in zip(exs, responses)])
    (got,) = run(family.sessions[family.module.REWARD], **dict(zip(
        ["pixel_values", "prompt_ids", "prompt_mask", "response_ids", "response_mask"], batch)))
    assert got.shape == (4,) and got.dtype == np.float32
    np.testing.assert_allclose(got, rewards.numpy(), atol=1e-5)
    torch.testing.assert_close(rewards, alone, atol=1e-5, rtol=1e-4)


def test_reward_model_saves_and_loads(family, tmp_path):
    reward = copy.deepcopy(family.reward)  # the session's reward is the published one's
    torch.nn.init.normal_(reward.head.weight, std=0.5)  # a head worth telling apart
    reward.save(tmp_path)
    loaded = family.module.load_reward(tmp_path).eval()
    batch = family.batch(examples(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(*batch), reward(*batch))


def test_sequence_logprobs_match_a_manual_computation(family):
    exs = examples(4)
    responses = ["green", "bottom right", "three", "a large yellow triangle at top right"]
    pixels, ids, mask, r_ids, r_mask = family.batch(exs, responses)
    with torch.no_grad():
        logp = family.module.sequence_logprobs(family.bundle.model, pixels, ids, mask, r_ids, r_mask)
    assert logp.shape == r_ids.shape and torch.isfinite(logp).all()
    assert (logp[r_mask == 0] == 0).all() and (logp[r_mask == 1] < 0).all()
    for i in range(len(exs)):  # one row at a time, no padding, through the model's own forward
        prompt, response = ids[i, mask[i].bool()], r_ids[i, r_mask[i].bool()]
        full = torch.cat([prompt, response])[None]
        kwargs = (dict(decoder_input_ids=full) if family.name == "encoder_decoder" else dict(input_ids=full))
        with torch.no_grad():
            logits = family.bundle.model(pixel_values=pixels[i:i + 1], **kwargs).logits[0]
        if family.name == "llava":  # the family's policy never answers with the image placeholder
            logits[:, family.bundle.image_token_id] = float("-inf")
        manual = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(-1, response[:, None]).squeeze(-1)
        torch.testing.assert_close(logp[i, :len(response)], manual, atol=1e-5, rtol=1e-4)


# -- LoRA and the saved policy ----------------------------------------------------------------

def test_lora_reference_logprobs_are_the_base_models(family):
    batch = family.batch(examples(3))
    reference = hf_lora.reference_logprobs(family.lora, family.module.sequence_logprobs, *batch)
    with torch.no_grad():
        base = family.module.sequence_logprobs(family.base, *batch)
        adapted = family.module.sequence_logprobs(family.lora, *batch)
    torch.testing.assert_close(reference, base)
    assert (adapted - base).abs().max() > 1e-3  # the adapters did learn something


def test_merged_policy_is_a_transformers_directory_and_its_export_equals_the_adapted_model(family):
    assert (family.policy_dir / "model.safetensors").exists()
    assert not list(family.policy_dir.glob("adapter_*"))  # merged: no peft files needed to load it
    exs = examples(3)
    pixels, ids, mask, _, _ = family.batch(exs)
    tokens = family.module.onnx_generate(family.sessions, family.bundle, pixels.numpy(), ids.numpy(), mask.numpy(),
                                         MAX_NEW)
    r_ids = torch.from_numpy(tokens)
    r_mask = torch.from_numpy(tokens != family.bundle.tokenizer.pad_token_id).long()  # answer + EOS
    with torch.no_grad():
        adapted = family.module.sequence_logprobs(family.lora, pixels, ids, mask, r_ids, r_mask)
        merged = family.module.sequence_logprobs(family.bundle.model, pixels, ids, mask, r_ids, r_mask)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    # ...and the exported graphs' own log-probs of what they generated agree with the adapted model.
    onnx_logp = _onnx_logprobs(family, pixels, ids, mask, r_ids, r_mask)
    np.testing.assert_allclose(onnx_logp, adapted.numpy(), atol=1e-4)


def _onnx_logprobs(family, pixels, ids, mask, r_ids, r_mask) -> np.ndarray:
    """Teacher-forced log-probs from one prefill of the decoder graph over prompt + response."""
    full, full_mask, pos = (t.numpy() for t in hf_layout.join(ids, mask, r_ids, r_mask))
    L, H, hd = family.bundle.cache_shape()
    past = hf_layout.empty_past(len(full), L, H, hd).numpy()
    s = family.sessions
    if family.name == "llava":  # the prompt's spliced embeddings, then the response by id, in one decoder call
        (embeds,) = run(s[family.module.ENCODER], pixel_values=pixels, prompt_ids=ids, prompt_mask=mask)
        logits, _ = run(s[family.module.DECODER], inputs_embeds=embeds, input_ids=r_ids, attention_mask=full_mask,
                        position_ids=pos, past=past)
        # The graph's raw logits; the family's policy (and its stepper) never answer with the placeholder.
        logits = family.module.without_placeholder(torch.from_numpy(logits), family.bundle.image_token_id).numpy()
    else:
        (cross,) = run(s[family.module.ENCODER], pixel_values=pixels)
        logits, _ = run(s[family.module.DECODER], input_ids=full, attention_mask=full_mask, position_ids=pos,
                        cross_past=cross, past=past)
    out = hf_layout.response_logprobs(torch.from_numpy(logits), r_ids, r_mask)
    return out.numpy()
