from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Side(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIDE_UNSPECIFIED: _ClassVar[Side]
    SIDE_LEFT: _ClassVar[Side]
    SIDE_RIGHT: _ClassVar[Side]

class ImplicitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMPLICIT_KIND_UNSPECIFIED: _ClassVar[ImplicitKind]
    IMPLICIT_COPY: _ClassVar[ImplicitKind]
    IMPLICIT_REGENERATE: _ClassVar[ImplicitKind]
    IMPLICIT_CLICK: _ClassVar[ImplicitKind]
    IMPLICIT_DWELL: _ClassVar[ImplicitKind]
    IMPLICIT_ABANDON: _ClassVar[ImplicitKind]
SIDE_UNSPECIFIED: Side
SIDE_LEFT: Side
SIDE_RIGHT: Side
IMPLICIT_KIND_UNSPECIFIED: ImplicitKind
IMPLICIT_COPY: ImplicitKind
IMPLICIT_REGENERATE: ImplicitKind
IMPLICIT_CLICK: ImplicitKind
IMPLICIT_DWELL: ImplicitKind
IMPLICIT_ABANDON: ImplicitKind

class Thumbs(_message.Message):
    __slots__ = ("up",)
    UP_FIELD_NUMBER: _ClassVar[int]
    up: bool
    def __init__(self, up: _Optional[bool] = ...) -> None: ...

class Rating(_message.Message):
    __slots__ = ("stars",)
    STARS_FIELD_NUMBER: _ClassVar[int]
    stars: int
    def __init__(self, stars: _Optional[int] = ...) -> None: ...

class Preference(_message.Message):
    __slots__ = ("chosen_response_id", "rejected_response_id", "chosen_side", "rejected_side")
    CHOSEN_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_SIDE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_SIDE_FIELD_NUMBER: _ClassVar[int]
    chosen_response_id: str
    rejected_response_id: str
    chosen_side: Side
    rejected_side: Side
    def __init__(self, chosen_response_id: _Optional[str] = ..., rejected_response_id: _Optional[str] = ..., chosen_side: _Optional[_Union[Side, str]] = ..., rejected_side: _Optional[_Union[Side, str]] = ...) -> None: ...

class Correction(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class Implicit(_message.Message):
    __slots__ = ("kind", "dwell_ms", "display_position", "num_displayed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DWELL_MS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_DISPLAYED_FIELD_NUMBER: _ClassVar[int]
    kind: ImplicitKind
    dwell_ms: int
    display_position: int
    num_displayed: int
    def __init__(self, kind: _Optional[_Union[ImplicitKind, str]] = ..., dwell_ms: _Optional[int] = ..., display_position: _Optional[int] = ..., num_displayed: _Optional[int] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("schema_version", "event_id", "response_id", "app_id", "user_id", "session_id", "timestamp_ms", "thumbs", "rating", "preference", "correction", "implicit")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    THUMBS_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    IMPLICIT_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    response_id: str
    app_id: str
    user_id: str
    session_id: str
    timestamp_ms: int
    thumbs: Thumbs
    rating: Rating
    preference: Preference
    correction: Correction
    implicit: Implicit
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., response_id: _Optional[str] = ..., app_id: _Optional[str] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., thumbs: _Optional[_Union[Thumbs, _Mapping]] = ..., rating: _Optional[_Union[Rating, _Mapping]] = ..., preference: _Optional[_Union[Preference, _Mapping]] = ..., correction: _Optional[_Union[Correction, _Mapping]] = ..., implicit: _Optional[_Union[Implicit, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class SampledResponse(_message.Message):
    __slots__ = ("response_id", "text", "token_ids", "token_logprobs", "reward", "display_position")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_POSITION_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    reward: float
    display_position: int
    def __init__(self, response_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., reward: _Optional[float] = ..., display_position: _Optional[int] = ...) -> None: ...

class InferenceEvent(_message.Message):
    __slots__ = ("schema_version", "event_id", "request_id", "model_version", "prompt", "image", "image_sha256", "responses", "sampling", "timestamp_ms", "app_id", "session_id", "arm")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    request_id: str
    model_version: str
    prompt: str
    image: bytes
    image_sha256: str
    responses: _containers.RepeatedCompositeFieldContainer[SampledResponse]
    sampling: SamplingParams
    timestamp_ms: int
    app_id: str
    session_id: str
    arm: str
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., request_id: _Optional[str] = ..., model_version: _Optional[str] = ..., prompt: _Optional[str] = ..., image: _Optional[bytes] = ..., image_sha256: _Optional[str] = ..., responses: _Optional[_Iterable[_Union[SampledResponse, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., app_id: _Optional[str] = ..., session_id: _Optional[str] = ..., arm: _Optional[str] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("payload", "source_topic", "reason", "timestamp_ms", "event_id")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    source_topic: str
    reason: str
    timestamp_ms: int
    event_id: str
    def __init__(self, payload: _Optional[bytes] = ..., source_topic: _Optional[str] = ..., reason: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., event_id: _Optional[str] = ...) -> None: ...
