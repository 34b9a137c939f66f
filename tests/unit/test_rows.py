"""The row mapper: columns derived from Structs, values converted for ClickHouse, DDL mismatches named."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from lockgate.contracts import (
    AnalysisMetric,
    AnalysisRun,
    ArtifactRegistered,
    AuditRecord,
    CostEntry,
    CostLedger,
    DeadLetter,
    DriftReport,
    EvalCaseResult,
    EvalCasesRecorded,
    EvalCompleted,
    FeatureDrift,
    GateAudited,
    InferenceEvent,
    InferenceScored,
    LineageEdge,
    LineageEdges,
    LineageRun,
    ReleaseRegistered,
    RolloutState,
    RuleResult,
    Score,
    SpanRecord,
)
from lockgate.contracts.envelope import Event
from lockgate.store.rows import DdlColumn, Table, fits, schema_problems
from lockgate.store.tables import (
    COST_LEDGER,
    DEAD_LETTERS,
    DRIFT_REPORTS,
    EVAL_CASES,
    GATE_DECISIONS,
    INFERENCE_EVENTS,
    OTEL_TRACES,
    TABLES,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
RULE = RuleResult(rule="acc", metric="exact_match", op=">=", threshold=0.9, observed=0.5, verdict="FAIL")
FEATURE = FeatureDrift(feature="latency_ms", psi=0.3, ks_stat=0.5, ks_pvalue=0.01, reference_mean=1.0,
                       current_mean=2.0, drifted=True)
SPAN = SpanRecord(timestamp=NOW, trace_id="a" * 32, span_id="b" * 16, parent_span_id="", trace_state="", name="s",
                  kind="Server", service="svc", resource={"r": "1"}, scope_name="x", scope_version="1",
                  attributes={"a": "1"}, duration_ns=5, status_code="Ok", status_message="",
                  events=[(NOW, "e1", {"k": "v"}), (NOW, "e2", {})], links=[("c" * 32, "d" * 16, "", {})])
CASE = EvalCaseResult(case_id="c1", repeat=1, input="q", expected="a", output="a", scores={"exact_match": 1.0},
                      latency_ms=3.5, input_tokens=2, output_tokens=1, details={"llm_judge": {"reasons": ["ok"]}})

# One sample per table: (values, extra columns); the integration test inserts each for real.
SAMPLE_ROWS: dict[str, tuple[list[Any], dict[str, list[Any]]]] = {
    "inference_events": ([InferenceEvent(app="shop", prompt="p", attributes={"k": "v"}, scores={"s": 1.0}),
                          InferenceEvent(app="shop")], {"msg_id": ["m1", "m1"], "served": [True, False]}),
    "otel_traces": ([SPAN], {}),
    "dead_letters": ([DeadLetter(origin="sink", subject="x", reason="r", payload=b"\xffok", headers={"h": "1"})], {}),
    "artifacts": ([ArtifactRegistered(kind="dataset", name="qa", hash="sha256:1", labels={"a": "b"})], {}),
    "releases": ([ReleaseRegistered(release="r1", app="shop", artifacts={"dataset/qa": "sha256:1"})], {}),
    "lineage_runs": ([LineageRun(run_id="run", kind="eval", inputs=["a"], outputs=["b"])], {}),
    "lineage_edges": ([LineageEdges(event_id="e1", time=NOW, edges=[
        LineageEdge(src="r1", src_kind="release", dst="sha256:1", dst_kind="dataset", relation="uses"),
        LineageEdge(src="r0", src_kind="release", dst="r1", dst_kind="release", relation="parent_of")])], {}),
    "eval_runs": ([EvalCompleted(run_id="run", release="r1", suite="s", metrics={"m": 1.0})], {}),
    "eval_cases": ([EvalCasesRecorded(run_id="run", release="r1", cases=[CASE, EvalCaseResult(case_id="c2")])], {}),
    "gate_decisions": ([GateAudited(release="r1", action="decided", actor="gatekeeper", decision="BLOCK",
                                    rules=[RULE])], {}),
    "rollout_events": ([RolloutState(deployment="web", stable_release="r0", canary_release="r1", step=2)], {}),
    "drift_reports": ([DriftReport(deployment="web", window_start=NOW, window_end=NOW, reference_n=1, current_n=1,
                                   features=[FEATURE, msgspec.structs.replace(FEATURE, feature="x", drifted=False)],
                                   drifted=True)], {}),
    "cost_ledger": ([CostLedger(price_book="sha256:pb", entries=[
        CostEntry(event_id="e1", time=NOW, tenant="acme", app="shop", model="m", cost_usd=0.5, priced=True),
        CostEntry(event_id="e2", time=NOW, tenant="acme", app="shop")])], {}),
    "audit_log": ([AuditRecord(seq=1, producer="router", kind="rollout", actor="apikey:k1", target="web",
                               action="promote", details={"canary": "r1"}, recorded_at=NOW, hash="sha256:1",
                               key_id="k", signature="c2ln")], {}),
    "inference_scores": ([InferenceScored(event_id="e1", app="shop", deployment="web", variant="canary", release="r1",
                                          scores={"pii_free": 1.0},
                                          results=[Score(scorer="pii_free", value=1.0),
                                                   Score(scorer="llm_judge", error="judge endpoint j: HTTP 503")])], {}),
    "analysis_runs": ([AnalysisRun(deployment="web", release="r2", baseline="r1", phase="Failed", outcome="aborted",
                                   metrics=[AnalysisMetric(name="error_rate", verdict="FAILED",
                                                           condition="<= stable + 0.01", canary=0.05, threshold=0.015)],
                                   key_id="k", signature="c2ln")], {}),
}


def test_every_table_has_a_sample() -> None:
    assert set(SAMPLE_ROWS) == {t.name for t in TABLES}


def _row(table: Table, values: list[Any], i: int = 0, extra: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    data = table.data(values, extra)
    assert len({len(c) for c in data}) == 1  # every column has one value per row
    return {name: data[k][i] for k, name in enumerate(table.columns)}


def test_items_repeat_the_parent_fields_once_per_item() -> None:
    values, _ = SAMPLE_ROWS["drift_reports"]
    data = DRIFT_REPORTS.data(values)
    rows = [dict(zip(DRIFT_REPORTS.columns, r, strict=True)) for r in zip(*data, strict=True)]
    assert [(r["feature"], r["drifted"], r["deployment"]) for r in rows] == [
        ("latency_ms", True, "web"), ("x", False, "web")]
    assert DRIFT_REPORTS.origins(values * 2) == [0, 0, 1, 1]
    ledger = _row(COST_LEDGER, SAMPLE_ROWS["cost_ledger"][0], 1)
    assert (ledger["event_id"], ledger["tenant"], ledger["price_book"]) == ("e2", "acme", "sha256:pb")


def test_values_are_converted_by_type() -> None:
    case = _row(EVAL_CASES, SAMPLE_ROWS["eval_cases"][0])
    assert case["scores"] == {"exact_match": 1.0}  # dict of scalars: a Map
    assert json.loads(case["details"]) == {"llm_judge": {"reasons": ["ok"]}}  # dict of Any: JSON text
    audit = _row(GATE_DECISIONS, SAMPLE_ROWS["gate_decisions"][0])
    assert json.loads(audit["rules"])[0]["verdict"] == "FAIL"  # list of Structs: JSON text
    letter = _row(DEAD_LETTERS, SAMPLE_ROWS["dead_letters"][0])
    assert letter["payload"] == "\\xffok"  # bytes: text, undecodable bytes escaped
    span = _row(OTEL_TRACES, [SPAN])
    assert span["Events.Name"] == ["e1", "e2"] and span["Links.SpanId"] == ["d" * 16]
    assert span["Timestamp"] == NOW and span["SpanName"] == "s"
    # derived from the value: the tenant and app whose key sent it (its resource's `lockgate.tenant` and
    # `lockgate.app`), '' for lockgate's own
    assert (span["SenderTenant"], span["SenderApp"]) == ("", "")
    sent = msgspec.structs.replace(SPAN, resource={"lockgate.tenant": "acme", "lockgate.app": "shop"})
    assert (_row(OTEL_TRACES, [sent])["SenderTenant"], _row(OTEL_TRACES, [sent])["SenderApp"]) == ("acme", "shop")
    assert OTEL_TRACES.keys(OTEL_TRACES.data([sent])) == [("acme", "shop", "a" * 32, "b" * 16)]


def test_extra_columns_and_transforms() -> None:
    table = INFERENCE_EVENTS
    row = _row(table, *SAMPLE_ROWS["inference_events"][:1], extra={"msg_id": ["m", "m"], "served": [True, True]})
    assert row["msg_id"] == "m" and row["served"] is True and row["prompt"] == "p"
    event = InferenceEvent(app="a", prompt="secret")
    data = table.data([event], {"msg_id": ["m"], "served": [False]},
                      transform={"prompt": lambda p: p and "[REDACTED]"})
    assert data[table.index("prompt")] == ["[REDACTED]"]
    with pytest.raises(ValueError, match="msg_id"):
        table.data([InferenceEvent(app="a")])
    # whether a router served it is the sink's to say (from the subject): no row is written without it
    with pytest.raises(ValueError, match="served"):
        table.data([InferenceEvent(app="a")], {"msg_id": ["m"]})
    # an event is stored once per (tenant, app, id), whatever its message: another tenant's or app's id is another
    assert table.keys(data) == [(event.tenant, event.app, event.id)]
    cases = EVAL_CASES.data(SAMPLE_ROWS["eval_cases"][0])
    assert EVAL_CASES.keys(cases) == [("run", "c1", 1), ("run", "c2", 0)]  # a key of several columns: tuples


@pytest.mark.parametrize("name", sorted(SAMPLE_ROWS))
def test_a_tables_own_structs_give_the_columns_their_attributes_give(name: str) -> None:
    """`data` transposes a table's own Structs all at once; anything else is read attribute by attribute:
    the same columns either way, whatever the table's exclusions and renames."""
    table = next(t for t in TABLES if t.name == name)
    values, extra = SAMPLE_ROWS[name]

    class Proxy:  # not the table's Struct: read by attribute
        def __init__(self, value: Any) -> None:
            self.__dict__.update(msgspec.structs.asdict(value))

    assert table.data([Proxy(v) for v in values], extra) == table.data(values, extra)
    assert table.data([], {k: [] for k in extra}) == [[] for _ in table.columns]


