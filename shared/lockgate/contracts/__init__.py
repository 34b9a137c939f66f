"""Every event lockgate puts on the wire; one module per subject family."""

from __future__ import annotations

from typing import Union

import msgspec

from lockgate.contracts.artifacts import (
    ArtifactKind,
    ArtifactRegistered,
    LineageEdge,
    LineageEdges,
    LineageRun,
    ReleaseRegistered,
)
from lockgate.contracts.audit import AuditEntry, AuditKind, AuditRecord
from lockgate.contracts.budget import BudgetEvent
from lockgate.contracts.cost import CostEntry, CostLedger, CostRecord
from lockgate.contracts.dlq import DeadLetter
from lockgate.contracts.drift import REQUEST_FEATURES, DriftReport, FeatureDrift, request_side
from lockgate.contracts.envelope import SCHEMA_VERSION, Event, utcnow
from lockgate.contracts.evals import (
    BaselineComparison,
    EvalCaseResult,
    EvalCasesRecorded,
    EvalCompleted,
    EvalRequested,
    EvalReran,
    MetricInterval,
    ReleaseBinding,
)
from lockgate.contracts.gates import (
    DecisionsPage,
    DecisionsRead,
    GateAudited,
    GateDecided,
    GateReview,
    RuleResult,
    StoredDecision,
)
from lockgate.contracts.gitops import AppliedChange, ApplyRecorded, ApplyReply, ApplyRequest, StateEntry
from lockgate.contracts.inference import InferenceEvent, InferenceScored, Score
from lockgate.contracts.provenance import AliasChanged, ArtifactLifecycle
from lockgate.contracts.rollout import AnalysisMetric, AnalysisRun, RolloutState
from lockgate.contracts.telemetry import SpanBatch, SpanRecord

EVENT_TYPES: tuple[type[Event], ...] = (
    InferenceEvent,
    ArtifactRegistered,
    ReleaseRegistered,
    LineageRun,
    EvalRequested,
    EvalCompleted,
    EvalReran,
    GateDecided,
    GateReview,
    RolloutState,
    DriftReport,
    CostRecord,
    DeadLetter,
    SpanBatch,
    # facts: rows only the sink stores
    EvalCasesRecorded,
    GateAudited,
    LineageEdges,
    CostLedger,
    AuditRecord,
    AnalysisRun,
    # what producers ask the audit chainer to record
    AuditEntry,
    # what `lockgate apply` did
    ApplyRecorded,
    # what budgets refused at the router
    BudgetEvent,
    # online evaluation of sampled live traffic
    InferenceScored,
    # provenance: signed alias changes and artifact lifecycles
    AliasChanged,
    ArtifactLifecycle,
)

AnyEvent = Union[EVENT_TYPES]  # noqa: UP007 - a runtime tagged union for msgspec

__all__ = [
    "REQUEST_FEATURES",
    "SCHEMA_VERSION",
    "AliasChanged",
    "ArtifactLifecycle",
    "EVENT_TYPES",
    "AnyEvent",
    "AppliedChange",
    "ApplyReply",
    "ApplyRequest",
    "ApplyRecorded",
    "ArtifactKind",
    "ArtifactRegistered",
    "AuditEntry",
    "AuditKind",
    "AuditRecord",
    "BaselineComparison",
    "BudgetEvent",
    "GateReview",
    "MetricInterval",
    "CostEntry",
    "CostLedger",
    "CostRecord",
    "DeadLetter",
    "DriftReport",
    "EvalCaseResult",
    "EvalCasesRecorded",
    "EvalCompleted",
    "EvalRequested",
    "EvalReran",
    "Event",
    "FeatureDrift",
    "DecisionsPage",
    "DecisionsRead",
    "GateAudited",
    "GateDecided",
    "InferenceEvent",
    "InferenceScored",
    "LineageEdge",
    "LineageEdges",
    "LineageRun",
    "ReleaseBinding",
    "ReleaseRegistered",
    "RolloutState",
    "AnalysisMetric",
    "AnalysisRun",
    "RuleResult",
    "Score",
    "SpanBatch",
    "SpanRecord",
    "StateEntry",
    "StoredDecision",
    "json_schema",
    "request_side",
    "utcnow",
]


def json_schema() -> dict:
    """JSON Schema (2020-12) for every event type, generated from the Structs."""
    schemas, components = msgspec.json.schema_components(EVENT_TYPES, ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lockgate events",
        "oneOf": schemas,
        "$defs": components,
    }
