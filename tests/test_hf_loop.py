"""Issue 12, done when: a team's own Hugging Face model goes round the whole loop.

A tiny random `VisionEncoderDecoderModel` (ViT + GPT-2, fuseloop/families/tiny.py) is written with
`save_pretrained`, opened as a model directory, given a few teacher-forced steps, and published.
The real inference server serves it through ONNX Runtime (Generate, GenerateStream, Score, KServe
ModelInfer); simulated users (demo/simulated_users.py) ask it and answer through the real feedback
service into the embedded bus; training rounds read that, gate for real, and a passing candidate
is redeployed through the serving record, on which the server converges. What a round writes (a
version's checkpoint, a refused candidate) is a directory `transformers` loads as it is.
A second pairing (DeiT encoder + BERT decoder with cross-attention) shows the family is not GPT-2's.
A LLaVA-style model (CLIP + projector + Llama, early fusion) goes through the same round, gate,
redeploy and convergence.
"""

from __future__ import annotations

import copy
import json
import math
import random
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException
from transformers import (AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration,
                          VisionEncoderDecoderModel)

from demo.simulated_users import Shown, SimulatedUser, UserModel
from fuseloop.bus import TopicConfig
from fuseloop.bus.url import open_bus
from fuseloop.checkpoint import POLICY, Checkpoint
from fuseloop.families import hf_lora
from fuseloop.families.hf_directory import OpenedModel, open_model_directory
from fuseloop.families.tiny import TinyConfig, build_encoder_decoder, build_llava, task_tokenizer
from fuseloop.preprocessing import PreprocessConfig, Preprocessor
from fuseloop.repository import DECODER, ENCODER, REWARD, ModelRepository
from fuseloop.scenes import GoldOracle, make_examples, make_split, png_bytes, render
from fuseloop.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc, inference_pb2, inference_pb2_grpc
from services.feedback.server import FeedbackServer, FeedbackServiceConfig
from services.inference.config import InferenceServiceConfig
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread
from tests.fixtures_hf import assert_cross_attention_is_projected_once
from trainer.batches import ContextTensors, tokens_to_inputs
from trainer.deploy import AdminDeployer, RecordDeployer
from trainer.export import publish
from trainer.gate import GateConfig
from trainer.ingest import IngestConfig
from trainer.losses import token_cross_entropy
from trainer.policy_gradient import PolicyGradientConfig, reference_logprobs, train_policy
from trainer.reward_training import RewardTrainConfig
from trainer.round import TrainConfig, Trainer
from trainer.signals import Context

MAX_NEW = 10
ADMIN = "hf-loop-admin"
EXAMPLES = make_split("validation", 4)


@dataclass
class Loop:
    """Version 1 of a team's model, served, with the feedback service in front of the bus."""

    ckpt: Checkpoint
    repo: ModelRepository
    bus: object
    topics: TopicConfig
    inference: ServerThread
    feedback: FeedbackServer
    app_token: str


