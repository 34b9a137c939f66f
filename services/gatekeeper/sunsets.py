"""Sunsets: when an artifact version's sunset passes, the current decision of every release that binds it and admits
(a PASS) or may come to (a NEEDS_REVIEW) is remade as a signed BLOCK with its `lifecycle kind/name` rule, naming the
successor (adapter: a timer per known sunset, remake.remake signs and stores).

An eval judged after the sunset is a BLOCK already (the lifecycle rule); this holds a decision made before it to the
same rule (docs/provenance.md, "Deprecation and sunset").

The timers are armed from the lifecycle records: at its start, for every artifact version with a sunset (one already
past is judged before the start returns), then for each record appended while it runs. Every replica hears each one
appended (`on_heard`: a core subscription, no queue group), so a replica that stops takes no sunset with it that the
others do not hold; the replicas' shared durable consumer (`on_lifecycle`) still reads those appended while none was
connected. A core subscription does not replay, so a replica lists every lifecycle again, as at its start, each time its
connection comes back (a record appended while it was down went to another replica only), and a listing that fails until
one succeeds (the service's `_keep_sunsets_listed`). A timer that rings reads the sunset again and acts on what it says
then, so a timer armed from an older read (or by a failed pass) never stands in for the sunset in force. The decision
remade carries an id derived from the one it replaces, so replicas and a second start remake the same decision
(compare-and-set: one stores it, the others find a BLOCK)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg

from lockgate.bus import Delivery
from lockgate.codec import Codec
from lockgate.contracts import GateDecided
from lockgate.contracts.provenance import ArtifactLifecycle
from lockgate.errors import ConfigError, InvalidEvent, LockgateError
from lockgate.provenance import chain, ledger, lifecycle
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.domain import Outcome
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import SUNSET, Records
from lockgate.services.gatekeeper.remake import judged_again
from lockgate.subjects import untoken

__all__ = ["Sunsets"]
log = logging.getLogger("lockgate.gatekeeper")
# When a sunset whose releases were not all remade (the bus or the key failed) is tried again.
_RETRY_S = 10.0
_lifecycles: Codec[ArtifactLifecycle] = Codec(ArtifactLifecycle)


class Sunsets:
    """The timers of the known sunsets, and the remaking of the decisions that bind a sunset artifact."""

    def __init__(self, ctx: ServiceContext, own: OwnKey, records: Records, publish_key: Callable[[], Awaitable[None]],
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]) -> None:
        self.ctx = ctx
        self.own = own
        self.records = records
        self.publish_key = publish_key
        self.spawn = spawn  # the service's background work, cancelled on its stop
        # artifact hash -> its timer and when it rings (the loop's clock); the earliest asked for is kept (_arm)
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._closed = False  # the service stops: a pass failing meanwhile arms nothing its stop would not cancel
        self.unheld: dict[str, str] = {}  # artifact hash -> why the releases binding it were not all remade
        # Lifecycle records handled, read from the replicas' shared consumer and heard by this one, and listings of
        # every lifecycle (`start`) done: tests await them.
        self.read, self.heard, self.listed = Progress(), Progress(), Progress()

    def problems(self) -> list[str]:
        """A sunset not held (readiness says so until a retry holds it): its releases may admit past it."""
        return [f"releases using {digest} may still admit past its sunset: {why}; retried every {_RETRY_S:g} s"
                for digest, why in sorted(self.unheld.items())]

    async def start(self) -> None:
        """Arm a timer for every artifact version with a sunset ahead, and remake now the decisions binding one whose
        sunset is past (passed while no gatekeeper ran). One whose history or releases cannot be read is retried
        by its own timer; only failing to list the lifecycles raises. Called again after a reconnect, it arms and
        remakes nothing twice (`_arm` keeps the earliest timer; a remade decision's id is derived)."""
        try:
            subjects = await ledger.subjects(self.ctx.bus, self.ctx.bus.subjects.lifecycle_any)
            try:
                listed: list[GateDecided] | None = await self.records.current_decisions()  # once, for every past one
            except LockgateError:
                listed = None  # each sunset past reads them itself, retried if that fails
            for subject in subjects:
                digest = self._digest(subject)
                if digest is not None:  # else no artifact's history (chain.read skips what is on it)
                    await self._due(digest, listed)
        finally:
            await self.listed.bump()

    def close(self) -> None:
        """Cancel the timers and arm no more (the service stops; its spawned work is cancelled by the service)."""
        self._closed = True
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    async def on_lifecycle(self, record: ArtifactLifecycle, delivery: Delivery) -> None:
        """A lifecycle record appended: arm the timer of its artifact version's sunset, as its verified history says
        now (its last record; one nobody trusted signed is no part of it, and a later one may move or drop the
        sunset: the timer reads it again when it rings). The subject names the version, never the record's `hash`."""
        digest = self._digest(delivery.subject)
        if digest is None:
            raise InvalidEvent(f"lifecycle record {record.id} is on {delivery.subject}, no artifact version's "
                               "lifecycle subject")
        try:
            await self._read(digest)
        finally:
            await self.read.bump()

    async def on_heard(self, msg: Msg) -> None:
        """A message on a lifecycle subject, as every replica hears it: arm its artifact version's timer as
        `on_lifecycle` does. What is no lifecycle record is skipped (every reader skips it, chain.read); a read that
        fails is tried again by the timer, which says so (readiness) if it fails too."""
        digest = self._digest(msg.subject)
        if digest is None:
            return
        try:
            said = _lifecycles.decode(msg.data).sunset
        except InvalidEvent:
            return
        try:
            try:
                read = await self._read(digest)
            except LockgateError as exc:
                log.warning("lifecycle of %s not read: %s; read again in %g s", digest, exc.message, _RETRY_S)
                self._arm(digest, _RETRY_S)
                read = None
            if said is not None and (read is None or lifecycle.utc(said) < read):
                # The stream may store a record after its subscribers hear it (a cluster commits it first): a sunset
                # it says sooner than the one read is read again by then (and ignored if no trusted person signed it).
                self._arm(digest, min(_RETRY_S, max(0.0, (lifecycle.utc(said) - datetime.now(UTC)).total_seconds())))
        finally:
            await self.heard.bump()

    async def _read(self, digest: str) -> datetime | None:
        """Arm `digest`'s timer for the sunset its verified history says now (one past rings at once); that sunset."""
        when = await self._sunset(digest)
        if when is not None:
            self._arm(digest, max(0.0, (when - datetime.now(UTC)).total_seconds()))
        return when

    def armed(self, digest: str) -> float | None:
        """When `digest`'s timer rings (the loop's clock), None if none is armed."""
        armed = self._timers.get(digest)
        return None if armed is None else armed[0]

    def _digest(self, subject: str) -> str | None:
        """The artifact version whose lifecycle `subject` holds (None: not a lifecycle subject)."""
        prefix = self.ctx.bus.subjects.lifecycle_any.removesuffix("*")
        if not subject.startswith(prefix):
            return None
        try:
            return untoken(subject.removeprefix(prefix))
        except ConfigError:
            return None

    async def _sunset(self, digest: str) -> datetime | None:
        """The sunset of the record in force for `digest` (its last verified one), None without one. A history that
        does not verify is past now: the releases using it are judged at once, and its lifecycle rule fails closed
        (lifecycle.gate_rules), as an eval using it is."""
        try:
            found = await lifecycle.history(self.ctx.bus, self.ctx.settings, digest)
        except chain.ChainBroken as exc:
            log.warning("lifecycle of %s: %s; the releases using it are blocked", digest, exc.message)
            return datetime.now(UTC)
        ledger.reported(found.skipped)
        last = found.records[-1] if found.records else None
        return None if last is None or last.sunset is None else lifecycle.utc(last.sunset)

    def _arm(self, digest: str, delay_s: float) -> None:
        """Have `digest`'s timer ring in `delay_s` at the latest: one armed to ring sooner stays (it reads the
        sunset again and arms for it), so what was read last never gives way to an older read."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        at = loop.time() + delay_s
        armed = self._timers.get(digest)
        if armed is not None:
            if armed[0] <= at:
                return
            armed[1].cancel()
        self._timers[digest] = (at, loop.call_later(delay_s, self._ring, digest))

    def _ring(self, digest: str) -> None:
        self._timers.pop(digest, None)  # a timer replaced is cancelled: the one that rings is the one armed
        self.spawn(self._due(digest), f"sunset:{digest[:19]}")

    async def _due(self, digest: str, listed: Sequence[GateDecided] | None = None) -> None:
        """Read `digest`'s sunset and act on it: armed while ahead, and once past the current decision of every
        release binding it that admits or may (a PASS, a NEEDS_REVIEW) is remade as a BLOCK (`listed`: the
        current decisions, read here if None). A failure is said (log, readiness) and retried by a timer."""
        try:
            when = await self._sunset(digest)
            # The loop's clock is monotonic, the sunset wall-clock time: a timer may ring early after a clock step.
            if when is not None and when > datetime.now(UTC):
                self._arm(digest, (when - datetime.now(UTC)).total_seconds())
            elif when is not None:
                for release in self._binding(digest, await self.records.current_decisions() if listed is None
                                             else listed):
                    await self._remake(release, digest)
        except LockgateError as exc:
            self.unheld[digest] = exc.message
            log.error("releases using %s may still admit past its sunset: %s; retried in %g s", digest, exc.message,
                      _RETRY_S)
            self._arm(digest, _RETRY_S)
            return
        self.unheld.pop(digest, None)

    @staticmethod
    def _binding(digest: str, listed: Sequence[GateDecided]) -> list[str]:
        """The releases whose current decision (among `listed`) binds artifact version `digest` and admits or may."""
        return sorted({d.release for d in listed if d.decision in ("PASS", "NEEDS_REVIEW")
                       and digest in domain.judged_artifacts(d.artifacts).values()})

    async def _remake(self, release: str, digest: str) -> None:
        """Remake `release`'s current decision as a BLOCK under the lifecycle rules of its artifacts now, if it
        binds `digest` and admits or may."""

        async def judge(current: GateDecided) -> Outcome | None:
            judged = domain.judged_artifacts(current.artifacts)
            if digest not in judged.values():
                return None
            return domain.past_sunset(current, await lifecycle.gate_rules(self.ctx.bus, self.ctx.settings, judged))

        await judged_again(self.own, self.records, self.publish_key, release, judge, action=SUNSET)
