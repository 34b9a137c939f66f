"""Every ClickHouse table, declared once as the projection of its contract Struct.

`key` names the columns that identify one fact: the sink looks them up to store a republished or
redelivered fact once (rows sharing a key are one fact's rows, stored together or not at all).
"""

from __future__ import annotations

from lockgate.contracts import (
    AnalysisRun,
    ArtifactRegistered,
    AuditRecord,
    CostLedger,
    DeadLetter,
    DriftReport,
    EvalCasesRecorded,
    EvalCompleted,
    GateAudited,
    InferenceEvent,
    InferenceScored,
    LineageEdges,
    LineageRun,
    ReleaseRegistered,
    RolloutState,
    SpanRecord,
)
from lockgate.store.rows import Table

# Envelope fields that describe transport, not the fact: no table stores them.
_ROUTING = ("source", "trace_id", "span_id", "schema_version")

INFERENCE_EVENTS = Table(
    "inference_events", InferenceEvent, exclude=("schema_version",),
    # the NATS message an event arrived in (for tracing a row back to its message); an event is
    # stored once per (tenant, app, id), whatever messages carried it: ids are chosen by producers, so
    # another tenant's or app's event under the same id is another event, never this one's duplicate (one
    # app sending another's id first hid that app's event and its cost). `served`: it came on a router's
    # subject (Subjects.served), which the sink knows and no producer can claim
    extra={"msg_id": str, "served": bool}, key=("tenant", "app", "id"),
)


def _sender_tenant(span: SpanRecord) -> str:
    return span.resource.get("lockgate.tenant", "")


def _sender_app(span: SpanRecord) -> str:
    return span.resource.get("lockgate.app", "")


# The OpenTelemetry Collector ClickHouse exporter's layout, so its tools read ours, plus `SenderTenant` and
# `SenderApp` (migration 020): the tenant and app whose API key sent the span over OTLP, which the receiver stamps as
# the resource attributes `lockgate.tenant` and `lockgate.app`, or '' for lockgate's own spans. A span is stored once
# per (SenderTenant, SenderApp, TraceId, SpanId), whatever exports carry it: ids travel in traceparent headers, so
# another tenant or app naming a span's ids, or lockgate's, sends another span, never that one's duplicate (a probe's
# app of one tenant sending another app's ids first had that app's span dropped, its own shown in its place).
OTEL_TRACES = Table(
    "otel_traces", SpanRecord,
    derived={"SenderTenant": (str, _sender_tenant), "SenderApp": (str, _sender_app)},
    key=("SenderTenant", "SenderApp", "TraceId", "SpanId"),
    rename={"timestamp": "Timestamp", "trace_id": "TraceId", "span_id": "SpanId",
            "parent_span_id": "ParentSpanId", "trace_state": "TraceState", "name": "SpanName",
            "kind": "SpanKind", "service": "ServiceName", "resource": "ResourceAttributes",
            "scope_name": "ScopeName", "scope_version": "ScopeVersion", "attributes": "SpanAttributes",
            "duration_ns": "Duration", "status_code": "StatusCode", "status_message": "StatusMessage"},
    nested={"events": ("Events.Timestamp", "Events.Name", "Events.Attributes"),
            "links": ("Links.TraceId", "Links.SpanId", "Links.TraceState", "Links.Attributes")},
)

# Where the original was stored is an instruction to the sink (delete it), not a column.
DEAD_LETTERS = Table("dead_letters", DeadLetter, exclude=(*_ROUTING, "tenant", "stream", "stream_seq", "cut_from"), key=("id",))

ARTIFACTS = Table("artifacts", ArtifactRegistered, exclude=_ROUTING,
                  rename={"id": "event_id", "time": "registered_at"}, key=("event_id",))

RELEASES = Table("releases", ReleaseRegistered, exclude=_ROUTING, rename={"id": "event_id"}, key=("event_id",))

LINEAGE_RUNS = Table("lineage_runs", LineageRun, exclude=(*_ROUTING, "tenant"), rename={"id": "event_id"},
                     key=("event_id",))

# `event_id` is the event the edges were derived from; the LineageEdges envelope id is not stored.
LINEAGE_EDGES = Table("lineage_edges", LineageEdges, exclude=(*_ROUTING, "id", "tenant"), items="edges",
                      key=("event_id",))

EVAL_RUNS = Table(
    "eval_runs", EvalCompleted,
    # `binding` is the gate's input (the release as the run started), which a decision row already reflects.
    # `intervals` are stored (JSON text, migration 022): `lineage DATASET` shows each outcome's (probe p29 F5).
    exclude=(*_ROUTING, "tenant", "baseline_run", "comparisons", "warnings", "artifacts", "ratios", "binding"),
    rename={"id": "event_id"}, key=("run_id",),  # one row per run, whatever the redeliveries
)

EVAL_CASES = Table("eval_cases", EvalCasesRecorded, exclude=(*_ROUTING, "id", "tenant"), items="cases",
                   key=("run_id", "case_id", "repeat"))

GATE_DECISIONS = Table("gate_decisions", GateAudited, exclude=_ROUTING, key=("id",))

# `actor`: the operator's key identity, '' when the router acted on evidence (migration 018).
ROLLOUT_EVENTS = Table("rollout_events", RolloutState, exclude=(*_ROUTING, "tenant"), key=("id",))

# One row per feature; the feature's `drifted` is the column, the report's is their disjunction.
DRIFT_REPORTS = Table("drift_reports", DriftReport, exclude=(*_ROUTING, "drifted"), items="features",
                      key=("id",))

# One row per priced event, (tenant, app, event id) as inference_events; the entry's own time and tenant are the
# columns.
COST_LEDGER = Table("cost_ledger", CostLedger, exclude=(*_ROUTING, "id", "time", "tenant"), items="entries",
                    key=("tenant", "app", "event_id"))

# The hash-chained audit log (lockgate.auditchain): one row per seq, however often the chainer republishes it.
AUDIT_LOG = Table("audit_log", AuditRecord, exclude=_ROUTING, key=("seq",))

# Online evaluation of live answers: one row per (answer, scorer), its value or its error (a judge outage).
INFERENCE_SCORES = Table("inference_scores", InferenceScored, exclude=(*_ROUTING, "id", "scores"), items="results",
                         key=("tenant", "app", "scorer", "event_id"))  # the event id last: the sink orders by it


# Signed analysis measurements of rollouts (lockgate.analysisruns): one row per measurement.
ANALYSIS_RUNS = Table("analysis_runs", AnalysisRun, exclude=_ROUTING, key=("id",))

TABLES: tuple[Table, ...] = (
    INFERENCE_EVENTS, OTEL_TRACES, DEAD_LETTERS, ARTIFACTS, RELEASES, LINEAGE_RUNS, LINEAGE_EDGES, EVAL_RUNS,
    EVAL_CASES, GATE_DECISIONS, ROLLOUT_EVENTS, DRIFT_REPORTS, COST_LEDGER, AUDIT_LOG, INFERENCE_SCORES, ANALYSIS_RUNS,
)

# Kept by materialized views (migrations 005, 016 and 020), never written by the sink: no contract Struct of their own.
DERIVED: tuple[str, ...] = ("otel_traces_trace_id_ts", "otel_traces_trace_id_ts_mv", "cost_hourly", "cost_hourly_mv",
                             "inference_event_keys", "inference_event_keys_mv", "cost_ledger_keys", "cost_ledger_keys_mv",
                             "inference_scores_keys", "inference_scores_keys_mv", "otel_traces_keys", "otel_traces_keys_mv")
