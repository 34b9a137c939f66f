"""NATS edge of the applied state: `lockgate apply` asks, the lineage recorder records (the bucket's only
writer), audits and announces; the caller gets the announcement or why nothing was recorded."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from lockgate import auditlog
from lockgate.codec import UNDECODABLE, to_json, undecodable
from lockgate.contracts import ApplyRecorded, ApplyReply, ApplyRequest
from lockgate.errors import BusUnavailable
from lockgate.gitops.state import state_key
from lockgate.identity import IdentityRefused, verify_apply
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.lineage import applied

log = logging.getLogger("lockgate.lineage")
_requests = msgspec.json.Decoder(ApplyRequest)


class AppliedState:
    """Answers apply requests on `Subjects.gitops_apply_all`, one at a time (a subscription's callbacks
    run one after another), so two applies never interleave their entries."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.answered = Progress()  # requests answered, recorded or refused; tests await it

    async def on_request(self, msg: Any) -> None:
        """Record one apply, or answer why not; the requesting identity is the subject's last token, which
        NATS lets only that identity publish."""
        identity = msg.subject.rsplit(".", 1)[-1]
        try:
            request = _requests.decode(msg.data)
        except (*UNDECODABLE, msgspec.ValidationError) as exc:
            await self._refuse(msg, f"an apply request of {identity} is not an ApplyRequest: {undecodable(exc)}")
            return
        why = applied.problem(request)
        try:
            # A person named is a person who signed it (the trust file's word); unsigned, it is the identity's.
            actor = verify_apply(self.ctx.settings, request) if request.applied_by else identity
        except IdentityRefused as exc:
            why = why or exc.message
        if why is not None:
            await self._refuse(msg, f"apply of {request.directory[:200]} by {identity} refused: {why}")
            return
        try:
            event = await self._record(request, identity, actor)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, BusUnavailable) as exc:
            # The audit entry, if it was stored, names what was asked; entries written so far stay (each is the
            # folder's truth) and the caller's next apply writes the rest.
            await self._answer(msg, ApplyReply(error=f"the applied state could not be recorded: {exc!r}"))
            return
        await self._answer(msg, ApplyReply(recorded=event))

    async def _record(self, request: ApplyRequest, identity: str, actor: str) -> ApplyRecorded:
        bus = self.ctx.bus
        event = applied.recorded(request)
        if not request.changes:
            return event  # an apply that changed nothing leaves no trace: it did nothing
        # The audit entry first: once it is on the stream the chainer appends it, so no recorded change is
        # ever without its row (a failure after it leaves a row of a change partly made, never the reverse).
        await auditlog.record(
            bus, "lineage", kind="apply", actor=actor, target=request.directory, action="apply", entry_id=event.id,
            details={"identity": identity, "commit": request.commit, "author": request.author,
                     "dirty": str(request.dirty).lower(),
                     # The list is cut to what a row holds; its count and digest stand for all of it (the
                     # announced ApplyRecorded and the bucket's history hold the whole list to check them by).
                     "changes": ", ".join(f"{c.action} {c.kind}/{c.name}" for c in request.changes),
                     "changes_count": len(request.changes), "changes_digest": applied.changes_digest(request)})
        kv = await bus.kv(bus.subjects.kv_gitops)
        now = datetime.now(UTC)
        entries = {e.key: e for e in request.entries}
        for change in request.changes:
            key = state_key(change.kind, change.name)
            if change.action == "remove":
                with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                    await kv.delete(key)
            else:
                await kv.put(key, msgspec.json.encode(applied.stamped(entries[f"{change.kind}/{change.name}"], now)))
        await bus.publish(bus.subjects.apply_recorded, event)
        return event

    async def _refuse(self, msg: Any, why: str) -> None:
        log.warning("%s", why)
        await self._answer(msg, ApplyReply(error=why))

    async def _answer(self, msg: Any, reply: ApplyReply) -> None:
        await self.answered.bump()  # before the reply leaves: a caller holding it finds it counted
        with contextlib.suppress(Exception):  # a caller that gave up meanwhile is not an error
            await msg.respond(to_json(reply))
