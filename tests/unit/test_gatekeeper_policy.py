"""Policy validation of the new rule kinds, limits and review triggers; review transitions."""

from __future__ import annotations

import pytest

from lockgate.contracts import BaselineComparison, GateDecided, GateReview
from lockgate.errors import PolicyError
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.review import apply_review, review_reasons

pytestmark = pytest.mark.timeout(10)


def doc(rule: dict | None = None, **extra: object) -> dict:
    return {"name": "p", "rules": [rule or {"metric": "m", "op": ">=", "threshold": 1}], **extra}


@pytest.mark.parametrize(("raw", "message"), [
    (doc({"metric": "m", "relative": {}}), "expected exactly one of min_change or max_regression - at `$.rules[0].relative`"),
    (doc({"metric": "m", "relative": {"max_regression": -1}}), "Expected `float` >= 0.0 - at `$.rules[0].relative.max_regression`"),
    (doc({"metric": "m", "relative": {"min_change": 0.1, "better": "up"}}), "Invalid enum value 'up' - at `$.rules[0].relative.better`"),
    (doc({"metric": "m", "relative": {"min_change": 0.1, "mode": "pct"}}), "Invalid enum value 'pct' - at `$.rules[0].relative.mode`"),
    (doc({"metric": "m", "non_inferiority": {"better": "higher"}}), "missing required field `margin` - at `$.rules[0].non_inferiority`"),
    (doc({"metric": "m", "non_inferiority": {"margin": 1}, "relative": {"min_change": 1}}), "not both - at `$.rules[0]`"),
    (doc({"metric": "m", "op": ">=", "threshold": 1, "hard": "yes"}), "Expected `bool`, got `str` - at `$.rules[0].hard`"),
    (doc({"metric": "m", "op": ">=", "threshold": 1, "dry_run": 1}), "Expected `bool`, got `int` - at `$.rules[0].dry_run`"),
    (doc({"metric": "m", "op": ">=", "threshold": 1, "no_data": "skip"}), "Invalid enum value 'skip' - at `$.rules[0].no_data`"),
    (doc(limits={"max_failures": -1}), "Expected `int` >= 0 - at `$.limits.max_failures`"),
    (doc(limits={"max_fail": 1}), "unknown field `max_fail` - at `$.limits`"),
    (doc(limits=[1]), "Expected `object`, got `array` - at `$.limits`"),
    (doc(review={"require_when": []}), "Expected `array` of length >= 1 - at `$.review.require_when`"),
    (doc(review={"require_when": [{"metric_moved": "safety.*"}]}), "metric_moved needs `by`, the smallest move that requires review - at `$.review.require_when[0]`"),
    (doc(review={"require_when": [{"artifact_changed": ""}]}), "Expected `str` of length >= 1 - at `$.review.require_when[0].artifact_changed`"),
    (doc(review={"require_when": [{"prompt": "x"}]}), "unknown field `prompt` - at `$.review.require_when[0]`"),
])
def test_malformed_policies_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        domain.parse_policy(raw)
    assert message in err.value.message


def test_full_policy_parses() -> None:
    p = domain.parse_policy({
        "name": "release", "version": 3, "limits": {"max_inconclusive": 1},
        "rules": [{"name": "acc", "metric": "exact_match", "relative": {"max_regression": 0.02}},
                  {"metric": "safety.pii", "op": "<=", "threshold": 0, "hard": True},
                  {"metric": "cost_usd_per_case", "op": "<=", "threshold": 0.01, "dry_run": True},
                  {"metric": "score", "non_inferiority": {"margin": 0.05, "better": "higher"}}],
        "review": {"require_when": [{"metric_moved": "safety.*", "by": 0.01}, {"artifact_changed": "prompt/*"}]}})
    assert p.version == "3" and p.limits == domain.Limits(max_inconclusive=1)
    assert [(r.name, r.kind) for r in p.rules] == [
        ("acc", "relative"), ("safety.pii <= 0", "absolute"), ("cost_usd_per_case <= 0.01", "absolute"),
        ("score non_inferiority", "non_inferiority")]
    assert p.rules[1].hard and p.rules[2].dry_run and len(p.review.require_when) == 2


def test_review_triggers() -> None:
    p = domain.parse_policy(doc(review={"require_when": [{"metric_moved": "safety.*", "by": 0.01},
                                                         {"artifact_changed": "prompt/*"}]}))
    moved = {"safety.pii": BaselineComparison(metric="safety.pii", candidate=0.02, baseline=0.0, diff=0.02),
             "score": BaselineComparison(metric="score", candidate=0.5, baseline=0.9, diff=-0.4)}
    same = {"prompt/system": "sha256:a", "dataset/qa": "sha256:d"}
    assert review_reasons(p.review.require_when, {}, same, same) == []
    assert review_reasons(p.review.require_when, moved, same, same) == ["metric_moved safety.* by >= 0.01: safety.pii moved +0.02"]
    changed = review_reasons(p.review.require_when, {}, {**same, "prompt/system": "sha256:b"}, same)
    assert changed == ["artifact_changed prompt/*: prompt/system"]
    assert review_reasons(p.review.require_when, {}, same, None) == ["artifact_changed prompt/*: prompt/system (baseline unknown)"]


def pending(decision: str = "NEEDS_REVIEW") -> GateDecided:
    return GateDecided(release="v2", decision=decision, rules=[], review_required="prompt changed", eval_run="e1")


def test_approve_and_reject_a_pending_decision() -> None:
    cur = pending()
    ok = apply_review(cur, GateReview(release="v2", action="approve", actor="ann", reason="read it"), "new-1")
    assert ok.action == "approved" and ok.decision is not None
    assert (ok.decision.decision, ok.decision.reviewed_by, ok.decision.id, ok.decision.eval_run) == (
        "PASS", "ann", "new-1", "e1")
    no = apply_review(cur, GateReview(release="v2", action="reject", actor="bob", reason="too risky"), "new-2")
    assert (no.action, no.decision.decision) == ("rejected", "BLOCK") and "bob: too risky" in no.reason


def test_approve_without_pending_review_is_refused_and_reject_is_an_override() -> None:
    blocked = pending("BLOCK")
    refused = apply_review(blocked, GateReview(release="v2", action="approve", actor="ann", reason="ship"), "n")
    assert refused.decision is None and refused.action == "refused" and "is BLOCK, not NEEDS_REVIEW" in refused.reason
    veto = apply_review(pending("PASS"), GateReview(release="v2", action="reject", actor="ann", reason="no"), "n")
    assert veto.action == "override" and veto.decision.decision == "BLOCK" and "warning" in veto.reason
    stale = apply_review(pending(), GateReview(release="v2", action="approve", actor="a", reason="r",
                                               decision_id="old"), "n")
    assert stale.decision is None and "latest is" in stale.reason
    assert apply_review(None, GateReview(release="v2", action="approve", actor="a", reason="r"), "n").action == "refused"
