"""Sunsets: when an artifact version's sunset passes, the current decision of every release that binds it and admits
(a PASS) or may come to (a NEEDS_REVIEW) is remade as a signed BLOCK with its `lifecycle kind/name` rule, naming the
successor (adapter: a timer per known sunset, remake.remake signs and stores).

An eval judged after the sunset is a BLOCK already (the lifecycle rule); this holds a decision made before it to the
same rule. Before, a PASS decided before the sunset kept admitting: `gate verify` said PASS, the router took it as a
new deployment's first release and kept serving it (probe p29 F4).

The timers are armed from the lifecycle records: when the gatekeeper reads one (its durable consumer of the
provenance stream's lifecycle subjects) and, at its start, for every artifact version with a sunset (one already past
is judged before the start returns). Replicas share that consumer, so a record read by one arms that one's timer; each
replica's start arms them all. The decision remade carries an id derived from the one it replaces, so replicas and a
second start remake the same decision (compare-and-set: one stores it, the others find a BLOCK)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from lockgate.bus import Delivery
from lockgate.contracts import GateDecided
from lockgate.contracts.provenance import ArtifactLifecycle
from lockgate.errors import ConfigError, InvalidEvent, LockgateError
from lockgate.provenance import chain, ledger, lifecycle
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.domain import Outcome
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import SUNSET, Records, decided
from lockgate.services.gatekeeper.remake import judged_again
from lockgate.subjects import untoken

__all__ = ["Sunsets"]
log = logging.getLogger("lockgate.gatekeeper")
# When a sunset whose releases were not all remade (the bus or the key failed) is tried again.
_RETRY_S = 10.0


class Sunsets:
    """The timers of the known sunsets, and the remaking of the decisions that bind a sunset artifact."""

    def __init__(self, ctx: ServiceContext, own: OwnKey, records: Records, publish_key: Callable[[], Awaitable[None]],
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]) -> None:
        self.ctx = ctx
        self.own = own
        self.records = records
        self.publish_key = publish_key
        self.spawn = spawn  # the service's background work, cancelled on its stop
        self._timers: dict[str, tuple[datetime, asyncio.TimerHandle]] = {}  # artifact hash -> its sunset's timer
        self.unheld: dict[str, str] = {}  # artifact hash -> why the releases binding it were not all remade

    def problems(self) -> list[str]:
        """A sunset passed whose releases may still admit (readiness says so until a retry remakes them)."""
        return [f"releases using {digest} (past its sunset) may still admit: {why}; retried every {_RETRY_S:g} s"
                for digest, why in sorted(self.unheld.items())]

    async def start(self) -> int:
        """Arm a timer for every artifact version with a sunset ahead, and remake now the decisions binding one whose
        sunset is past (passed while no gatekeeper ran); how many were remade."""
        remade = 0
        for subject in await ledger.subjects(self.ctx.bus, self.ctx.bus.subjects.lifecycle_any):
            digest = self._digest(subject)
            if digest is None:
                continue  # no artifact's history (chain.read skips what is on it)
            try:
                when = await self._sunset(digest)
            except chain.ChainBroken as exc:
                log.warning("lifecycle of %s: %s", digest, exc.message)  # every eval using it is a BLOCK
                continue
            if when is not None and when <= datetime.now(UTC):
                remade += await self._pass(digest, when)
            elif when is not None:
                self._arm(digest, when)
        return remade

    def close(self) -> None:
        """Cancel the timers (the service stops; its spawned work is cancelled by the service)."""
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    async def on_lifecycle(self, record: ArtifactLifecycle, delivery: Delivery) -> None:
        """A lifecycle record appended: (re)arm the timer of its artifact version's sunset, as its verified history
        says now (its last record; one nobody trusted signed is no part of it, and a later one may move or drop the
        sunset). The subject names the version, never the record's own `hash`."""
        digest = self._digest(delivery.subject)
        if digest is None:
            raise InvalidEvent(f"lifecycle record {record.id} is on {delivery.subject}, no artifact version's "
                               "lifecycle subject")
        when = await self._sunset(digest)
        if when is None:
            self._disarm(digest)
        else:
            self._arm(digest, when)  # one past already fires at once

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
        """The sunset of the record in force for `digest` (its last verified one), None without one."""
        found = await lifecycle.history(self.ctx.bus, self.ctx.settings, digest)
        ledger.reported(found.skipped)
        last = found.records[-1] if found.records else None
        return None if last is None or last.sunset is None else lifecycle.utc(last.sunset)

    def _disarm(self, digest: str) -> None:
        armed = self._timers.pop(digest, None)
        if armed is not None:
            armed[1].cancel()

    def _arm(self, digest: str, when: datetime, delay_s: float | None = None) -> None:
        """The timer of `digest`'s sunset `when` (replacing one armed before), due then or in `delay_s`."""
        self._disarm(digest)
        due = max(0.0, (when - datetime.now(UTC)).total_seconds()) if delay_s is None else delay_s
        timer = asyncio.get_running_loop().call_later(
            due, lambda: self.spawn(self._due(digest, when), f"sunset:{digest[:19]}"))
        self._timers[digest] = (when, timer)

    async def _due(self, digest: str, when: datetime) -> None:
        """The timer of `digest`'s sunset `when` rang: remake what binds it, or try again later if that failed."""
        armed = self._timers.get(digest)
        if armed is None or armed[0] != when:
            return  # re-armed for another sunset meanwhile
        self._timers.pop(digest)
        if datetime.now(UTC) < when:
            # The loop's clock is monotonic, the sunset wall-clock time: early after a clock step, armed again.
            self._arm(digest, when)
            return
        await self._pass(digest, when)

    async def _pass(self, digest: str, when: datetime) -> int:
        """Remake as a BLOCK the current decision of every release binding `digest`, past its sunset `when`, that
        admits or may (a PASS, a NEEDS_REVIEW); how many. A failure is said (log, readiness) and retried by a
        timer."""
        try:
            remade = 0
            for release in await self._binding(digest):
                remade += await self._remake(release, digest)
        except LockgateError as exc:
            self.unheld[digest] = exc.message
            log.error("releases using %s, past its sunset %s, were not all blocked: %s; retried in %g s",
                      digest, lifecycle.utc_iso(when), exc.message, _RETRY_S)
            self._arm(digest, when, _RETRY_S)
            return 0
        self.unheld.pop(digest, None)
        return remade

    async def _binding(self, digest: str) -> list[str]:
        """The releases whose current decision binds artifact version `digest` and admits or may."""
        out = []
        for raw in (await self.ctx.bus.kv_entries(self.ctx.bus.subjects.kv_gates)).values():
            try:
                listed = decided.decode(raw)
            except InvalidEvent:
                continue  # no decision: it admits nothing (the router refuses what does not verify)
            if listed.decision in ("PASS", "NEEDS_REVIEW") and \
                    digest in domain.judged_artifacts(listed.artifacts).values():
                out.append(listed.release)
        return sorted(set(out))

    async def _remake(self, release: str, digest: str) -> int:
        """Remake `release`'s current decision as a BLOCK under the lifecycle rules of its artifacts now, if it
        binds `digest` and admits or may (1: remade)."""

        async def judge(current: GateDecided) -> Outcome | None:
            if digest not in domain.judged_artifacts(current.artifacts).values():
                return None
            return domain.past_sunset(current, await lifecycle.gate_rules(
                self.ctx.bus, self.ctx.settings, domain.judged_artifacts(current.artifacts)))

        return int(await judged_again(self.own, self.records, self.publish_key, release, judge, action=SUNSET))
