from fuseloop.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("image", "prompt", "sampling", "num_candidates", "best_of", "session_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BEST_OF_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    prompt: str
    sampling: _events_pb2.SamplingParams
    num_candidates: int
    best_of: int
    session_id: str
    def __init__(self, image: _Optional[bytes] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[_events_pb2.SamplingParams, _Mapping]] = ..., num_candidates: _Optional[int] = ..., best_of: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("response_id", "text", "reward", "logprob", "num_tokens")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    text: str
    reward: float
    logprob: float
    num_tokens: int
    def __init__(self, response_id: _Optional[str] = ..., text: _Optional[str] = ..., reward: _Optional[float] = ..., logprob: _Optional[float] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "model_version", "candidates")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_version: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, request_id: _Optional[str] = ..., model_version: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("candidate_index", "response_id", "text_delta", "done", "model_version", "request_id")
    CANDIDATE_INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    candidate_index: int
    response_id: str
    text_delta: str
    done: bool
    model_version: str
    request_id: str
    def __init__(self, candidate_index: _Optional[int] = ..., response_id: _Optional[str] = ..., text_delta: _Optional[str] = ..., done: _Optional[bool] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("image", "prompt", "response")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    prompt: str
    response: str
    def __init__(self, image: _Optional[bytes] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("reward", "model_version")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    reward: float
    model_version: str
    def __init__(self, reward: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...
