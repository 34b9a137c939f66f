"""Route table of one router: in-memory state (read on every request), its persistence and the step timer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import msgspec
import nats.js.errors

from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import GateDecided, RolloutState
from lockgate.errors import (
    BusUnavailable,
    InvalidEvent,
    LockgateError,
    Retryable,
    SignatureError,
    StoreUnavailable,
)
from lockgate.service import ServiceContext
from lockgate.signing import Verifier
from lockgate.subjects import token
from services.router import domain
from services.router.domain import Route

log = logging.getLogger("lockgate.router")

ROLLOUT_COLUMNS = ("id", "time", "deployment", "stable_release", "canary_release", "canary_weight",
                   "phase", "step", "reason", "decision_id")
_route_decoder = msgspec.json.Decoder(Route)
_gate_codec: Codec[GateDecided] = Codec(GateDecided)


class RouterNotReady(Retryable):
    """The router has not restored its routes yet (the decision is redelivered later)."""


class Rollouts:
    """Routes by deployment. Changes apply in memory at once; persistence follows in order."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        s: Settings = ctx.settings
        self.steps = domain.normalize_steps(s.rollout_steps)
        self.interval_s = s.rollout_step_interval_s
        self.routes: dict[str, Route] = {}
        self._defaults: dict[str, Route] = {}
        self.ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._outbox: deque[tuple[Route, RolloutState]] = deque()
        self._persist_lock = asyncio.Lock()
        self._kv = None
        # Decisions move traffic, so only those signed by a trusted gatekeeper key are acted on.
        self.verifier = Verifier(ctx.bus, s)

    # reads (hot path)
    def route(self, deployment: str) -> Route:
        """Current route of a deployment (the default route if none was configured)."""
        r = self.routes.get(deployment)
        if r is None:
            r = self._defaults.get(deployment)
            if r is None:
                # Unconfigured deployments are cached apart, bounded, so odd headers cannot grow memory.
                if len(self._defaults) >= 1024:
                    self._defaults.clear()
                r = self._defaults[deployment] = domain.default_route(deployment, self.ctx.settings.stable_upstream)
        return r

    async def wait_for(self, predicate: Callable[[dict[str, Route]], bool], timeout: float) -> None:
        """Wait until predicate(routes) holds (checked after every change); TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            while not predicate(self.routes):
                await self._changed.wait()

    # lifecycle
    async def restore(self) -> None:
        """Load persisted routes from KV, then accept decisions."""
        self._kv = await self.ctx.bus.kv(self.ctx.bus.subjects.kv_routes)
        try:
            keys = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        for key in keys:
            try:
                entry = await self._kv.get(key)
                route = _route_decoder.decode(entry.value)
            except (nats.js.errors.KeyNotFoundError, msgspec.DecodeError) as exc:
                log.warning("ignoring unreadable route %s: %s", key, exc)
                continue
            self.routes[route.deployment] = route
        self.ready.set()
        self._wake.set()

    async def run_timer(self) -> None:
        """Advance progressing canaries when their step is due (one loop for all deployments)."""
        while True:
            now = time.time()
            due = [d for d in (domain.due_at(r) for r in self.routes.values()) if d is not None]
            if due and min(due) <= now:
                for route in list(self.routes.values()):
                    new = domain.tick(route, self.steps, self.interval_s, now)
                    if new is not None:
                        self._apply(new)
                try:
                    await self.flush()
                except LockgateError as exc:
                    log.warning("rollout state not persisted yet: %s", exc.message)
                continue
            self._wake.clear()
            timeout = (min(due) - now) if due else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    # changes
    async def start_canary(self, deployment: str, req: domain.CanaryRequest) -> Route:
        """Start a canary; if the gate already decided its release (KV), act on that at once."""
        await self._await_ready()
        s = self.ctx.settings
        new = domain.start_canary(self.route(deployment), req, default_canary_upstream=s.canary_upstream,
                                  first_step=self.steps[0])
        self._apply(new)
        decision = await self._stored_decision(req.canary_release)
        if decision is not None:
            self.apply_decision(decision)
        await self.flush()
        return self.routes[deployment]

    def apply_decision(self, decision: GateDecided) -> int:
        """Apply a gate decision to every deployment canarying its release; returns how many changed."""
        now = time.time()
        changed = 0
        for route in list(self.routes.values()):
            new = domain.on_decision(route, decision, self.steps, self.interval_s, now)
            if new is not None:
                self._apply(new)
                changed += 1
        return changed

    async def on_decision(self, decision: GateDecided) -> None:
        """Handle a decision from the bus: apply in memory, then persist (retried via nack)."""
        await self._await_ready()
        self.apply_decision(decision)
        await self.flush()

    def manual(self, deployment: str, action: str) -> Route:
        """Operator abort or promote of the current canary."""
        route = self.route(deployment)
        if route.phase in ("promoted", "aborted"):
            raise domain.InvalidRollout(f"canary of {deployment!r} is already {route.phase}")
        new = domain.abort(route, "by operator") if action == "abort" else domain.promote(route, "by operator")
        self._apply(new)
        return new

    def _apply(self, route: Route) -> None:
        # Synchronous on purpose: the next request routed after this line sees the new weight.
        self.routes[route.deployment] = route
        self._outbox.append((route, domain.to_state(route)))
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        self._wake.set()

    async def flush(self) -> None:
        """Persist pending changes in order: KV route, RolloutState event, rollout_events row."""
        async with self._persist_lock:
            while self._outbox:
                route, state = self._outbox[0]
                await self._persist(route, state)
                self._outbox.popleft()

    async def _persist(self, route: Route, state: RolloutState) -> None:
        bus, store = self.ctx.bus, self.ctx.store
        try:
            await self._kv.put(route.deployment, msgspec.json.encode(route))
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot write route {route.deployment!r} to KV: {exc!r}") from None
        await bus.publish(bus.subjects.rollout(route.deployment), state)
        row = (state.id, state.time, state.deployment, state.stable_release, state.canary_release,
               state.canary_weight, state.phase, state.step, state.reason, state.decision_id)
        try:
            await store.ainsert_rows("rollout_events", ROLLOUT_COLUMNS, [row], token=state.id)
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise StoreUnavailable(f"insert into rollout_events failed: {exc!r}") from None

    async def _await_ready(self) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), 30)
        except TimeoutError:
            raise RouterNotReady("router routes not restored within 30 s") from None

    async def _stored_decision(self, release: str) -> GateDecided | None:
        try:
            kv = await self.ctx.bus.kv(self.ctx.bus.subjects.kv_gates)
            entry = await kv.get(token(release))
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot read gate decision for {release!r}: {exc!r}") from None
        if not entry.value:
            return None
        try:
            decision = _gate_codec.decode(entry.value)
            await self.verifier.verify(decision)
        except (InvalidEvent, SignatureError) as exc:
            log.warning("ignoring stored gate decision for %s: %s", release, exc.message)
            return None
        return decision
