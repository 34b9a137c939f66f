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
from lockgate.codec import to_json
from lockgate.contracts import ApplyRecorded, ApplyReply, ApplyRequest
from lockgate.gitops.state import state_key
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
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._answer(msg, ApplyReply(error=f"an apply request of {identity} is not an ApplyRequest: {exc}"))
            return
        why = applied.problem(request)
        if why is not None:
            log.warning("apply of %s by %s refused: %s", request.directory, identity, why)
            await self._answer(msg, ApplyReply(error=f"apply of {request.directory} refused: {why}"))
            return
        try:
            event = await self._record(request, identity)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            # Entries written so far stay (each is the folder's truth); the caller's next apply writes the rest.
            await self._answer(msg, ApplyReply(error=f"the applied state could not be recorded: {exc!r}"))
            return
        await self._answer(msg, ApplyReply(recorded=event))

    async def _record(self, request: ApplyRequest, identity: str) -> ApplyRecorded:
        bus = self.ctx.bus
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
        event = applied.recorded(request)
        if not request.changes:
            return event  # an apply that changed nothing leaves no trace: it did nothing
        await auditlog.record(
            bus, "lineage", kind="apply", actor=request.applied_by or identity, target=request.directory,
            action="apply", entry_id=event.id,
            details={"identity": identity, "commit": request.commit, "author": request.author,
                     "dirty": str(request.dirty).lower(), "changes": ", ".join(
                         f"{c.action} {c.kind}/{c.name}" for c in request.changes)[:2000]})
        await bus.publish(bus.subjects.apply_recorded, event)
        return event

    async def _answer(self, msg: Any, reply: ApplyReply) -> None:
        await self.answered.bump()  # before the reply leaves: a caller holding it finds it counted
        with contextlib.suppress(Exception):  # a caller that gave up meanwhile is not an error
            await msg.respond(to_json(reply))
