"""The drift gate: a policy's drift rules over a live drift report, as rule results and a BLOCK."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from lockgate.contracts import DriftReport, FeatureDrift
from lockgate.errors import PolicyError
from lockgate.services.gatekeeper.domain import parse_policy
from lockgate.services.gatekeeper.drift import decide_drift, drift_results, unjudgeable
from lockgate.services.gatekeeper.driftgate import canary_release, decode_route
from tests.helpers import JETSTREAM_JSON

pytestmark = pytest.mark.timeout(10)
EVAL = [{"metric": "score", "op": ">=", "threshold": 0.8}]


def policy(*drift: dict) -> object:
    return parse_policy({"name": "p", "rules": EVAL, "drift": list(drift)})


def _record(route: dict) -> bytes:
    """A route record as the router writes it (with its deployment and stable, and fields the gate ignores)."""
    return msgspec.json.encode({"deployment": "chat", "stable": {"release": "r1", "endpoint": "default"},
                                "version": 3, **route})


def report(comparison: str = "now_vs_reference", tests: dict[str, float] | None = None,
           reference_start: datetime | None = None, **psi: float) -> DriftReport:
    """A report whose features have these PSIs; `tests` gives some a drift test's p-value (KS, alpha 0.05); its
    reference begins at `reference_start` (None: when its window does)."""
    now = datetime.now(UTC)
    tests = tests or {}
    feats = [FeatureDrift(feature=name.replace("__", ":"), psi=v, ks_stat=0.0, ks_pvalue=1.0, reference_mean=10.0,
                          current_mean=30.0, drifted=v >= 0.2,
                          **({"test": "ks", "statistic": 0.4, "p_value": tests[name], "threshold": 0.05,
                              "test_drifted": tests[name] < 0.05} if name in tests else {}))
             for name, v in psi.items()]
    extra = {"release": "r2", "reference_release": "r1"} if comparison == "canary_vs_stable" else {}
    return DriftReport(served=True, deployment="chat", window_start=now, window_end=now, reference_n=500, current_n=500,
                       features=feats, drifted=any(f.drifted for f in feats), comparison=comparison,  # type: ignore[arg-type]
                       reference_window_start=reference_start or now, reference_window_end=now, **extra)


def test_feature_over_max_psi_blocks_naming_the_feature_and_rule() -> None:
    out = decide_drift(policy({"kind": "drift", "max_psi": 0.1}), report(output_tokens=0.15, latency_ms=0.02))
    assert out is not None and out.decision == "BLOCK"
    assert "drift psi <= 0.1" in out.reason and "DRIFT in output_tokens (PSI 0.15, mean 10 -> 30)" in out.reason
    assert "latency_ms" not in out.reason and "deployment 'chat'" in out.reason
    (r,) = out.rules
    assert (r.verdict, r.metric, r.observed, r.threshold) == ("FAIL", "drift_psi:output_tokens", 0.15, 0.1)


def test_within_threshold_is_no_new_decision() -> None:
    p = policy({"max_psi": 0.3})
    assert decide_drift(p, report(output_tokens=0.25)) is None
    (r,) = drift_results(p, report(output_tokens=0.25))
    assert r.verdict == "PASS" and "largest PSI 0.25 (output_tokens) within max_psi 0.3" in r.hint


def test_feature_filter_globs_names_and_categorical_features() -> None:
    p = policy({"max_psi": 0.1, "features": ["finish_reason"]}, {"max_psi": 0.1, "features": ["error_type:*"]})
    out = decide_drift(p, report(output_tokens=0.9, finish_reason__length=0.4, error_type__timeout=0.05))
    assert out is not None
    failed = [r for r in out.rules if r.verdict == "FAIL"]
    assert [r.rule for r in failed] == ["drift psi <= 0.1 on finish_reason"]
    assert "finish_reason:length (PSI 0.4, share" in out.reason and "output_tokens" not in out.reason


def test_no_matching_feature_is_no_data_and_never_blocks() -> None:
    p = policy({"max_psi": 0.1, "features": ["ttft_ms"]})
    assert decide_drift(p, report(output_tokens=0.9)) is None
    assert drift_results(p, report(output_tokens=0.9))[0].verdict == "NO_DATA"


def test_dry_run_rule_reports_but_does_not_block() -> None:
    p = policy({"max_psi": 0.1, "dry_run": True})
    assert decide_drift(p, report(output_tokens=0.9)) is None
    assert drift_results(p, report(output_tokens=0.9))[0].verdict == "FAIL"


def test_policy_without_drift_rules_never_decides_on_drift() -> None:
    assert decide_drift(parse_policy({"name": "p", "rules": EVAL}), report(output_tokens=5.0)) is None


@pytest.mark.parametrize(("rule", "message"), [
    ({"max_psi": 0}, "Expected `float` > 0.0 - at `$.drift[0].max_psi`"),
    ({"max_psi": 0.1, "kind": "metric"}, "Invalid enum value 'metric' - at `$.drift[0].kind`"),
    ({"max_psi": 0.1, "feature": "x"}, "unknown field `feature` - at `$.drift[0]`"),
    ({"features": ["output_tokens"]}, "a drift rule needs max_psi, test: true, or both - at `$.drift[0]`"),
    ({"max_psi": 0.1, "compare": "canary"}, "Invalid enum value 'canary' - at `$.drift[0].compare`"),
])
def test_malformed_drift_rules_name_the_field(rule: dict, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy(rule)
    assert message in err.value.message


@pytest.mark.parametrize(("route", "release"), [
    ({"canary": {"release": "r2"}, "phase": "promoted", "verifying": True, "promoted_at": 0}, "r2"),
    ({"canary": {"release": "r2"}, "phase": "promoted", "verifying": True, "promoted_at": 4e9}, ""),  # predates it
    ({"canary": {"release": "r2"}, "phase": "promoted", "verifying": False}, ""),  # promoted: no canary now
    # A canary with a stable arm: the deployment's window is mostly stable's traffic, moved by what clients ask.
    # Before, a probe's client asked other questions and had a healthy canary BLOCKed (for good) on this report.
    ({"canary": {"release": "r2"}, "phase": "progressing", "started_at": 0}, ""),
    ({"canary": {"release": "r2"}, "phase": "idle"}, ""),  # waiting for its decision, no traffic
    ({"phase": "idle"}, ""),
])
def test_a_now_vs_reference_report_is_evidence_about_a_release_under_post_promotion_analysis_only(
        route: dict, release: str) -> None:
    assert canary_release(decode_route(_record(route)), report(output_tokens=0.5)) == release


@pytest.mark.parametrize("reference_start", [datetime.fromtimestamp(999, UTC), None])
def test_a_now_vs_reference_report_whose_reference_predates_the_promotion_is_no_evidence(
        reference_start: datetime | None) -> None:
    """Its reference holds the previous release's traffic, or it names none (probe p69 F2: a steady release was
    BLOCKed or rolled back against its predecessor's answers)."""
    route = decode_route(_record({"canary": {"release": "r2"}, "phase": "promoted", "verifying": True,
                                  "promoted_at": 1000}))
    r = report(output_tokens=0.5, reference_start=reference_start)
    if reference_start is None:
        r = msgspec.structs.replace(r, reference_window_start=None)
    assert canary_release(route, r) == ""


