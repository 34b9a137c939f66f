"""Where decisions go: the append-only audit log (a fact the sink stores), KV `lg_gates`, and the bus
(adapter, translates errors)."""

from __future__ import annotations

import nats.errors
import nats.js.errors

from lockgate import auditlog
from lockgate.codec import Codec, encode
from lockgate.contracts import GateAudited, GateDecided
from lockgate.errors import BusUnavailable, InvalidEvent, UnreadableValue
from lockgate.ids import derived_id
from lockgate.queryclient import ask
from lockgate.server.service import ServiceContext
from lockgate.subjects import token

_decided: Codec[GateDecided] = Codec(GateDecided)
# The hash-chained audit log's kind of each gate action (approvals and rejections are reviews).
_KINDS = {"decided": "decision", "refused": "refusal", "override": "override"}


class Records:
    """Audit fact first, KV second, event last: a retry repeats the rest; msg ids and the sink's lookup of
    the decision id dedupe it."""

    def __init__(self, ctx: ServiceContext, salt: str) -> None:
        self.ctx = ctx
        self.salt = salt  # the gatekeeper's secret (Signer.id_salt): no other identity predicts an entry's id

    async def audit(self, decision: GateDecided, *, action: str, actor: str, key: str,
                    reason: str | None = None) -> None:
        """Publish one audit row for the sink and one entry of the chained audit log (both deduplicated by
        `key` on redelivery)."""
        row = GateAudited(
            id=decision.id, time=decision.time, release=decision.release, action=action, actor=actor,
            decision=decision.decision, eval_run=decision.eval_run, policy=decision.policy,
            baseline=decision.baseline, rules=list(decision.rules),
            reason=decision.reason if reason is None else reason, signature=decision.signature,
            key_id=decision.key_id, tenant=decision.tenant, source="gatekeeper", trace_id=decision.trace_id)
        await self.ctx.bus.publish(self.ctx.bus.subjects.gate_audit, row, msg_id=f"audit-{key}")
        await auditlog.record(
            self.ctx.bus, "gatekeeper", kind=_KINDS.get(action, "review"), actor=actor, target=decision.release,
            action=action, reason=row.reason, tenant=decision.tenant, entry_id=derived_id("audit-entry", self.salt, key),
            trace_id=decision.trace_id, details={"decision": decision.decision, "decision_id": decision.id,
                                                 "eval_run": decision.eval_run, "policy": decision.policy,
                                                 "signed_by": decision.key_id})

    async def announce(self, decision: GateDecided, *, key: str) -> None:
        """Make the decision current in KV, then publish it."""
        s = self.ctx.bus.subjects
        try:
            kv = await self.ctx.bus.kv(s.kv_gates)
            await kv.put(token(decision.release), encode(decision))
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot write decision for {decision.release} to KV {s.kv_gates}: {exc!r}") from None
        await self.ctx.bus.publish(s.gate_decided(decision.release), decision, msg_id=key)

    async def current(self, release: str) -> GateDecided | None:
        """The release's latest decision from KV (None if never gated); UnreadableValue when its key holds
        anything else, which must never pass for "never gated" (no decision, so nothing for drift to block)."""
        s = self.ctx.bus.subjects
        try:
            kv = await self.ctx.bus.kv(s.kv_gates)
            entry = await kv.get(token(release))
        except nats.js.errors.KeyNotFoundError:
            return None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read decision for {release} from KV {s.kv_gates}: {exc!r}") from None
        if not entry.value:
            return None
        try:
            decision = _decided.decode(entry.value)
        except InvalidEvent as exc:
            raise UnreadableValue(f"the decision of {release!r} in KV {s.kv_gates} is unreadable: "
                                  f"{exc.message}") from None
        # A review must never countersign a decision about another release stored under this key.
        if decision.release != release:
            raise UnreadableValue(f"the decision stored for {release!r} in KV {s.kv_gates} is about "
                                  f"{decision.release!r}")
        return decision

    async def consecutive_errors(self, release: str, exclude_run: str) -> int:
        """Errored decisions in a row for the release, from the audit log (via the query service)."""
        return await ask(self.ctx.bus, "consecutive_errors", {"release": release, "exclude_run": exclude_run},
                         into=int)