def sft(opened: OpenedModel, steps: int, lr: float = 3e-3, batch: int = 8) -> list[float]:
    """Teacher-forced steps on the task's answers through the family interface, as pretraining
    trains (family.token_logits + token_cross_entropy)."""
    family, policy, pre = opened.family, opened.policy, opened.preprocessor
    examples = make_split("train", steps * batch)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    losses = []
    policy.train()
    for step in range(steps):
        chunk = examples[step * batch:(step + 1) * batch]
        pixels = torch.from_numpy(pre.images([render(e.scene) for e in chunk]))
        ids, mask = (torch.from_numpy(a) for a in pre.prompts([e.prompt for e in chunk]))
        r_ids, r_mask = (torch.from_numpy(a) for a in pre.responses([e.answer for e in chunk]))
        logits = family.token_logits(policy, pixels, ids, mask, r_ids[:, :-1], r_mask[:, :-1])
        loss = token_cross_entropy(logits, r_ids[:, 1:], r_mask[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    policy.eval()
    return losses


def checkpoint_of(opened: OpenedModel) -> Checkpoint:
    policy = opened.policy.eval()
    return Checkpoint(opened.family, policy, opened.family.reward_model_from_policy(policy).eval(),
                      opened.preprocessor)


@contextmanager
def started_loop(root: Path, model_dir: Path) -> Iterator[Loop]:
    """A team's model directory opened, given a few SFT steps, published as version 1 and served,
    with the feedback service in front of the bus."""
    torch.manual_seed(0)
    # Answers of at most MAX_NEW tokens, in serving and in training (the round's samples and gate).
    opened = open_model_directory(model_dir, PreprocessConfig(max_response_tokens=MAX_NEW))
    losses = sft(opened, steps=4, lr=1e-3)
    assert losses[-1] < losses[0]
    ckpt = checkpoint_of(opened)
    repo = ModelRepository(root / "repo")
    publish(ckpt, repo, lineage={"source": "sft"})
    RecordDeployer(repo).deploy(1)
    bus = open_bus(f"sqlite:///{root / 'bus.db'}", client_id="hf-loop", spool_dir=str(root / "spool"))
    topics, app_token = TopicConfig(), secrets.token_hex(8)
    inference = ServerThread(InferenceServer(
        InferenceServiceConfig(port=0, admin_token=ADMIN, topics=topics, max_queue_delay_ms=1.0,
                               serving_record_watch_s=0.2),
        OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1, allow_spinning=False)), repo, bus)).start()
    feedback = FeedbackServer(FeedbackServiceConfig(app_tokens={app_token: "hf-app"},
                                                    pseudonym_key=secrets.token_bytes(32), port=0, topics=topics),
                              bus).start()
    try:
        yield Loop(ckpt, repo, bus, topics, inference, feedback, app_token)
    finally:
        feedback.stop()
        inference.stop()
        bus.close()


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-loop")
    with started_loop(root, build_encoder_decoder(root / "team-model", TinyConfig(init_std=0.2))) as running:
        yield running


@pytest.fixture(scope="module")
def llava_loop(tmp_path_factory):
    """The same loop on a LLaVA-style model (CLIP vision tower + projector + Llama)."""
    root = tmp_path_factory.mktemp("hf-llava-loop")
    with started_loop(root, build_llava(root / "team-model", TinyConfig(init_std=0.2))) as running:
        yield running


def torch_inputs(pre: Preprocessor, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels = pre.images([render(e.scene) for e in examples])
    ids, mask = pre.prompts([e.prompt for e in examples])
    return tuple(torch.from_numpy(a) for a in (pixels, ids, mask))


def greedy_answers(ckpt: Checkpoint, examples) -> list[str]:
    pixels, ids, mask = torch_inputs(ckpt.preprocessor, examples)
    with torch.no_grad():
        tokens, _ = ckpt.family.generate(ckpt.policy, pixels, ids, mask, MAX_NEW, temperature=0.0)
    return [ckpt.preprocessor.decode(row.tolist()) for row in tokens]


def generate_request(example) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(image=png_bytes(render(example.scene)), prompt=example.prompt,
                                         sampling=events_pb2.SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))


def served(address: str, examples) -> tuple[list[str], set[str]]:
    """Greedy answers of the serving version, and the versions that answered."""
    with grpc.insecure_channel(address) as channel:
        replies = [inference_pb2_grpc.InferenceServiceStub(channel).Generate(generate_request(e)) for e in examples]
    return [r.candidates[0].text for r in replies], {r.model_version for r in replies}


