"""Gate decisions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

from lockgate.contracts.bounds import Id, Signature, Text, Who, check_bounds
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
    approvals: list[str] = []  # the distinct people who approved this NEEDS_REVIEW so far (a policy may need N)
    # The key id each of `approvals` signed with (same order): an approval counts only while that key is
    # its person's and trusted, so revoking a stolen key also takes back what it approved.
    approval_keys: list[str] = []
    # The release's decisions in the order the gatekeeper stored them, under its signature: each one's is above the
    # one it was stored over (Records, by compare-and-set), so no two of a release share one and a clock behind
    # decides nothing; the gatekeeper's clock in microseconds when that is higher (Stored.next_seq), so one made over
    # a gates bucket made anew is above those made before it.
    # 0: made before decisions carried one (such a one is older than any that carries one: decisionwatch.Newest).
    seq: int = 0

    @property
    def judged(self) -> dict[str, str]:
        """The release content it judged (`kind/name` -> hash), without the suite and policy it names under the bare
        keys `eval_suite` and `policy`."""
        return {k: v for k, v in self.artifacts.items() if "/" in k}

    def differences(self, held: Mapping[str, str], holding: str) -> list[str]:
        """Each artifact where the content it judged and `held` (what a release holds, said as `holding`) differ."""
        judged = self.judged
        return [f"{k} judged {judged.get(k) or 'nothing'}, {holding} {held.get(k) or 'nothing'}"
                for k in sorted({*judged, *held}) if judged.get(k) != held.get(k)]


class GateReview(Event, frozen=True, kw_only=True, tag="lockgate.gate.review"):
    """A human approval or rejection of a release waiting in NEEDS_REVIEW (or an override).

    Signed by the reviewer's personal key (`key_id`); the gatekeeper takes the reviewer's name from the
    trust file's person for that key, and refuses a review whose `actor` names someone else.
    """

    release: Name
    action: Literal["approve", "reject"]
    actor: Who
    reason: Text
    decision_id: Id = ""
    key_id: Id = ""
    signature: Signature = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self)


def review_key(review_id: str) -> str:
    """The Nats-Msg-Id of the decision the gatekeeper announces for the GateReview `review_id` (and, under
    `audit_msg_id`, of its audit row, a refusal's included). The decision's own id is salted (no one predicts it),
    so this is what the reviewer's CLI follows its review by."""
    return f"gate-review-{review_id}"


def audit_msg_id(key: str) -> str:
    """The Nats-Msg-Id of the GateAudited row of the decision (or refusal) announced under `key`."""
    return f"audit-{key}"


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


class StoredDecision(msgspec.Struct, frozen=True, kw_only=True):
    """One gates-bucket entry as stored: its key (the release's token), KV revision and value, the gatekeeper's
    signed bytes untouched, so a reader verifies the signature itself (the gateway passing it on cannot forge one)."""

    key: str
    revision: int
    value: bytes


class DecisionsPage(msgspec.Struct, frozen=True, kw_only=True):
    """An application user's request for one page of a decisions read (`Subjects.read_decisions`): the entries
    whose keys sort after `after` ("" for the first page). A request without a body (an SDK from before pages)
    is answered in one message, or with an error when its entries do not fit in one."""

    after: str = ""


class DecisionsRead(msgspec.Struct, frozen=True, kw_only=True):
    """The gateway's answer to an application user's decision read (`Subjects.reads`): the entries it may read
    (none for a release it may not, alike to one never decided), or what kept it from reading them.

    A page holds what fits in one NATS message: `next_after` is the key to ask after (`DecisionsPage`) for the
    rest, empty on the last page."""

    entries: list[StoredDecision] = []
    error: Literal["", "not_found", "unavailable"] = ""
    message: str = ""
    next_after: str = ""
