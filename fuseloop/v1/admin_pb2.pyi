from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelVersionInfo(_message.Message):
    __slots__ = ("version", "parent_version", "created_at", "serving", "metrics_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    version: str
    parent_version: str
    created_at: str
    serving: bool
    metrics_json: str
    def __init__(self, version: _Optional[str] = ..., parent_version: _Optional[str] = ..., created_at: _Optional[str] = ..., serving: _Optional[bool] = ..., metrics_json: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersionInfo, _Mapping]]] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("version", "canary_percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: str
    canary_percent: float
    def __init__(self, version: _Optional[str] = ..., canary_percent: _Optional[float] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("serving_version", "previous_version", "generation", "canary_version")
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    serving_version: str
    previous_version: str
    generation: int
    canary_version: str
    def __init__(self, serving_version: _Optional[str] = ..., previous_version: _Optional[str] = ..., generation: _Optional[int] = ..., canary_version: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("serving_version", "previous_version", "runtime", "ready", "history", "desired_version", "desired_generation", "desired_status", "desired_error", "canary_version", "canary_percent", "canary_status")
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    DESIRED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESIRED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    DESIRED_STATUS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_ERROR_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CANARY_STATUS_FIELD_NUMBER: _ClassVar[int]
    serving_version: str
    previous_version: str
    runtime: str
    ready: bool
    history: _containers.RepeatedScalarFieldContainer[str]
    desired_version: str
    desired_generation: int
    desired_status: str
    desired_error: str
    canary_version: str
    canary_percent: float
    canary_status: str
    def __init__(self, serving_version: _Optional[str] = ..., previous_version: _Optional[str] = ..., runtime: _Optional[str] = ..., ready: _Optional[bool] = ..., history: _Optional[_Iterable[str]] = ..., desired_version: _Optional[str] = ..., desired_generation: _Optional[int] = ..., desired_status: _Optional[str] = ..., desired_error: _Optional[str] = ..., canary_version: _Optional[str] = ..., canary_percent: _Optional[float] = ..., canary_status: _Optional[str] = ...) -> None: ...
