"""Where decisions go: KV `lg_gates`, the append-only audit log (a fact the sink stores), and the bus
(adapter, translates errors)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import NamedTuple

import nats.errors
import nats.js.errors

from lockgate import auditlog
from lockgate.codec import Codec, encode
from lockgate.contracts import GateAudited, GateDecided
from lockgate.contracts.gates import audit_msg_id
from lockgate.errors import BusUnavailable, InvalidEvent, LockgateError, Retryable, UnreadableValue
from lockgate.ids import derived_id
from lockgate.queryclient import ask
from lockgate.redact import scrub_secrets
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper import domain
from lockgate.subjects import token

decided: Codec[GateDecided] = Codec(GateDecided)
# The audit action of a decision remade under the veto of the same content under another name (siblings.Siblings).
VETOED_SIBLING = "vetoed"
# The audit action of a PASS remade as a BLOCK at start, decided under a policy or suite the gates file does not allow
# (GateHandlers.hold_to_gates_file).
REQUIRED = "required"
# The audit action of a PASS or NEEDS_REVIEW remade as a BLOCK when an artifact it binds reached its sunset
# (sunsets.Sunsets).
SUNSET = "sunset"
# The audit action of a PASS or NEEDS_REVIEW remade as a BLOCK when the release it was measured against stopped being
# an allowed baseline (measured.Measured).
BASELINE = "baseline"
# The hash-chained audit log's kind of each gate action (approvals and rejections are reviews).
_KINDS = {"decided": "decision", VETOED_SIBLING: "decision", REQUIRED: "decision", SUNSET: "decision",
          BASELINE: "decision",
          "refused": "refusal",
          "override": "override"}


class Stored(NamedTuple):
    """A release's decision as stored in KV, and what a decision made on it is stored over."""

    decision: GateDecided | None  # None: none stored, or `unreadable`
    revision: int  # its KV revision (0: the key was never written, or deleted)
    unreadable: str = ""  # why the value stored is no decision of the release ("" when it is, or none is)
    deleted: int = 0  # the revision of the key's delete or purge marker, when that is what it holds

    @property
    def next_seq(self) -> int:
        """The `seq` a decision stored over this one signs: the signing clock in microseconds since the epoch, or one
        above what the key holds if that is higher (a hybrid of a clock and a counter).

        What the key holds: above this decision's `seq`, and above every KV revision the key had so far, which keeps
        the order rising over what carries no `seq` (a decision signed before decisions carried one, a value that
        is no decision, a key deleted: its marker's revision). With the compare-and-set over `revision`, which
        stores one decision only per value it read, a release's decisions in one bucket rise whatever the clocks.

        The clock, because what the key holds is not all there was: a gates bucket made anew (a lost store, a
        restore from a backup) numbers from 1 and holds nothing of the release, so this signed 1, below every
        decision a client had read, and the SDK refused the genuine BLOCK as a superseded one (probe p39 F2). No
        store survives its own loss, the clock does: a decision made after is above every one made before unless a
        gatekeeper's clock ran ahead of this one's by more than the time between them. Not the audit chain's `seq`:
        its stream is lost and restored with the bucket, and a decision's row is chained after it is stored.
        Microseconds since 1970 (1.8e15 now; exact in a JSON number until 2255) are above every `seq` and revision
        a gatekeeper of before signed, so its decisions stay older than any signed now."""
        floor = max(self.decision.seq if self.decision is not None else 0, self.revision, self.deleted)
        return max(floor + 1, time.time_ns() // 1000)


class UnorderedDecision(LockgateError):
    """A decision signed without a `seq` above the one it would be stored over (Stored.next_seq): subscribers would
    take it for an older decision and skip it, so it is not stored."""


class DecisionRaced(Retryable):
    """Another decision of the release was stored after the one this was made on was read: nothing of this one is
    recorded, and its message is redelivered to be judged again on what is stored now."""


class ContentRaced(Retryable):
    """Another decision about the same content was recorded while this one was: its message is redelivered, and
    the content's record read again."""


class Records:
    """KV first, by compare-and-set over the decision the new one was made on, then the audit fact, then the
    event: a redelivery finds its decision stored and repeats the rest (msg ids and the sink's lookup of the
    decision id dedupe them). Stored over what it read, a decision never replaces one it did not see: an eval's
    PASS judged before a person's reject landed (or a drift BLOCK) is judged again, under that veto."""

    def __init__(self, ctx: ServiceContext, salt: str) -> None:
        self.ctx = ctx
        self.salt = salt  # the gatekeeper's secret (Signer.id_salt): no other identity predicts an entry's id
        # Puts the names of a content vetoed now under its veto, after a decision about it was stored
        # (siblings.Siblings.veto; it signs).
        self.siblings: Callable[[GateDecided], Awaitable[None]] | None = None
        # Remakes the decisions measured against a release no longer an allowed baseline, and a decision measured
        # against one (measured.Measured.after; it signs).
        self.measured: Callable[[GateDecided], Awaitable[None]] | None = None

    async def audit(self, decision: GateDecided, *, action: str, actor: str, key: str,
                    reason: str | None = None) -> None:
        """Publish one audit row for the sink and one entry of the chained audit log (both deduplicated by
        `key` on redelivery). A `reason` given here (a refusal's, which may quote a review) is scrubbed of secrets as
        a signed decision's is (lockgate.signing), so no row of `gate_decisions` keeps one."""
        reason = decision.reason if reason is None else scrub_secrets(reason)
        row = GateAudited(
            id=decision.id, time=decision.time, release=decision.release, action=action, actor=actor,
            decision=decision.decision, eval_run=decision.eval_run, policy=decision.policy,
            baseline=decision.baseline, rules=list(decision.rules),
            reason=reason, signature=decision.signature,
            key_id=decision.key_id, tenant=decision.tenant, source="gatekeeper", trace_id=decision.trace_id)
        await self.ctx.bus.publish(self.ctx.bus.subjects.gate_audit, row, msg_id=audit_msg_id(key))
        await auditlog.record(
            self.ctx.bus, "gatekeeper", kind=_KINDS.get(action, "review"), actor=actor, target=decision.release,
            action=action, reason=row.reason, tenant=decision.tenant, entry_id=derived_id("audit-entry", self.salt, key),
            trace_id=decision.trace_id, details={"decision": decision.decision, "decision_id": decision.id,
                                                 "eval_run": decision.eval_run, "policy": decision.policy,
                                                 "signed_by": decision.key_id})

    async def settle(self, decision: GateDecided, *, over: int, action: str, actor: str, key: str) -> None:
        """Store the decision over revision `over` (Stored.revision of what it was made on), then audit and
        announce it; DecisionRaced, with nothing recorded, when another decision was stored meanwhile."""
        await self.store(decision, over=over)
        await self.finish(decision, action=action, actor=actor, key=key)

    async def finish(self, decision: GateDecided, *, action: str, actor: str, key: str) -> None:
        """Audit and announce a stored decision (again, for a message redelivered after its decision was stored).

        Announced even when its audit rows cannot be written: the decision is current in KV already, and routers
        and watchers must act on it now (a reject of a live release was held back for as long as the audit queue
        refused entries: a producer filled it with junk). The audit failure still fails the message, so it is
        redelivered and the rows retried (both deduplicated by `key`, as is the announcement)."""
        try:
            # Before its audit rows, and again on each redelivery until it holds: a veto binds its content under
            # any name only once it is recorded there.
            await self.bind_content(decision)
            # Then the names of a vetoed content, this one's included (a PASS judged while a veto landed on its
            # content under another name): after this decision was stored, so a veto recorded meanwhile is seen here
            # or sees this decision in its own pass (siblings.Siblings.veto).
            if self.siblings is not None and action != VETOED_SIBLING:  # the pass that remade it covers the rest
                await self.siblings(decision)
            # Then what was measured against it, if it is no allowed baseline now, whatever made it so (a reject, a
            # veto reaching it, a drift BLOCK, a sunset, a later eval): after it was stored, so an eval comparing
            # with it that read it still allowed is seen here, or sees this decision when its own is stored.
            if self.measured is not None:
                await self.measured(decision)
            await self.audit(decision, action=action, actor=actor, key=key)
        finally:
            await self.ctx.bus.publish(self.ctx.bus.subjects.gate_decided(decision.release), decision, msg_id=key)

    async def store(self, decision: GateDecided, *, over: int) -> None:
        """Make the decision current in KV, only over revision `over` (0: where none is stored); DecisionRaced
        when the key moved on from it."""
        s = self.ctx.bus.subjects
        if decision.seq <= over:
            raise UnorderedDecision(f"decision {decision.id} of {decision.release!r} is signed with seq {decision.seq}, "
                                    f"not above revision {over} it would be stored over: a gatekeeper path that signs "
                                    "no order (Stored.next_seq); not stored")
        try:
            kv = await self.ctx.bus.kv(s.kv_gates)
            if over:
                await kv.update(token(decision.release), encode(decision), last=over)
            else:
                await kv.create(token(decision.release), encode(decision))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise DecisionRaced(f"decision {decision.id} of {decision.release!r} not stored: another decision of it "
                                "was stored after the one it was made on; judged again") from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot write decision for {decision.release} to KV {s.kv_gates}: {exc!r}") from None

    async def current(self, release: str) -> GateDecided | None:
        """The release's latest decision from KV (None if never gated); UnreadableValue when its key holds
        anything else, which must never pass for "never gated" (no decision, so nothing for drift to block)."""
        stored = await self.read(release)
        if stored.unreadable:
            raise UnreadableValue(stored.unreadable)
        return stored.decision

    async def current_decisions(self) -> list[GateDecided]:
        """Every release's current decision, as KV gates holds them; an entry that is no decision is left out: it
        admits nothing (the router refuses what does not verify)."""
        out = []
        for raw in (await self.ctx.bus.kv_entries(self.ctx.bus.subjects.kv_gates)).values():
            try:
                out.append(decided.decode(raw))
            except InvalidEvent:
                continue
        return out

    async def read(self, release: str) -> Stored:
        """The release's latest decision from KV with its revision; what the key holds if it is no decision of
        the release is `unreadable`, never "never gated"."""
        s = self.ctx.bus.subjects
        # A review must never countersign a decision about another release stored under this key.
        return await self._stored(s.kv_gates, token(release), f"the decision of {release!r}",
                                  lambda d: None if d.release == release else f"is about {d.release!r}")

    async def _stored(self, bucket: str, key: str, what: str, about: Callable[[GateDecided], str | None]) -> Stored:
        """The decision KV `bucket` holds under `key`, with its revision: `unreadable` (saying so of `what`) when the
        key holds something else than a decision, or one `about` says is not the key's (why, else None)."""
        try:
            kv = await self.ctx.bus.kv(bucket)
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError as exc:  # and deleted: create() writes over its tombstone
            marker = getattr(exc, "entry", None)  # a deleted key's marker (nats-py passes it on)
            return Stored(None, 0, deleted=marker.revision if marker is not None else 0)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read {what} from KV {bucket}: {exc!r}") from None
        if not entry.value:
            return Stored(None, entry.revision)
        try:
            decision = decided.decode(entry.value)
        except InvalidEvent as exc:
            return Stored(None, entry.revision, f"{what} in KV {bucket} is unreadable: {exc.message}")
        if (other := about(decision)) is not None:
            return Stored(None, entry.revision, f"{what} stored in KV {bucket} {other}")
        return Stored(decision, entry.revision)

    async def bind_content(self, decision: GateDecided) -> None:
        """Record `decision` as what its content is vetoed by in its tenant (KV vetoes, under domain.veto_key), when
        it vetoes it or lifts the veto kept (domain.binds_content); compare-and-set over what was read, so a veto
        recorded meanwhile is never replaced unseen (ContentRaced: redelivered)."""
        key = domain.veto_key(decision.tenant, decision.artifacts)
        if not key:
            return
        kept = await self.content(decision.tenant, decision.artifacts)
        if kept.decision is not None and kept.decision.id == decision.id:
            return  # recorded before this redelivery
        if not domain.binds_content(decision, kept.decision, bool(kept.unreadable)):
            return
        s = self.ctx.bus.subjects
        try:
            kv = await self.ctx.bus.kv(s.kv_vetoes)
            if kept.revision:
                await kv.update(key, encode(decision), last=kept.revision)
            else:
                await kv.create(key, encode(decision))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise ContentRaced(f"veto of content {key} by decision {decision.id} of {decision.release!r} not "
                               "recorded: another decision about it was recorded meanwhile; recorded again") from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot record the veto of content {key} in KV {s.kv_vetoes}: {exc!r}") from None

    async def content(self, tenant: str, artifacts: Mapping[str, str]) -> Stored:
        """The decision `tenant`'s names of the content `artifacts` serve are vetoed by (or their veto lifted by), with
        the revision of its key (domain.veto_key); what the key holds if it is no decision about that content of that
        tenant is `unreadable` (it may have been a veto), never "no veto".

        A content whose key was never written is read under the key of before (domain.legacy_veto_key, the artifacts'
        labels and every tenant's alike), so a veto recorded before an upgrade still holds; one of another tenant
        there is none of this tenant's. One found there is recorded under the content's key as it is read (found
        under the key of before, it held only for these very labels)."""
        key = domain.veto_key(tenant, artifacts)
        if not key:
            return Stored(None, 0)
        kept = await self._veto(key)
        legacy = domain.legacy_veto_key(artifacts)
        if kept.revision or not legacy:
            return kept
        old = await self._stored(self.ctx.bus.subjects.kv_vetoes, legacy, f"the veto of content {legacy}",
                                 lambda d: None if domain.legacy_veto_key(d.artifacts) == legacy else
                                 "is about other content")
        if old.decision is not None and old.decision.tenant != tenant:
            return Stored(None, 0)
        if old.decision is None:
            return Stored(None, 0, old.unreadable)
        return await self._upgrade(key, old.decision)

    async def upgrade_vetoes(self) -> list[GateDecided]:
        """Record each veto found under the key of before (domain.legacy_veto_key) under its content's key too, where
        that holds nothing yet; the vetoes so recorded, now or at an earlier start (their content's key still holds
        them).

        The key of before hashed the artifacts' labels: read only through a name of those very labels, such a veto
        bound no relabelled name of the content until one of them was judged. Read here, it binds them all. Its
        entry stays, for a gatekeeper of before still running beside this one."""
        out = []
        for key, raw in (await self.ctx.bus.kv_entries(self.ctx.bus.subjects.kv_vetoes)).items():
            try:
                old = decided.decode(raw)
            except InvalidEvent:
                continue  # read as a veto through that key only (content), as before
            if key != domain.legacy_veto_key(old.artifacts):
                continue  # under its content's key
            kept = await self.content(old.tenant, old.artifacts)
            if kept.decision is not None and kept.decision.id == old.id:
                out.append(old)
        return out

    async def _veto(self, key: str) -> Stored:
        """The decision KV vetoes holds under content key `key` (domain.veto_key)."""
        return await self._stored(self.ctx.bus.subjects.kv_vetoes, key, f"the veto of content {key}",
                                  lambda d: None if domain.veto_key(d.tenant, d.artifacts) == key else
                                  "is about other content or another tenant")

    async def _upgrade(self, key: str, old: GateDecided) -> Stored:
        """Record `old`, a veto found under the key of before, under its content's key `key` (create only: anything
        recorded there meanwhile is newer), and read that key."""
        s = self.ctx.bus.subjects
        try:
            kv = await self.ctx.bus.kv(s.kv_vetoes)
            await kv.create(key, encode(old))
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # recorded meanwhile (another replica's upgrade, or a newer decision): read below
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot record the veto of content {key} in KV {s.kv_vetoes}: {exc!r}") from None
        return await self._veto(key)

    async def consecutive_errors(self, release: str, exclude_run: str) -> int:
        """Errored decisions in a row for the release, from the audit log (via the query service)."""
        return await ask(self.ctx.bus, "consecutive_errors", {"release": release, "exclude_run": exclude_run},
                         into=int)
