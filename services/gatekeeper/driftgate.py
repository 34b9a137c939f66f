"""NATS edge of the drift gate: a DriftReport about a release under a policy with drift rules (a canary-versus-
stable report of the canary, or after a blue-green promotion the deployment's now-versus-reference one) becomes
a signed BLOCK of that release (the router acts on BLOCK: it rolls the canary back)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import nats.js.errors

from lockgate import artifacts
from lockgate.bus import Delivery
from lockgate.contracts import DriftReport, GateDecided
from lockgate.errors import BusUnavailable, ConfigError, NotFound, UnreadableValue
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.domain import Outcome
from lockgate.services.gatekeeper.drift import decide_drift, unjudgeable
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import Records, Stored
from lockgate.services.gatekeeper.review import VETOED
from lockgate.subjects import token

log = logging.getLogger("lockgate.gatekeeper")


class _Target(msgspec.Struct, frozen=True):
    release: str = ""
    tenant: str = ""  # "" in routes stored before the router recorded it


class _Route(msgspec.Struct, frozen=True, kw_only=True):
    """What the gate reads of the router's route record (KV, read-only): which release is the canary, and
    whether it is live. The router's own Struct is not imported: services never import each other.

    `deployment` and `stable` are required as in the router's record: JSON that is no route (JetStream's
    acknowledgement or API answer aimed at the key) is refused, never read as a route without a canary. Unknown
    fields stay allowed: this is a view of a record the router evolves by appending fields."""

    deployment: str
    stable: _Target
    canary: _Target | None = None
    phase: str = "idle"
    verifying: bool = False
    started_at: float = 0.0
    promoted_at: float = 0.0
    good: list[_Target] = []  # the known-good history, newest last


_routes = msgspec.json.Decoder(_Route)


def decode_route(raw: bytes) -> _Route:
    """The gate's view of a route record (msgspec.DecodeError if unreadable)."""
    return _routes.decode(raw)


def known_good(route: _Route | None) -> str:
    """The deployment's newest known-good release (else its stable one), "" when it serves none."""
    if route is None:
        return ""
    return route.good[-1].release if route.good else route.stable.release


async def read_route(ctx: ServiceContext, deployment: str) -> _Route | None:
    """The route of `deployment` (None if it has none); UnreadableValue when its key holds anything else, which
    must never pass for "no route"."""
    s = ctx.bus.subjects
    try:
        entry = await (await ctx.bus.kv(s.kv_routes)).get(token(deployment))
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.BucketNotFoundError):
        return None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot read route {deployment!r} from KV {s.kv_routes}: {exc!r}") from None
    try:
        route = decode_route(entry.value)
    except msgspec.DecodeError as exc:
        why = str(exc)
    else:
        if route.deployment == deployment:
            return route
        why = f"it is the route of {route.deployment!r}"
    raise UnreadableValue(f"the route of {deployment!r} in KV {s.kv_routes} is unreadable ({why})")


def canary_release(route: _Route | None, report: DriftReport) -> str:
    """The release a drift report is evidence about, "" when none.

    A canary_vs_stable report: the canary it names (its window is that release's own traffic, whatever the
    route's phase since: a canary the router already aborted still earns its BLOCK), or, naming none, the live
    canary (or preview). A now_vs_reference report: only a release under post-promotion analysis, the one arm
    left, whose traffic its window and reference are (both begun after its promotion). Never a canary that has a
    stable arm: the deployment's window is then mostly stable's traffic and moves with what clients ask (a probe had
    a healthy canary BLOCKed, for good, by asking other questions), and the same-time canary-versus-stable comparison is what judges it."""
    if report.comparison == "canary_vs_stable" and report.release:
        return report.release
    if route is None or route.canary is None:
        return ""
    if report.comparison == "canary_vs_stable":
        live, since = route.phase == "progressing", route.started_at
        return route.canary.release if live and report.window_end.timestamp() >= since else ""
    # After a promotion, only a report whose reference and window are both the promoted release's traffic (p69).
    live = route.phase == "promoted" and route.verifying
    return route.canary.release if live and report.observed_since(route.promoted_at) else ""


