import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferenceEvent(_message.Message):
    __slots__ = ("id", "tenant", "trace_id", "span_id", "time", "source", "app", "deployment", "variant", "release", "model", "response_model", "provider", "operation", "input_tokens", "output_tokens", "cached_tokens", "latency_ms", "ttft_ms", "status", "error_type", "finish_reason", "prompt", "response", "user_hash", "session_id", "attributes", "scores")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    USER_HASH_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    trace_id: str
    span_id: str
    time: _timestamp_pb2.Timestamp
    source: str
    app: str
    deployment: str
    variant: str
    release: str
    model: str
    response_model: str
    provider: str
    operation: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    latency_ms: float
    ttft_ms: float
    status: str
    error_type: str
    finish_reason: str
    prompt: str
    response: str
    user_hash: str
    session_id: str
    attributes: _containers.ScalarMap[str, str]
    scores: _containers.ScalarMap[str, float]
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., trace_id: _Optional[str] = ..., span_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., app: _Optional[str] = ..., deployment: _Optional[str] = ..., variant: _Optional[str] = ..., release: _Optional[str] = ..., model: _Optional[str] = ..., response_model: _Optional[str] = ..., provider: _Optional[str] = ..., operation: _Optional[str] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., latency_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., status: _Optional[str] = ..., error_type: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ..., user_hash: _Optional[str] = ..., session_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., scores: _Optional[_Mapping[str, float]] = ...) -> None: ...

class InferenceBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[InferenceEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[InferenceEvent, _Mapping]]] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("index", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class IngestReply(_message.Message):
    __slots__ = ("accepted", "rejected", "rejections")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ...) -> None: ...
