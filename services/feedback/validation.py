"""What a valid FeedbackEvent is. Each rule fails with a message that names the field and the value."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import unknown_fields

from fuseloop.events import EVENT_SCHEMA_VERSION, SIGNALS, signal_kind
from fuseloop.v1 import events_pb2


class InvalidFeedback(ValueError):
    """The event breaks a rule; the message says which and how."""


@dataclass(frozen=True)
class FeedbackLimits:
    max_text_bytes: int = 8 * 1024  # correction text, UTF-8
    max_id_bytes: int = 256  # event, response, user and session ids
    max_dwell_ms: int = 24 * 3600 * 1000


def check_event(event: events_pb2.FeedbackEvent, limits: FeedbackLimits) -> None:
    """Raises InvalidFeedback for the first broken rule."""
    if event.schema_version not in (0, EVENT_SCHEMA_VERSION):
        raise InvalidFeedback(
            f"schema_version {event.schema_version} is not supported: this service speaks {EVENT_SCHEMA_VERSION}"
        )
    _require_id(event.event_id, "event_id", limits)
    _require_id(event.session_id, "session_id", limits)
    _optional_id(event.user_id, "user_id", limits)
    if event.timestamp_ms < 0:
        raise InvalidFeedback(f"timestamp_ms must be unix milliseconds (>= 0), got {event.timestamp_ms}")

    signal = signal_kind(event)
    if signal is None:
        unknown = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(event)})
        hint = f" (it carries fields {unknown} this service does not know: a newer client?)" if unknown else ""
        raise InvalidFeedback(f"unknown feedback kind: no signal set; set one of {', '.join(SIGNALS)}{hint}")
    if signal == "preference":
        _optional_id(event.response_id, "response_id", limits)
        _check_preference(event.preference, limits)
        return
    _require_id(event.response_id, "response_id", limits)
    if signal == "rating":
        if not 1 <= event.rating.stars <= 5:
            raise InvalidFeedback(f"rating.stars must be 1..5, got {event.rating.stars}")
    elif signal == "correction":
        size = len(event.correction.text.encode("utf-8"))
        if size == 0:
            raise InvalidFeedback("correction.text is empty: say what the answer should have been")
        if size > limits.max_text_bytes:
            raise InvalidFeedback(f"correction.text is {size} bytes; the limit is {limits.max_text_bytes}")
    elif signal == "implicit":
        _check_implicit(event.implicit, limits)


def _check_preference(p: events_pb2.Preference, limits: FeedbackLimits) -> None:
    _require_id(p.chosen_response_id, "preference.chosen_response_id", limits)
    _require_id(p.rejected_response_id, "preference.rejected_response_id", limits)
    if p.chosen_response_id == p.rejected_response_id:
        raise InvalidFeedback("preference.chosen_response_id and rejected_response_id are the same response")
    for name in ("chosen_side", "rejected_side"):
        side = getattr(p, name)
        if side not in (events_pb2.SIDE_LEFT, events_pb2.SIDE_RIGHT):
            raise InvalidFeedback(f"preference.{name} must be SIDE_LEFT or SIDE_RIGHT, got {_enum_name(events_pb2.Side, side)}")
    if p.chosen_side == p.rejected_side:
        raise InvalidFeedback("preference.chosen_side and rejected_side are the same side")


def _check_implicit(i: events_pb2.Implicit, limits: FeedbackLimits) -> None:
    if i.kind == events_pb2.IMPLICIT_KIND_UNSPECIFIED or i.kind not in events_pb2.ImplicitKind.values():
        known = ", ".join(n for n in events_pb2.ImplicitKind.keys() if n != "IMPLICIT_KIND_UNSPECIFIED")
        raise InvalidFeedback(f"unknown implicit.kind {_enum_name(events_pb2.ImplicitKind, i.kind)}; use one of {known}")
    if not 0 <= i.dwell_ms <= limits.max_dwell_ms:
        raise InvalidFeedback(f"implicit.dwell_ms must be 0..{limits.max_dwell_ms}, got {i.dwell_ms}")
    if i.kind == events_pb2.IMPLICIT_DWELL and i.dwell_ms == 0:
        raise InvalidFeedback("implicit.dwell_ms is required (> 0) for IMPLICIT_DWELL")
    if i.display_position < 0 or i.num_displayed < 0:
        raise InvalidFeedback(
            f"implicit.display_position and num_displayed must be >= 0, got {i.display_position} and {i.num_displayed}"
        )
    if i.num_displayed and i.display_position >= i.num_displayed:
        raise InvalidFeedback(
            f"implicit.display_position {i.display_position} is outside the {i.num_displayed} responses displayed"
        )


def _require_id(value: str, name: str, limits: FeedbackLimits) -> None:
    if not value:
        raise InvalidFeedback(f"{name} is missing")
    _optional_id(value, name, limits)


def _optional_id(value: str, name: str, limits: FeedbackLimits) -> None:
    size = len(value.encode("utf-8"))
    if size > limits.max_id_bytes:
        raise InvalidFeedback(f"{name} is {size} bytes; the limit is {limits.max_id_bytes}")


def _enum_name(enum: object, number: int) -> str:
    try:
        return enum.Name(number)  # type: ignore[attr-defined]
    except ValueError:
        return str(number)
