"""Human review: when a policy requires it, and what an approval or rejection turns a decision into (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import msgspec

from lockgate.contracts import BaselineComparison, GateDecided, GateReview, RuleResult
from lockgate.services.gatekeeper.policy import Review, ReviewTrigger
from lockgate.signing import signed_approvals

# The rule a person's reject of some content leaves on every later decision about that content, until an
# approval lifts it (domain.standing_veto): a new eval must not sign a PASS over it.
VETOED = "vetoed"


def review_reasons(triggers: tuple[ReviewTrigger, ...], comparisons: Mapping[str, BaselineComparison],
                   candidate: Mapping[str, str], baseline: Mapping[str, str] | None) -> list[str]:
    """Why a human must look, one reason per fired trigger (empty: no review needed).

    `baseline` None means the baseline's artifacts are unknown: then every matching candidate artifact
    counts as changed, because a review that silently never fires is worse than one too many.
    """
    out: list[str] = []
    for t in triggers:
        if t.kind == "metric_moved":
            moved = [f"{m} moved {c.diff:+.4g}" for m, c in sorted(comparisons.items())
                     if fnmatchcase(m, t.pattern) and abs(c.diff) >= t.by]
            if moved:
                out.append(f"metric_moved {t.pattern} by >= {t.by:g}: {', '.join(moved)}")
            continue
        keys = sorted(k for k in {*candidate, *(baseline or {})} if fnmatchcase(k, t.pattern))
        if baseline is None:
            changed = [f"{k} (baseline unknown)" for k in keys if k in candidate]
        else:
            changed = [k for k in keys if candidate.get(k) != baseline.get(k)]
        if changed:
            out.append(f"artifact_changed {t.pattern}: {', '.join(changed)}")
    return out


@dataclass(frozen=True)
class ReviewRules:
    """What an approval takes, from the policy's `review` section (defaults: one approver, anyone)."""

    approvals: int = 1
    forbid_self_approval: bool = False

    @classmethod
    def of(cls, review: Review | None) -> ReviewRules:
        """The rules of a policy's review section (None: the defaults)."""
        return cls() if review is None else cls(review.approvals, review.forbid_self_approval)


@dataclass(frozen=True)
class ReviewOutcome:
    """What the gatekeeper does with a GateReview: a new decision (or None) and the audit action."""

    decision: GateDecided | None
    action: str
    reason: str


def apply_review(current: GateDecided | None, review: GateReview, new_id: str, *, reviewer: str,
                 rules: ReviewRules = ReviewRules(), author: str | None = None,
                 withdrawn: Mapping[str, str] | None = None) -> ReviewOutcome:
    """Approve/reject a NEEDS_REVIEW decision as `reviewer` (the verified signer, never the payload's claim).

    - a review must name the decision it answers, and that must be the latest: a stale or replayed one is refused;
    - approve without a pending NEEDS_REVIEW is refused (no new decision, audit action "refused"):
      one command must never turn a BLOCK (perhaps a hard safety gate) into PASS;
    - an approval counts once per person; the decision stays NEEDS_REVIEW (re-signed, listing the
      approvals so far) until `rules.approvals` distinct people approved, then it is PASS; an earlier
      approval in `withdrawn` (its person or key no longer trusted: name -> why) no longer counts;
    - with `forbid_self_approval`, the release's author may not approve, and an unknown author (a release
      not signed by its author) cannot be told apart from the reviewer, so every approval is refused;
    - reject of a pending decision blocks; of one that is not pending it is an override to BLOCK (audit
      action "override"): a human veto is always allowed because it can only make the gate stricter. It
      stands over later evals of the same content (domain.standing_veto) until an approval passes one;
      that PASS marks the `vetoed` rule lifted.
    """
    who = f"{reviewer}: {review.reason}"
    refused = f"{review.action} by {who} refused"
    if current is None:
        return ReviewOutcome(None, "refused", f"{refused}: {review.release} has no decision")
    if review.decision_id != current.id:
        named = f"names decision {review.decision_id}" if review.decision_id else "names no decision"
        return ReviewOutcome(None, "refused", f"{refused}: it {named}, but the latest is {current.id}")
    pending = current.decision == "NEEDS_REVIEW"
    withdrawn = withdrawn or {}
    kept = [(a, k) for a, k in signed_approvals(current) if a not in withdrawn]
    approvals, approval_keys = [a for a, _ in kept], [k for _, k in kept]
    dropped = "".join(f"; the approval by {why}, no longer counts" for a, why in withdrawn.items()
                      if a in current.approvals)
    if review.action == "approve":
        if not pending:
            return ReviewOutcome(None, "refused", f"{refused}: the latest decision for {review.release} is "
                                                  f"{current.decision}, not NEEDS_REVIEW; re-run the eval instead")
        if rules.forbid_self_approval and author is None:
            return ReviewOutcome(None, "refused", f"{refused}: the policy forbids self-approval and the author of "
                                                  f"{review.release} is unknown (not signed by a trusted person); "
                                                  "register the change under a new name with a personal identity")
        if rules.forbid_self_approval and author == reviewer:
            return ReviewOutcome(None, "refused", f"{refused}: {reviewer} is the author of {review.release}, and "
                                                  "the policy forbids self-approval")
        if reviewer in approvals:
            return ReviewOutcome(None, "refused", f"{refused}: {reviewer} already approved; the policy needs "
                                                  f"{rules.approvals} distinct approvers")
        approvals.append(reviewer)
        approval_keys.append(review.key_id)
    was = f"was NEEDS_REVIEW: {current.review_required or current.reason}{dropped}"
    if review.action == "approve" and len(approvals) < rules.approvals:
        verdict, action = "NEEDS_REVIEW", "approved"
        reason = (f"approved by {who} ({len(approvals)} of {rules.approvals} distinct approvers: "
                  f"{', '.join(approvals)}; {was})")
    elif review.action == "approve":
        verdict, action = "PASS", "approved"
        by = who if len(approvals) == 1 else f"{', '.join(approvals)} (last {who})"
        reason = f"approved by {by} ({was})"
    elif pending:
        verdict, action = "BLOCK", "rejected"
        reason = f"rejected by {who} ({was})"
    else:
        verdict, action = "BLOCK", "override"
        reason = f"override: rejected by {who}; warning: the gate had decided {current.decision}"
    rules = _lifted(current.rules, approvals) if verdict == "PASS" else current.rules
    new = GateDecided(id=new_id, release=current.release, decision=verdict, rules=rules,
                      eval_run=current.eval_run, policy=current.policy, baseline=current.baseline,
                      artifacts=current.artifacts, reason=reason, review_required=current.review_required,
                      reviewed_by=reviewer, approvals=approvals, approval_keys=approval_keys,
                      tenant=current.tenant, source="gatekeeper",
                      trace_id=review.trace_id)
    return ReviewOutcome(new, action, reason)


def review_action(decision: GateDecided) -> str:
    """The audit action of a decision apply_review made (its verdict and reason say which)."""
    if decision.decision != "BLOCK":
        return "approved"
    return "override" if decision.reason.startswith("override:") else "rejected"


def _lifted(rules: list[RuleResult], approvals: list[str]) -> list[RuleResult]:
    """`rules` with a standing veto marked lifted by the approvals that passed the decision."""
    by = ", ".join(approvals)
    return [msgspec.structs.replace(r, verdict="PASS", observed=1.0, hint=f"lifted by the approval of {by}: {r.hint}")
            if r.rule == VETOED and r.verdict == "FAIL" else r for r in rules]
