"""Policy validation of the new rule kinds, limits and review triggers; review transitions."""

from __future__ import annotations

import hashlib
import math

import msgspec
import pytest

from lockgate.contracts import BaselineComparison, GateDecided, GateReview
from lockgate.errors import PolicyError
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.policy import parse_policy
from lockgate.services.gatekeeper.review import ReviewRules, apply_review, review_action, review_reasons

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
    (doc(review={"approvals": 0}), "Expected `int` >= 1 - at `$.review.approvals`"),
    (doc(review={"require_when": [{"metric_moved": "safety.*"}]}), "metric_moved needs `by`, the smallest move that requires review - at `$.review.require_when[0]`"),
    (doc(review={"require_when": [{"artifact_changed": ""}]}), "Expected `str` of length >= 1 - at `$.review.require_when[0].artifact_changed`"),
    (doc(review={"require_when": [{"prompt": "x"}]}), "unknown field `prompt` - at `$.review.require_when[0]`"),
])
def test_malformed_policies_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        domain.parse_policy(raw)
    assert message in err.value.message


@pytest.mark.parametrize(("raw", "message"), [
    # Every number of a policy finite (probe p68 F1: msgspec took inf for `ge=0`, and a slice rule's -inf threshold made
    # a decision no reader decoded), named by its path; an integer past a float's range alike.
    (doc({"metric": "m", "slices": {"max_regression": math.inf}}),
     "max_regression must be a finite number, got inf - at `$.rules[0].slices.max_regression`"),
    (doc({"metric": "m", "relative": {"max_regression": math.inf}}),
     "max_regression must be a finite number, got inf - at `$.rules[0].relative.max_regression`"),
    (doc({"metric": "m", "relative": {"min_change": -math.inf}}),
     "min_change must be a finite number, got -inf - at `$.rules[0].relative.min_change`"),
    (doc({"metric": "m", "non_inferiority": {"margin": math.inf}}),
     "margin must be a finite number, got inf - at `$.rules[0].non_inferiority.margin`"),
    (doc({"metric": "m", "max_count": 10 ** 400}),
     "max_count must be a finite number, got an integer of 401 digits - at `$.rules[0].max_count`"),
    (doc(review={"require_when": [{"metric_moved": "m", "by": math.inf}]}),
     "by must be a finite number, got inf - at `$.review.require_when[0].by`"),
    (doc(drift=[{"max_psi": math.inf}]), "max_psi must be a finite number, got inf - at `$.drift[0].max_psi`"),
    (doc(limits={"max_failures": 10 ** 400}),
     "max_failures must be a finite number, got an integer of 401 digits - at `$.limits.max_failures`"),
])
def test_a_number_json_cannot_carry_is_refused_naming_its_path(raw: dict, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(raw)
    assert err.value.message == f"policy: {message}"


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


def pending(decision: str = "NEEDS_REVIEW", approvals: tuple[str, ...] = ()) -> GateDecided:
    return GateDecided(id="d1", release="v2", decision=decision, rules=[], review_required="prompt changed",
                       eval_run="e1", approvals=list(approvals))


def review(action: str = "approve", decision_id: str = "d1", actor: str = "") -> GateReview:
    # `actor` is only what the payload claims; apply_review is told the verified reviewer separately.
    return GateReview(release="v2", action=action, actor=actor, reason="read it", decision_id=decision_id)


def test_approve_and_reject_a_pending_decision() -> None:
    cur = pending()
    ok = apply_review(cur, review(actor="mallory"), "new-1", reviewer="ann")
    assert ok.action == "approved" and ok.decision is not None
    assert (ok.decision.decision, ok.decision.reviewed_by, ok.decision.id, ok.decision.eval_run) == (
        "PASS", "ann", "new-1", "e1")
    assert ok.decision.approvals == ["ann"] and "mallory" not in ok.reason  # the claim is never believed
    no = apply_review(cur, review("reject"), "new-2", reviewer="bob")
    assert (no.action, no.decision.decision) == ("rejected", "BLOCK") and "bob: read it" in no.reason


def test_the_audit_action_of_a_stored_review_decision_is_read_back_from_it() -> None:
    # A review redelivered after its decision was stored is audited then, by what the decision says.
    outcomes = [apply_review(pending(), review(), "a", reviewer="ann"),
                apply_review(pending(), review(), "b", reviewer="ann", rules=ReviewRules(approvals=2)),
                apply_review(pending(), review("reject"), "c", reviewer="bob"),
                apply_review(pending("PASS"), review("reject"), "d", reviewer="bob")]
    assert [o.action for o in outcomes] == ["approved", "approved", "rejected", "override"]
    assert [review_action(o.decision) for o in outcomes if o.decision] == [o.action for o in outcomes]


def test_approve_without_pending_review_is_refused_and_reject_is_an_override() -> None:
    refused = apply_review(pending("BLOCK"), review(), "n", reviewer="ann")
    assert refused.decision is None and refused.action == "refused" and "is BLOCK, not NEEDS_REVIEW" in refused.reason
    veto = apply_review(pending("PASS"), review("reject"), "n", reviewer="ann")
    assert veto.action == "override" and veto.decision.decision == "BLOCK" and "warning" in veto.reason
    stale = apply_review(pending(), review(decision_id="old"), "n", reviewer="ann")
    assert stale.decision is None and "names decision old, but the latest is d1" in stale.reason
    unnamed = apply_review(pending(), review(decision_id=""), "n", reviewer="ann")  # could be replayed anywhere
    assert unnamed.decision is None and "names no decision" in unnamed.reason
    assert apply_review(None, review(), "n", reviewer="ann").action == "refused"


def test_n_distinct_approvers_are_needed_and_the_same_one_counts_once() -> None:
    two = ReviewRules(approvals=2)
    first = apply_review(pending(), review(), "d2", reviewer="ann", rules=two)
    assert first.decision is not None and first.decision.decision == "NEEDS_REVIEW"
    assert first.decision.approvals == ["ann"] and "1 of 2 distinct approvers" in first.reason
    again = apply_review(first.decision, review(decision_id="d2"), "d3", reviewer="ann", rules=two)
    assert again.decision is None and again.action == "refused" and "ann already approved" in again.reason
    second = apply_review(first.decision, review(decision_id="d2"), "d3", reviewer="bob", rules=two)
    assert second.decision is not None and second.decision.decision == "PASS"
    assert second.decision.approvals == ["ann", "bob"] and second.decision.reviewed_by == "bob"
    veto = apply_review(first.decision, review("reject", decision_id="d2"), "d3", reviewer="cy", rules=two)
    assert veto.decision is not None and veto.decision.decision == "BLOCK"  # any one reject blocks


@pytest.mark.parametrize(("author", "reviewer", "allowed"), [
    ("ann", "ann", False), ("ann", "bob", True), (None, "bob", False)])
def test_forbidden_self_approval_needs_a_known_author_other_than_the_reviewer(
        author: str | None, reviewer: str, allowed: bool) -> None:
    rules = ReviewRules(forbid_self_approval=True)
    out = apply_review(pending(), review(), "n", reviewer=reviewer, rules=rules, author=author)
    assert (out.decision is not None) == allowed
    if not allowed:
        assert out.action == "refused" and ("is the author" in out.reason or "author of v2 is unknown" in out.reason)
    # without the rule the author may approve, and a reject by the author is always allowed
    assert apply_review(pending(), review(), "n", reviewer="ann", author="ann").decision is not None
    assert apply_review(pending(), review("reject"), "n", reviewer="ann", rules=rules, author="ann").decision


def test_review_section_sets_approvals_and_self_approval() -> None:
    p = parse_policy({"name": "p", "rules": [{"metric": "m", "op": ">=", "threshold": 1}],
                      "review": {"approvals": 2, "forbid_self_approval": True}})
    assert ReviewRules.of(p.review) == ReviewRules(2, True) and ReviewRules.of(None) == ReviewRules(1, False)
    with pytest.raises(PolicyError, match="approvals"):
        parse_policy({"name": "p", "rules": [{"metric": "m", "op": ">=", "threshold": 1}],
                      "review": {"approvals": 0}})


# A person's reject stands over later evals of the same content (domain.standing_veto): before, any operator
# re-ran the eval of a rejected release and the gatekeeper signed a PASS over the veto.
ARTS = {"prompt/system": "sha256:a", "model_config/m": "sha256:c"}


def decided(decision: str, *, by: str = "", arts: dict | None = None, rules: list | None = None) -> GateDecided:
    return GateDecided(id="d1", release="v2", decision=decision, rules=rules or [], reviewed_by=by,
                       reason=f"override: rejected by {by}: tone regressed" if by else "x",
                       artifacts={**(ARTS if arts is None else arts), "policy": "sha256:p", "eval_suite": "sha256:s"})


def test_a_persons_reject_stands_over_a_new_eval_of_the_same_content_and_is_carried_on() -> None:
    veto = domain.standing_veto(decided("BLOCK", by="carol"), ARTS)
    assert veto is not None and (veto.rule, veto.verdict) == ("vetoed", "FAIL")
    assert veto.hint.startswith("release 'v2' was rejected by carol (decision d1: override: rejected by carol: "
                                "tone regressed); a new eval of the same content does not lift a reject")
    passed = domain.Outcome("PASS", (), "all 2 rules of policy 'p' passed")
    held = domain.under_veto(passed, veto)
    assert held.decision == "NEEDS_REVIEW" and held.rules[-1] == veto
    assert held.reason.startswith("release 'v2' was rejected by carol") and "carol" in held.review_required
    blocked = domain.under_veto(domain.Outcome("BLOCK", (), "accuracy failed"), veto)
    assert blocked.decision == "BLOCK" and blocked.reason.startswith("accuracy failed; release 'v2' was rejected")
    # The NEEDS_REVIEW (or BLOCK) it leads to carries it: the eval after it is held the same way.
    carried = decided("NEEDS_REVIEW", rules=list(held.rules))
    assert domain.standing_veto(carried, ARTS) == veto
    # Other content (another binding) is judged afresh, and so is a release nobody rejected.
    assert domain.standing_veto(decided("BLOCK", by="carol"), {**ARTS, "prompt/system": "sha256:b"}) is None
    assert domain.standing_veto(decided("BLOCK"), ARTS) is None
    assert domain.standing_veto(None, ARTS) is None
    assert domain.under_veto(passed, None) == passed
    # A current decision that cannot be read may hide a reject: held too.
    unread = domain.standing_veto(None, ARTS, unreadable="not a decision")
    assert unread is not None and unread.rule == "vetoed" and "cannot be read (not a decision)" in unread.hint


def test_an_approval_lifts_the_veto_and_an_approved_pass_binds_nothing() -> None:
    held = GateDecided(id="d1", release="v2", decision="NEEDS_REVIEW", review_required="vetoed",
                       rules=[domain.standing_veto(decided("BLOCK", by="carol"), ARTS)], artifacts=ARTS)
    half = apply_review(held, review(), "d2", reviewer="ann", rules=ReviewRules(approvals=2)).decision
    assert half is not None and half.decision == "NEEDS_REVIEW"
    assert domain.standing_veto(half, ARTS) is not None  # one of two approvals: the veto still stands
    passed = apply_review(half, review(decision_id="d2"), "d3", reviewer="bob", rules=ReviewRules(approvals=2))
    assert passed.decision is not None and passed.decision.decision == "PASS"
    [lifted] = passed.decision.rules
    assert (lifted.rule, lifted.verdict) == ("vetoed", "PASS") and lifted.hint.startswith(
        "lifted by the approval of ann, bob: release 'v2' was rejected by carol")
    assert domain.standing_veto(passed.decision, ARTS) is None  # the next eval is judged afresh
    # ... unless an approval that lifted it no longer counts (bob's key revoked: it leaked): the veto stands again,
    # or re-running the eval (which the refusal of the PASS advises) signed a clean PASS over carol's reject.
    again = domain.standing_veto(passed.decision, ARTS, withdrawn={"bob": "bob's key k2 is revoked"})
    assert again is not None and (again.rule, again.verdict) == ("vetoed", "FAIL")
    assert "lifted by approvals that no longer count (bob's key k2 is revoked)" in again.hint
    assert domain.standing_veto(passed.decision, ARTS, withdrawn={"dan": "not one of its approvers"}) is None
    # A reject of it again blocks and stands again.
    again = apply_review(passed.decision, review("reject", decision_id="d3"), "d4", reviewer="carol").decision
    assert again is not None and domain.standing_veto(again, ARTS) is not None


def test_a_veto_reaching_back_remakes_every_pass_of_its_content_and_leaves_what_carries_a_veto() -> None:
    # Probe fs: a PASS that lifted a veto by an approval that no longer counts stands under that veto again
    # (standing_veto), yet it is a PASS: the reach-back must remake it NEEDS_REVIEW, not leave it as "under a veto".
    digest = domain.content_digest(ARTS)
    veto = domain.standing_veto(decided("BLOCK", by="carol"), ARTS)
    held = GateDecided(id="d1", release="v2", decision="NEEDS_REVIEW", rules=[veto], artifacts=ARTS)
    passed = apply_review(held, review(), "d2", reviewer="bob").decision
    assert passed is not None and passed.decision == "PASS"
    assert domain.standing_veto(passed, ARTS, withdrawn={"bob": "bob's key k2 is revoked"}) is not None
    assert domain.reached_by_veto(passed, "default", digest)
    assert domain.reached_by_veto(decided("PASS"), "default", digest)
    assert domain.reached_by_veto(decided("NEEDS_REVIEW"), "default", digest)  # held for another reason: the veto joins
    assert domain.reached_by_veto(decided("BLOCK"), "default", digest)  # stays a BLOCK, gaining the veto's rule
    # Left as they are: what carries a veto already (a redelivery), another tenant's, other content.
    assert not domain.reached_by_veto(held, "default", digest)
    assert not domain.reached_by_veto(decided("BLOCK", by="carol"), "default", digest)
    assert not domain.reached_by_veto(decided("PASS"), "acme", digest)
    assert not domain.reached_by_veto(decided("PASS", arts={**ARTS, "prompt/system": "sha256:b"}), "default", digest)


# A veto binds the content, not the name (probe p3): before, the same artifact versions registered under a new name
# got a fresh PASS over a person's reject.


def test_the_content_digest_is_what_the_release_serves_whatever_the_order_suite_or_policy() -> None:
    digest = domain.content_digest(decided("BLOCK").artifacts)
    assert digest == hashlib.sha256(b"model_config=sha256:c\nprompt=sha256:a").hexdigest()
    assert domain.content_digest(dict(reversed(ARTS.items()))) == digest  # the suite and policy are no content
    assert domain.content_digest({**ARTS, "policy": "sha256:other"}) == digest
    assert domain.content_digest({**ARTS, "prompt/system": "sha256:b"}) != digest  # one artifact differs
    assert domain.content_digest({**ARTS, "tool/search": "sha256:t"}) != digest  # one more served
    assert domain.content_digest({"policy": "sha256:p"}) == domain.content_digest({}) == ""  # nothing to bind


# Probe p7: the same bytes under another artifact name, or a release listing fewer (or more) artifacts that are not
# served, escaped a person's reject: the digest hashed the labels and every artifact the release listed.
@pytest.mark.parametrize("arts", [
    {"prompt/system-x": "sha256:a", "model_config/m": "sha256:c"},  # another label, the same bytes
    {"prompt/system": "sha256:a", "model_config/other": "sha256:c"},
    {**ARTS, "prompt/extra": "sha256:a"},  # the same bytes under two labels
    {**ARTS, "policy/shop-release-policy": "sha256:p", "eval_suite/qa": "sha256:s", "dataset/qa": "sha256:d"},
    {**ARTS, "dataset/other": "sha256:d2"},  # what it is judged on and by is no content
])
def test_the_content_digest_ignores_labels_and_what_is_not_served(arts: dict[str, str]) -> None:
    assert domain.content_digest(arts) == domain.content_digest(ARTS)
    veto = domain.standing_veto(decided("BLOCK", by="carol"), arts)
    assert veto is not None and veto.hint.startswith("release 'v2' was rejected by carol")


def test_a_vetoes_key_is_its_tenants_and_the_key_of_before_is_the_labelled_set() -> None:
    key = domain.veto_key("default", ARTS)
    assert key == hashlib.sha256(f"tenant=default\n{domain.content_digest(ARTS)}".encode()).hexdigest()
    assert domain.veto_key("default", {"prompt/x": "sha256:a", "model_config/m": "sha256:c", "policy/p": "h"}) == key
    assert domain.veto_key("acme", ARTS) != key  # tenants are isolated
    assert domain.veto_key("default", {"policy/p": "sha256:p"}) == ""
    # What a gatekeeper of before recorded vetoes under: still read, so an upgrade keeps them.
    assert domain.legacy_veto_key({**ARTS, "policy": "sha256:p"}) == hashlib.sha256(
        b"model_config/m=sha256:c\nprompt/system=sha256:a").hexdigest()
    assert domain.legacy_veto_key({"policy": "sha256:p"}) == ""


def test_a_veto_kept_for_the_content_holds_a_new_name_until_an_approval_lifts_that_veto() -> None:
    reject = decided("BLOCK", by="carol")  # of release v2
    assert domain.binds_content(reject, None)
    # A new name with the same content: its eval is judged under the reject of v2, which it names.
    veto = domain.standing_veto(reject, ARTS)
    assert veto is not None and veto.hint.startswith("release 'v2' was rejected by carol (decision d1")
    held = msgspec.structs.replace(decided("NEEDS_REVIEW", rules=[veto]), id="e1", release="v2-clone")
    assert domain.binds_content(held, reject)  # it carries the veto on: kept in its place
    # A drift BLOCK (its veto rule) binds it the same way; an eval's plain BLOCK or PASS binds nothing.
    drift = decided("BLOCK", rules=[domain.drift_veto("v2", "rep1", "answers drifted")])
    assert domain.binds_content(drift, None) and domain.standing_veto(drift, ARTS) is not None
    assert not domain.binds_content(decided("BLOCK"), reject) and not domain.binds_content(decided("PASS"), reject)
    # An approval that lifted this very veto lifts it for the content; one that lifted another veto does not.
    passed = apply_review(held, review(decision_id="e1"), "e2", reviewer="ann").decision
    assert passed is not None and passed.decision == "PASS"
    assert domain.binds_content(passed, held) and domain.standing_veto(passed, ARTS) is None
    other = decided("BLOCK", by="dan")
    other = msgspec.structs.replace(other, reason="override: rejected by dan: unsafe")
    assert not domain.binds_content(passed, other) and not domain.binds_content(passed, None)
    # What is kept cannot be read (held as a veto): the approval that lifted that hold replaces it.
    assert domain.binds_content(passed, None, unreadable=True)
    assert not domain.binds_content(decided("PASS"), None, unreadable=True)
