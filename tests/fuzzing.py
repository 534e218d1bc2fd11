"""Seeded request fuzzing for the native gRPC services: hostile values, wire-level mutations and the
one rule every answer must keep (OK, or a client-error status whose message names what was wrong)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc

SERVER_FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
STRINGS = ["", " ", "\x00", "é", "\u202e\u0647\u0644\u0627", "\U0001f600" * 3, "\ufeff", "a\nb\tc", "%s%n{0}", "\u00b2\u0663",
           "x" * 300, "\u4e2d" * 100]
FLOATS = [float("nan"), float("inf"), float("-inf"), -0.0, -1.0, 1e-45, 1e30, 3.4e38, 0.5, 1.0]
INTS32 = [0, -1, 1, 2, -(2**31), 2**31 - 1, 1000, 7]
INTS64 = INTS32 + [-(2**63), 2**63 - 1, 2**40]


def unknown_field(rng: random.Random) -> bytes:
    """A field this schema does not know (number 900+), as a newer client might send: varint or bytes."""
    number = rng.randint(900, 5000)
    if rng.random() < 0.5:
        return _varint(number << 3) + _varint(rng.getrandbits(40))
    payload = rng.randbytes(rng.randint(0, 20))
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def mutate_wire(rng: random.Random, data: bytes) -> bytes:
    """Bytes a broken client or a bit flip could send: truncated, flipped, spliced or extended."""
    what = rng.randrange(5)
    if what == 0 and data:
        return data[: rng.randrange(len(data))]
    if what == 1 and data:
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if what == 2:
        at = rng.randint(0, len(data))
        return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]
    if what == 3:
        return data + unknown_field(rng)
    return data + data  # a repeated message: proto merges it, so every field is set twice


@dataclass
class Outcome:
    what: str  # the call and the mutations applied, for the failure message
    code: grpc.StatusCode
    details: str


def outcome(what: str, call: Callable[[], object]) -> Outcome:
    try:
        call()
        return Outcome(what, grpc.StatusCode.OK, "")
    except grpc.RpcError as e:
        return Outcome(what, e.code(), e.details() or "")


def assert_refusals_are_client_errors(outcomes: list[Outcome], names_what_was_wrong: Callable[[Outcome], bool]) -> None:
    """No server fault, and every refusal explains itself: a client can fix its request from it."""
    faults = [o for o in outcomes if o.code in SERVER_FAULTS]
    assert not faults, faults[:5]
    silent = [o for o in outcomes if o.code != grpc.StatusCode.OK and not names_what_was_wrong(o)]
    assert not silent, silent[:5]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
