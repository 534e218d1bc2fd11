"""KServe v2 ModelInfer serves the Hugging Face encoder-decoder's published version like the
built-in model's: each graph answers what ONNX Runtime answers in process, and a client's mistake
(a token id outside the vocabulary, a position outside the table, a cache that doesn't match its
mask) is an INVALID_ARGUMENT naming the input, with the bounds read from the family's config
(VisionEncoderDecoderConfig's decoder), not the built-in model's keys."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from fuseloop.families import family_for
from fuseloop.families.hf_encoder_decoder import example_inputs
from fuseloop.repository import DECODER, ENCODER, MODELS, REWARD
from services.inference.config import InferenceServiceConfig
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread
from tests.fixtures_hf import FamilyRun
from tests.test_inference_kserve import infer_inputs


@pytest.fixture(scope="module")
def published(hf_family_runs) -> FamilyRun:
    return hf_family_runs["encoder_decoder"]


@pytest.fixture(scope="module")
def served(published):
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    with ServerThread(InferenceServer(InferenceServiceConfig(port=0), runtime, published.repo)) as thread:
        yield thread


@pytest.fixture(scope="module")
def client(served):
    client = tc.InferenceServerClient(served.address)
    yield client
    client.close()


def arrays_for(published: FamilyRun, model: str) -> dict[str, np.ndarray]:
    """The family's own well-formed example inputs (padded rows included), as numpy."""
    return {k: v.numpy() for k, v in example_inputs(published.bundle, batch=2, seed=3)[model].items()}


def test_the_server_holds_the_reward_graph_until_a_client_asks_for_another(served, client, published):
    """(Runs first: the module's server is fresh.) The engine process holds the generation graphs."""
    version = published.manifest.version
    engine = served.call(served.server.engine.resident())
    assert served.server.deployment.resident() == {version: [REWARD]} and engine == {version: [DECODER, ENCODER]}
    assert client.is_model_ready(ENCODER) and client.get_model_metadata(ENCODER).inputs  # from the manifest
    assert served.server.deployment.resident() == {version: [REWARD]}
    assert client.infer(ENCODER, infer_inputs(arrays_for(published, ENCODER))).as_numpy("cross_past").shape[0] == 2
    assert served.server.deployment.resident() == {version: [ENCODER, REWARD]}


@pytest.mark.parametrize("model", MODELS)
def test_model_infer_answers_what_onnxruntime_answers(client, published, model):
    arrays = arrays_for(published, model)
    result = client.infer(model, infer_inputs(arrays))
    assert result.get_response().model_version == str(published.manifest.version)
    session = published.sessions[model]
    want = session.run(None, arrays)
    for out, expected in zip(session.get_outputs(), want):
        np.testing.assert_allclose(result.as_numpy(out.name), expected, rtol=1e-5, atol=1e-6)


def test_the_bounds_are_the_decoders(published):
    stepper = family_for(published.manifest).stepper(published.manifest.model_config, None)
    decoder = published.bundle.model.config.decoder
    assert stepper.vocab_size() == decoder.vocab_size and stepper.max_positions() == decoder.n_positions


@pytest.mark.parametrize("model, name, change, message", [
    (DECODER, "input_ids", lambda a, v, p: a + v, "outside the vocabulary"),
    (REWARD, "prompt_ids", lambda a, v, p: a + v, "outside the vocabulary"),
    (REWARD, "response_ids", lambda a, v, p: -a, "outside the vocabulary"),
    (DECODER, "position_ids", lambda a, v, p: a + p, "outside the position table"),
    (DECODER, "attention_mask", lambda a, v, p: a[:, 1:], "must be past length"),
    (REWARD, "response_mask", lambda a, v, p: a * 3, "mask values must be 0 or 1"),
    (REWARD, "prompt_ids", lambda a, v, p: a[:, :0], "dimension 1 is 0"),
    (DECODER, "cross_past", lambda a, v, p: a[:, :0], "dimension 1 is 0"),  # no image tokens to attend to
])
def test_a_clients_mistake_is_an_invalid_argument_naming_the_input(client, published, model, name, change, message):
    stepper = family_for(published.manifest).stepper(published.manifest.model_config, None)
    arrays = arrays_for(published, model)
    arrays[name] = change(arrays[name], stepper.vocab_size(), stepper.max_positions())
    if name == "prompt_ids" and arrays[name].shape[1] == 0:
        arrays["prompt_mask"] = arrays["prompt_mask"][:, :0]
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, infer_inputs(arrays))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value.message()
    assert f"input {name}" in err.value.message() and message in err.value.message()


def test_a_sequence_longer_than_the_position_table_is_refused_before_the_graph_runs(client, published):
    table = family_for(published.manifest).stepper(published.manifest.model_config, None).max_positions()
    arrays = arrays_for(published, REWARD)
    n = table + 1 - arrays["response_ids"].shape[1]
    arrays["prompt_ids"] = np.full((2, n), 5, dtype=np.int64)
    arrays["prompt_mask"] = np.ones((2, n), dtype=np.int64)
    with pytest.raises(InferenceServerException) as err:
        client.infer(REWARD, infer_inputs(arrays))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input prompt_ids + response_ids" in err.value.message() and f"position table has {table}" in err.value.message()