class DriftGate:
    """Judges drift reports by the policy of the canary release's current decision."""

    def __init__(self, ctx: ServiceContext, own: OwnKey, records: Records,
                 publish_key: Callable[[], Awaitable[None]]) -> None:
        self.ctx = ctx
        self.own = own  # signs only while the trust roots trust its key
        self.signer = own.signer
        self.records = records
        self.publish_key = publish_key
        self.ignored = Progress()  # reports not judged: another tenant's events, or a deployment of another's

    async def _route(self, deployment: str) -> _Route | None:
        try:
            return await read_route(self.ctx, deployment)
        except UnreadableValue as exc:
            # Never "no canary": the report would go unjudged. Refused (dead-lettered with this reason) instead.
            raise UnreadableValue(f"{exc.message}: a drift report naming no release cannot say which canary it "
                                  "is about") from None

    async def on_drift(self, report: DriftReport, delivery: Delivery) -> None:
        """BLOCK the deployment's canary release when its policy's drift rules fail on the report (one of
        answers the routers served: an application's own events are no evidence of what a release did)."""
        if not report.served:
            return
        named = report.comparison == "canary_vs_stable" and bool(report.release)
        route = None if named else await self._route(report.deployment)
        release = canary_release(route, report)
        if not release:
            return
        why = await self._not_its_tenant(report, release, route, named)
        if why:
            log.warning("drift report %s not judged against %s: %s", report.id, release, why)
            await self.ignored.bump()
            return
        stored = await self.records.read(release)
        if stored.unreadable:
            await self._block(report, release, unjudgeable(report, release, stored.unreadable), stored)
            return
        current = stored.decision
        if current is not None and current.id == domain.decision_id(report.id, self.signer.id_salt):
            # Redelivered after its BLOCK was stored.
            await self.records.finish(current, action="decided", actor="gatekeeper", key=f"gate-drift-{report.id}")
            return
        # Only a release gated under a policy can be judged by it; an already blocked one needs no second BLOCK.
        if current is None or not current.policy or current.decision == "BLOCK":
            return
        try:
            policy = domain.parse_policy(await artifacts.load_structured(self.ctx.bus, current.policy))
        except (ConfigError, NotFound, ValueError) as exc:
            log.warning("drift report %s: policy %s of %s unusable: %s", report.id, current.policy, release, exc)
            return
        outcome = decide_drift(policy, report)
        if outcome is None:
            return
        await self._block(report, release, outcome, stored)

    async def _not_its_tenant(self, report: DriftReport, release: str, route: _Route | None, named: bool) -> str:
        """Why `report` is no evidence about `release` for want of tenant ("" when it is): its events must be of the
        tenant the release is registered under (the binding says, never the report), and the deployment must
        serve that tenant's releases. A BLOCK applies to every deployment of the release, so another tenant's
        events (its own traffic through a deployment serving the release, arm by arm as it likes) would otherwise
        stop the release everywhere."""
        try:
            owner = await self._tenant_of(release)
        except NotFound as exc:
            return exc.message
        if report.tenant != owner:
            return f"its events are tenant {report.tenant!r}'s, and {release!r} is registered under {owner!r}"
        if named:
            try:
                route = await self._route(report.deployment)
            except UnreadableValue:
                route = None  # the report names its release, whose tenant was checked: judged as before
        for t in (route.stable, route.canary) if route is not None else ():
            if t is not None and t.release and t.release != release \
                    and (t.tenant or await self._tenant_of(t.release, "")) != owner:
                return (f"deployment {report.deployment!r} serves {t.release!r}, not a release of {owner!r} "
                        "(a deployment serves one tenant's releases)")
        return ""

    async def _tenant_of(self, release: str, missing: str | None = None) -> str:
        """The tenant `release` is registered under; NotFound if it is not registered (`missing` instead, if given)."""
        try:
            return str((await artifacts.release_of(self.ctx.bus, release)).get("tenant") or "")
        except NotFound:
            if missing is None:
                raise
            return missing

    async def _block(self, report: DriftReport, release: str, outcome: Outcome, stored: Stored) -> None:
        """Sign, record and announce the BLOCK of `release` over the decision `stored` (keeping what it judged, if
        readable, and a person's standing veto of it, which a later eval of the same content must still see)."""
        current = stored.decision
        vetoes = [r for r in current.rules if r.rule == VETOED and r.verdict == "FAIL"] if current else []
        # The BLOCK binds the content it judged: a re-run of its eval is held for an approver, never a PASS over it.
        vetoes = vetoes or ([domain.drift_veto(release, report.id, outcome.reason)] if current else [])
        decision = await self.own.sign(GateDecided(
            id=domain.decision_id(report.id, self.signer.id_salt), release=release, decision="BLOCK",
            rules=[*outcome.rules, *vetoes],
            eval_run=current.eval_run if current else "", policy=current.policy if current else "",
            baseline=current.baseline if current else "", artifacts=current.artifacts if current else {},
            reason=outcome.reason, tenant=report.tenant, source="gatekeeper", trace_id=report.trace_id,
            seq=stored.next_seq))
        await self.publish_key()
        await self.records.settle(decision, over=stored.revision, action="decided", actor="gatekeeper",
                                  key=f"gate-drift-{report.id}")
        log.info("release %s BLOCK by drift: %s", release, outcome.reason)
