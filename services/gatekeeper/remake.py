"""A release's current decision made again by the gatekeeper, when something that binds it changed since it was decided
(adapter: signs, stores and audits). The veto reach-back remakes the names of a vetoed content under the veto
(siblings.Siblings); the start of a gatekeeper remakes the PASSes the gates file does not allow as BLOCKs
(GateHandlers.hold_to_gates_file); an artifact's sunset remakes the PASSes and NEEDS_REVIEWs binding it as BLOCKs
(sunsets.Sunsets); a release that stops being an allowed baseline remakes the PASSes and NEEDS_REVIEWs measured against
it as BLOCKs (measured.Measured)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec

from lockgate.contracts import GateDecided
from lockgate.errors import SignatureError
from lockgate.services.gatekeeper.domain import Outcome, decision_id
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import DecisionRaced, Records, Stored

__all__ = ["judged_again", "remake"]
log = logging.getLogger("lockgate.gatekeeper")
# How often a release's decision is read again when another decision of it is stored while it is judged: evals and
# reviews landing meanwhile are judged under the new rule already, so the next read ends it.
_TRIES = 3


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
    decision = await own.sign(msgspec.structs.replace(
        current, id=decision_id, time=datetime.now(UTC), decision=out.decision, rules=list(out.rules),
        reason=out.reason, review_required=out.review_required, reviewed_by="", approvals=[], approval_keys=[],
        trace_id=trace_id, span_id="", seq=Stored(current, over).next_seq))
    await publish_key()
    await records.settle(decision, over=over, action=action, actor="gatekeeper",
                         key=f"gate-{action}-{decision.id}")
    return decision


async def judged_again(own: OwnKey, records: Records, publish_key: Callable[[], Awaitable[None]], release: str,
                       judge: Callable[[GateDecided], Awaitable[Outcome | None]], *, action: str) -> bool:
    """Remake `release`'s current decision as `judge` says it is now (None: it stands), audited as `action`; whether it
    was remade. Read and judged again when another decision of it is stored meanwhile (DecisionRaced after _TRIES).
    One id per decision remade and action, so a second start or a replica remakes the same. A current decision no
    trusted key signed is left as it is (see `remake`)."""
    for _ in range(_TRIES):
        stored = await records.read(release)
        current = stored.decision
        out = None if current is None else await judge(current)
        if current is None or out is None:
            return False
        try:
            await remake(own, records, publish_key, current, stored.revision, out,
                         decision_id=decision_id(current.id, f"{records.salt}:{action}:{release}"), action=action,
                         trace_id="")
        except DecisionRaced:
            continue
        except SignatureError as exc:  # not ours: no reader admits it as it is
            log.warning("release %s: its decision is not one a trusted key signed, left as it is: %s", release,
                        exc.message)
            return False
        log.warning("release %s no longer admits: %s", release, out.reason)
        return True
    raise DecisionRaced(f"the decision of {release!r} was not judged again ({action}): it changed {_TRIES} times "
                        "while it was")