def transformers_answers(directory: Path, examples) -> list[str]:
    """Greedy answers as a `transformers` user gets them from the directory, knowing nothing of
    fuseloop: the model class its config names, its tokenizer's chat template, its image processor
    (a LLaVA model's processor, which expands the image token)."""
    d = str(directory)
    llava = "Llava" in json.loads((directory / "config.json").read_text())["architectures"][0]
    model = (LlavaForConditionalGeneration if llava else VisionEncoderDecoderModel).from_pretrained(
        d, local_files_only=True).eval()
    processor = (AutoProcessor if llava else AutoImageProcessor).from_pretrained(d, local_files_only=True)
    tokenizer = processor.tokenizer if llava else AutoTokenizer.from_pretrained(d, local_files_only=True)
    answers = []
    for e in examples:
        content = f"{processor.image_token} {e.prompt}" if llava else e.prompt
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        with torch.no_grad():
            if llava:
                inputs = processor(images=render(e.scene), text=text, return_tensors="pt")
                ids = inputs["input_ids"]
                out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
            else:
                ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
                pixels = processor(images=render(e.scene), return_tensors="pt").pixel_values
                out = model.generate(pixel_values=pixels, decoder_input_ids=ids, max_new_tokens=MAX_NEW,
                                     do_sample=False)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def test_the_opened_model_is_served_as_torch_computes_it(loop):
    ckpt, address = loop.ckpt, loop.inference.address
    expected = greedy_answers(ckpt, EXAMPLES)
    answers, versions = served(address, EXAMPLES)
    assert answers == expected and versions == {"1"}
    assert len(set(expected)) > 1  # answers differ by image and prompt: the check has teeth
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        streamed = ["".join(c.text_delta for c in stub.GenerateStream(generate_request(e))).strip() for e in EXAMPLES]
        scores = [stub.Score(inference_pb2.ScoreRequest(image=png_bytes(render(e.scene)), prompt=e.prompt,
                                                        response=text)).reward for e, text in zip(EXAMPLES, expected)]
    assert streamed == expected
    _, rewards = reward_inputs(ckpt, EXAMPLES, expected)
    np.testing.assert_allclose(scores, rewards, atol=1e-4)


