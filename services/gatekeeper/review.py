"""Human review: when a policy requires it, and what an approval or rejection turns a decision into (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from lockgate.contracts import BaselineComparison, GateDecided, GateReview
from lockgate.services.gatekeeper.policy import ReviewTrigger


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
class ReviewOutcome:
    """What the gatekeeper does with a GateReview: a new decision (or None) and the audit action."""

    decision: GateDecided | None
    action: str
    reason: str


def apply_review(current: GateDecided | None, review: GateReview, new_id: str) -> ReviewOutcome:
    """Approve/reject a NEEDS_REVIEW decision. Policy for the other cases:

    - approve without a pending NEEDS_REVIEW is refused (no new decision, audit action "refused"):
      one command must never turn a BLOCK (perhaps a hard safety gate) into PASS;
    - reject of a decision that is not pending is an override to BLOCK (audit action "override"):
      a human veto is always allowed because it can only make the gate stricter.
    """
    who = f"{review.actor}: {review.reason}"
    if current is None:
        return ReviewOutcome(None, "refused", f"{review.action} by {who} refused: {review.release} has no decision")
    if review.decision_id and review.decision_id != current.id:
        return ReviewOutcome(None, "refused", f"{review.action} by {who} refused: it names decision "
                                              f"{review.decision_id}, but the latest is {current.id}")
    pending = current.decision == "NEEDS_REVIEW"
    if review.action == "approve" and not pending:
        return ReviewOutcome(None, "refused", f"approve by {who} refused: the latest decision for {review.release} "
                                              f"is {current.decision}, not NEEDS_REVIEW; re-run the eval instead")
    if pending:
        verdict, action = ("PASS", "approved") if review.action == "approve" else ("BLOCK", "rejected")
        reason = f"{action} by {who} (was NEEDS_REVIEW: {current.review_required or current.reason})"
    else:
        verdict, action = "BLOCK", "override"
        reason = f"override: rejected by {who}; warning: the gate had decided {current.decision}"
    new = GateDecided(id=new_id, release=current.release, decision=verdict, rules=current.rules,
                      eval_run=current.eval_run, policy=current.policy, baseline=current.baseline,
                      artifacts=current.artifacts, reason=reason, review_required=current.review_required,
                      reviewed_by=review.actor, tenant=current.tenant, source="gatekeeper",
                      trace_id=review.trace_id)
    return ReviewOutcome(new, action, reason)
