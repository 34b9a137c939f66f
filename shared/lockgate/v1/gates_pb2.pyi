import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RuleResult(_message.Message):
    __slots__ = ("rule", "metric", "op", "threshold", "observed", "verdict", "hint")
    RULE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    rule: str
    metric: str
    op: str
    threshold: float
    observed: float
    verdict: str
    hint: str
    def __init__(self, rule: _Optional[str] = ..., metric: _Optional[str] = ..., op: _Optional[str] = ..., threshold: _Optional[float] = ..., observed: _Optional[float] = ..., verdict: _Optional[str] = ..., hint: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("release", "decision", "rules", "eval_run", "policy", "reason", "signature", "key_id", "id", "time", "tenant", "baseline", "artifacts", "signed")
    class ArtifactsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    EVAL_RUN_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    release: str
    decision: str
    rules: _containers.RepeatedCompositeFieldContainer[RuleResult]
    eval_run: str
    policy: str
    reason: str
    signature: str
    key_id: str
    id: str
    time: _timestamp_pb2.Timestamp
    tenant: str
    baseline: str
    artifacts: _containers.ScalarMap[str, str]
    signed: bytes
    def __init__(self, release: _Optional[str] = ..., decision: _Optional[str] = ..., rules: _Optional[_Iterable[_Union[RuleResult, _Mapping]]] = ..., eval_run: _Optional[str] = ..., policy: _Optional[str] = ..., reason: _Optional[str] = ..., signature: _Optional[str] = ..., key_id: _Optional[str] = ..., id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tenant: _Optional[str] = ..., baseline: _Optional[str] = ..., artifacts: _Optional[_Mapping[str, str]] = ..., signed: _Optional[bytes] = ...) -> None: ...

class GetDecisionRequest(_message.Message):
    __slots__ = ("release",)
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    release: str
    def __init__(self, release: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("release_prefix",)
    RELEASE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    release_prefix: str
    def __init__(self, release_prefix: _Optional[str] = ...) -> None: ...