def reward_inputs(ckpt: Checkpoint, examples, responses: list[str]) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The reward graph's inputs from the Preprocessor, and the torch reward model's rewards for them."""
    pre = ckpt.preprocessor
    pixels, ids, mask = torch_inputs(pre, examples)
    r_ids, r_mask = (torch.from_numpy(a) for a in pre.responses(responses))
    with torch.no_grad():
        rewards = ckpt.reward(pixels, ids, mask, r_ids, r_mask).numpy()
    return {"pixel_values": pixels, "prompt_ids": ids, "prompt_mask": mask, "response_ids": r_ids,
            "response_mask": r_mask}, rewards


def test_kserve_model_infer_on_the_reward_graph_gives_the_torch_reward(loop):
    arrays, rewards = reward_inputs(loop.ckpt, EXAMPLES, greedy_answers(loop.ckpt, EXAMPLES))
    client = tc.InferenceServerClient(loop.inference.address)  # Triton's own client, unchanged
    try:
        inputs = []
        for name, t in arrays.items():
            inputs.append(tc.InferInput(name, list(t.shape), "FP32" if t.dtype == torch.float32 else "INT64"))
            inputs[-1].set_data_from_numpy(t.numpy())
        result = client.infer(REWARD, inputs)
    finally:
        client.close()
    assert result.get_response().model_version == "1"
    np.testing.assert_allclose(result.as_numpy("rewards"), rewards, atol=1e-4)


def contexts_of(examples) -> list[Context]:
    return [Context(e.prompt, png_bytes(render(e.scene)), f"request-{i}") for i, e in enumerate(examples)]


def test_lora_trains_only_the_adapters_and_the_reference_is_the_base_model(loop):
    ckpt = loop.ckpt
    base = copy.deepcopy(ckpt.policy)
    policy = hf_lora.add_lora(copy.deepcopy(ckpt.policy), rank=4)
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    examples = make_examples(8, seed=5)
    tensors = ContextTensors(ckpt.preprocessor)
    contexts = contexts_of(examples)
    cfg = PolicyGradientConfig(steps=2, prompts_per_step=4, samples_per_prompt=2, lr=1e-2, demo_batch=4)
    train_policy(ckpt.family, policy, None, ckpt.reward, contexts, list(zip(contexts, [e.answer for e in examples])),
                 tensors, cfg)
    changed = {k for k, v in policy.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]

    px, ids, mask = tensors.inputs(contexts)
    with torch.no_grad():
        tokens, _ = ckpt.family.generate(base, px, ids, mask, MAX_NEW, 1.0, 1.0, torch.Generator().manual_seed(0))
        inp, imask = tokens_to_inputs(tokens, ckpt.preprocessor.bos_id, ckpt.preprocessor.eos_id)
        of_base = ckpt.family.sequence_logprobs(base, px, ids, mask, inp, imask)
        adapted = ckpt.family.sequence_logprobs(policy, px, ids, mask, inp, imask)
        merged = ckpt.family.sequence_logprobs(hf_lora.merged(policy), px, ids, mask, inp, imask)
    reference = reference_logprobs(ckpt.family, policy, None)(px, ids, mask, inp, imask)
    torch.testing.assert_close(reference, of_base, atol=1e-5, rtol=0)
    assert (adapted - of_base).abs().max() > 1e-3  # the adapters learned something
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)  # merging keeps what they learned


def user_traffic(loop: Loop, requests: int, seed: int) -> int:
    """Simulated users (the demo's) call Generate and send their feedback through the feedback
    service, as demo/traffic.py does, but one at a time and with the model's answer length.
    Returns the feedback events sent."""
    rng = random.Random(seed)
    users = [SimulatedUser(f"user-{seed}-{i}", UserModel(pair_share=0.5), GoldOracle(), rng) for i in range(3)]
    auth = [("authorization", f"Bearer {loop.app_token}")]
    sent = 0
    with grpc.insecure_channel(loop.inference.address) as ich, grpc.insecure_channel(loop.feedback.address) as fch:
        infer, feedback = inference_pb2_grpc.InferenceServiceStub(ich), feedback_pb2_grpc.FeedbackServiceStub(fch)
        for example in make_examples(requests, seed=100 + seed):
            user = users[rng.randrange(len(users))]
            reply = infer.Generate(inference_pb2.GenerateRequest(
                image=png_bytes(render(example.scene)), prompt=example.prompt,
                num_candidates=2 if user.wants_pair() else 1, session_id=user.session_id,
                sampling=events_pb2.SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW)))
            events = user.react(example, [Shown(c.response_id, c.text, pos) for pos, c in enumerate(reply.candidates)])
            feedback.SubmitBatch(feedback_pb2.SubmitBatchRequest(events=events), metadata=auth)
            sent += len(events)
    return sent


FEW_STEPS = PolicyGradientConfig(steps=2, prompts_per_step=4, samples_per_prompt=2, demo_batch=4)


def trainer_for(loop: Loop, workdir: Path, **config) -> Trainer:
    base = dict(reward=RewardTrainConfig(steps=4, batch_size=8),
                ingest=IngestConfig(poll_timeout_s=0.3, group=f"hf-loop-{uuid.uuid4().hex[:8]}"), min_new_feedback=1)
    return Trainer(TrainConfig(workdir=workdir, **{**base, **config}), loop.bus, loop.repo, loop.topics,
                   deployer=RecordDeployer(loop.repo))


def test_a_lora_round_on_feedback_the_gate_refuses_keeps_a_candidate_transformers_loads(loop, tmp_path):
    sent = user_traffic(loop, requests=24, seed=1)
    # The team asks for a reward gain no round reaches: the gate refuses, the candidate is kept.
    trainer = trainer_for(loop, tmp_path / "work", policy=replace(FEW_STEPS, lora_rank=4),
                          gate=GateConfig(min_reward_gain=1e9))
    try:
        report = trainer.run_round()
    finally:
        trainer.close()
    assert report["ingest"]["feedback_events"] == sent and report["signals"]["examples"]["pairs"] > 0
    assert not report["deployed"] and report["version"] is None
    assert any("does not beat serving" in r for r in report["not_deployed_because"]), report["gate"]
    assert report["policy"]["kl"] < GateConfig().kl_budget  # LoRA's first steps stay near their base
    assert loop.repo.serving_state().serving == 1 and loop.repo.versions() == [1]
    candidate = tmp_path / "work" / "candidates" / "round-001"
    kept = Checkpoint.load(candidate)
    assert not any("lora" in k for k in kept.policy.state_dict())  # merged: a plain transformers model
    assert transformers_answers(candidate / POLICY, EXAMPLES) == greedy_answers(kept, EXAMPLES)


@pytest.mark.parametrize("family", ["loop", "llava_loop"])
def test_a_round_that_passes_the_gate_is_redeployed_and_the_server_converges(family, request, tmp_path):
    loop = request.getfixturevalue(family)
    user_traffic(loop, requests=24, seed=2)
    # Any reward gain passes (the feedback of two dozen requests is noise); the KL budget is the default's.
    trainer = trainer_for(loop, tmp_path / "work", policy=replace(FEW_STEPS, lr=1e-4),
                          gate=GateConfig(min_reward_gain=-math.inf))
    try:
        report = trainer.run_round()
    finally:
        trainer.close()
    assert report["gate"]["passed"] and report["deployed"], report["gate"]
    version = report["version"]
    assert version == loop.repo.latest() and loop.repo.serving_state().serving == version
    admin = AdminDeployer(loop.inference.address, ADMIN)
    deadline = time.monotonic() + 60
    while admin.status().serving_version != str(version) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert admin.status().serving_version == str(version)

    published = Checkpoint.load(loop.repo.checkpoint_dir(version))
    answers, versions = served(loop.inference.address, EXAMPLES)
    assert versions == {str(version)}
    assert answers == greedy_answers(published, EXAMPLES)
    assert transformers_answers(loop.repo.checkpoint_dir(version) / POLICY, EXAMPLES) == answers


# -- a second pairing: DeiT encoder + BERT decoder (cross-attention), from config classes ----------

def build_deit_bert(directory: Path, pre: PreprocessConfig = PreprocessConfig()) -> Path:
    from PIL import Image
    from transformers import BertConfig, DeiTConfig, DeiTImageProcessor, VisionEncoderDecoderConfig

    torch.manual_seed(0)
    tokenizer = task_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    encoder = DeiTConfig(image_size=pre.image_size, patch_size=8, hidden_size=64, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=128, initializer_range=0.2)
    # A decoder narrower than the encoder: the model's enc_to_dec projection is in the graphs too.
    decoder = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=96, max_position_embeddings=128, is_decoder=True, add_cross_attention=True,
                         initializer_range=0.2, **ids)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    model = VisionEncoderDecoderModel(config=config)
    model.generation_config.update(**ids, decoder_start_token_id=tokenizer.bos_token_id)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    DeiTImageProcessor(size={"height": pre.image_size, "width": pre.image_size}, do_center_crop=False,
                       resample=Image.BILINEAR, rescale_factor=1 / 255, image_mean=[pre.mean] * 3,
                       image_std=[pre.std] * 3).save_pretrained(str(directory))
    return directory


def test_a_deit_encoder_with_a_bert_decoder_opens_publishes_and_serves_as_torch_generates(tmp_path):
    opened = open_model_directory(build_deit_bert(tmp_path / "deit-bert"))
    assert type(opened.policy.decoder).__name__ == "BertLMHeadModel"
    ckpt = checkpoint_of(opened)
    repo = ModelRepository(tmp_path / "repo")
    manifest = publish(ckpt, repo)
    assert manifest.family == "hf-encoder-decoder" and manifest.metrics["export_max_abs_diff"] < 1e-4
    assert_cross_attention_is_projected_once(repo.model_path(ENCODER, 1), repo.model_path(DECODER, 1))
    expected = greedy_answers(ckpt, EXAMPLES)
    assert len(set(expected)) > 1
    assert transformers_answers(repo.checkpoint_dir(1) / POLICY, EXAMPLES) == expected  # HF's own generate
    config = InferenceServiceConfig(port=0, max_queue_delay_ms=1.0)
    with ServerThread(InferenceServer(config, OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1)),
                                      repo)) as thread:
        answers, versions = served(thread.address, EXAMPLES)
    assert answers == expected and versions == {"1"}
