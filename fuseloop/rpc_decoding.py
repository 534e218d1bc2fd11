"""Request bytes that are not a valid message: gRPC would answer INTERNAL/UNKNOWN when a
deserializer raises, so deserializers return a `Malformed` and handlers answer INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message


@dataclass(frozen=True)
class Malformed:
    reason: str


def safe_deserializer(message_type: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def deserialize(data: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return Malformed(f"the request is not a valid {message_type.DESCRIPTOR.full_name}: {e}")

    return deserialize