@pytest.mark.parametrize(("route", "release"), [
    ({"canary": {"release": "r3"}, "phase": "progressing", "started_at": 0}, "r3"),
    ({"canary": {"release": "r3"}, "phase": "progressing", "started_at": 4e9}, ""),  # the report predates it
    ({"canary": {"release": "r3"}, "phase": "promoted", "verifying": True}, ""),  # no stable arm to compare with
    ({"canary": {"release": "r3"}, "phase": "idle"}, ""),
])
def test_a_canary_vs_stable_report_naming_no_release_is_about_the_live_canary(route: dict, release: str) -> None:
    unnamed = msgspec.structs.replace(report("canary_vs_stable", output_tokens=0.5), release="")
    assert canary_release(decode_route(_record(route)), unnamed) == release


def test_a_rule_can_target_canary_versus_stable_reports_only() -> None:
    p = policy({"max_psi": 0.1, "compare": "canary_vs_stable", "features": ["output_tokens"]})
    assert p.drift[0].name == "drift psi <= 0.1 on output_tokens (canary_vs_stable)"  # type: ignore[attr-defined]
    assert decide_drift(p, report(output_tokens=0.9)) is None  # a now-vs-reference report: not this rule's
    assert drift_results(p, report(output_tokens=0.9)) == ()
    out = decide_drift(p, report("canary_vs_stable", output_tokens=0.9))
    assert out is not None and out.decision == "BLOCK"
    assert "deployment 'chat' (canary vs stable)" in out.reason
    assert "canary r2: 500 events against 500 of stable r1" in out.reason
    # a rule without `compare` (as before) judges both kinds
    assert decide_drift(policy({"max_psi": 0.1}), report("canary_vs_stable", output_tokens=0.9)) is not None


