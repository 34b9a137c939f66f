"""A veto reaches back: when a person's reject or a drift BLOCK comes to bind some content, every other release name
of its tenant holding that very content (domain.content_digest: what it serves, however labelled) is judged again
under it, as an eval of it would be now (at most NEEDS_REVIEW, naming the veto). Before, a name gated before the
reject kept its PASS, and its traffic, until someone rejected it too. Another tenant's names are left alone: tenants
are isolated, so one tenant's review neither takes another's release out of traffic nor writes its release name and
reviewer's reason into the other's decisions."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec

from lockgate.contracts import GateDecided
from lockgate.errors import InvalidEvent
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.domain import Outcome
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import VETOED_SIBLING, Records, decided

log = logging.getLogger("lockgate.gatekeeper")


class Siblings:
    """Remakes the decisions of the other names of a vetoed content (Records.siblings calls `veto`)."""

    def __init__(self, ctx: ServiceContext, own: OwnKey, records: Records,
                 publish_key: Callable[[], Awaitable[None]]) -> None:
        self.ctx = ctx
        self.own = own
        self.records = records
        self.publish_key = publish_key

    async def veto(self, vetoing: GateDecided) -> None:
        """If `vetoing` vetoes its content, put every other name's decision about that content in its tenant under
        the veto.

        Idempotent, so a redelivery of `vetoing`'s message finishes a pass cut short: a name under the veto already
        is left as it is. A BLOCK stays a BLOCK (it gains the veto's rule). Each is stored by compare-and-set over
        the decision it was made from (DecisionRaced: the message is redelivered and the pass runs again)."""
        judged = domain.judged_artifacts(vetoing.artifacts)
        veto = domain.standing_veto(vetoing, judged)
        if veto is None:
            return
        digest = domain.content_digest(judged)
        if not digest:
            return  # it serves nothing known: no other name holds its content
        for release in await self._holding(digest, vetoing):
            stored = await self.records.read(release)
            current = stored.decision
            if current is None or current.tenant != vetoing.tenant \
                    or domain.content_digest(current.artifacts) != digest \
                    or domain.standing_veto(current, judged) is not None:
                continue  # changed since the listing, or under a veto already (this one's, a redelivery)
            out = domain.under_veto(Outcome(current.decision, tuple(current.rules), current.reason,
                                            current.review_required), veto)
            decision = (await self.own.require()).sign(msgspec.structs.replace(
                current,
                # One id per veto and name, so a redelivery remakes the same decision.
                id=domain.decision_id(vetoing.id, f"{self.records.salt}:{VETOED_SIBLING}:{release}"),
                time=datetime.now(UTC), decision=out.decision, rules=list(out.rules), reason=out.reason,
                review_required=out.review_required, reviewed_by="", approvals=[], approval_keys=[],
                trace_id=vetoing.trace_id, span_id=""))
            await self.publish_key()
            await self.records.settle(decision, over=stored.revision, action=VETOED_SIBLING, actor="gatekeeper",
                                      key=f"gate-{VETOED_SIBLING}-{decision.id}")
            log.warning("release %s holds the content of %s, now vetoed: %s", release, vetoing.release, out.reason)

    async def _holding(self, digest: str, vetoing: GateDecided) -> list[str]:
        """The releases of `vetoing`'s tenant, other than its own, whose current decision judged content `digest`."""
        out = []
        for raw in (await self.ctx.bus.kv_entries(self.ctx.bus.subjects.kv_gates)).values():
            try:
                decision = decided.decode(raw)
            except InvalidEvent:
                continue  # no decision: an eval of that name is held under it (Records.read), nothing to remake
            if decision.release != vetoing.release and decision.tenant == vetoing.tenant \
                    and domain.content_digest(decision.artifacts) == digest:
                out.append(decision.release)
        return sorted(set(out))
