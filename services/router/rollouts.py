"""Route table of one router replica: in-memory state (read on every request), kept in step with the
routes KV bucket (watched; written with compare-and-set), its persistence and the step timer."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import math
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.js.errors

from lockgate import analysisruns, artifacts, shipped
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import (
    AnalysisRun,
    DriftReport,
    GateDecided,
    InferenceEvent,
    InferenceScored,
    RolloutState,
)
from lockgate.contracts.inference import ATTEMPT, SHADOW_SKIPPED, STICKY
from lockgate.errors import (
    BusUnavailable,
    ConfigError,
    InvalidEvent,
    LockgateError,
    NotFound,
    Retryable,
    SignatureError,
    UnreadableValue,
)
from lockgate.pricebook import load_price_book, priced_model
from lockgate.retry import RetryPolicy
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.router import analysis, bluegreen, domain, patch, progress, resilience, runs
from lockgate.services.router.domain import Route
from lockgate.services.router.endpoints import Endpoints, UnknownEndpoint
from lockgate.services.router.evidence import Evidence, InFlight, Unanswered
from lockgate.services.router.shadowstats import Budget, Ledger, ShadowSummary, spend_key
from lockgate.services.router.upstream import Lane, Underway, Upstream
from lockgate.signing import TRUST_CHECK_S, Keyring, Verifier, withdrawn
from lockgate.subjects import token, untoken

log = logging.getLogger("lockgate.router")

# The attributes of a served event `observe` reads (`InferenceEvent.cached`, `_diverted`, `_note_trip`): the only ones
# a starting router reads back from the record (handlers.replay_served), as the others (an answer's tool calls, up to
# 64 kB) made its pages too large for one NATS message (probe p36 F1). A key read there must be named here (and
# `Evidence.add`'s, SHADOW_SKIPPED: a restarted router must not judge a preview on the copies of one key alone; the
# shadow ledger's, ATTEMPT: a failed call a retry went past pairs with no shadow; `evidence.unit`'s, STICKY: a
# restarted router counts the users of the sticky-key header as users).
EVIDENCE_ATTRIBUTES = ("cache", "lockgate.fallback_from", "lockgate.fallback_from_release",
                       "lockgate.fallback_reason", SHADOW_SKIPPED, ATTEMPT, STICKY)

_route_decoder = msgspec.json.Decoder(Route)
_gate_codec: Codec[GateDecided] = Codec(GateDecided)
_drift_decoder = msgspec.json.Decoder(DriftReport)
# A change that lost a compare-and-set is recomputed on the reloaded route and tried again; the
# short jittered pause keeps contending replicas from colliding again in step.
_CAS_RETRY = RetryPolicy(attempts=5, initial_s=0.005, max_s=0.1)
# An operator's change answered "applied but not yet persisted" (`Rollouts._later`) is persisted on this cadence
# until the bus answers.
_LATER_RETRY = RetryPolicy(attempts=None, initial_s=0.1, max_s=2.0)
# A due step whose canary's decision could not be read (the bus away) waits this long before it is tried again.
_ADMISSION_RETRY_S = 1.0
# How long a gate decision waits for this replica's KV watch to apply the route writes made before it
# (Rollouts._routes_current); past it, every route is read again from KV instead.
_WATCH_LAG_S = 2.0
# How often every serving stable's and every live canary's current decision is read again (Rollouts._hold_stables,
# _hold_canaries), and every live canary's drift reports stored since (_hold_drifts): a decision or report the route
# never acted on (its message taken by a replica that could not act on it, a route stored before stables were
# checked) takes effect within it.
STABLE_CHECK_S = 5.0
# A canary's admission read again (Rollouts._admission_now): its release, its current verified decision (None:
# none, or it does not verify) and why not; None when the admission holds (or the route rests on none).
Admission = tuple[str, GateDecided | None, str] | None
# An operator's change of a route (Rollouts._settle): run again on every compare-and-set attempt, it reads what it
# checks (decisions) and then changes the route in memory without awaiting; returns a refusal ("" or None: none).
Change = Callable[[], Awaitable[str | None]]


class RouterNotReady(Retryable):
    """The router has not restored its routes yet (the decision is redelivered later)."""


class RouteContended(Retryable):
    """Other replicas kept changing the route first (the decision is redelivered later)."""


class Unpersisted(Retryable):
    """An operator's change applied (HTTP 503 "ACTION applied ..."), not all of it persisted yet: what is still to
    come follows in the message."""


class _Trip(msgspec.Struct, frozen=True, kw_only=True):
    """A run of a canary's requests diverted to stable by an open breaker (`Rollouts._note_trip`): of the rollout
    (canary release, start), from the first (unix seconds), until when the breaker that diverted the last may still
    be open (its time plus its endpoint's cooldown), and how many."""

    rollout: tuple[str, float]
    since: float
    until: float
    diverted: int


@dataclass
class _Pending:
    """A route change not yet fully persisted; revision is set once its KV write has won."""

    route: Route
    state: RolloutState
    revision: int | None = None
    announce: bool = True  # False for analysis bookkeeping that moves no traffic (KV only, no event)
    runs: list[AnalysisRun] = field(default_factory=list)  # signed analysis records, published once KV won
    lost: bool = False  # dropped unwritten: another replica's write of its deployment won first (`Rollouts._lost`)


# The writes (`Rollouts._apply`) of the change `Rollouts._until_won` runs in this task: the change runs again only if
# one of them was dropped, never because a write of another change (the timer stepping another deployment, say) lost.
_WRITES: contextvars.ContextVar[list[_Pending] | None] = contextvars.ContextVar("route_writes", default=None)


class Rollouts:
    """Routes by deployment. Changes apply in memory at once; persistence follows in order.

    KV is the source of truth shared by replicas: a watch applies every replica's writes here, and
    writes are compare-and-set on the revision the change was based on, so of two replicas moving
    the same deployment only one wins and announces it; the loser drops its change and reloads.
    """

    def __init__(self, ctx: ServiceContext, endpoints: Endpoints) -> None:
        self.ctx = ctx
        self.endpoints = endpoints
        s: Settings = ctx.settings
        self.steps = domain.normalize_steps(s.rollout_steps)
        self.interval_s = s.rollout_step_interval_s
        self.stable_check_s = STABLE_CHECK_S
        self.routes: dict[str, Route] = {}
        self._defaults: dict[str, Route] = {}
        self.ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._outbox: deque[_Pending] = deque()
        self._persist_lock = asyncio.Lock()
        self._kv: Any = None
        self._watcher: Any = None
        self._rewatched = asyncio.Event()  # set when `_watcher` is replaced (`_rewatch`) or closed
        self.caught_up = Progress()  # times the routes were watched anew and read again after a loss (`_caught_up`)
        self._revisions: dict[str, int] = {}  # KV revision each in-memory route is based on
        self._watched = 0  # the last KV revision (of any route) the watch has applied or passed over
        self._watch_moved = asyncio.Event()
        self._unpersisted: Counter[str] = Counter()  # outbox entries per deployment
        self.conflicts = 0  # compare-and-sets lost to another replica's write, of every deployment (a count only)
        self._poisoned: dict[str, str] = {}  # deployment -> why its last change was dropped unpersisted
        # deployment -> why its route in KV cannot be read (JetStream's answer aimed at its key, say): the proxy
        # refuses it until a readable route is written. Its last readable revision (KV history, `recover`; or the
        # last route this replica held) stays in `routes`, on every replica, so that an operator's change
        # (compare-and-set on the unreadable value's revision) starts from it and the deployment stays its tenant's.
        self.unreadable: dict[str, str] = {}
        # deployment -> (its unreadable revision, the last readable one before it, 0: none), once `recover` read its
        # KV history: `routes` holds that last readable revision.
        self._recovered: dict[str, tuple[int, int]] = {}
        # Decisions move traffic, so only those signed by a trusted gatekeeper key are acted on.
        self.verifier = Verifier(ctx.bus, s)
        # Analysis records are signed with the router's own key (never the gatekeeper's: lockgate.analysisruns).
        self.signer = analysisruns.router_signer(s)
        # Calls priced as the ledger books them: a call of unknown usage at its worst case (`_pricer`).
        price = _pricer(s)
        # Live evidence per variant for canary analysis, fed by `observe`: at $0, a canary whose upstream reported
        # no usage was promoted on cost_per_request while each of its calls was billed its worst case (probe p63 B).
        self.evidence = Evidence(price)
        # Shadow traffic: the served-versus-shadow comparison (from events) and this replica's mirror budgets.
        # A copy given up on at its worst case (probe p60 F2).
        self.shadows = Ledger(price)
        self._budgets: dict[str, tuple[tuple[str, float], Budget]] = {}
        self._ledgers: dict[str, tuple[str, float]] = {}
        self._shadowed = asyncio.Event()  # set after shadow bookkeeping, for `wait_for_shadow`
        self._scored = asyncio.Event()  # set after online scores, for `wait_for_scores`
        # Analysed deployments with evidence since their last look: a due look is taken as soon as evidence
        # arrives (not at the next tick), and one without new evidence waits up to one interval more for it.
        self._fresh: set[str] = set()
        # deployment -> its rollout (canary release, start) whose canary failed a call of its own, and the first such
        # call's time: the canary's diversions by an open breaker count as its failures from then on (`_diverted`)
        self._failing: dict[str, tuple[str, float, float]] = {}
        # deployment -> the latest run of its canary's requests diverted to stable by an open breaker, as every
        # replica's events report them (`_note_trip`, read by `tripped`).
        self._trips: dict[str, _Trip] = {}
        # This replica's upstream calls (the proxy's, set when the router is wired): its breakers hold a canary's
        # step while they refuse its calls, before any request was diverted (`tripped`).
        self.upstream: Upstream | None = None
        # This replica's requests with an upstream call under way (the proxy adds and removes them): a look counts
        # those of the judged releases unanswered past `router_unanswered_s` as failures (`unanswered`).
        self.inflight: InFlight[Underway] = InFlight()
        self.unanswered_s = s.router_unanswered_s
        # deployment -> why the served events from before this replica started (or published while it was cut off from
        # the bus) are not all read back yet (`handlers.read_back`): its looks judge part of its evidence, so they
        # wait (`analysis.incomplete`).
        self.unreplayed: dict[str, str] = {}
        self.replayed = asyncio.Event()  # set while the served events awaited (`await_replay`) are all read back
        self._held: dict[str, float] = {}  # deployment -> when its due step may read its admission again
        self._later_tasks: set[asyncio.Task[None]] = set()  # operators' changes still being persisted (`_later`)
        # deployment -> since when (wall clock) this replica has seen a DRIFT report able to move its route
        # (`progress.drift_moves`, `_note_drift`), and the stream sequence of the last report `_hold_drifts` read since
        self._drift_from: dict[str, float] = {}
        self._drifts_read: dict[str, tuple[float, int]] = {}
        # True while this replica serves stable only: cut off from the bus longer than router_cut_off_s, until it
        # is back and has reloaded its routes (run_cut_off; read by the proxy on every request). Why: its connection
        # lost ("lost", run_cut_off), or connected to a server that answers nothing ("unresponsive", run_unanswered).
        self.cut_off = False
        self._cuts: set[str] = set()
        # True once it served stable only, cut off, for longer than router_cut_off_refuse_s (if set): it then refuses
        # its governed deployments until it is back (read by the proxy on every request).
        self.refusing = False
        self._refuse_timer: asyncio.TimerHandle | None = None
        # The router's secret (`load_secret`): keys the sticky buckets and the user hashes. Read at `restore`.
        self.secret = b""

    # reads (hot path)
    def sticky_salt(self, route: Route) -> str:
        """The key of the route's sticky buckets (domain.sticky_salt): the same on every replica."""
        return domain.sticky_salt(self.secret, route)

    def user_hash(self, tenant: str, user: str) -> str:
        """A tenant's user id as events record it (domain.user_hash): the same on every replica."""
        return domain.user_hash(self.secret, tenant, user)

    def route(self, deployment: str) -> Route:
        """Current route of a deployment (the default route if none was configured)."""
        r = self.routes.get(deployment)
        if r is None:
            r = self._defaults.get(deployment)
            if r is None:
                # Unconfigured deployments are cached apart, bounded, so odd headers cannot grow memory.
                if len(self._defaults) >= 1024:
                    self._defaults.clear()
                r = self._defaults[deployment] = domain.default_route(deployment)
        return r

    async def wait_for(self, predicate: Callable[[dict[str, Route]], bool], timeout: float) -> None:
        """Wait until predicate(routes) holds (checked after every change); TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            while not predicate(self.routes):
                await self._changed.wait()

    async def changes(self, deployment: str, keepalive_s: float = 15.0) -> AsyncIterator[Route | None]:
        """The deployment's route now, then each time any route changes (runs until the caller stops); None
        after `keepalive_s` without a change, so a watcher can tell a client that went away."""
        while True:
            changed = self._changed  # taken before the read: a change in between is never missed
            yield self.route(deployment)
            while True:
                try:
                    await asyncio.wait_for(changed.wait(), keepalive_s)
                    break
                except TimeoutError:
                    yield None

    # lifecycle
    async def load_secret(self) -> None:
        """Read the router's secret from its bucket, which no other identity but admin may read; the first replica
        creates it (create-only, and the bucket keeps every key's first value: a second create is refused), the
        others read the one that won."""
        bus, bucket = self.ctx.bus, self.ctx.bus.subjects.kv_router_secret
        try:
            kv = await bus.kv(bucket)
            try:
                value = (await kv.get("secret")).value
            except nats.js.errors.KeyNotFoundError:
                with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
                    await kv.create("secret", secrets.token_bytes(domain.SECRET_BYTES))  # another replica's may win
                value = (await kv.get("secret")).value
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot read the router's secret from KV {bucket}: {exc!r}") from None
        if value is None or len(value) != domain.SECRET_BYTES:
            raise UnreadableValue(f"the router's secret in KV {bucket} is not {domain.SECRET_BYTES} bytes: something "
                                  "else wrote it; an admin must delete the bucket, and the next router draws another "
                                  "(every rollout's users are split afresh, user hashes change)")
        self.secret = value

    async def restore(self) -> None:
        """Load the router's secret and persisted routes (watching the KV bucket's initial values), then accept
        decisions."""
        await self.load_secret()
        bus, bucket = self.ctx.bus, self.ctx.bus.subjects.kv_routes
        try:
            self._kv = await bus.kv(bucket)
            # Loaded once the watch reached the bucket's last revision at the start: nats-py's "that was
            # all" marker can come before values already on their way (nats-io/nats.py#842).
            last = (await bus.js.stream_info(f"KV_{bucket}")).state.last_seq
            self._watcher = await self._kv.watchall()
            seen = 0
            while True:
                entry = await self._watcher.updates(timeout=30)
                if entry is not None:
                    self._on_entry(entry)
                    seen = max(seen, entry.revision)
                if seen >= last and (last or entry is None):  # an empty bucket: done at the marker
                    break
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot load routes from KV: {exc!r}") from None
        self.ready.set()
        self._wake.set()

    async def run_watch(self) -> None:
        """Apply route changes written by any replica as they land in KV (runs until close()); when the watch is
        made anew (`_rewatch`), the new one is followed."""
        while (watcher := self._watcher) is not None:
            replaced = self._rewatched
            follow = asyncio.ensure_future(self._apply_watched(watcher))
            swapped = asyncio.ensure_future(replaced.wait())
            try:
                await asyncio.wait((follow, swapped), return_when=asyncio.FIRST_COMPLETED)
            finally:
                follow.cancel()
                swapped.cancel()
            if follow.done() and not follow.cancelled():
                follow.result()  # raises what ended it
                if self._watcher is watcher:
                    return  # stopped, not replaced

    async def _apply_watched(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is not None:
                self._on_entry(entry)

    async def _rewatch(self) -> None:
        """Watch the routes bucket anew, from every key's current value on, in place of the watch before.

        The watch is an ephemeral consumer: a nats-server restart drops it, and nats-py makes it again only once
        two of its heartbeats went missing, 10 to 20 s later. Meanwhile the replica, connected, healthy and serving
        canaries, saw no route another replica wrote: an abort made just after a restart left it sending half its
        users to the aborted canary for 15 s (probe p19 F1). A new watch delivers what was written meanwhile (each
        key's last value) and what is written next."""
        try:
            watcher = await self._kv.watchall()
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot watch the routes in KV again: {exc!r}") from None
        if self._watcher is None:  # closed meanwhile
            with contextlib.suppress(Exception):
                await watcher.stop()
            return
        old, self._watcher = self._watcher, watcher
        replaced, self._rewatched = self._rewatched, asyncio.Event()
        replaced.set()
        if old is not None:
            with contextlib.suppress(Exception):  # dropped with the old server: nothing left to stop
                await old.stop()

    async def run_cut_off(self) -> None:
        """Serve stable only while cut off from the bus (runs until close()).

        A replica that cannot hear the bus hears no BLOCK of a canary and no other replica's abort: past
        `router_cut_off_s` it stops sending anyone to a canary (weight, header route, shadow) until the connection
        is back and its routes are read again from KV (what the others decided meanwhile). After a shorter loss (a
        server restart) it keeps serving canaries, and its routes are read again as well, with the watch made anew:
        the server dropped the watch, which nats-py makes again only 10 to 20 s later (probe p19 F1)."""
        bus, bound = self.ctx.bus, self.ctx.settings.router_cut_off_s
        seen = bus.reconnects
        while True:
            await bus.lost(seen)
            if bus.reconnects == seen:  # down now
                back = seen
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(bound):
                        back = await bus.reconnected(after=seen)
                if back == seen:
                    self._cut("lost", True, f"cut off from the bus for more than {bound:g} s (router_cut_off_s)")
                    back = await bus.reconnected(after=seen)
                seen = back
            else:  # a loss seen only once it was over: the watch may have gone with it all the same
                seen = bus.reconnects
            await self._caught_up()
            self._cut("lost", False, "back on the bus with its routes reloaded")

    async def run_unanswered(self) -> None:
        """Serve stable only while the bus is connected but answers nothing for longer than `router_cut_off_s` (runs
        until close()): a hung nats-server, or a partition that drops the server's side only, hides as much from a
        replica as a lost connection, yet the client counts it lost only after its pings went unanswered for about
        two minutes. Before, such a replica kept sending users to a canary the gate had BLOCKed meanwhile (probe p2).
        Asked with the health check's own probe (`Bus.health`: answered within its deadline whatever the server
        does), a few times per bound."""
        bus, bound = self.ctx.bus, self.ctx.settings.router_cut_off_s
        every = min(1.0, bound / 2)
        since: float | None = None  # when the probes began to go unanswered
        unanswered = 0
        while True:
            began = time.monotonic()
            state, _ = await bus.health()
            if state == "unresponsive":
                since, unanswered = (began if since is None else since), unanswered + 1
                # Two probes at least: one slow answer on a loaded machine is no partition.
                if unanswered >= 2 and time.monotonic() - since >= bound:
                    self._cut("unresponsive", True, f"the bus has answered nothing for more than {bound:g} s "
                                                    "(router_cut_off_s)")
            else:
                since, unanswered = None, 0
                if state == "connected" and "unresponsive" in self._cuts:
                    await self._caught_up()
                    self._cut("unresponsive", False, "the bus answers again and the routes are reloaded")
            await asyncio.sleep(every)  # the probe's cadence, not a synchronisation

    async def _caught_up(self) -> None:
        """Watch the routes anew (`_rewatch`: what any replica writes from now on is applied as it lands), persist
        what this replica changed while cut off (compare-and-set: what another replica wrote wins), then read every
        route again from KV; retried while the bus fails it (a restarted server's JetStream not ready yet)."""
        policy = RetryPolicy(attempts=None, initial_s=0.1, max_s=2.0)

        async def once() -> None:
            await self._rewatch()
            await self.flush()
            await self._reload_all()

        await policy.call(once, retry_on=LockgateError, what="reload routes after a cut-off")
        await self.caught_up.bump()

    async def _reload_all(self) -> None:
        """Read every route again from KV, but those with changes of this replica not persisted yet (their
        compare-and-set settles them)."""
        try:
            stored = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            stored = []
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot list routes in KV: {exc!r}") from None
        keys = set()
        for key in stored:
            with contextlib.suppress(LockgateError):  # a key no deployment maps to (the watch ignores it too)
                keys.add(untoken(key))
        for deployment in keys | set(self.routes):
            if not self._unpersisted[deployment]:
                await self._reload(deployment)

    async def _routes_current(self) -> None:
        """Return once this replica's routes hold every route write any replica made before now: its KV watch has
        applied the bucket's last revision as it is now (a watch that lags longer: every route is read again).

        A gate decision is acted on by one replica (the durable consumer's), on the routes it holds, and acked:
        acted on a route that lacks another replica's write just before (a canary just started or patched in, on
        a decision read before the BLOCK was stored), it would change nothing, and the BLOCK would be lost."""
        bus, bucket = self.ctx.bus, self.ctx.bus.subjects.kv_routes
        try:
            last = (await bus.js.stream_info(f"KV_{bucket}")).state.last_seq
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot read the state of the routes bucket: {exc!r}") from None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_WATCH_LAG_S):
                while self._watched < last:
                    await self._watch_moved.wait()
                return
        log.warning("route watch behind the routes bucket (at %d of %d) for %g s: reading every route again",
                    self._watched, last, _WATCH_LAG_S)
        await self._reload_all()

    def _cut(self, cause: str, on: bool, why: str) -> None:
        (self._cuts.add if on else self._cuts.discard)(cause)
        if bool(self._cuts) != self.cut_off:
            self.cut_off = bool(self._cuts)
            self._refuse_after(self.ctx.settings.router_cut_off_refuse_s if self.cut_off else 0.0)
            log.warning("%s: serving %s", why, "stable only" if self.cut_off else "canaries again")
            self._notify()

    def _refuse_after(self, bound: float) -> None:
        """Refuse governed deployments `bound` seconds from now (0: serve them again, or never refuse)."""
        if self._refuse_timer is not None:
            self._refuse_timer.cancel()
            self._refuse_timer = None
        self.refusing = False
        if bound > 0:
            self._refuse_timer = asyncio.get_running_loop().call_later(bound, self._refuse, bound)

    def _refuse(self, bound: float) -> None:
        self.refusing = True
        log.warning("serving stable only for more than %g s (router_cut_off_refuse_s): refusing governed deployments "
                    "until back on the bus", bound)
        self._notify()

    async def close(self) -> None:
        """Stop watching KV, and persisting operators' changes queued while the bus was away."""
        self._refuse_after(0.0)
        for task in list(self._later_tasks):
            task.cancel()
        watcher, self._watcher = self._watcher, None
        self._rewatched.set()
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _on_entry(self, entry: Any) -> None:
        if entry.revision > self._watched:
            self._watched = entry.revision
            moved, self._watch_moved = self._watch_moved, asyncio.Event()
            moved.set()
        try:
            key = untoken(entry.key)  # KV keys are tokens of deployment names (one-to-one)
        except LockgateError:
            log.warning("ignoring route under a key no deployment maps to: %r", entry.key)
            return
        # Our own writes echo back at a known revision; and while we hold unpersisted changes for
        # a deployment, its compare-and-set settles who wins, so the watch must not move it first.
        if entry.revision <= self._revisions.get(key, 0) or self._unpersisted[key]:
            return
        if entry.operation in ("DEL", "PURGE"):
            self._set(key, None, entry.revision)
            return
        try:
            route = _route_decoder.decode(entry.value)
        except msgspec.DecodeError as exc:
            self._unreadable(key, entry.revision, str(exc))
            return
        self._set(key, route, entry.revision)

    def _set(self, key: str, route: Route | None, revision: int) -> None:
        if route is None:
            self.routes.pop(key, None)
        else:
            self.routes[key] = route
        self._note_drift(key, route)
        self._revisions[key] = revision
        self.unreadable.pop(key, None)
        self._recovered.pop(key, None)
        self._notify()

    def _unreadable(self, key: str, revision: int, why: str) -> None:
        """The deployment's route in KV is no route: refused (never the default route, which passthrough would
        serve ungoverned) until one is written. The revision is kept so that the write repairing it wins its
        compare-and-set at once."""
        log.warning("route of %s in KV is unreadable (%s): refusing its requests until a route is written", key, why)
        self.unreadable[key] = why
        self._revisions[key] = revision
        self._notify()

    async def last_readable(self, deployment: str) -> tuple[Route, int] | None:
        """The newest readable revision of the deployment's route in the key's KV history (the routes bucket keeps
        10 per key) and its revision; None when there is none (a deletion ends the search: what came before it is
        not the deployment's any more). JetStream's answers aimed at the key are what is skipped."""
        last = self._revisions.get(deployment, 0)
        try:
            watcher = await self._kv.watch(token(deployment), include_history=True)
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot read the history of route {deployment!r} from KV: {exc!r}") from None
        entries: list[Any] = []
        try:
            # Up to the revision this replica knows of, at least: nats-py's "that was all" marker can come before
            # values already on their way (nats-io/nats.py#842).
            while True:
                entry = await watcher.updates(timeout=5)
                if entry is not None:
                    entries.append(entry)
                if entries and entries[-1].revision >= last:
                    break
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot read the history of route {deployment!r} from KV: {exc!r}") from None
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        for entry in reversed(entries):
            if entry.operation in ("DEL", "PURGE"):
                return None
            with contextlib.suppress(msgspec.DecodeError):
                return _route_decoder.decode(entry.value), entry.revision
        return None

    async def recover(self, deployment: str) -> tuple[Route, int] | None:
        """For a deployment whose route record is unreadable: its last readable revision (`last_readable`), held as
        its route here, as a replica that was running then holds it, so that every replica, restarted or not, takes
        it for the deployment's (whose it is, what it serves, where an operator's change starts); None when there
        is none (then nothing is held: only an admin's first release writes the deployment anew). The proxy still
        refuses the deployment (`unreadable`) until a route is written. Also None for a readable deployment."""
        revision = self._revisions.get(deployment, 0)
        if deployment not in self.unreadable or self._unpersisted[deployment]:
            return None
        known = self._recovered.get(deployment)
        if known is None or known[0] != revision:
            found = await self.last_readable(deployment)
            if deployment not in self.unreadable or self._revisions.get(deployment, 0) != revision \
                    or self._unpersisted[deployment]:
                return None  # a route was written meanwhile (the watch applied it, or a change of ours is pending)
            if found is None:
                self.routes.pop(deployment, None)
            else:
                self.routes[deployment] = found[0]
            self._note_drift(deployment, found[0] if found else None)
            known = self._recovered[deployment] = (revision, found[1] if found else 0)
        route = self.routes.get(deployment)
        return (route, known[1]) if known[1] and route is not None else None

    def restorable(self, deployment: str) -> int:
        """The revision of the deployment's route `routes` holds as its last readable one (`recover`), for one whose
        route record is unreadable; 0 when none is readable, it was not read yet here, or the record is readable."""
        unread, revision = self._recovered.get(deployment, (0, 0))
        if deployment not in self.unreadable or unread != self._revisions.get(deployment) \
                or deployment not in self.routes:
            return 0
        return revision

    async def run_timer(self) -> None:
        """Advance progressing canaries when their step is due (one loop for all deployments)."""
        while True:
            self._wake.clear()  # before reading: a change or evidence from now on wakes the wait below
            now = time.time()
            due = [d for d in (self._timer_due(r) for r in self.routes.values()) if d is not None]
            if due and min(due) <= now:
                for route in list(self.routes.values()):
                    when = self._timer_due(route)
                    if when is not None and when <= now and (rollbacks := await self._may_step(route, now)) is not None:
                        # The clock read again after the await: a step that begins is timed from when its weight
                        # takes effect, or requests served at the old weight meanwhile count as the new step's.
                        self._step(route, time.time(), rollbacks)
                try:
                    await self.flush()
                except LockgateError as exc:
                    log.warning("rollout state not persisted yet: %s", exc.message)
                continue
            timeout = (min(due) - now) if due else None
            # asyncio.timeout, not wait_for: on 3.11 a stop's cancel that lands as wait_for times out is
            # swallowed, and this loop would then wait forever (seen hanging a test's teardown)
            with contextlib.suppress(TimeoutError):  # a step fell due
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def run_trust_watch(self, looked: tuple[Keyring | None, float], every_s: float = TRUST_CHECK_S) -> None:
        """Act on a change of the trust roots at once, not at a canary's next step: a canary whose admitting
        decision no longer verifies (its key revoked or retired, an approval it rests on withdrawn) goes back to 0%,
        and a break-glass override whose admin's key is revoked (or who is no admin any more) ends. Before, a canary
        at 10%, or a paused one, kept its traffic until something would raise it, and an override for good. The
        trust file is local and nothing announces its changes, so this looks at it (a stat) every `every_s` seconds.
        `looked`: the first look's outcome (`trust_look`, which the start awaits before it serves)."""
        seen, checked = looked
        while True:
            await asyncio.sleep(every_s)
            seen, checked = await self.trust_look(seen, checked)

    async def trust_look(self, seen: Keyring | None = None, checked: float = -math.inf) -> tuple[Keyring | None, float]:
        """One look of `run_trust_watch` (the roots acted on before: `seen`; the last read of the decisions at
        monotonic `checked`): a change of the roots is acted on, and every serving stable's and every live canary's
        decision is read again at once after one, and every `stable_check_s` seconds (`_hold_stables`,
        `_hold_canaries`), with every live canary's drift reports stored since they last were (`_hold_drifts`). A
        change it cannot act on (the file malformed, the decisions unreadable) is looked at again at the next. The
        first look, with nothing seen, reads them all: a route restored from KV may rest on a release no decision
        allows now (one BLOCKed while every replica was down), so the start awaits it before serving. Returns the
        new (seen, checked)."""
        try:
            roots = self.verifier.roots()
            if roots is not seen:
                await self._recheck(roots)
                seen = roots
                checked = -math.inf  # a key trusted or revoked changes which decisions count: look again now
        except LockgateError as exc:
            log.error("trust roots changed, not acted on yet: %s", exc.message)
        if time.monotonic() - checked >= self.stable_check_s:
            checked = time.monotonic()  # one that failed (the bus away) is tried again at the next period
            for hold, what in ((self._hold_stables, "serving stables"), (self._hold_canaries, "live canaries"),
                               (self._hold_drifts, "drift reports of live canaries")):
                try:
                    await hold()
                except LockgateError as exc:
                    log.warning("%s not checked again yet: %s", what, exc.message)
        return seen, checked

    async def _hold_canaries(self) -> None:
        """Every live canary's admission (`domain.rests_on_admission`) against its release's current decision, read
        again now. A verified decision that does not allow it is acted on as its message arriving is (`_act_on`:
        a BLOCK aborts the canary, a NEEDS_REVIEW holds it at 0%); none that verifies takes it back to 0%
        (`_unadmit`). Retryable if one cannot be read or acted on now (the others are checked all the same).

        A decision's message reaches one replica (the router's durable consumer is shared), and the others learn it
        from the route that one writes. One that takes it and cannot act (a partition that drops the server's side
        only, a frozen process) held it until redelivery, 30 s later, maybe to another such replica: a connected,
        healthy replica kept a canary a person rejected at 50% for 30 to 180 s (probe p19 F2). The decision is in
        KV before it is announced, so every replica acts on it within `stable_check_s` whatever the others do."""
        unread: list[str] = []
        for route in list(self.routes.values()):
            if not domain.rests_on_admission(route):
                continue
            try:
                await self._hold_canary(route)
            except Retryable as exc:  # the bus away, the route contended: looked at again next time
                unread.append(f"{route.deployment}: {exc.message}")
        await self.flush()
        if unread:
            raise Retryable(f"canaries not checked again: {'; '.join(unread)}")

    async def _hold_canary(self, route: Route) -> None:
        """A live canary's admission against its release's current decision, read again now: a verified one that
        does not allow it is acted on as its message arriving is (a BLOCK aborts the canary, and says so; before,
        a trust change that found one only took the canary back to 0%); none that verifies takes it back to 0%."""
        admission = await self._admission_now(route)
        if admission is None:
            return
        decision = admission[1]
        if decision is not None and decision.id != route.decision_id:
            log.warning("%s: canary %s rests on an admission its current decision %s (%s) does not give: acting on "
                        "that decision", route.deployment, decision.release, decision.id, decision.decision)
            await self._act_on(decision)
        elif self.routes.get(route.deployment) is route:  # else changed meanwhile: looked at again next time
            self._unadmit(route, admission)

    def _note_drift(self, deployment: str, route: Route | None) -> None:
        """Note when a DRIFT report began to be able to move `deployment`'s route, as this replica saw the route change
        (`_hold_drifts` reads only reports stored since). A report stored before (while the canary had 0%, say, or a
        `drift` metric judged drift) was not acted on when it came, and must not be later (probe p24 F1: a header
        step's report aborted the canary the moment an approval gave it weight)."""
        if route is None or progress.drift_moves(route) is None:
            self._drift_from.pop(deployment, None)
        elif deployment not in self._drift_from:
            self._drift_from[deployment] = time.time()

    async def _hold_drifts(self) -> None:
        """The drift reports stored for every route a DRIFT moves now (`progress.drift_moves`: a live canary whose
        analysis does not judge drift, a blue-green release under post-promotion analysis) since this replica last
        read them, each acted on as its message arriving is (`_act_on_drift`: a DRIFT aborts the canary, or rolls
        the release back). Retryable if one cannot be read or acted on now (the others are read all the same; it is
        read again next time).

        A report's message reaches one replica (the router's durable consumer is shared), and the others learn what
        it did from the route that one writes. One that takes it and cannot act (a partition that drops the server's
        side only, a frozen process) held it until redelivery, 30 s each and 8 at most, while connected, healthy
        replicas kept the drifting canary serving. The report is in the events stream before it is delivered, so
        every replica acts on it within `stable_check_s` whatever the others do: every report stored since the route
        could be moved by one (`_note_drift`; a replica started since reads from its start), not the newest only:
        the monitor's reports of the deployment's whole traffic, and other tenants' and applications' own, share its
        subject, and one of them follows a canary's report within seconds."""
        stream = self.ctx.bus.subjects.streams["events"].name
        moved = dict(self._drift_from)
        # A route no report moves now, or moved again since (a retry, a canary given weight again), is read anew.
        self._drifts_read = {d: read for d, read in self._drifts_read.items() if moved.get(d) == read[0]}
        unread: list[str] = []
        for deployment, since in moved.items():
            try:
                await self._hold_drift(stream, deployment, since)
            except Retryable as exc:  # the bus away, the route contended: read again next time
                unread.append(f"{deployment}: {exc.message}")
        if unread:
            raise Retryable(f"drift reports not read: {'; '.join(unread)}")

    async def _hold_drift(self, stream: str, deployment: str, since: float) -> None:
        """The reports on `deployment`'s drift subject stored since this replica last read them (since `since` at
        first), each acted on in turn (`_hold_drifts`). One get when none is new, the common case."""
        bus = self.ctx.bus
        subject = bus.subjects.drift(deployment)
        last = await bus.last_stored(stream, subject)
        read = self._drifts_read.get(deployment)
        if last is None or (read is not None and last[0] <= read[1]) or (read is None and last[1] < since):
            self._drifts_read[deployment] = (since, last[0] if last is not None else 0)
            return
        stored = bus.stored_after(stream, subject, read[1]) if read is not None else \
            bus.stored_since(stream, subject, since)
        async for seq, _, data in stored:
            try:
                await self._act_on_drift(_drift_decoder.decode(data))
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec checks UTF-8 with Python's codec
                log.warning("%s: skipped unreadable drift report %d of %s: %s", deployment, seq, stream, exc)
            except Retryable:
                raise  # read again from this one next time
            except LockgateError as exc:  # one its message would have dead-lettered: never acted on
                log.error("%s: drift report %d of %s cannot be acted on: %s", deployment, seq, stream, exc.message)
            self._drifts_read[deployment] = (since, seq)
            if self._drift_from.get(deployment) != since:
                return  # ended (by this report, say): nothing more to read for it

    async def _hold_stables(self) -> None:
        """Every route's serving stable against its release's current decision, read again now: rolled back
        (`domain.hold_stable`) when a verified one does not allow it. Its decision's message rolls it back when it
        arrives; this is for one the route never acted on, and survives a restart: before, nothing but that
        message ever looked at the stable's decision (probe p14). BusUnavailable if a decision cannot be read
        (the others are checked all the same)."""
        unread: list[str] = []
        for route in list(self.routes.values()):
            release = route.stable.release
            if not release:
                continue
            try:
                decision = await self._stored_decision(release)
                if decision is None or (domain.allows(decision, release) and route.glass_stable is None):
                    continue
                rollbacks = await self._known_good_now(route)
            except BusUnavailable as exc:
                unread.append(f"{route.deployment}: {exc.message}")
                continue
            if self.routes.get(route.deployment) is not route:
                continue  # changed while the decisions were read: looked at again next time
            new = domain.hold_stable(route, decision, rollbacks)
            if new is not None:
                log.warning("%s: %s", route.deployment, new.reason)
                self._apply(new)
        await self.flush()
        if unread:
            raise BusUnavailable(f"stables not checked again: {'; '.join(unread)}")

    async def _recheck(self, roots: Keyring) -> None:
        """Every route's admission (`_hold_canary`) and override against the trust roots `roots`; Retryable if a
        decision cannot be read or acted on now (nothing is skipped: the caller tries the whole again)."""
        unread: list[str] = []
        for route in list(self.routes.values()):
            override = route.override
            if override is not None and roots.people is not None:
                gone = withdrawn(roots.people, roots.revoked, [(override.actor, override.key_id)], roles=("admin",))
                if gone:
                    self._apply(domain.clear_override(route, why=gone[override.actor]))
                    route = self.route(route.deployment)
            if not domain.rests_on_admission(route):  # at 0% too: a header route may serve it
                continue
            try:
                await self._hold_canary(route)
            except Retryable as exc:
                unread.append(f"{route.deployment}: {exc.message}")
        await self.flush()
        if unread:
            raise Retryable(f"admissions not checked again: {'; '.join(unread)}")

    def _timer_due(self, route: Route) -> float | None:
        """`_due`, no earlier than a deployment's admission can be read again (see `_may_step`)."""
        when, held = self._due(route), self._held.get(route.deployment)
        return when if when is None or held is None else max(when, held)

    async def _may_step(self, route: Route, now: float) -> Mapping[str, GateDecided | None] | None:
        """What a step of a due route needs when the timer may step it, else None. A step may raise a canary's
        traffic or promote it, so the decision that admitted it must still verify (a revoked key's no longer does:
        the canary goes back to 0% instead); a promoted route's step (its post-promotion analysis) may roll it back,
        and only to a known-good release a decision allows now, so those decisions are read (returned; none for a
        canary, whose step aborts it at worst). None too when the route changed meanwhile (the loop looks again) or
        a decision cannot be read (tried again in `_ADMISSION_RETRY_S`: a step never rests on a decision nobody
        could check)."""
        try:
            admission = await self._admission_now(route)
            rollbacks = await self._known_good_now(route) if route.phase == "promoted" else domain.NO_DECISIONS
        except BusUnavailable as exc:
            log.warning("%s: not stepped: %s", route.deployment, exc.message)
            self._held[route.deployment] = now + _ADMISSION_RETRY_S
            return None
        self._held.pop(route.deployment, None)
        if self.routes.get(route.deployment) is not route or self._unadmit(route, admission):
            return None
        return rollbacks

    async def _known_good_now(self, route: Route) -> dict[str, GateDecided | None]:
        """The current verified decision (None: none, or it does not verify) of each of `route`'s known-good
        releases but its stable, for a rollback (domain.last_good); BusUnavailable if one cannot be read."""
        return {t.release: await self._stored_decision(t.release) for t in route.good
                if t.release != route.stable.release}

    def _due(self, route: Route) -> float | None:
        """When the timer next acts on a route: its analysis look once it is due and new evidence has arrived
        (the look follows the evidence at once, not a tick later), else one interval later all the same, so
        looks go on without traffic. Looks stay at most one per interval: the same alpha spent per look. A
        deployment waiting for the read-back of its evidence (`unreplayed`) looks one interval late too: its look
        would only wait, and written first it would put off by an interval the look of a replica that has all of
        the evidence (the next look is shared in KV)."""
        when = progress.due_at(route)
        if when is None or when != route.next_step_at or not progress.analysed(route) \
                or (route.deployment in self._fresh and route.deployment not in self.unreplayed):
            return when
        return when + progress.interval_of(route, self.interval_s)

    # changes
    async def start_canary(self, deployment: str, req: domain.CanaryRequest,
                           override: domain.Override | None = None, actor: str = "",
                           tenant: str | None = None) -> Route:
        """Start a canary at 0%; if a verified decision already allows its release (KV), act on it at once.

        A new stable release takes all traffic, so it too needs a decision that allows it, always: an
        admin's break-glass `override` is signed for the canary release only. A canary asked to start at
        a weight needs one as well, unless the override is given. With `tenant` (the caller's; None for an admin),
        both releases must be registered under it.
        """
        await self._await_ready()
        stable = await self.target(req.stable_release, tenant)
        canary = await self.target(req.canary_release, tenant)
        if override is None and req.initial_weight:
            decision, why_not = await self._read_decision(req.canary_release)
            if not domain.allows(decision, req.canary_release):
                # Why a stored decision does not count (a revoked key, a withdrawn approval) says how to restore it.
                why = f" ({why_not})" if why_not else ""
                raise domain.NotAdmitted(
                    f"refused: canary {req.canary_release!r} has no verified gate decision allowing it{why}, so it "
                    "cannot start at a weight; start it without initial_weight (it waits at 0%) or an admin "
                    "may override with break_glass")
        followed: list[str] = []
        # The rollout's id, which keys its sticky buckets with the router's secret, drawn here (domain stays
        # deterministic), once for every attempt.
        rollout = secrets.token_hex(8)

        async def change() -> None:
            # The new stable's decision is read on every attempt and checked on the route this attempt changes: a
            # change that lost to another replica's write is recomputed on the reloaded route, whose stable may no
            # longer be the one the request keeps (a BLOCKed release put back at 100% without a decision, had it been
            # checked once against the stale route).
            stable_decision = await self._stored_decision(req.stable_release)
            route = self.route(deployment)
            current = route.stable.release
            if req.stable_release != current:
                domain.require_allowed(req.stable_release, stable_decision, "stable release",
                                       f"the current stable is {current or 'none'!r}; a break-glass override covers "
                                       "only the canary release it names: start from a stable a decision allows")
            strategy = req.strategy
            steps = domain.normalize_steps(strategy.weights()) if strategy and strategy.weights() else self.steps
            # At 0% (or held at its break-glass weight): the canary's decision is read once the route holds it
            # (`_settle` follows it), so a BLOCK stored meanwhile is the one acted on.
            started = domain.start_canary(route, req, stable=stable, canary=canary,
                                          first_step=steps[0], override=override, now=time.time(),
                                          rollout=rollout)
            self._apply(msgspec.structs.replace(started, strategy=strategy, started_at=time.time(), paused=False,
                                                analysis=None), actor=actor or (override.actor if override else ""))
            self.evidence.forget(deployment, keep={req.stable_release, req.canary_release})
            followed[:] = [req.canary_release, *([req.stable_release] if req.stable_release != current else [])]

        return await self._settle(deployment, change, followed)

    async def first_release(self, deployment: str, release: str, actor: str = "", tenant: str | None = None) -> Route:
        """Give a deployment without a stable release its first one, serving 100% at once, if and only if the
        release's verified current decision allows it, as a new stable of a canary needs (domain.first_release);
        with `tenant` (the caller's; None for an admin), a release registered under it."""
        await self._await_ready()
        target = await self.target(release, tenant)

        async def change() -> None:
            decision = await self._stored_decision(release)  # on every attempt
            # `_settle` recovered the route of one whose record is unreadable: its last readable revision, alike on
            # every replica, restarted or not. With one, the deployment keeps what it serves (domain.restore: that
            # revision itself, back with its own stable release only); with none (admin keys only, check_tenant),
            # it is given a first release from nothing.
            why = self.unreadable.get(deployment, "")
            restorable = self.restorable(deployment)
            route = self.route(deployment)  # the default route where nothing is held
            if restorable:
                self._apply(domain.restore(route, release, decision, actor, restorable, why), actor=actor)
                return
            new = domain.first_release(route, target, decision, actor)
            if why and deployment not in self.routes:
                new = msgspec.structs.replace(new, reason=f"{new.reason} (written over its unreadable route record, "
                                                          f"{why}, none of whose KV history is readable)")
            self._apply(new, actor=actor)

        return await self._settle(deployment, change, [release])

    async def apply_decision(self, decision: GateDecided) -> int:
        """Apply a gate decision to every deployment canarying its release; returns how many changed. A deployment
        it may roll back (its stable is the release) has its known-good releases' decisions read first: a rollback
        goes only to one a decision allows now."""
        # Only a decision that does not allow the release rolls back the routes serving it.
        allowing = domain.allows(decision, decision.release)
        serving = [] if allowing else [r for r in self.routes.values() if r.stable.release == decision.release]
        rollbacks = {r.deployment: await self._known_good_now(r) for r in serving}
        if not allowing and (any(self.routes.get(r.deployment) is not r for r in serving) or any(
                r.stable.release == decision.release and r.deployment not in rollbacks for r in self.routes.values())):
            # Read for routes as they were: one changed meanwhile is looked at again, never rolled back unread.
            raise RouteContended("routes changed while their known-good releases' decisions were read")
        now = time.time()
        changed = 0
        for route in list(self.routes.values()):
            new = progress.on_decision(route, decision, progress.steps_of(route, self.steps),
                                     progress.interval_of(route, self.interval_s), now,
                                     rollbacks.get(route.deployment, domain.NO_DECISIONS))
            if new is not None:
                self._apply(new)
                changed += 1
        return changed

    async def on_decision(self, decision: GateDecided) -> None:
        """Handle a decision from the bus: apply in memory, then persist (retried via nack).

        The release's current decision is the one in KV (the gatekeeper writes it there before publishing, by
        compare-and-set): that one is applied, whatever the message is. A message it superseded (a PASS
        redelivered after the BLOCK that followed it) is never acted on, whatever the decisions' times say: they
        are the gatekeepers' clocks, and a replica's running ahead made an old PASS outrank the NEEDS_REVIEW after
        it. Without a verified current decision, a message is applied only if it allows nothing (it can only make
        the route stricter)."""
        await self._await_ready()
        current = await self._stored_decision(decision.release)
        if current is not None:
            if current.id != decision.id:
                log.info("decision %s for %s is not its current one, %s (%s): applying that", decision.id,
                         decision.release, current.id, current.decision)
            decision = current
        elif domain.allows(decision, decision.release):
            log.warning("ignoring gate decision %s for %s: it is not the release's current verified decision",
                        decision.id, decision.release)
            return
        await self._act_on(decision)

    async def _act_on(self, decision: GateDecided) -> None:
        """Act on a release's current verified decision, on routes holding every route write made before now; a
        decision's message (`on_decision`) and the periodic re-read of live canaries (`_hold_canaries`) alike."""
        await self._routes_current()
        await self._until_won(lambda: self.apply_decision(decision))  # reads its decisions again on every attempt

    async def manual(self, deployment: str, action: str, override: domain.Override | None = None,
                     actor: str = "", to: str = "", canary: str = "", started_at: float | None = None) -> Route:
        """Operator abort (always allowed), promote (only an admitted canary, or break-glass), undo (the previous
        release back, within a blue-green scale-down window; with `to`, a named known-good release) or
        clear-override; with `canary` or `started_at`, only while the deployment runs that rollout
        (`progress.expect`, checked again on the route each attempt applies to)."""
        await self._await_ready()
        followed: list[str] = []

        async def change() -> str:
            now = self.route(deployment)
            if action == "abort" and not bluegreen.swappable(now):
                return await self._abort(deployment, actor, canary, started_at)
            # Read on every attempt, for the route as it is then. `undo`: refused if the release it puts back is not
            # allowed now (its verified current decision: the gate may have BLOCKed it since); `retry`: refused for
            # a release BLOCKed since; `promote`: the canary must still be admitted (`_admission_now`).
            before = self.route(deployment)
            previous = before.previous.release if before.previous else ""
            release = (to or previous) if action == "undo" else (
                before.canary.release if action == "retry" and before.canary else "")
            decision = await self._stored_decision(release) if release else None
            admission = await self._admission_now(before) if action == "promote" and override is None else None
            # What a break-glass promote goes past: the canary's current decision, which then keeps it serving.
            glassed = await self._stored_decision(before.canary.release) \
                if action == "promote" and override is not None and before.canary is not None else None
            rollbacks = await self._known_good_now(before) if action == "abort" else {}
            # The route as it is after the reads; a decision read for another release than the one this change puts
            # back counts as none (domain's checks name the release).
            route = self.route(deployment)
            progress.expect(route, action, canary, started_at)
            if action == "retry":
                self._retry(route, decision, actor)
                assert route.canary is not None
                followed[:] = [route.canary.release]
            elif action == "undo" and to:
                self._apply(domain.undo_to(route, to, decision, actor), actor=actor)
                followed[:] = [to]
            elif action == "clear-override":
                self._apply(domain.clear_override(route), actor=actor)
            elif action == "undo":
                # Exactly the previous release, whose decision was checked; never another in its place.
                self._apply(bluegreen.undo(route, decision, actor), actor=actor)
                assert route.previous is not None
                followed[:] = [route.previous.release]
            elif action == "abort" and bluegreen.swappable(route):
                # Within a blue-green scale-down window, or while its post-promotion analysis runs, an abort is an
                # instant swap back to the last known-good release, as a failed analysis's rollback (an abort is
                # always allowed: it takes off the release the operator stops).
                if route is not before:  # changed while the decisions were read: try again on the route as it is
                    raise RouteContended("route changed while its known-good releases' decisions were read")
                self._apply(bluegreen.abort_promotion(route, actor, rollbacks), actor=actor)
            elif action == "abort":  # its route changed while the known-good releases' decisions were read
                raise RouteContended("route changed while its known-good releases' decisions were read")
            else:
                refused = self._unadmit(route, admission, actor) if override is None else ""
                if refused:
                    return refused
                over = glassed.id if glassed is not None and route.canary is not None \
                    and glassed.release == route.canary.release else ""
                promoted = domain.manual_promote(route, override, time.time(), over)
                if actor and override is None:  # the override's reason names its admin already
                    promoted = msgspec.structs.replace(promoted, reason=f"{promoted.reason} {actor}")
                promoted = bluegreen.promoted(promoted, time.time(), progress.interval_of(route, self.interval_s))
                self._apply(promoted, actor=actor)
                assert route.canary is not None
                followed[:] = [route.canary.release]
            return ""

        return await self._settle(deployment, change, followed)

    async def _abort(self, deployment: str, actor: str, canary: str, started_at: float | None) -> str:
        """An operator's abort of a canary (`manual`), applied before anything is read: all traffic goes back to the
        stable at once, and only then is the stable's current decision read: one that does not allow it hands all
        traffic on to the last known-good release one allows (`domain.hold_stable`). Before (probe p67 F1), that read
        came first: with the bus away it failed, nothing was applied, the operator was told "abort applied but not
        yet persisted", and the canary went on serving and was promoted. Now a read that fails leaves the abort
        applied and its write queued (BusUnavailable: `_settle` says so); the stable is checked by `_hold_stables`
        within `stable_check_s` of the bus answering again."""
        route = self.route(deployment)
        progress.expect(route, "abort", canary, started_at)
        if route.phase in ("promoted", "aborted"):
            raise domain.InvalidRollout(f"canary of {deployment!r} is already {route.phase}")
        self._apply(domain.abort(route, f"by operator {actor}" if actor else "by operator"), actor=actor)
        aborted = self.route(deployment)  # as applied (`_apply` unpauses a finished canary)
        held = await self._stored_decision(aborted.stable.release) if aborted.stable.release else None
        if held is None:
            return ""
        rollbacks = await self._known_good_now(aborted) if not domain.allows(held, held.release) else {}
        if self.routes.get(deployment) is not aborted:
            return ""  # moved on while the decisions were read: `_hold_stables` looks at the stable it serves
        back = domain.hold_stable(aborted, held, rollbacks)
        if back is not None:
            self._apply(back, actor=actor)
        return ""

    async def patch(self, deployment: str, body: dict[str, Any], actor: str, tenant: str | None = None) -> Route:
        """A JSON merge patch of the deployment (patch.py): only the fields it names change; the rollout keeps
        its phase, step and analysis. A new canary release needs a verified decision allowing it to keep
        a weight (else it waits at 0%, as a new canary does); with `tenant` (the caller's; None for an admin), one
        registered under it."""
        await self._await_ready()
        doc = patch.apply(self.route(deployment), body)
        canary = await self.target(doc.canary_release, tenant) if doc.canary_release else None
        followed: list[str] = []

        async def change() -> str:
            # Read on every attempt, for the route as it is then: a new canary release's decision; for a higher
            # weight of the same canary, its admission (`_admission_now`).
            before = self.route(deployment)
            doc_before = patch.apply(before, body)
            swapped = before.canary is None or doc_before.canary_release != before.canary.release
            decision = await self._stored_decision(canary.release) if canary is not None and swapped else None
            raises = doc_before.weight > before.weight and not swapped
            admission = await self._admission_now(before) if raises else None
            route = self.route(deployment)
            doc_now = patch.apply(route, body)  # recomputed on the route a lost compare-and-set reloads
            fields = patch.changed(route, doc_now)
            if not fields:
                raise domain.InvalidRollout(f"the patch changes nothing on {deployment!r}")
            refused = self._unadmit(route, admission, actor) if "weight" in fields and raises else ""
            if refused:
                return refused
            new, now = route, time.time()
            if "strategy" in fields:  # first: a canary swapped in with it is timed by the new strategy
                new = progress.replace_strategy(new, doc_now.strategy, self.interval_s, now)
            if "canary_release" in fields:
                assert canary is not None
                new = progress.replace_canary(new, canary, decision, now, progress.interval_of(new, self.interval_s))
            if "weight" in fields:
                new = progress.set_weight(new, doc_now.weight, actor)
            new = msgspec.structs.replace(new, version=route.version + 1,
                                          reason=f"patched {', '.join(fields)} by {actor or 'operator'}: {new.reason}")
            self._apply(new, actor=actor)
            if "canary_release" in fields:
                assert canary is not None
                self.evidence.forget(deployment, keep={new.stable.release, canary.release})
                followed[:] = [canary.release]
            return ""

        return await self._settle(deployment, change, followed)

    def _retry(self, route: Route, decision: GateDecided | None, actor: str) -> None:
        """The rollout restarted at 0%; the canary's current decision, read once the route holds it, is acted on
        after (`_settle` follows it): a release still allowed goes straight to its first step."""
        if decision is not None and route.canary is not None and decision.release == route.canary.release \
                and decision.decision == "BLOCK":
            raise domain.InvalidRollout(f"refused: {decision.release!r} is BLOCKed by the gate"
                                        + (f": {decision.reason}" if decision.reason else "")
                                        + "; retry only a release the gate allows")
        restarted = progress.retry(route, actor, time.time())
        self._apply(restarted, actor=actor)
        assert restarted.canary is not None
        self.evidence.forget(route.deployment, keep={restarted.stable.release, restarted.canary.release})

    async def operate(self, deployment: str, action: str, actor: str, *, weight: float = 0.0,
                      why: str = "", step: int = 0, canary: str = "", started_at: float | None = None) -> Route:
        """Operator pause, resume, approve (of pause step `step`) or set-weight (progress.py), recorded with the
        actor's identity; with `canary` or `started_at`, only while the deployment runs that rollout (an approval
        names all three, and is checked by `progress.approve`)."""
        await self._await_ready()

        async def change() -> str:
            # Raising the weight or resuming the steps: the canary must still be admitted, read on every attempt.
            before = self.route(deployment)
            raises = action in ("resume", "approve") or (action == "set-weight" and weight > before.weight)
            admission = await self._admission_now(before) if raises else None
            route = self.route(deployment)
            if action != "approve":  # on the route this attempt applies to: after a lost compare-and-set too
                progress.expect(route, action, canary, started_at)
            refused = self._unadmit(route, admission, actor) if raises else ""
            if refused:
                return refused
            if action == "pause":
                new = progress.pause(route, actor, why)
            elif action == "resume":
                new = progress.resume(route, actor, progress.interval_of(route, self.interval_s), time.time())
            elif action == "approve":
                # Checked on the route this attempt applies to (re-read after a lost compare-and-set): two approvals
                # of one pause, on one replica or two, end that pause once; the other finds the route moved on.
                new = progress.approve(route, step, canary, started_at, actor,
                                       progress.interval_of(route, self.interval_s), time.time())
            elif action == "set-weight":
                new = progress.set_weight(route, weight, actor)
            else:
                raise domain.InvalidRollout(f"unknown rollout action {action!r}")
            self._apply(new, actor=actor)
            return ""

        return await self._settle(deployment, change)

    # live evidence
    def analysing(self) -> bool:
        """True while any deployment's rollout is under analysis or mirrored (its events are worth keeping), or has
        a step or promotion still to come (its canary's diversions by an open breaker hold them: `tripped`)."""
        return any(progress.collecting(r) or progress.shadowing(r) or r.phase == "progressing"
                   for r in self.routes.values())

    def observe(self, events: list[InferenceEvent]) -> None:
        """Keep the events of deployments whose canary is under analysis (either variant's release), and pair
        shadow events with the served ones of mirrored deployments. Only the routers' events of requests they
        served arrive here (`subjects.served`): an application's could say anything."""
        shadowed = fresh = False
        for e in events:
            if e.cached:  # a replay: an app repeating one cached request must not fill the canary's sample
                continue
            deployment = e.deployment or e.app
            route = self.routes.get(deployment)
            if route is None or route.canary is None or not _evidence_of(route, e.tenant, e.release):
                continue
            # Read back at a start (handlers.replay_served), events of an earlier rollout are none of this one's.
            if progress.shadowing(route) and e.time.timestamp() >= route.started_at:
                rollout = (route.canary.release, route.started_at)
                if self._ledgers.get(deployment) != rollout:  # a new rollout compares from nothing
                    self._ledgers[deployment] = rollout
                    self.shadows.start(deployment, route.canary.release)
                self.shadows.add(deployment, e)
                shadowed = True
            self._note_trip(route, e)
            if not progress.collecting(route):
                continue
            release = e.release
            # Shadow events count for the candidate too: a blue-green preview is judged on mirrored traffic. After a
            # promotion the old release's events (from before it, read back at start) are the baseline.
            if release in (route.canary.release, route.stable.release) or (
                    route.phase == "promoted" and route.previous is not None and release == route.previous.release):
                self.evidence.add(e, release)
                self._diverted(route, e, release)
                if progress.analysed(route) and deployment not in self._fresh:
                    self._fresh.add(deployment)
                    fresh = True
        if fresh:
            self._wake.set()  # a look that is due is taken now, on this evidence
        if shadowed:
            changed, self._shadowed = self._shadowed, asyncio.Event()
            changed.set()

    def await_replay(self, why: str) -> None:
        """At start, before serving, and when the bus connection is lost: every deployment whose analysis reads
        evidence from before now (`collecting`) waits for the served events from before the start (or published
        while cut off) to be read back; `why` says what the looks wait for. (A mirrored deployment's comparison is
        read back too, but nothing waits for it.)"""
        self.replayed.clear()
        self.unreplayed = {r.deployment: why for r in self.routes.values() if progress.collecting(r)}
        if progress.served_replay(self.routes.values(), time.time()) is None:
            self.replayed.set()

    def replay_stalled(self, why: str) -> None:
        """The read-back failed (it is tried again): the waiting deployments' looks say why."""
        self.unreplayed = dict.fromkeys(self.unreplayed, why)

    def replay_done(self) -> None:
        """The served events awaited (`await_replay`) are all read back: the waiting deployments are judged again,
        their next look as soon as it is due."""
        self._fresh.update(self.unreplayed)
        self.unreplayed = {}
        self.replayed.set()
        self._wake.set()

    def _diverted(self, route: Route, e: InferenceEvent, release: str) -> None:
        """A canary that fails its own calls trips its breaker on its endpoint (its release's lane, upstream.Lane:
        no other tenant's or release's calls open it, probe p27 F3b); from then on its
        requests are served by stable, skipped without a call, and would leave no canary evidence: the canary
        would wait for its minimum sample for ever instead of being aborted. So a request of its diverted by the
        open breaker counts as one more canary failure if the canary had failed a call of its own in this rollout
        (not one its client failed) at the diversion's time or before. (A breaker left open by an earlier release
        does not judge a new canary that has not failed itself.) By the events' times, not the order they come
        in: a replica reading them back at its start reads the newest (still in the stream) before the rest (from
        the record), and live ones meanwhile. Counted by arrival, it missed every diversion read before the
        canary's first failure, and judged a failing canary on a fraction of its failures; a diversion that comes
        before the failure it follows is held until that failure comes (`Evidence.charge`)."""
        assert route.canary is not None
        canary, deployment = route.canary.release, route.deployment
        failing = self._failing.get(deployment)
        first = failing[2] if failing is not None and failing[:2] == (canary, route.started_at) else None
        if release == canary:
            at = e.time.timestamp()
            if e.status != "ok" and not e.client_failed and at >= route.started_at and (first is None or at < first):
                self._failing[deployment] = (canary, route.started_at, at)
                self.evidence.charge(deployment, canary, at)
            return
        attrs = e.attributes
        if attrs.get("lockgate.fallback_reason") == "breaker_open" and attrs.get("lockgate.fallback_from_release") == canary:
            self.evidence.divert(msgspec.structs.replace(e, status="error", error_type="breaker_open"), canary, first)

    def _note_trip(self, route: Route, e: InferenceEvent) -> None:
        """Note a request of a live canary that an open breaker diverted to stable (on any replica: each sees every
        replica's events), for `tripped`. Diversions come in runs: one within the cooldown of the breaker that
        diverted the one before is part of its run (that breaker may still have been open); one after it begins
        another run. Read back at a start, they come out of time order: one older than the run held is of an
        earlier run, and changes nothing."""
        assert route.canary is not None
        attrs = e.attributes
        if (route.phase != "progressing" or attrs.get("lockgate.fallback_reason") != "breaker_open"
                or attrs.get("lockgate.fallback_from_release") != route.canary.release):
            return
        at = e.time.timestamp()
        if at < route.started_at:
            return
        endpoint = self.endpoints.by_id.get(attrs.get("lockgate.fallback_from", ""))
        until = at + (endpoint.breaker if endpoint is not None else resilience.BreakerSpec()).cooldown_s
        rollout = (route.canary.release, route.started_at)
        held = self._trips.get(route.deployment)
        if held is None or held.rollout != rollout or at > held.until:
            self._trips[route.deployment] = _Trip(rollout=rollout, since=at, until=until, diverted=1)
        elif until >= held.since:  # within this run, not of one before it
            self._trips[route.deployment] = _Trip(rollout=rollout, since=min(held.since, at),
                                                  until=max(held.until, until), diverted=held.diverted + 1)

    def tripped(self, route: Route, now: float) -> progress.Tripped | None:
        """Whether the canary's endpoint breaker is open now, as far as this replica can tell (None: not seen open):
        on any replica whose events reported a diversion of the canary's requests to stable within that breaker's
        cooldown, or on this one, whose breakers of the canary's own calls (its release's lane, upstream.Lane) refuse
        calls to each endpoint the canary's requests try before stable's (its endpoint, a group's members, their
        fallbacks). A breaker of another replica that diverted nothing yet is not seen: that replica's events are all
        the others know of it. Another tenant's or release's calls to the same model there have breakers of their
        own: their failures hold no canary (probe p27 F3)."""
        if route.canary is None or route.phase != "progressing":
            return None
        held = self._trips.get(route.deployment)
        shared = held if held is not None and held.rollout == (route.canary.release, route.started_at) \
            and held.until > now else None
        since = shared.since if shared is not None else None
        if self.upstream is not None:
            group = self.endpoints.groups.get(route.canary.endpoint)
            own = group.endpoints if group is not None else [route.canary.endpoint]
            hops = [eid for _, eid in resilience.fallback_chain(own, self.endpoints.fallbacks)
                    if eid in self.endpoints.by_id]
            canary = route.canary
            ago = self.upstream.refused_for(hops, Lane(canary.model, canary.tenant, canary.release)) if hops else None
            if ago is not None:
                since = min(since, now - ago) if since is not None else now - ago
        if since is None:
            return None
        return progress.Tripped(since=since, diverted=shared.diverted if shared is not None else 0)

    def observe_scores(self, scored: list[InferenceScored]) -> None:
        """Keep the online scores of answers of deployments under analysis, by the answer's release: answers a
        router served only (an application's events are scored too, but could say anything)."""
        for s in scored:
            if not s.served:
                continue
            route = self.routes.get(s.deployment or s.app)
            if (route is None or route.canary is None or not progress.collecting(route)
                    or not _evidence_of(route, s.tenant, s.release)):
                continue
            release = s.release or (route.canary.release if s.variant == "canary" else route.stable.release)
            if release in (route.canary.release, route.stable.release) or (
                    route.previous is not None and release == route.previous.release):
                self.evidence.add_scores(route.deployment, release, s.event_id, s.time.timestamp(),
                                         s.measured())  # NaN: an error
                if progress.analysed(route):
                    self._fresh.add(route.deployment)
                    self._wake.set()
        changed, self._scored = self._scored, asyncio.Event()
        changed.set()

    async def wait_for_scores(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until predicate() holds (checked after every batch of online scores)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._scored.wait()

    async def wait_for_shadow(self, deployment: str, predicate: Callable[[ShadowSummary], bool],
                              timeout: float) -> ShadowSummary:
        """Wait until predicate(shadow summary) holds (checked after every event of a mirrored deployment)."""
        async with asyncio.timeout(timeout):
            while not predicate(summary := self.shadow_summary(deployment)):
                await self._shadowed.wait()
        return summary

    def shadow_budget(self, route: Route) -> Budget | None:
        """This replica's mirror budget for the route's rollout (None when it does not mirror)."""
        if not progress.shadowing(route) or route.strategy is None or route.strategy.shadow is None:
            return None
        assert route.canary is not None
        rollout = (route.canary.release, route.started_at)
        held = self._budgets.get(route.deployment)
        if held is None or held[0] != rollout or held[1].spec != route.strategy.shadow:
            # The rollout's cost is kept in the KV under its key (shadow.SpendStore): a changed spec keeps its spend.
            held = self._budgets[route.deployment] = (rollout, Budget(
                route.strategy.shadow, time.monotonic, spend_key(route.deployment, *rollout)))
        return held[1]

    def shadow_summary(self, deployment: str) -> ShadowSummary:
        """The served-versus-shadow comparison of the deployment's rollout, with this replica's budget counts."""
        held = self._budgets.get(deployment)
        return self.shadows.summary(deployment, held[1] if held else None)

    def measurement(self, route: Route, now: float) -> analysis.Measurement:
        """The canary against stable over the analysis window (else since the canary started), at the
        rollout's next look. Each arm's calls in flight on this replica past `router_unanswered_s` count in it as
        failed now (`unanswered`)."""
        spec = progress.spec_of(route)
        assert route.canary is not None and spec is not None
        look = (route.analysis.look if route.analysis else 0) + 1
        if route.phase == "promoted" and route.previous is not None:
            # Post-promotion: the new release since its promotion against the old one's evidence before it.
            since = route.promoted_at if spec.window_s is None else max(route.promoted_at, now - spec.window_s)
            hung = self.unanswered(route.deployment, route.stable.release, now)
            canary = self.evidence.sample(route.deployment, route.stable.release, since, hung)
            stable = self.evidence.sample(route.deployment, route.previous.release, route.started_at)
            comparison, release, drift_since, whole = progress.drift_evidence(route, since)
            return analysis.unanswered(analysis.measure(
                spec, canary, stable, look,
                self.evidence.drift(route.deployment, release, drift_since, comparison, whole),
                baseline_final=True), len(hung), self.unanswered_s)
        since = route.started_at if spec.window_s is None else max(route.started_at, now - spec.window_s)
        hung = self.unanswered(route.deployment, route.canary.release, now)
        # Stable's too: a release slow alike on both arms is no worse for it.
        stable_hung = self.unanswered(route.deployment, route.stable.release, now)
        canary = self.evidence.sample(route.deployment, route.canary.release, since, hung)
        stable = self.evidence.sample(route.deployment, route.stable.release, since, stable_hung)
        if stable.n < spec.min_sample and since > route.started_at:
            stable = self.evidence.sample(route.deployment, route.stable.release, route.started_at, stable_hung)
        comparison, release, drift_since, whole = progress.drift_evidence(route, since)
        began = progress.step_began(route)
        m = analysis.measure(spec, canary, stable, look,
                             self.evidence.drift(route.deployment, release, drift_since, comparison, whole),
                             step_n=self.evidence.count(route.deployment, route.canary.release, began), step_at=began)
        if bluegreen.spec(route) is not None:  # a preview: its evidence is its testers' traffic and shadow copies
            m = analysis.uncopied(m, canary, stable, self.evidence.uncopied(route.deployment, route.stable.release,
                                                                          since), spec.min_sample)
        return analysis.unanswered(m, len(hung), self.unanswered_s)

    def unanswered(self, deployment: str, release: str, now: float) -> list[Unanswered]:
        """`release`'s calls for `deployment` in flight on this replica whose upstream has been silent for longer
        than `router_unanswered_s` (none before the proxy is wired): its client hanging up now would make each
        the release's failure (`upstream_unanswered`), and one that never answers makes no event before a timeout
        (the endpoint's `first_byte_s`) or that hang-up ends it. Without them a look judged a release that hangs on
        its fast answers alone, and promoted it (probe p26). Silence is measured as for a hang-up: less the holds of
        the router's loop that may have kept an answer unread. Other replicas' calls are not known here."""
        if self.upstream is None:
            return []
        lag = self.upstream.lag
        found = []
        for call, key_id in self.inflight.calls(deployment):
            hop = call.hop  # the call under way now; None between calls, or once answered
            if hop is None or hop.tag[1].release != release:
                continue
            silent = lag.silent_s(call.since, call.heard.at)
            if silent > self.unanswered_s:  # as a hang-up is judged (proxy `_Record.hung_up`)
                found.append(Unanswered(at=now - silent, silent_s=silent, key_id=key_id))
        return found

    def _step(self, route: Route, now: float, rollbacks: Mapping[str, GateDecided | None]) -> None:
        """A due route: the clock's own changes first (timed pauses, blue-green promotion and scale-down,
        plain steps), else analysed rollouts are measured (and abort, pause, advance or roll back)."""
        steps, interval = progress.steps_of(route, self.steps), progress.interval_of(route, self.interval_s)
        tripped = self.tripped(route, now)
        new = progress.on_time(route, steps, interval, now, tripped)
        if new is not None:
            # A breaker's hold is announced as it begins; its renewals each interval go to KV only.
            self._apply(new, announce=not (progress.breaker_held(new) and progress.breaker_held(route)))
            return
        if progress.analysed(route) and route.next_step_at <= now:
            spec = progress.spec_of(route)
            assert spec is not None
            starts = progress.analysis_starts(route, spec)
            if now < starts:  # the initial delay: the first look is taken once it is over
                self._apply(msgspec.structs.replace(route, version=route.version + 1, next_step_at=starts),
                            announce=False)
                return
            self._fresh.discard(route.deployment)  # what arrives from now on is new to the next look
            try:
                m = self.measurement(route, now)
            except Exception as exc:  # a measurement that cannot be taken is recorded, never a pass
                log.exception("analysis of %s could not be measured", route.deployment)
                errored = progress.on_error(route, repr(exc)[:200], interval, now, rollbacks)
                run = runs.error(route, errored, spec, repr(exc))
                if errored is not None:
                    self._apply(errored, announce=errored.phase != route.phase, runs=[self._sign(run)] if run else [])
                return
            missing = self.unreplayed.get(route.deployment)
            if missing is not None:
                m = analysis.incomplete(m, missing)
            new = progress.on_measurement(route, m, steps, interval, now, rollbacks, tripped)
            # Recorded as the rollout counted it: a look that waited past its progress deadline is inconclusive.
            run = runs.record(route, new, new.analysis.last if new and new.analysis and new.analysis.last else m, spec)
            if new is not None:
                # Bookkeeping of a look that moves no traffic goes to KV only, not to the rollout history (a step
                # whose sample fills slowly says it waits there, `rollout get` and `watch`); a step that waits
                # past its progress deadline is announced once, as its looks start to count as inconclusive.
                moved = ((new.weight, new.phase, new.paused, new.stable, new.verifying, progress.overdue_now(new),
                          progress.breaker_held(new))
                         != (route.weight, route.phase, route.paused, route.stable, route.verifying,
                             progress.overdue_now(route), progress.breaker_held(route)))
                self._apply(new, announce=moved, runs=[self._sign(run)] if run else [])

    def _sign(self, run: AnalysisRun) -> AnalysisRun:
        return analysisruns.sign(run, self.signer)

    def observe_drift(self, report: DriftReport) -> None:
        """A drift report as evidence for analyses with a `drift` metric (every replica sees every report)."""
        route = self._drift_route(report)
        if route is not None and progress.collecting(route):
            self.evidence.add_drift(report)
            if progress.drift_judged(route):
                self._fresh.add(route.deployment)
                self._wake.set()  # a look that is due is taken now, on this report

    def _drift_route(self, report: DriftReport) -> Route | None:
        """The route a drift report is evidence about; None when there is none, or when the report's events are
        another tenant's than the one whose releases the deployment serves: the drift monitor keeps each tenant's
        events in windows of their own, and a tenant whose key may send traffic here (unscoped, say) could steer
        what its own window compares, arm by arm. The gate ignores such a report too (driftgate.py). A route
        stored before targets recorded their tenant takes every report, as before."""
        route = self.routes.get(report.deployment)
        owner = _owner(route) if route is not None else ""
        if owner and report.tenant != owner:
            log.debug("%s: drift report %s is of tenant %r's events, not of %r whose releases it serves: not evidence",
                     report.deployment, report.id, report.tenant, owner)
            return None
        return route

    async def on_drift(self, report: DriftReport) -> None:
        """A drift report: evidence for analyses with a `drift` metric; without one, a DRIFT covering a live
        canary's traffic aborts it (persisted; retried via nack)."""
        await self._await_ready()
        self.observe_drift(report)
        await self._act_on_drift(report)

    async def _act_on_drift(self, report: DriftReport) -> None:
        """Act on a drift report (`progress.on_drift`): a report's message (`on_drift`) and the periodic read of the
        live canaries' reports (`_hold_drifts`) alike."""

        async def change() -> None:
            route = self._drift_route(report)
            rollbacks = await self._known_good_now(route) if route is not None and route.verifying else {}
            if route is not None and self.routes.get(route.deployment) is not route:
                raise RouteContended("route changed while its known-good releases' decisions were read")
            new = progress.on_drift(route, report, rollbacks) if route is not None else None
            if new is not None:
                self._apply(new)

        await self._until_won(change)

    async def _settle(self, deployment: str, change: Change, follow: Sequence[str] = ()) -> Route:
        """An operator's change of one deployment, run until its compare-and-set wins; the route it leaves.
        Raises what dropped the write, or NotAdmitted with the admission re-check `change` returned as refused.

        Then the releases `follow` names once the change won (those it started, admitted or put back: `change` may
        fill it in) follow their current decision, read now (`_follow`): what `change` read of them was current
        when read, not when the route took it."""
        self._poisoned.pop(deployment, None)
        refused: str | None = None
        restored: list[str] = []
        made: list[_Pending] = []  # the writes of the change's last attempt

        async def attempt() -> None:
            nonlocal refused
            # A route record made unreadable: the change starts from its last readable revision (`recover`) on every
            # replica, whose releases then follow the decisions stored since (a replica that was running acted on
            # them then; one restarted since held no route to act on).
            found = await self.recover(deployment)
            restored[:] = [t.release for t in (found[0].stable, found[0].canary) if t is not None and t.release] \
                if found else []
            refused = await change()

        try:
            await self._until_won(attempt, made)
        except Retryable as exc:
            if not any(not w.lost for w in made):
                raise  # nothing applied: the operator is told to retry (actions.refusal)
            # Applied here, its write queued: the operator is told so, and it is written once the bus answers, or run
            # again on the route that won if another replica's write landed first (before, probe p67 F1, it was
            # dropped then, after the operator had been told it was applied).
            self._later(deployment, attempt, made)
            raise Unpersisted(f"applied but not yet persisted (written once the bus answers): {exc.message}") from None
        self._raise_if_poisoned(deployment)
        if refused:
            raise domain.NotAdmitted(refused)
        try:
            for release in dict.fromkeys([*follow, *restored]):
                await self._follow(deployment, release)
        except Retryable as exc:
            raise Unpersisted(f"applied and persisted; the current gate decision of the releases it serves is read "
                              f"again within {self.stable_check_s:g} s of the bus answering: {exc.message}") from None
        self._raise_if_poisoned(deployment)
        return self.route(deployment)

    def _later(self, deployment: str, attempt: Callable[[], Awaitable[None]], made: list[_Pending]) -> None:
        """An operator's change applied here whose write `made` is queued: persisted in the background once the bus
        answers, and `attempt` run again (until it wins) if another replica's write of the deployment won first.
        One the route that won refuses (already aborted, another rollout named) is logged and dropped."""

        again = False  # the change is to run again: its write was lost, and no attempt since applied it

        async def settle() -> None:
            nonlocal again
            await self.flush()
            if again or any(w.lost for w in made):
                again = True
                try:
                    await self._until_won(attempt, made)
                finally:
                    again = not made  # applied again: the next flush settles its write

        async def run() -> None:
            try:
                await _LATER_RETRY.call(settle, retry_on=Retryable, what=f"operator's change of {deployment!r}")
            except LockgateError as exc:
                log.warning("operator's change of %r not applied on the route another replica wrote first: %s",
                            deployment, exc.message)

        task = asyncio.create_task(run())
        self._later_tasks.add(task)
        task.add_done_callback(self._later_tasks.discard)

    async def _follow(self, deployment: str, release: str) -> None:
        """`release`'s current decision, read now that the route holds what an operator's change made of it, acted on
        as the gate handler does (a BLOCK aborts its canary or rolls it back as the stable; a PASS admits a canary
        waiting for one), and a canary of it on `deployment` no decision allows now taken back to 0%.

        The change decided on a decision read before the route held it. A BLOCK stored meanwhile was acted on by the
        gate handler on the route as it was then, without the release (a canary not started yet), and acked: it is
        never delivered again, and the earlier PASS would have admitted the BLOCKed release for good."""

        async def attempt() -> None:
            decision, why_not = await self._read_decision(release)  # again on every attempt
            if decision is not None:
                await self.apply_decision(decision)
            route = self.route(deployment)
            self._unadmit(route, self._admission(route, release, decision, why_not))

        await self._until_won(attempt)

    def _raise_if_poisoned(self, deployment: str) -> None:
        reason = self._poisoned.pop(deployment, None)
        if reason is not None:
            raise domain.InvalidRollout(f"route change for {deployment!r} was dropped: {reason}")

    async def _until_won(self, change: Callable[[], object], made: list[_Pending] | None = None) -> None:
        # A change that lost to another replica's write is recomputed on the reloaded route, so a
        # decision or operator action is never silently dropped, only re-applied (or found moot). A change that
        # is a coroutine function reads what it checks again on each attempt, never reusing an earlier read.
        # Only its own writes decide: before (probe p57 F3), any compare-and-set this replica lost during the flush
        # ran it again, so a pause already written was answered 409 "already paused", and a retry already written
        # failed as "not aborted" and its canary was never admitted.
        async def attempt() -> None:
            writes: list[_Pending] = []
            if made is not None:  # the caller's view of this attempt's writes, whatever it raises
                made[:] = []
                writes = made
            mark = _WRITES.set(writes)
            try:
                result = change()
                if inspect.isawaitable(result):
                    await result
            finally:
                _WRITES.reset(mark)
            await self.flush()
            if any(w.lost for w in writes):
                raise RouteContended(f"route kept changing under {_CAS_RETRY.attempts} attempts; retrying later")

        await _CAS_RETRY.call(attempt, retry_on=RouteContended, what="route compare-and-set")

    def _apply(self, route: Route, *, actor: str = "", announce: bool = True,
               runs: list[AnalysisRun] | None = None) -> None:
        # Synchronous on purpose: the next request routed after this line sees the new weight.
        if route.paused and route.phase in ("promoted", "aborted"):
            route = msgspec.structs.replace(route, paused=False)  # a finished canary holds nothing
        before = self.routes.get(route.deployment)  # the route this change is made from: which attempt it is part of
        self.routes[route.deployment] = route
        self._note_drift(route.deployment, route)
        state = domain.to_state(route, before)
        if actor:
            state = msgspec.structs.replace(state, actor=actor)
        pending = _Pending(route, state, announce=announce, runs=runs or [])
        self._outbox.append(pending)
        writes = _WRITES.get()
        if writes is not None:
            writes.append(pending)
        self._unpersisted[route.deployment] += 1
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        self._wake.set()

    async def flush(self) -> None:
        """Persist pending changes in order: KV route (compare-and-set), then the RolloutState event (the sink
        stores it in `rollout_events`)."""
        async with self._persist_lock:
            while self._outbox:
                item = self._outbox[0]
                try:
                    persisted = await self._persist(item)
                except Retryable:
                    raise
                except Exception as exc:
                    await self._drop_poison(item, exc)
                    continue
                if persisted:
                    self._outbox.popleft()
                    self._unpersisted[item.route.deployment] -= 1
                else:
                    await self._lost(item.route.deployment)

    async def _drop_poison(self, item: _Pending, exc: Exception) -> None:
        """A change that can never persist is dead-lettered and dropped; the route is reloaded from KV."""
        self._outbox.popleft()
        self._unpersisted[item.route.deployment] -= 1
        reason = exc.message if isinstance(exc, LockgateError) else repr(exc)
        log.error("dropping route change for %r that cannot be persisted: %s", item.route.deployment, reason)
        with contextlib.suppress(LockgateError):  # the DLQ is best effort; the next change must still go
            await self.ctx.bus.dead_letter("router", subject=self.ctx.bus.subjects.rollout_all,
                                           payload=msgspec.json.encode(item.state),
                                           reason=f"route change cannot be persisted: {reason}")
        self._poisoned[item.route.deployment] = reason
        if not self._unpersisted[item.route.deployment]:
            await self._reload(item.route.deployment)

    async def _persist(self, item: _Pending) -> bool:
        """Persist one change; False (nothing announced) if another replica moved the route first."""
        bus = self.ctx.bus
        route, state = item.route, item.state
        if item.revision is None:  # a retry after a later step failed must not write KV again
            last = self._revisions.get(route.deployment, 0)
            value = msgspec.json.encode(route)
            try:
                if last:
                    item.revision = await self._kv.update(token(route.deployment), value, last=last)
                else:
                    item.revision = await self._kv.create(token(route.deployment), value)
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
            except nats.errors.Error as exc:
                raise BusUnavailable(f"cannot write route {route.deployment!r} to KV: {exc!r}") from None
            self._revisions[route.deployment] = item.revision
            self.unreadable.pop(route.deployment, None)  # a readable route is stored over it
        if item.announce:
            await bus.publish(bus.subjects.rollout(route.deployment), state)
            item.announce = False  # a retry after the records failed must not announce twice
        while item.runs:
            await bus.publish(bus.subjects.analysis_runs, item.runs[0])
            item.runs.pop(0)
        return True

    async def _lost(self, deployment: str) -> None:
        """Another replica's write won: drop our changes to this deployment and take KV's route."""
        self.conflicts += 1
        for p in self._outbox:
            p.lost = p.lost or p.route.deployment == deployment
        self._outbox = deque(p for p in self._outbox if p.route.deployment != deployment)
        self._unpersisted.pop(deployment, None)
        log.info("route %s changed by another replica; dropping our change and reloading", deployment)
        await self._reload(deployment)

    async def _reload(self, deployment: str) -> None:
        """Take KV's route for a deployment (none if it has no key), unless the watch applied a later write while
        it was read: the read answered first can be resumed after the watch entry that followed it (CI, once, under
        load: a replica reading its routes after a bus restart put back the 50% canary another replica had just
        aborted, and served it until the next write)."""
        before = self._revisions.get(deployment, 0)
        try:
            entry = await self._kv.get(token(deployment))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            if self._revisions.get(deployment, 0) == before:
                self._set(deployment, None, 0)
            return
        except nats.errors.Error as exc:
            # The next watch entry or compare-and-set attempt repairs the stale route.
            raise BusUnavailable(f"cannot reload route {deployment!r} from KV: {exc!r}") from None
        if before != self._revisions.get(deployment, 0) > entry.revision:
            return
        try:
            route = _route_decoder.decode(entry.value)
        except msgspec.DecodeError as exc:
            self._unreadable(deployment, entry.revision, str(exc))
            return
        self._set(deployment, route, entry.revision)

    async def _await_ready(self) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), 30)
        except TimeoutError:
            raise RouterNotReady("router routes not restored within 30 s") from None

    async def target(self, release: str, tenant: str | None = None) -> domain.Target:
        """Where a release's traffic goes, exactly as its bound bundle's model config says.

        The release must be registered (its name bound to one bundle in the releases KV) with one
        `model_config/...` artifact naming a model and, optionally, an endpoint id of the allow-list
        (default `default`) and sampling parameters. Anything else is InvalidRollout. With `tenant` (the
        caller's, None for an admin), ReleaseNotInScope unless the release is registered under that tenant.
        """
        if tenant is not None:
            await self._check_own(release, tenant)
        try:
            ships = await shipped.of_release(self.ctx.bus, release)
        except (NotFound, ConfigError) as exc:
            raise domain.InvalidRollout(exc.message) from None
        try:
            self.endpoints.get(ships.endpoint)
        except UnknownEndpoint as exc:
            raise domain.InvalidRollout(f"release {release!r}: {exc.message}") from None
        return domain.Target(release=release, app=ships.app, tenant=ships.tenant, endpoint=ships.endpoint,
                             model=ships.model, params=ships.params)

    async def _check_own(self, release: str, tenant: str) -> None:
        """ReleaseNotInScope unless `release` is registered under `tenant`: a release of another tenant and one
        registered by nobody are refused alike, so a tenant's key learns nothing of other tenants' release names
        (before, another's was refused naming its tenant, an unknown one as not registered)."""
        try:
            owner: str | None = str((await artifacts.release_of(self.ctx.bus, release)).get("tenant") or "")
        except NotFound:
            owner = None
        if owner != tenant:
            raise domain.ReleaseNotInScope(
                f"refused: {release!r} is not a registered release of tenant {tenant!r}; a key of tenant {tenant!r} "
                f"rolls out only its own tenant's releases (register it under that tenant, `release create --tenant "
                f"{tenant}`, or use an admin key)")

    async def check_tenant(self, deployment: str, tenant: str | None) -> None:
        """ReleaseNotInScope unless the releases `deployment` serves (stable, canary, the previous stable) are
        `tenant`'s (None: an admin's, any tenant's); a deployment serving none is anyone's to give a first release.

        One whose route record is unreadable is whose its last readable revision says (`recover`), on every replica,
        restarted or not; with none readable, an admin's only (before, a replica restarted since held no route for
        it, so it was anyone's: another tenant's key gave it a release of its own)."""
        await self.recover(deployment)
        if deployment in self.unreadable and deployment not in self.routes and tenant is not None:
            raise domain.ReleaseNotInScope(_not_theirs(deployment, tenant))
        if not await self.serves_tenant(self.route(deployment), tenant):
            raise domain.ReleaseNotInScope(_not_theirs(deployment, tenant or ""))

    async def serves_tenant(self, route: Route, tenant: str | None) -> bool:
        """Whether every release `route` serves (stable, canary, the previous stable) is `tenant`'s (None: an
        admin's, any tenant's): what a key of `tenant` may change, and read (a route serving none is anyone's).

        A deployment's releases are of one tenant (domain.same_tenant) from its first release on, so this holds
        for every change made after it; a route stored before targets recorded their tenant is read from the
        releases' bindings (BusUnavailable when they cannot be read)."""
        if tenant is None:
            return True
        for t in (route.stable, route.canary, route.previous):
            if t is None or not t.release:
                continue
            owner = t.tenant
            if not owner:
                try:
                    owner = str((await artifacts.release_of(self.ctx.bus, t.release)).get("tenant") or "")
                except NotFound:
                    owner = ""
            if owner != tenant:
                return False
        return True

    async def _stored_decision(self, release: str) -> GateDecided | None:
        return (await self._read_decision(release))[0]

    async def _read_decision(self, release: str) -> tuple[GateDecided | None, str]:
        """The release's current decision in KV if it verifies against the trust file as it is now, else None
        and why ("" when none is stored)."""
        try:
            kv = await self.ctx.bus.kv(self.ctx.bus.subjects.kv_gates)
            entry = await kv.get(token(release))
        except nats.js.errors.KeyNotFoundError:
            return None, ""
        except nats.errors.Error as exc:
            raise BusUnavailable(f"cannot read gate decision for {release!r}: {exc!r}") from None
        if not entry.value:
            return None, ""
        try:
            decision = _gate_codec.decode(entry.value)
            if decision.release != release:
                raise SignatureError(f"decision {decision.id} stored for {release!r} is for {decision.release!r}")
            await self.verifier.verify(decision)
        except (InvalidEvent, SignatureError) as exc:
            log.warning("ignoring stored gate decision for %s: %s", release, exc.message)
            return None, exc.message
        if decision.release != release:  # a decision only ever speaks for the release it names
            log.warning("ignoring stored gate decision under %s: it is for %s", release, decision.release)
            return None, f"it is for {decision.release!r}"
        if await self._about_bound_content(decision) is None:
            return None, f"decision {decision.id} judged other content than {release!r} holds now"
        return decision, ""

    async def _admission_now(self, route: Route) -> Admission:
        """Before raising a canary's traffic or promoting it, whether it is still admitted (`_admission`, on its
        release's current decision read again now); None as well when the route does not rest on a decision
        (`domain.rests_on_admission`).

        Never the route's record of its admission alone: the decision that admitted the canary may have been
        superseded by one the route never heard of (a BLOCK acted on by a replica that did not hold the canary
        yet), or signed by a key revoked since."""
        if not domain.rests_on_admission(route):
            return None
        assert route.canary is not None
        release = route.canary.release
        decision, why_not = await self._read_decision(release)
        return self._admission(route, release, decision, why_not)

    def _admission(self, route: Route, release: str, decision: GateDecided | None, why_not: str) -> Admission:
        """None when `release`'s current decision (`decision`, verified against the trust file as it is now; None
        with `why_not` saying why it does not count, or with "" when none is stored) allows it, a newer PASS than
        the one that admitted its canary included; with none stored (deleted from KV since it admitted the
        canary), when the key that signed the route's admission is still trusted. Else the release,
        that decision and why not, for `_unadmit`."""
        if domain.allows(decision, release):
            return None
        if decision is None and not why_not and route.admitted_by and self.verifier.trusts(route.admitted_by):
            return None
        return release, decision, why_not

    def _unadmit(self, route: Route, admission: Admission, actor: str = "") -> str:
        """Take the canary of `route` (the current one) back to 0% if the admission read for it no longer holds;
        returns the refusal to give the operator, "" when it holds. The admission was read for one canary
        release: one that became the canary (or was admitted) while it was read was admitted by a decision
        verified just now, so it holds."""
        if admission is None:
            return ""
        release, decision, why_not = admission
        if not domain.rests_on_admission(route) or route.canary is None or route.canary.release != release:
            return ""
        new = domain.readmit(route, decision, why_not)
        if new is None:
            return ""
        log.warning("%s: %s", route.deployment, new.reason)
        self._apply(new, actor=actor)
        return f"refused: {new.reason}"

    async def _about_bound_content(self, decision: GateDecided) -> GateDecided | None:
        """`decision`, or None when it allows its release but judged other content than the release name is
        bound to now (domain.other_content): then it admits nothing, as one that does not verify.

        Every admission (first release, canary start, patch, retry, undo, a decision from the bus) takes its
        decision from here or `_stored_decision`, so a PASS never admits content it did not judge, however the
        name came to hold it."""
        if not domain.allows(decision, decision.release):
            return decision  # only an allowing decision admits anything
        try:
            bound = (await artifacts.release_of(self.ctx.bus, decision.release)).get("artifacts")
        except NotFound:
            bound = None
        why = domain.other_content(decision, bound if isinstance(bound, dict) else None)
        if why:
            log.warning("ignoring gate decision %s for %s: %s", decision.id, decision.release, why)
            return None
        return decision


def _not_theirs(deployment: str, tenant: str) -> str:
    """Why a key of `tenant` may not change `deployment`, which serves another tenant's releases: neither those
    releases nor their tenant are named (the key cannot read that route either: it reads as one never configured)."""
    return (f"refused: {deployment!r} serves releases that are not tenant {tenant!r}'s; a key of tenant {tenant!r} "
            "changes only the rollouts of its own tenant's releases (an admin key may change any)")


def _owner(route: Route) -> str:
    """The tenant whose releases the deployment serves ("" for a route stored before targets recorded it)."""
    return route.stable.tenant or (route.canary.tenant if route.canary else "")


def _evidence_of(route: Route, tenant: str, release: str) -> bool:
    """Whether an answer a router served to a key of `tenant`, from `release`, may be evidence about `route`: one of
    the tenant whose releases the deployment serves, or one its own releases answered (only its tenant's keys and
    admin keys are served them). Another tenant's key naming the deployment is answered as a name nobody configured,
    by the default route under passthrough (release ""): its answers and their scores are that tenant's, and counted
    here they sank or carried the canary, a release-less score as stable's (probe p25 F2). A route stored before
    targets recorded their tenant takes every answer, as before (compare `_drift_route`)."""
    owner = _owner(route)
    mine = {t.release for t in (route.stable, route.canary, route.previous) if t is not None and t.release}
    return not owner or tenant == owner or release in mine


def _pricer(settings: Settings) -> Callable[[InferenceEvent], float | None]:
    """USD of one event by the configured price book (None for a model it does not price), as the cost ledger
    prices it (cost.domain.event_cost): a call of unknown usage at the worst case its event says was charged."""
    book = load_price_book(settings.price_book)
    models = book.models

    def price(e: InferenceEvent) -> float | None:
        rates = models.get(priced_model(e.model, e.response_model, models))
        if rates is None:
            return None
        return (rates.writing() if e.billed_dearest else rates).cost(*e.billed_tokens, *e.billed_writes)

    return price
