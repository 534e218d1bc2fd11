"""ONNX Runtime matches PyTorch: every exported graph across batch sizes and sequence and cache
lengths, and greedy generation through the service's engine, token for token."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from fuseloop.repository import DECODER, ENCODER, REWARD, ModelRepository
from fuseloop.scenes import make_split, png_bytes, render
from services.inference.engine import EngineConfig, GenerationEngine, GenerationJob, SequenceSpec
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig

ATOL = 1e-4


@pytest.fixture(scope="module")
def loaded(shared_repo_dir):
    return OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1)).load(ModelRepository(shared_repo_dir), 1)


def numpy_inputs(inputs: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
@pytest.mark.parametrize("prompt_len, past_len", [(1, 0), (7, 1), (24, 6)])
def test_every_graph_matches_pytorch(quick_checkpoint, loaded, batch, prompt_len, past_len):
    ckpt = quick_checkpoint
    graphs = ckpt.family.graphs(ckpt.policy, ckpt.reward, batch=batch, seed=batch * 100 + prompt_len,
                                prompt_len=prompt_len, past_len=past_len)
    enc, step, rew = graphs[ENCODER], graphs[DECODER], graphs[REWARD]
    with torch.no_grad():
        memory, memory_mask = enc.module(**enc.inputs)
        logits, present = step.module(**step.inputs)
        reward = rew.module(**rew.inputs)
    got_memory, got_mask = loaded.run(ENCODER, numpy_inputs(enc.inputs))
    np.testing.assert_allclose(got_memory, memory.numpy(), atol=ATOL)
    np.testing.assert_array_equal(got_mask, memory_mask.numpy())
    got_logits, got_present = loaded.run(DECODER, numpy_inputs(step.inputs))
    np.testing.assert_allclose(got_logits, logits.numpy(), atol=ATOL)
    np.testing.assert_allclose(got_present, present.numpy(), atol=ATOL)
    np.testing.assert_allclose(loaded.score(**numpy_inputs(rew.inputs)), reward.numpy(), atol=ATOL)
    # One new token per step, as serving decodes.
    one = dict(step.inputs, input_ids=step.inputs["input_ids"][:, :1], position_ids=step.inputs["position_ids"][:, :1],
               attention_mask=step.inputs["attention_mask"][:, : past_len + 1])
    with torch.no_grad():
        logits1, present1 = step.module(**one)
    got_logits1, got_present1 = loaded.run(DECODER, numpy_inputs(one))
    np.testing.assert_allclose(got_logits1, logits1.numpy(), atol=ATOL)
    np.testing.assert_allclose(got_present1, present1.numpy(), atol=ATOL)


def test_greedy_generation_through_the_engine_equals_pytorch_token_for_token(quick_checkpoint, loaded):
    examples = make_split("test", 12)
    pre = loaded.preprocessor
    max_new = pre.config.max_response_tokens
    done = threading.Semaphore(0)
    jobs = [GenerationJob(loaded, pre.image(png_bytes(render(e.scene))), pre.prompt_ids(e.prompt),
                          [SequenceSpec(temperature=0.0, top_p=1.0, max_new_tokens=max_new)],
                          on_done=lambda job, error: done.release())
            for e in examples]
    engine = GenerationEngine(EngineConfig(max_batch=8)).start()
    try:
        for job in jobs:  # submitted together: they share batches, with padding, joining as others leave
            engine.submit(job)
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    policy = quick_checkpoint.policy.eval()
    for example, job in zip(examples, jobs):
        pixels = torch.from_numpy(pre.image(png_bytes(render(example.scene))))[None]
        ids, mask = pre.prompts([example.prompt])
        tokens, logprobs = quick_checkpoint.family.generate(policy, pixels, torch.from_numpy(ids), torch.from_numpy(mask),
                                                            max_new, temperature=0)
        expected = tokens[0].tolist()
        if pre.eos_id in expected:
            expected = expected[: expected.index(pre.eos_id) + 1]
        assert job.sequences[0].token_ids == expected, example.prompt
        np.testing.assert_allclose(job.sequences[0].logprobs, logprobs[0, : len(expected)].numpy(), atol=1e-4)
