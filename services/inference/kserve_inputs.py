"""KServe v2 request checks: everything a client can get wrong in a ModelInfer (or a version
string) is refused here with INVALID_ARGUMENT and a message naming the input, before ONNX Runtime
sees it. The graphs' own limits (vocabulary, position tables, at least one token) come from the
version's family (its stepper, over the manifest's model config), so every family is checked alike."""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.utils import triton_to_np_dtype

from fuseloop.families import Stepper

INT64_MAX = 2**63 - 1
PAST_AXIS = 3  # the sequence axis of a `past` cache, (B, 2L, H, P, hd), in every family (DecodeState)
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


def check_graph_inputs(model: str, inputs: dict[str, np.ndarray], stepper: Stepper) -> None:
    """What a graph itself needs beyond names, dtypes and ranks, for any family, by input name:
    token ids (`*_ids`) inside the vocabulary, at least one of them, and a `*_mask` partner of
    the same shape; 0/1 masks; position ids inside the position table; an `attention_mask` as long
    as the cache (`past`) plus the new tokens; `memory` (or `cross_past`) not empty. The
    bounds are the family's (`Stepper.vocab_size`, `max_positions`, `max_tokens`). `model` names
    the graph in messages."""
    vocab, table, own = stepper.vocab_size(), stepper.max_positions(), stepper.max_tokens()
    shared = []  # token inputs read as one sequence through the position table, with their masks
    for name, ids in inputs.items():
        if not name.endswith("_ids") or name == "position_ids" or ids.ndim < 2:
            continue
        _not_empty(name, ids, 1)
        limit = own.get(name)
        if limit is not None and ids.shape[1] > limit:
            raise invalid(f"input {name}: {ids.shape[1]} tokens; {model} takes at most {limit}")
        mask_name = name.removesuffix("_ids") + "_mask"
        mask = inputs.get(mask_name)
        if mask is not None and mask.shape != ids.shape:
            raise invalid(f"input {mask_name} has shape {list(mask.shape)}; {name} has {list(ids.shape)}")
        _ids_in(name, ids, vocab, "vocabulary")
        if mask is not None:
            _mask(mask_name, mask)
        if limit is None:
            shared.append((name, ids, mask))
    if shared:  # real tokens per row (positions count real tokens only)
        lengths = sum(m.sum(axis=1) if m is not None else np.full(len(i), i.shape[1]) for _, i, m in shared)
        if lengths.size and lengths.max() > table:
            names = " + ".join(n for n, _, _ in shared)
            raise invalid(f"input {names}: {int(lengths.max())} tokens in a row; {model}'s position table has {table}")
    pos = inputs.get("position_ids")
    if pos is not None:
        ids = inputs.get("input_ids")
        if ids is not None and pos.shape != ids.shape:
            raise invalid(f"input position_ids has shape {list(pos.shape)}; input_ids has {list(ids.shape)}")
        _ids_in("position_ids", pos, table, "position table")
    att, past = inputs.get("attention_mask"), inputs.get("past")
    if att is not None and att.ndim == 2:
        new = next((inputs[n].shape[1] for n in ("input_ids", "position_ids") if n in inputs and inputs[n].ndim >= 2),
                   None)
        if past is not None and past.ndim > PAST_AXIS and new is not None and att.shape[1] != past.shape[PAST_AXIS] + new:
            raise invalid(f"input attention_mask has length {att.shape[1]}; it must be past length "
                          f"{past.shape[PAST_AXIS]} + new tokens {new} = {past.shape[PAST_AXIS] + new}")
        if att.shape[1] > table:
            raise invalid(f"input attention_mask has length {att.shape[1]}; {model}'s position table has {table}")
        _mask("attention_mask", att)
    for name in ("memory", "cross_past"):
        memory = inputs.get(name)
        if memory is not None and memory.ndim >= 2:
            _not_empty(name, memory, 1)
            memory_mask = inputs.get(name + "_mask")
            if memory_mask is not None:
                if memory_mask.shape != memory.shape[:2]:
                    raise invalid(f"input {name}_mask has shape {list(memory_mask.shape)}; {name} has "
                                  f"{list(memory.shape)}")
                _mask(name + "_mask", memory_mask)