def test_a_test_rule_fails_on_the_feature_s_own_drift_test() -> None:
    p = policy({"test": True, "features": ["response_text"]})
    assert p.drift[0].name == "drift no test drift on response_text"  # type: ignore[attr-defined]
    calm = report(tests={"response_text": 0.3}, response_text=0.0, output_tokens=0.9)
    assert decide_drift(p, calm) is None
    assert drift_results(p, calm)[0].hint == "no drift test found drift in 1 matching feature(s)"
    out = decide_drift(p, report(tests={"response_text": 0.005}, response_text=0.0))
    assert out is not None
    (r,) = out.rules
    assert (r.verdict, r.metric, r.observed, r.threshold) == ("FAIL", "drift_test:response_text", 0.005, 0.05)
    assert "DRIFT in response_text (PSI 0, mean 10 -> 30; ks p 0.005 < 0.05) over its drift test" in out.reason
    both = policy({"max_psi": 0.5, "test": True})
    assert decide_drift(both, report(tests={"output_tokens": 0.01}, output_tokens=0.05)) is not None


def test_a_canary_versus_stable_report_is_evidence_about_the_release_it_names() -> None:
    aborted = decode_route(_record({"canary": {"release": "r2"}, "phase": "aborted"}))
    assert canary_release(aborted, report("canary_vs_stable", output_tokens=0.5)) == "r2"
    assert canary_release(None, report("canary_vs_stable", output_tokens=0.5)) == "r2"
    assert canary_release(None, report(output_tokens=0.5)) == ""
    # events that named no release (an SDK's): the route's live canary
    unnamed = msgspec.structs.replace(report("canary_vs_stable", output_tokens=0.5), release="")
    live = decode_route(_record({"canary": {"release": "r3"}, "phase": "progressing"}))
    assert (canary_release(live, unnamed), canary_release(aborted, unnamed)) == ("r3", "")


def test_a_rule_naming_no_feature_judges_the_answers_not_what_clients_send() -> None:
    # Before: a rule without `features` judged every feature, so a client sending long prompts (input_tokens,
    # prompt_text) had a release BLOCKed and rolled back. Such a feature is judged only by a rule that names it.
    moved = report(input_tokens=3.4, prompt_text=0.0, output_tokens=0.01, tests={"prompt_text": 1e-9})
    assert decide_drift(policy({"max_psi": 0.2, "test": True}), moved) is None
    named = decide_drift(policy({"max_psi": 0.2, "features": ["input_tokens"]}), moved)
    assert named is not None and named.decision == "BLOCK" and "DRIFT in input_tokens" in named.reason
    texts = decide_drift(policy({"test": True, "features": ["prompt_*"]}), moved)
    assert texts is not None and "prompt_text" in texts.reason


def _moved(feature: str, ref: float, cur: float, psi: float = 13.8) -> DriftReport:
    """A canary-versus-stable report in which one feature moved from `ref` to `cur` (drifted, by PSI and test)."""
    f = FeatureDrift(feature=feature, psi=psi, ks_stat=0.0, ks_pvalue=1.0, reference_mean=ref, current_mean=cur,
                     drifted=True, test="chi_squared", statistic=50.0, p_value=1e-12, threshold=0.05, test_drifted=True)
    return msgspec.structs.replace(report("canary_vs_stable"), features=[f], drifted=True)


