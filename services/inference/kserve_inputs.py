"""KServe v2 request checks: everything a client can get wrong in a ModelInfer (or a version
string) is refused here with INVALID_ARGUMENT and a message naming the input, before ONNX Runtime
sees it. The graphs' own limits (vocabulary, position tables, at least one token) come from the
manifest's model config."""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.utils import triton_to_np_dtype

from fuseloop.repository import DECODER, ENCODER, REWARD

INT64_MAX = 2**63 - 1
MAX_RANK = 8
TYPED_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents"}

DTYPES = {name: np.dtype(triton_to_np_dtype(name)) for name in TYPED_CONTENTS}


class KServeError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> KServeError:
    return KServeError(grpc.StatusCode.INVALID_ARGUMENT, message)


def parse_version(text: str, model: str) -> int:
    """A model_version string -> int. str.isdigit() also accepts '²' and Arabic-Indic digits,
    which int() refuses (or reads as other numbers): only ASCII digits, at most int64."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > INT64_MAX:
        raise invalid(f"model_version of {model} must be a decimal number (ASCII digits), got {text[:40]!r}")
    return int(text)


def decode_input(tensor, raw: bytes | None) -> np.ndarray:
    """A request tensor (raw bytes or typed contents) -> numpy, checked against its declared shape."""
    name, datatype = tensor.name, tensor.datatype
    shape = [int(d) for d in tensor.shape]
    if len(shape) > MAX_RANK:
        raise invalid(f"input {name}: shape has {len(shape)} dimensions (at most {MAX_RANK})")
    if any(d < 0 for d in shape):
        raise invalid(f"input {name}: negative dimension in shape {shape}")
    count = 1
    for d in shape:  # Python ints: a product past int64 is refused, never wrapped
        count *= d
    if count > INT64_MAX:
        raise invalid(f"input {name}: shape {shape} has more elements than int64 can count")
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise invalid(f"input {name}: datatype {datatype[:40]!r} is not supported")
    has_typed = tensor.HasField("contents") and any(
        len(getattr(tensor.contents, f)) for f in set(TYPED_CONTENTS.values()))
    if raw is not None:
        if has_typed:
            raise invalid(f"input {name}: has both typed contents and raw_input_contents; send one")
        if len(raw) != count * dtype.itemsize:
            raise invalid(f"input {name}: {len(raw)} bytes of raw contents for shape {shape} "
                          f"{datatype} (expected {count * dtype.itemsize})")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    for field in set(TYPED_CONTENTS.values()) - {TYPED_CONTENTS[datatype]}:
        if len(getattr(tensor.contents, field)):
            raise invalid(f"input {name}: {datatype} data must be in {TYPED_CONTENTS[datatype]}, "
                          f"not {field}")
    values = getattr(tensor.contents, TYPED_CONTENTS[datatype])
    if len(values) != count:
        raise invalid(f"input {name}: {len(values)} values for shape {shape} (expected {count})")
    try:
        return np.asarray(values, dtype=dtype).reshape(shape)
    except OverflowError:
        raise invalid(f"input {name}: a value does not fit {datatype}") from None


def _ids_in(name: str, arr: np.ndarray, limit: int, what: str) -> None:
    if arr.size and (arr.min() < 0 or arr.max() >= limit):
        bad = arr[(arr < 0) | (arr >= limit)].ravel()[0]
        raise invalid(f"input {name}: {bad} is outside the {what} (0..{limit - 1})")


def _not_empty(name: str, arr: np.ndarray, axis: int) -> None:
    if arr.shape[axis] == 0:
        raise invalid(f"input {name}: dimension {axis} is 0; the model needs at least one element")


def _mask(name: str, arr: np.ndarray) -> None:
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise invalid(f"input {name}: mask values must be 0 or 1")


def check_graph_inputs(model: str, inputs: dict[str, np.ndarray], cfg: dict) -> None:
    """What the graphs themselves need beyond names, dtypes and ranks."""
    vocab = int(cfg["vocab_size"])
    if model in (ENCODER, REWARD):
        _not_empty("prompt_ids", inputs["prompt_ids"], 1)
        if inputs["prompt_ids"].shape[1] > cfg["max_prompt_tokens"]:
            raise invalid(f"input prompt_ids: {inputs['prompt_ids'].shape[1]} tokens; the model takes at most "
                          f"{cfg['max_prompt_tokens']}")
        if inputs["prompt_mask"].shape != inputs["prompt_ids"].shape:
            raise invalid(f"input prompt_mask has shape {list(inputs['prompt_mask'].shape)}; "
                          f"prompt_ids has {list(inputs['prompt_ids'].shape)}")
        _ids_in("prompt_ids", inputs["prompt_ids"], vocab, "vocabulary")
        _mask("prompt_mask", inputs["prompt_mask"])
    if model == REWARD:
        ids, mask = inputs["response_ids"], inputs["response_mask"]
        _not_empty("response_ids", ids, 1)
        if ids.shape[1] > cfg["max_response_tokens"] + 1:
            raise invalid(f"input response_ids: {ids.shape[1]} tokens; the position table has "
                          f"{cfg['max_response_tokens'] + 1}")
        if mask.shape != ids.shape:
            raise invalid(f"input response_mask has shape {list(mask.shape)}; response_ids has {list(ids.shape)}")
        _ids_in("response_ids", ids, vocab, "vocabulary")
        _mask("response_mask", mask)
    if model == DECODER:
        ids, pos, att = inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"]
        memory, memory_mask, past = inputs["memory"], inputs["memory_mask"], inputs["past"]
        _not_empty("input_ids", ids, 1)
        _not_empty("memory", memory, 1)
        if pos.shape != ids.shape:
            raise invalid(f"input position_ids has shape {list(pos.shape)}; input_ids has {list(ids.shape)}")
        if memory_mask.shape != memory.shape[:2]:
            raise invalid(f"input memory_mask has shape {list(memory_mask.shape)}; memory has {list(memory.shape)}")
        if att.shape[1] != past.shape[3] + ids.shape[1]:
            raise invalid(f"input attention_mask has length {att.shape[1]}; it must be past length {past.shape[3]} "
                          f"+ new tokens {ids.shape[1]} = {past.shape[3] + ids.shape[1]}")
        _ids_in("input_ids", ids, vocab, "vocabulary")
        _ids_in("position_ids", pos, int(cfg["max_response_tokens"]) + 1, "position table")
        _mask("attention_mask", att)
        _mask("memory_mask", memory_mask)
