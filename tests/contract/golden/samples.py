"""One fixed, fully populated instance of each event type: the source of its golden v1 payloads.

Every field is set to a value other than its default (the envelope's `schema_version` aside: it is
1 in v1), so a change of a field's type or name shows in the encoding; the `.defaults.json` golden,
built from the required fields alone, shows a change of a default. Floats are not whole numbers, so
a float that became an int shows too. A new event type adds its instance here, then runs
`python -m tests.contract.golden TypeName`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from lockgate.contracts import (
    AliasChanged,
    AnalysisMetric,
    AnalysisRun,
    AppliedChange,
    ApplyRecorded,
    ArtifactLifecycle,
    ArtifactRegistered,
    AuditEntry,
    AuditRecord,
    BaselineComparison,
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
    Event,
    FeatureDrift,
    GateAudited,
    GateDecided,
    GateReview,
    InferenceEvent,
    InferenceScored,
    LineageEdge,
    LineageEdges,
    LineageRun,
    MetricInterval,
    ReleaseRegistered,
    RolloutState,
    RuleResult,
    SpanBatch,
    SpanRecord,
)

# Microseconds are set so that the encoding of fractional seconds is pinned too.
TIME = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
LATER = datetime(2026, 1, 2, 3, 9, 5, 123456, tzinfo=UTC)
HASH = "sha256:" + "ab" * 32


def envelope(n: int) -> dict[str, Any]:
    """The envelope fields, fixed and non-default; `n` keeps ids distinct across types."""
    return {
        "id": f"01941f29-7c00-7000-8000-{n:012x}",
        "source": "golden-source",
        "time": TIME,
        "tenant": "acme",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
    }


SAMPLES: dict[str, Event] = {
    e.__class__.__name__: e
    for e in (
        InferenceEvent(
            **envelope(1), app="shop", deployment="web", variant="canary", release="shop-v2", model="gpt-x",
            response_model="gpt-x-2026-01", provider="openai", operation="text_completion", input_tokens=12,
            output_tokens=30, cached_tokens=4, latency_ms=123.5, ttft_ms=45.25, status="error",
            error_type="timeout", finish_reason="length", prompt="héllo ☃ \"quoted\"\n", response="bonjour",
            user_hash="u-5f3a", session_id="s-77", attributes={"k": "v", "ü": "ß"}, scores={"thumbs": 0.75},
        ),
        ArtifactRegistered(
            **envelope(2), kind="eval_suite", name="qa-suite", hash=HASH, size=1024, media_type="application/yaml",
            labels={"team": "search"}, signature="c2lnbmF0dXJl", key_id="key-1",
        ),
        ReleaseRegistered(
            **envelope(3), release="shop-v2", app="shop", artifacts={"dataset/qa": HASH, "prompt/system": HASH},
            parent="shop-v1", description="second release",
        ),
        LineageRun(**envelope(4), run_id="run-1", kind="eval", release="shop-v2", inputs=[HASH], outputs=["run:1"]),
        EvalRequested(
            **envelope(5), run_id="run-1", release="shop-v2", suite=HASH, endpoint="http://127.0.0.1:1/v1",
            model="gpt-x", baseline="shop-v1", policy=HASH, concurrency=3, timeout_s=12.5,
            artifacts={"eval_suite/qa": HASH},
        ),
        EvalCompleted(
            **envelope(6), run_id="run-1", release="shop-v2", suite=HASH, baseline="shop-v1", policy=HASH,
            status="failed", n_cases=100, n_errors=2, metrics={"exact_match": 0.875}, error="2 cases timed out",
            intervals={"exact_match": MetricInterval(estimate=0.875, low=0.8125, high=0.9375, confidence=0.9,
                                                     method="wilson", n=100)},
            baseline_run="run-0",
            comparisons={"exact_match": BaselineComparison(
                metric="exact_match", candidate=0.875, baseline=0.9, diff=-0.025, diff_low=-0.0625, diff_high=0.0125,
                p_value=0.125, effect_size=-0.5, test="mcnemar", n_pairs=100, warning="small sample")},
            warnings=["small sample"], artifacts={"eval_suite/qa": HASH},
        ),
        EvalReran(
            **envelope(6), run_id="run-2", rerun_of="run-1", release="shop-v2", suite=HASH, status="failed",
            n_cases=100, n_errors=1, error="1 case timed out", metrics={"exact_match": 0.625},
            intervals={"exact_match": MetricInterval(estimate=0.625, low=0.5, high=0.75, confidence=0.9,
                                                     method="wilson", n=100)},
            stored_metrics={"exact_match": 0.875},
            stored_intervals={"exact_match": MetricInterval(estimate=0.875, low=0.8125, high=0.9375, confidence=0.9,
                                                            method="wilson", n=100)},
            stored_cases=99, environment={"model": "gpt-x", "seed": "0"}, warnings=["environment changed"],
        ),
        GateDecided(
            **envelope(7), release="shop-v2", decision="NEEDS_REVIEW",
            rules=[RuleResult(rule="quality", metric="exact_match", op=">=", threshold=0.95, observed=0.875,
                              verdict="FAIL", hint="raise accuracy", low=0.8125, high=0.9375, baseline=0.9,
                              dry_run=True, explanation="0.875 < 0.95"),
                   RuleResult(rule="latency", metric="latency_p95_ms", op="<=", threshold=100.5, observed=None,
                              verdict="NO_DATA")],
            eval_run="run-1", policy=HASH, baseline="shop-v1", artifacts={"policy/gate": HASH}, reason="quality",
            signature="c2ln", key_id="key-1", review_required="approver", reviewed_by="alice",
        ),
        GateReview(**envelope(8), release="shop-v2", action="reject", actor="alice", reason="not yet",
                   decision_id="01941f29-7c00-7000-8000-000000000007"),
        RolloutState(**envelope(9), deployment="web", stable_release="shop-v1", canary_release="shop-v2",
                     canary_weight=12.5, phase="progressing", step=2, reason="gate passed",
                     decision_id="01941f29-7c00-7000-8000-000000000007"),
        DriftReport(
            **envelope(10), deployment="web", app="shop", window_start=TIME, window_end=LATER, reference_n=500,
            current_n=250,
            features=[FeatureDrift(feature="latency_ms", psi=0.3125, ks_stat=0.5, ks_pvalue=0.0125,
                                   reference_mean=100.5, current_mean=150.25, drifted=True)],
            drifted=True,
        ),
        CostRecord(
            **envelope(11), app="shop", deployment="web", model="gpt-x", calls=7, input_tokens=300,
            output_tokens=200, cached_tokens=50, cost_usd=0.0125, unpriced_calls=1, price_book=HASH,
            window_start=TIME, window_end=LATER,
        ),
        DeadLetter(**envelope(12), origin="sink", subject="lg.inference.shop", reason="invalid event",
                   error="Expected `str`, got `int` - at `$.app`", payload=b"\x00\xff{not json",
                   headers={"Nats-Msg-Id": "x"}, deliveries=3),
        SpanBatch(**envelope(13), spans=[SpanRecord(
            timestamp=TIME, trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7",
            parent_span_id="00f067aa0ba902b6", trace_state="k=v", name="chat gpt-x", kind="Server",
            service="lockgate-router", resource={"service.name": "lockgate-router"}, scope_name="lockgate",
            scope_version="1", attributes={"gen_ai.request.model": "gpt-x"}, duration_ns=1_500_000,
            status_code="Error", status_message="upstream timeout", events=[(LATER, "exception", {"a": "b"})],
            links=[("5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7", "k=v", {"c": "d"})])]),
        EvalCasesRecorded(**envelope(14), run_id="run-1", release="shop-v2", cases=[EvalCaseResult(
            case_id="c1", repeat=1, input="2+2?", expected="4", output="5", scores={"exact_match": 0.5},
            latency_ms=12.5, input_tokens=3, output_tokens=1, error="wrong", details={"judge": "close"})]),
        GateAudited(
            **envelope(15), release="shop-v2", action="approve", actor="alice", decision="PASS", eval_run="run-1",
            policy=HASH, baseline="shop-v1",
            rules=[RuleResult(rule="quality", metric="exact_match", op=">=", threshold=0.85, observed=0.875,
                              verdict="PASS")],
            reason="approved", signature="c2ln", key_id="key-1",
        ),
        LineageEdges(**envelope(16), event_id="01941f29-7c00-7000-8000-000000000003",
                     edges=[LineageEdge(src=HASH, src_kind="dataset", dst="shop-v2", dst_kind="release",
                                        relation="part_of")]),
        CostLedger(**envelope(17), price_book=HASH, entries=[CostEntry(
            event_id="01941f29-7c00-7000-8000-000000000001", time=TIME, tenant="acme", app="shop", deployment="web",
            release="shop-v2", model="gpt-x", input_tokens=12, output_tokens=30, cached_tokens=4, cost_usd=0.0125,
            priced=True)]),
        AuditEntry(**envelope(18), kind="break_glass", actor="apikey:k1(admin@acme/ops)", target="web",
                   action="promote", reason="incident 42", details={"canary": "shop-v2", "weight": "25.0"}),
        AuditRecord(**envelope(19), seq=7, producer="router", kind="rollout", actor="apikey:k1(operator@acme/ops)",
                    target="web", action="abort", reason="by operator", details={"stable": "shop-v1"},
                    recorded_at=LATER, prev_hash=HASH, hash=HASH, key_id="key-1", signature="c2ln"),
        ApplyRecorded(**envelope(20), directory="/repo/lockgate", commit="0123456789abcdef0123456789abcdef01234567",
                      author="Ann <ann@example.com>", dirty=True, applied_by="ann",
                      changes=[AppliedChange(action="change", kind="release", name="shop", digest=HASH,
                                             previous="sha256:" + "1" * 64, release="shop@0123456789ab",
                                             source="releases/shop.yaml")],
                      unchanged=3),
        BudgetEvent(**envelope(21), reason="over_budget", budget="acme-daily", counter="acme-daily.2026-01-02",
                    period="day", period_id="2026-01-02", app="shop", key_id="k1", deployment="web", model="gpt-x",
                    limit_usd=5.5, limit_tokens=100000, leased_usd=5.25, leased_tokens=99000, requested_usd=0.375,
                    requested_tokens=1500, denied=3, fail_open=True, replica="router-a"),
        InferenceScored(**envelope(22), event_id="01941f29-7c00-7000-8000-000000000001", app="shop",
                        deployment="web", variant="canary", release="shop-v2",
                        scores={"pii_free": 1.0, "length": 7.5}),
        AliasChanged(**envelope(23), seq=2, prev_digest=HASH, actor="ann", key_id="0123456789abcdef",
                     signature="c2lnbmF0dXJl", reason="launch", app="shop", alias="production", release="shop-v2",
                     previous="shop-v1", origin="gitops 0123456789abcdef0123456789abcdef01234567"),
        ArtifactLifecycle(**envelope(24), seq=2, prev_digest=HASH, actor="ann", key_id="0123456789abcdef",
                          signature="c2lnbmF0dXJl", reason="replaced", hash=HASH, successor="sha256:" + "cd" * 32,
                          sunset=LATER),
        AnalysisRun(**envelope(25), deployment="web", release="shop-v2", baseline="shop-v1", template="post-promotion",
                    step=2, look=3, phase="Failed", outcome="rolled back", successes=1, failures=2, inconclusives=1,
                    successes_needed=2, failure_limit=1, error="score:judge: 3 of 40 judge calls timed out", inconclusive_limit=3, canary_n=400, stable_n=410,
                    dry_run=True, metrics=[
                        AnalysisMetric(name="error_rate", verdict="FAILED", condition="<= stable + 0.01",
                                       canary=0.052, stable=0.005, threshold=0.015, bound=0.031, canary_n=400,
                                       stable_n=410, why="significantly above threshold"),
                        AnalysisMetric(name="latency_p95", verdict="SUCCESSFUL", condition="<= stable x 3",
                                       canary=120.0, stable=100.0, threshold=300.0, bound=110.0, canary_n=380,
                                       stable_n=408, dry_run=True)],
                    key_id="0123456789abcdef", signature="c2lnbmF0dXJl"),
    )
}
