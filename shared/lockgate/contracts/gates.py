"""Gate decisions."""

from __future__ import annotations

from typing import Literal

import msgspec

from lockgate.contracts.envelope import Event
from lockgate.contracts.names import Name, OptName

Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE", "ERROR", "NO_DATA"]
Decision = Literal["PASS", "BLOCK", "NEEDS_REVIEW"]


class RuleResult(msgspec.Struct, frozen=True, kw_only=True):
    """One rule's outcome: what was measured, against what, and the verdict."""

    rule: str
    metric: str
    op: str
    threshold: float
    observed: float | None
    verdict: Verdict
    hint: str = ""
    low: float | None = None
    high: float | None = None
    baseline: float | None = None
    dry_run: bool = False
    explanation: str = ""


class GateDecided(Event, frozen=True, kw_only=True, tag="lockgate.gate.decided"):
    """The gate's decision for a release, with one RuleResult per rule."""

    release: Name
    decision: Decision
    rules: list[RuleResult]
    eval_run: str = ""
    policy: str = ""
    baseline: OptName = ""
    artifacts: dict[str, str] = {}
    reason: str = ""
    signature: str = ""
    key_id: str = ""
    review_required: str = ""
    reviewed_by: str = ""


class GateReview(Event, frozen=True, kw_only=True, tag="lockgate.gate.review"):
    """A human approval or rejection of a release waiting in NEEDS_REVIEW (or an override)."""

    release: Name
    action: Literal["approve", "reject"]
    actor: str
    reason: str
    decision_id: str = ""


class GateAudited(Event, frozen=True, kw_only=True, tag="lockgate.gate.audited"):
    """One row of the append-only audit log: a decision, approval, rejection, override or refusal.

    `id` is the id of the decision it records (of the refused one's would-be decision for a refusal).
    """

    release: str
    action: str
    actor: str
    decision: Decision
    eval_run: str = ""
    policy: str = ""
    baseline: str = ""
    rules: list[RuleResult] = []
    reason: str = ""
    signature: str = ""
    key_id: str = ""
