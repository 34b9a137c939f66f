"""A veto reaches back: when a person's reject or a drift BLOCK comes to bind some content, every other release name
of its tenant holding that very content (domain.content_digest: what it serves, however labelled) is judged again
under it, as an eval of it would be now (at most NEEDS_REVIEW, naming the veto). Before, a name gated before the
reject kept its PASS, and its traffic, until someone rejected it too. Another tenant's names are left alone: tenants
are isolated, so one tenant's review neither takes another's release out of traffic nor writes its release name and
reviewer's reason into the other's decisions."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from lockgate.contracts import GateDecided, RuleResult
from lockgate.errors import InvalidEvent, SignatureError
from lockgate.identity import withdrawn_approvals
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.domain import Outcome
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import VETOED_SIBLING, DecisionRaced, Records, decided
from lockgate.services.gatekeeper.remake import remake

log = logging.getLogger("lockgate.gatekeeper")


class Siblings:
    """Remakes the decisions of the names of a vetoed content (Records.siblings calls `veto`)."""

    def __init__(self, ctx: ServiceContext, own: OwnKey, records: Records,
                 publish_key: Callable[[], Awaitable[None]]) -> None:
        self.ctx = ctx
        self.own = own
        self.records = records
        self.publish_key = publish_key

    async def veto(self, settled: GateDecided) -> None:
        """After `settled` was stored for its release (and recorded for its content, Records.bind_content): if its
        content is vetoed now, put every name of its tenant holding that content under the veto, its own included.

        The veto is the content's record (Records.content), read as an eval of the content reads it: a lift by
        approvals that no longer count (a revoked key, a person gone) lifted nothing, and the veto stands again.
        Its own name is included for a decision judged while the veto landed: its eval read no veto, and the
        reject's pass over the content's names listed them before it was stored. Each side writes before it reads
        (the veto, then the names; the decision, then the veto), so one of them sees the other whatever the order.

        Idempotent, so a redelivery finishes a pass cut short: a name carrying a veto already is left as it is. A
        BLOCK stays a BLOCK (it gains the veto's rule). Each is stored by compare-and-set over the decision it was
        made from (DecisionRaced, when it changed to one not under a veto: the message is redelivered and the pass
        runs again)."""
        judged = domain.judged_artifacts(settled.artifacts)
        digest = domain.content_digest(judged)
        if not digest:
            return  # it serves nothing known: no veto binds it, and no other name holds its content
        kept = await self.records.content(settled.tenant, judged)
        veto = domain.standing_veto(kept.decision, judged, kept.unreadable,
                                    withdrawn_approvals(self.ctx.settings, kept.decision))
        if veto is None:
            return
        for release in await self._holding(digest, settled.tenant):
            await self._remake(release, settled, veto, digest)

    async def _remake(self, release: str, vetoing: GateDecided, veto: RuleResult, digest: str) -> None:
        """Store `release`'s current decision about content `digest` again under `veto`, unless it carries one."""
        stored = await self.records.read(release)
        current = stored.decision
        if current is None or not domain.reached_by_veto(current, vetoing.tenant, digest):
            return  # changed since the listing, or under a veto already (this one's, a redelivery)
        out = domain.under_veto(Outcome(current.decision, tuple(current.rules), current.reason,
                                        current.review_required), veto)
        try:
            # One id per deciding decision and name, so a redelivery remakes the same decision.
            await remake(self.own, self.records, self.publish_key, current, stored.revision, out,
                         decision_id=domain.decision_id(vetoing.id, f"{self.records.salt}:{VETOED_SIBLING}:{release}"),
                         action=VETOED_SIBLING, trace_id=vetoing.trace_id)
        except SignatureError as exc:
            # Not ours: no reader admits it, and a veto remade over it would make it authentic (probe p28).
            log.warning("release %s holds vetoed content in an entry no trusted key signed, left as it is: %s",
                        release, exc.message)
            return
        except DecisionRaced:
            # The other side of a race (the reject's pass over the names, or the name's own decision seeing the
            # veto) remade it first: nothing left to do. Anything else stored meanwhile is judged on redelivery.
            now = (await self.records.read(release)).decision
            if now is not None and domain.reached_by_veto(now, vetoing.tenant, digest):
                raise
            return
        log.warning("release %s holds vetoed content, now under the veto: %s", release, out.reason)

    async def _holding(self, digest: str, tenant: str) -> list[str]:
        """The releases of `tenant` whose current decision judged content `digest`."""
        out = []
        for raw in (await self.ctx.bus.kv_entries(self.ctx.bus.subjects.kv_gates)).values():
            try:
                decision = decided.decode(raw)
            except InvalidEvent:
                continue  # no decision: an eval of that name is held under it (Records.read), nothing to remake
            if decision.tenant == tenant and domain.content_digest(decision.artifacts) == digest:
                out.append(decision.release)
        return sorted(set(out))

