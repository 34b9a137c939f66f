"""Every event type round-trips; decoders tolerate evolution (fields appended with defaults)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from lockgate.codec import Codec, any_event, encode
from lockgate.contracts import (
    EVENT_TYPES,
    AliasChanged,
    AnalysisMetric,
    AnalysisRun,
    AppliedChange,
    ApplyRecorded,
    ArtifactLifecycle,
    ArtifactRegistered,
    AuditEntry,
    AuditRecord,
    BudgetEvent,
    CostEntry,
    CostLedger,
    CostRecord,
    DeadLetter,
    DriftReport,
    EvalCaseResult,
    EvalCasesRecorded,
    EvalCompleted,
    EvalRequested,
    EvalReran,
    FeatureDrift,
    GateAudited,
    GateDecided,
    GateReview,
    InferenceEvent,
    InferenceScored,
    LineageEdge,
    LineageEdges,
    LineageRun,
    ReleaseBinding,
    ReleaseRegistered,
    RolloutState,
    RuleResult,
    SpanBatch,
    SpanRecord,
    json_schema,
)
from lockgate.errors import InvalidEvent, UnknownSchemaVersion

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

SAMPLES = [
    InferenceEvent(app="shop", model="gpt-x", input_tokens=12, output_tokens=30, prompt="héllo ☃",
                   attributes={"k": "v"}, scores={"thumbs": 1.0}),
    InferenceScored(event_id="e1", app="shop", deployment="web", release="r1", scores={"pii_free": 1.0}),
    ArtifactRegistered(kind="dataset", name="qa", hash="sha256:" + "0" * 64, size=10),
    ReleaseRegistered(release="r1", app="shop", artifacts={"dataset/qa": "sha256:" + "0" * 64}),
    LineageRun(run_id="run-1", kind="eval", release="r1", inputs=["a"], outputs=["b"]),
    EvalRequested(run_id="run-1", release="r1", suite="sha256:1", endpoint="http://x/v1"),
    EvalCompleted(run_id="run-1", release="r1", suite="sha256:1", metrics={"exact_match": 0.9}),
    EvalCompleted(run_id="run-2", release="r1", suite="sha256:1", environment={"task": "call", "model": "m"},
                  binding=ReleaseBinding(registered=True, bundle="sha256:b", artifacts={"model_config/m": "sha256:m"})),
    EvalCompleted(run_id="run-3", release="r9", suite="sha256:1", binding=ReleaseBinding(registered=False)),
    EvalReran(run_id="run-2", rerun_of="run-1", release="r1", suite="sha256:1", metrics={"exact_match": 0.9},
              stored_metrics={"exact_match": 0.85}),
    GateDecided(release="r1", decision="BLOCK", rules=[
        RuleResult(rule="q", metric="exact_match", op=">=", threshold=0.95, observed=0.9, verdict="FAIL"),
        RuleResult(rule="l", metric="latency_p95_ms", op="<=", threshold=100, observed=None, verdict="NO_DATA")],
        approvals=["ann"]),
    GateReview(release="r1", action="approve", actor="alice", reason="looked at the diff", key_id="k1",
               signature="c2ln"),
    RolloutState(deployment="web", stable_release="r0", canary_release="r1", canary_weight=10.0,
                 phase="progressing"),
    DriftReport(deployment="web", window_start=NOW, window_end=NOW, reference_n=10, current_n=10, drifted=True,
                features=[FeatureDrift(feature="latency_ms", psi=0.3, ks_stat=0.5, ks_pvalue=0.01,
                                       reference_mean=1.0, current_mean=2.0, drifted=True)]),
    DriftReport(deployment="web", window_start=NOW, window_end=NOW, reference_n=10, current_n=10, drifted=True,
                comparison="canary_vs_stable", release="r1", reference_release="r0", embedder="hashing-256",
                features=[FeatureDrift(feature="output_tokens", psi=1.3, ks_stat=0.9, ks_pvalue=1e-9,
                                       reference_mean=10.0, current_mean=30.0, drifted=True, test="wasserstein",
                                       statistic=2.0, p_value=None, threshold=0.1, test_drifted=True,
                                       reference_size=1500, current_size=1200),
                          FeatureDrift(feature="prompt_text", psi=0.0, ks_stat=0.1, ks_pvalue=0.2,
                                       reference_mean=0.5, current_mean=0.5, drifted=False,
                                       test="embedding_mean_distance", statistic=0.1, p_value=0.2, threshold=0.05,
                                       reference_size=10, current_size=10)]),
    CostRecord(app="shop", deployment="web", model="m", calls=2, input_tokens=3, output_tokens=4,
               cached_tokens=0, cost_usd=0.01, window_start=NOW, window_end=NOW),
    DeadLetter(origin="sink", subject="lg.inference.x", reason="invalid event", payload=b"\x00\xffbytes"),
    DeadLetter(origin="sink", subject="lg.inference.x", reason="invalid event", payload=b"\x00" * 8, cut_from=900_000,
               stream="LG_INFERENCE", stream_seq=7, original="LG_INFERENCE.7." + "0" * 64),
    SpanBatch(spans=[SpanRecord(timestamp=NOW, trace_id="a" * 32, span_id="b" * 16, parent_span_id="",
                                trace_state="", name="s", kind="Server", service="lockgate-router", resource={},
                                scope_name="x", scope_version="1", attributes={"a": "1"}, duration_ns=5,
                                status_code="Ok", status_message="", events=[(NOW, "e", {})],
                                links=[("c" * 32, "d" * 16, "", {})])]),
    EvalCasesRecorded(run_id="run-1", release="r1", cases=[
        EvalCaseResult(case_id="c1", repeat=0, input="q", expected="a", output="a", scores={"exact_match": 1.0},
                       details={"llm_judge": {"reasons": ["fine"], "cached": True}})]),
    GateAudited(release="r1", action="approved", actor="ann", decision="PASS", eval_run="run-1", rules=[
        RuleResult(rule="q", metric="exact_match", op=">=", threshold=0.95, observed=0.99, verdict="PASS")]),
    LineageEdges(event_id="e1", edges=[LineageEdge(src="r1", src_kind="release", dst="sha256:" + "0" * 64,
                                                   dst_kind="dataset", relation="uses")]),
    CostLedger(price_book="sha256:pb", entries=[CostEntry(event_id="e1", time=NOW, tenant="acme", app="shop",
                                                          model="m", input_tokens=3, cost_usd=0.25, priced=True)]),
    AuditEntry(kind="key", actor="admin", target="apikey:k1", action="create", details={"role": "viewer"}),
    AnalysisRun(deployment="web", release="r1", baseline="r0", phase="Successful", outcome="advanced",
                metrics=[AnalysisMetric(name="error_rate", verdict="SUCCESSFUL", condition="<= stable + 0.01",
                                        canary=0.004, stable=0.005, threshold=0.015)]),
    AuditRecord(seq=1, producer="admin", kind="key", actor="admin", target="apikey:k1", action="create",
                recorded_at=datetime(2026, 1, 2, tzinfo=UTC), hash="sha256:1", key_id="k", signature="c2ln"),
    ApplyRecorded(directory="/repo", commit="abc", author="Ann <ann@example.com>", dirty=False, changes=[
        AppliedChange(action="add", kind="prompt", name="p", digest="sha256:" + "0" * 64, source="prompts/p.yaml")],
        unchanged=2),
    BudgetEvent(reason="over_budget", budget="daily", counter="daily.2026-01-02", period="day", period_id="2026-01-02",
                app="shop", limit_usd=1.0, requested_usd=0.25),
    AliasChanged(seq=1, app="shop", alias="production", release="shop-v1", actor="ann", key_id="k", signature="c2ln"),
    ArtifactLifecycle(seq=1, hash="sha256:" + "0" * 64, successor="sha256:" + "1" * 64, sunset=NOW),
]


def test_every_event_type_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(EVENT_TYPES)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip_typed_and_through_the_union(event: msgspec.Struct) -> None:
    data = encode(event)
    assert Codec(type(event)).decode(data) == event
    assert any_event.decode(data) == event


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_old_decoder_reads_newer_event_with_appended_fields(event: msgspec.Struct) -> None:
    newer = msgspec.json.decode(encode(event))
    newer["added_in_a_later_version"] = {"nested": [1, 2, 3]}
    assert Codec(type(event)).decode(msgspec.json.encode(newer)) == event


def test_new_decoder_reads_older_event_missing_defaulted_fields() -> None:
    old = {"type": "lockgate.inference", "id": "x", "time": "2026-01-01T00:00:00Z", "app": "shop"}
    event = Codec(InferenceEvent).decode(msgspec.json.encode(old))
    assert event.app == "shop" and event.input_tokens == 0 and event.attributes == {}


def test_an_eval_result_without_the_binding_its_run_started_on_decodes_as_saying_none() -> None:
    # Appended after v1: an older evaluator's result still decodes; the gate blocks it (it says no binding).
    old = {"type": "lockgate.eval.completed", "id": "x", "time": "2026-01-01T00:00:00Z", "run_id": "run-1",
           "release": "r1", "suite": "sha256:1"}
    assert Codec(EvalCompleted).decode(msgspec.json.encode(old)).binding is None
    unbound = msgspec.json.decode(encode(EvalCompleted(run_id="r", release="r1", suite="s",
                                                       binding=ReleaseBinding())))["binding"]
    assert unbound == {"registered": False, "bundle": "", "artifacts": {}}  # said, and said unregistered


def test_unknown_schema_version_is_rejected_with_the_version() -> None:
    data = msgspec.json.decode(encode(SAMPLES[0]))
    data["schema_version"] = 99
    with pytest.raises(UnknownSchemaVersion, match="99"):
        any_event.decode(msgspec.json.encode(data))


def test_a_newer_event_anywhere_in_a_list_is_rejected() -> None:
    """Lists (an inference message) are checked in one pass: one event of a newer version among current ones."""
    events = [msgspec.to_builtins(InferenceEvent(app="shop")) for _ in range(5)]
    events[3]["schema_version"] = 7
    with pytest.raises(UnknownSchemaVersion, match="schema_version 7 for InferenceEvent"):
        Codec(list[InferenceEvent]).decode(msgspec.json.encode(events))
    del events[3]
    assert len(Codec(list[InferenceEvent]).decode(msgspec.json.encode(events))) == 4


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "malformed|truncated|Input data"),
        (b'{"type":"lockgate.inference"}', "missing required field `app`"),
        (b'{"type":"lockgate.inference","app":"a","latency_ms":-1}', r"\$.latency_ms"),
        (b'{"type":"nope","app":"a"}', "unknown event type"),
        (b'{"type":"lockgate.inference","app":"a","id":""}', r"length >= 1 - at `\$.id`"),
        (b'{"type":"lockgate.inference","app":"a","id":"' + b"x" * 129 + b'"}', r"length <= 128 - at `\$.id`"),
    ],
)
def test_bad_input_names_the_problem(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        any_event.decode(payload)


def test_json_nested_deeper_than_python_can_recurse_is_invalid_not_a_crash() -> None:
    # Where a type accepts anything, msgspec recurses per level and raises RecursionError, not DecodeError.
    with pytest.raises(InvalidEvent, match="nested too deeply"):
        Codec(Any).decode(b"[" * 100_000 + b"]" * 100_000)


def test_json_schema_covers_every_type() -> None:
    schema = json_schema()
    names = set(schema["$defs"])
    assert {t.__name__ for t in EVENT_TYPES} <= names
    inference = schema["$defs"]["InferenceEvent"]
    assert inference["properties"]["type"]["enum"] == ["lockgate.inference"]
    assert "gen_ai.usage.input_tokens" in inference["properties"]["input_tokens"]["description"]