README_RULE = {"max_psi": 0.1, "features": ["output_tokens", "finish_reason:*"]}  # the README's example
HARMLESS = [  # (feature, stable's share or mean, the canary's)
    ("model:sim-good", 0.0, 1.0),  # the canary serves its own model: the rollout itself
    ("finish_reason:stop", 0.698, 1.0),  # more answers end normally (fewer cut off by max_tokens)
    ("error_type:timeout", 0.2, 0.0),  # fewer errors
    ("error_type:(none)", 0.8, 1.0),  # more answers without one
    ("status:ok", 0.9, 1.0),
    ("latency_ms", 300.0, 180.0),  # faster
    ("latency_ms", 300.0, 310.0),  # slower by less than anyone notices
]


@pytest.mark.parametrize(("feature", "ref", "cur"), HARMLESS)
@pytest.mark.parametrize("rule", [{"max_psi": 0.2}, {"test": True}, README_RULE | {"features": ["*"]}])
def test_harmless_drift_never_blocks_a_canary(rule: dict, feature: str, ref: float, cur: float) -> None:
    # Before (probe p61 F2): a rule judged every matching feature whichever way it moved, so a canary differing
    # from stable only by its model name (PSI 13.8), or whose answers ended normally more often, got a signed BLOCK
    # and was rolled back, while the router's abort and `drift` metric (driftharm.harmless) let it through.
    moved = _moved(feature, ref, cur)
    assert decide_drift(policy(rule), moved) is None
    (r,) = drift_results(policy(rule), moved)
    assert r.verdict == "PASS" and r.hint.startswith(f"no harmful drift: {feature} (PSI 13.8")


def test_the_readme_rule_passes_a_canary_that_fixes_truncation() -> None:
    assert decide_drift(policy(README_RULE), _moved("finish_reason:stop", 0.698, 1.0)) is None


@pytest.mark.parametrize(("feature", "ref", "cur"), [
    ("error_type:timeout", 0.0, 0.2),  # more errors
    ("error_type:(none)", 1.0, 0.8),
    ("finish_reason:length", 0.02, 0.6),  # answers cut off
    ("finish_reason:stop", 1.0, 0.698),  # fewer end normally
    ("status:error", 0.0, 0.1),
    ("latency_ms", 300.0, 300.0 + 26.0),  # slower than MATERIAL_LATENCY_MS
    ("output_tokens", 48.0, 151.0),  # either way: no direction is better
    ("output_tokens", 151.0, 48.0),
])
def test_harmful_drift_still_blocks(feature: str, ref: float, cur: float) -> None:
    out = decide_drift(policy({"max_psi": 0.2}, README_RULE | {"features": ["*"], "test": True}),
                       _moved(feature, ref, cur))
    assert out is not None and out.decision == "BLOCK" and f"DRIFT in {feature} (PSI 13.8" in out.reason
    assert [r.verdict for r in out.rules] == ["FAIL", "FAIL"]


def test_harmless_drift_beside_harmful_drift_blocks_naming_only_the_harmful() -> None:
    both = msgspec.structs.replace(_moved("model:sim-good", 0.0, 1.0), features=[
        *_moved("model:sim-good", 0.0, 1.0).features, *_moved("finish_reason:length", 0.0, 0.5, psi=2.0).features])
    out = decide_drift(policy({"max_psi": 0.2}), both)
    assert out is not None and "DRIFT in finish_reason:length (PSI 2" in out.reason and "model" not in out.reason


@pytest.mark.parametrize("shape", sorted(JETSTREAM_JSON))
def test_jetstream_json_under_a_route_key_is_no_route(shape: str) -> None:
    # Before: every field had a default, so JetStream's acknowledgement or API answer aimed at the key read as a
    # route without a canary, and a drift report about the live canary went unjudged.
    with pytest.raises(msgspec.ValidationError, match="missing required field"):
        decode_route(JETSTREAM_JSON[shape])
    with pytest.raises(msgspec.DecodeError):
        decode_route(b"")


def test_a_release_whose_decision_is_unreadable_is_blocked_saying_why() -> None:
    out = unjudgeable(report(output_tokens=0.5), "r2", "the decision of 'r2' in KV lg_gates is unreadable: x")
    assert out.decision == "BLOCK"
    assert [(r.verdict, r.rule) for r in out.rules] == [("FAIL", "stored decision readable")]
    assert "about 'r2', unjudged: the decision of 'r2' in KV lg_gates is unreadable" in out.reason
