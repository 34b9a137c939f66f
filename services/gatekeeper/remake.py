"""A release's current decision made again by the gatekeeper, when something that binds it changed since it was decided
(adapter: signs, stores and audits). The veto reach-back remakes the names of a vetoed content under the veto
(siblings.Siblings); the start of a gatekeeper remakes the PASSes the gates file does not allow as BLOCKs
(GateHandlers.hold_to_gates_file); an artifact's sunset remakes the PASSes and NEEDS_REVIEWs binding it as BLOCKs
(sunsets.Sunsets)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec

from lockgate.contracts import GateDecided
from lockgate.services.gatekeeper.domain import Outcome
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import Records, Stored

__all__ = ["remake"]


async def remake(own: OwnKey, records: Records, publish_key: Callable[[], Awaitable[None]], current: GateDecided,
                 over: int, out: Outcome, *, decision_id: str, action: str, trace_id: str) -> GateDecided:
    """Sign `current` (stored at revision `over`) again as `out` under `decision_id` (derived from what caused it, so
    a redelivery or a second start remakes the same decision), and store it over `current` (DecisionRaced, with
    nothing recorded, when the release's decision changed since), audited as `action` by the gatekeeper.

    It keeps the eval run, policy and artifacts it judged; no person's review or approval is carried over: what it
    says now is the gatekeeper's, and a BLOCK naming a reviewer would read as that person's reject (a veto).

    SignatureError, with nothing signed, when `current` is not a decision the trust roots verify: an entry written to
    the gates bucket by other means (a service credential may) stays what it is, unverifiable and refused by every
    reader, rather than become an authentic decision citing another release's eval (probe p28)."""
    await own.verifier.verify(current, history=True)  # as history: what a key retired since signed is still ours
    decision = (await own.require()).sign(msgspec.structs.replace(
        current, id=decision_id, time=datetime.now(UTC), decision=out.decision, rules=list(out.rules),
        reason=out.reason, review_required=out.review_required, reviewed_by="", approvals=[], approval_keys=[],
        trace_id=trace_id, span_id="", seq=Stored(current, over).next_seq))
    await publish_key()
    await records.settle(decision, over=over, action=action, actor="gatekeeper",
                         key=f"gate-{action}-{decision.id}")
    return decision