class Thing(Event, frozen=True, kw_only=True, tag="test.thing"):
    name: str
    count: int = 0
    labels: dict[str, str] = {}


class ThingV2(Thing, frozen=True, kw_only=True, tag="test.thing"):
    added: float = 0.0


def test_a_field_without_a_column_is_a_schema_problem() -> None:
    ddl = [DdlColumn("id", "String"), DdlColumn("time", "DateTime64(6, 'UTC')"), DdlColumn("name", "String"),
           DdlColumn("count", "UInt32"), DdlColumn("labels", "Map(LowCardinality(String), String)"),
           DdlColumn("ingested_at", "DateTime64(3)", "DEFAULT")]
    exclude = ("source", "tenant", "trace_id", "span_id", "schema_version")
    assert schema_problems(Table("things", Thing, exclude=exclude), ddl) == []
    assert schema_problems(Table("things", ThingV2, exclude=exclude), ddl) == [
        "things.added: no such column (add a migration or exclude the field)"]
    wrong = [*ddl[:3], DdlColumn("count", "String"), *ddl[4:], DdlColumn("orphan", "String")]
    problems = schema_problems(Table("things", Thing, exclude=exclude), wrong)
    assert any(p.startswith("things.count: column type String") for p in problems)
    assert "things.orphan: the mapper never fills it and it has no default" in problems


@pytest.mark.parametrize(("py", "ch", "ok"), [
    (str, "LowCardinality(String)", True),
    (str | None, "Nullable(String)", True),
    (str, "Nullable(String)", False),
    (int, "UInt16", True),
    (int, "Float64", False),
    (float, "Float32", True),
    (bool, "Bool", True),
    (datetime, "DateTime64(6, 'UTC')", True),
    (dict[str, float], "Map(String, Float64)", True),
    (dict[str, float], "Map(String, String)", False),
    (list[str], "Array(String)", True),
])
def test_type_compatibility(py: type, ch: str, ok: bool) -> None:
    import msgspec.inspect as mi

    assert fits(mi.type_info(py), ch) is ok


def test_declaration_mistakes_fail_at_import() -> None:
    with pytest.raises(TypeError, match="no field"):
        Table("t", Thing, exclude=("nope",))
    with pytest.raises(TypeError, match="declared twice"):
        Table("t", Thing, rename={"name": "count"})
    with pytest.raises(TypeError, match="key column"):
        Table("t", Thing, key=("missing",))
