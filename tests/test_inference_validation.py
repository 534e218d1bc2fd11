"""Bad input gets a clear status and never takes the inference service down."""

from __future__ import annotations

import io
import random
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from fuseloop.repository import ModelRepository
from fuseloop.scenes import make_split, png_bytes, render
from fuseloop.v1 import events_pb2, inference_pb2, inference_pb2_grpc
from services.inference.config import InferenceServiceConfig
from services.inference.runtime.onnx_runtime import OnnxRuntime, OnnxRuntimeConfig
from services.inference.server import InferenceServer, ServerThread
from tests.fuzzing import FLOATS, INTS32, STRINGS, Outcome, assert_refusals_are_client_errors, mutate_wire, outcome

EXAMPLE = make_split("test", 1)[0]
IMAGE = png_bytes(render(EXAMPLE.scene))
PROMPT = EXAMPLE.prompt
MAX_IMAGE_BYTES = 100_000
MAX_PIXELS = 1024 * 1024


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size: a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def encoded(size: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(shared_repo_dir):
    config = InferenceServiceConfig(port=0, max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_PIXELS,
                                    max_prompt_chars=200, max_num_candidates=4, max_best_of=8,
                                    max_message_bytes=400_000, max_batch=1, max_queue=1)
    runtime = OnnxRuntime(OnnxRuntimeConfig(device="cpu", intra_op_threads=1))
    with ServerThread(InferenceServer(config, runtime, ModelRepository(shared_repo_dir))) as thread:
        yield thread


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def refused(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    return err.value


def generate(**kw) -> inference_pb2.GenerateRequest:
    kw.setdefault("image", IMAGE)
    kw.setdefault("prompt", PROMPT)
    return inference_pb2.GenerateRequest(**kw)


@pytest.mark.parametrize("image, message", [
    (b"", "image is empty"),
    (b"\x89PNG\r\n\x1a\n garbage", "could not be decoded"),
    (IMAGE[: len(IMAGE) // 2], "could not be decoded"),
    (png_claiming(5000, 5000), "5000x5000 = 25000000 pixels; the limit is"),
    (png_claiming(100_000, 100_000), "decompression bomb"),
    (encoded(8, "GIF"), "format GIF is not accepted"),
    (encoded(200, "PNG"), f"the limit is {MAX_IMAGE_BYTES}"),
])
def test_unusable_images_are_invalid_arguments_that_say_why(stub, image, message):
    for call, request in ((stub.Generate, generate(image=image)),
                          (stub.Score, inference_pb2.ScoreRequest(image=image, prompt=PROMPT, response="red"))):
        err = refused(call, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.details()


def test_jpeg_is_accepted(stub):
    assert stub.Generate(generate(image=encoded(32, "JPEG"))).candidates


@pytest.mark.parametrize("request_kw, message", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="what colour " * 30), "prompt is 360 characters; the limit is 200"),
    (dict(prompt="what colour is the circle ? " * 5), "tokens; the limit is"),
    (dict(num_candidates=5), "num_candidates is 5"),
    (dict(num_candidates=-1), "num_candidates is -1"),
    (dict(num_candidates=3, best_of=2), "best_of is 2"),
    (dict(best_of=9), "best_of is 9"),
    (dict(sampling=events_pb2.SamplingParams(max_new_tokens=-1)), "max_new_tokens is -1"),
    (dict(sampling=events_pb2.SamplingParams(max_new_tokens=33)), "max_new_tokens is 33; it must be 1..32"),
    (dict(sampling=events_pb2.SamplingParams(temperature=-0.5)), "temperature is -0.5"),
    (dict(sampling=events_pb2.SamplingParams(temperature=50)), "temperature is 50"),
    (dict(sampling=events_pb2.SamplingParams(temperature=float("nan"))), "temperature is nan"),
    (dict(sampling=events_pb2.SamplingParams(top_p=1.5)), "top_p is 1.5"),
    (dict(sampling=events_pb2.SamplingParams(top_p=-0.1)), "top_p is -0.1"),
    (dict(session_id="\u00e9" * 129), "session_id is 258 bytes; the limit is 256"),
])
def test_out_of_range_generate_requests_are_invalid_arguments_that_say_why(stub, request_kw, message):
    err = refused(stub.Generate, generate(**request_kw))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_best_of_cannot_stream(stub):
    err = refused(lambda r: list(stub.GenerateStream(r)), generate(best_of=2))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "use Generate" in err.details()


def test_score_refuses_an_overlong_response(stub):
    err = refused(stub.Score, inference_pb2.ScoreRequest(image=IMAGE, prompt=PROMPT, response="x" * 5000))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "response is 5000 characters" in err.details()


def test_a_message_over_the_size_limit_is_resource_exhausted(stub):
    err = refused(stub.Generate, generate(image=b"\x00" * 500_000))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_full_queue_answers_resource_exhausted_and_the_rest_are_served(stub):
    # max_batch 1 and max_queue 1: of 16 simultaneous long generations, some must be turned away.
    request = generate(sampling=events_pb2.SamplingParams(temperature=3.0, seed=1), num_candidates=1)

    def call(_):
        try:
            stub.Generate(request)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            assert "retry later" in e.details() or e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
            return e.code()

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(16)))
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_bytes_that_are_not_a_request_message_are_invalid_arguments(server, stub):
    with grpc.insecure_channel(server.address) as channel:
        for method in ("/fuseloop.v1.InferenceService/Generate", "/fuseloop.v1.InferenceService/Score",
                       "/fuseloop.v1.AdminService/Deploy", "/inference.GRPCInferenceService/ModelInfer"):
            err = refused(channel.unary_unary(method), b"\xff\xff\xff\xff not protobuf")
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not a valid" in err.details(), method
        err = refused(lambda r: list(channel.unary_stream("/fuseloop.v1.InferenceService/GenerateStream")(r)),
                      b"\xff\xff not protobuf")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Generate(generate()).candidates


# Every field a native request has, with the leaf name a refusal must mention.
GENERATE_FIELDS = ("image", "prompt", "session_id", "num_candidates", "best_of",
                   "sampling.max_new_tokens", "sampling.temperature", "sampling.top_p", "sampling.seed")
SCORE_FIELDS = ("image", "prompt", "response")


def hostile_image(rng: random.Random) -> bytes:
    return rng.choice([
        lambda: b"", lambda: rng.randbytes(rng.randint(1, 2000)), lambda: IMAGE[: rng.randrange(len(IMAGE))],
        lambda: IMAGE[:8] + rng.randbytes(64),  # a PNG signature, then garbage
        lambda: png_claiming(rng.choice([0, 1, 70_000, 2**31 - 1]), rng.choice([0, 1, 70_000, 2**31 - 1])),
        lambda: encoded(8, rng.choice(["GIF", "BMP", "TIFF"])), lambda: encoded(4, "JPEG")[:-20],
        lambda: b"\x00" * (MAX_IMAGE_BYTES + 1), lambda: encoded(1, "PNG"),
    ])()


def hostile_value(rng: random.Random, field: str) -> object:
    leaf = field.rsplit(".", 1)[-1]
    if leaf == "image":
        return hostile_image(rng)
    if leaf in ("prompt", "response", "session_id"):
        return rng.choice(STRINGS + [PROMPT * rng.randint(2, 40), PROMPT + rng.choice(STRINGS)])
    if leaf in ("temperature", "top_p"):
        return rng.choice(FLOATS)
    if leaf == "seed":
        return rng.choice([0, 1, 2**63, 2**64 - 1])
    return rng.choice(INTS32 + [rng.randint(-100, 100)])


def mutated(rng: random.Random, request, fields: tuple[str, ...]) -> tuple[bytes, set[str]]:
    """The request with 1-3 fields set to hostile values, sometimes then broken on the wire: its bytes
    and the leaf names a refusal may name ("wire" when the bytes themselves were broken)."""
    request = type(request).FromString(request.SerializeToString())
    names = set()
    for field in rng.sample(fields, rng.randint(1, 3)):
        *path, leaf = field.split(".")
        target = request
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, hostile_value(rng, field))
        names.add(leaf)
    data = request.SerializeToString()
    if rng.random() < 0.2:
        data, names = mutate_wire(rng, data), names | {"wire"}
    return data, names


def names_the_field(o: Outcome) -> bool:
    """A refusal says which field was wrong, or that the bytes were no request at all."""
    if o.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return True
    if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "retry later" in o.details or "larger than max" in o.details
    if o.code != grpc.StatusCode.INVALID_ARGUMENT:
        return False
    fields, touched = o.what.split("|")
    named = [n for n in touched.split(",") if n != "wire"]
    if "wire" in touched:
        named += [f.rsplit(".", 1)[-1] for f in GENERATE_FIELDS + SCORE_FIELDS] + ["is not a valid", "stream"]
    return any(n in o.details for n in named)


def test_fuzzed_native_requests_never_get_unknown_or_internal(server, stub):
    """Seeded mutations of valid Generate, GenerateStream and Score requests: hostile images (garbage,
    truncated, zero-size, huge dimensions, other formats), unicode and huge strings, negative, NaN and
    infinite numbers, unknown fields, broken bytes and tiny deadlines. Each answer is OK or a client
    error naming what was wrong, and the server keeps serving valid requests."""
    rng = random.Random(2024)
    sampling = events_pb2.SamplingParams(max_new_tokens=3, temperature=1.0, seed=1)
    base = {"Generate": (generate(sampling=sampling, session_id="s-1"), GENERATE_FIELDS),
            "GenerateStream": (generate(sampling=sampling, session_id="s-1"), GENERATE_FIELDS),
            "Score": (inference_pb2.ScoreRequest(image=IMAGE, prompt=PROMPT, response="red"), SCORE_FIELDS)}
    outcomes = []
    with grpc.insecure_channel(server.address) as channel:
        calls = {"Generate": channel.unary_unary("/fuseloop.v1.InferenceService/Generate"),
                 "GenerateStream": lambda data, **kw: list(
                     channel.unary_stream("/fuseloop.v1.InferenceService/GenerateStream")(data, **kw)),
                 "Score": channel.unary_unary("/fuseloop.v1.InferenceService/Score")}
        for i in range(600):
            method = ("Generate", "GenerateStream", "Score")[i % 3]
            request, fields = base[method]
            data, names = mutated(rng, request, fields)
            timeout = rng.choice([0.001, 0.01]) if rng.random() < 0.05 else 30
            outcomes.append(outcome(f"{method}|{','.join(sorted(names))}",
                                    lambda: calls[method](data, timeout=timeout)))
    assert_refusals_are_client_errors(outcomes, names_the_field)
    assert {o.code for o in outcomes} >= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    assert stub.Generate(generate(sampling=sampling)).candidates
    assert stub.Score(inference_pb2.ScoreRequest(image=IMAGE, prompt=PROMPT, response="red")).model_version
