"""Routing and rollout rules: sticky canary split and the rollout state machine. Pure, no I/O."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import random
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from lockgate.codec import UNDECODABLE, undecodable
from lockgate.contracts import GateDecided, RolloutState
from lockgate.contracts.names import Name, OptName, check_names
from lockgate.errors import LockgateError
from lockgate.services.router.strategy import AnalysisStatus, HeaderRoute, Strategy

T = TypeVar("T")

Phase = Literal["idle", "progressing", "promoted", "aborted"]
Variant = Literal["stable", "canary"]
BUCKETS = 10_000


class InvalidRollout(LockgateError):
    """A rollout request contradicts the deployment's state (HTTP 409; a PUT's release or spec, 400), or is
    malformed (InvalidRequest)."""


class InvalidRequest(InvalidRollout):
    """A request malformed in itself, whatever the deployment's state: a body that is not the JSON its endpoint
    takes, of the wrong type or out of range (HTTP 400 `invalid_request_error`, never a 409 conflict)."""


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """Where one variant's traffic goes: exactly as its release's model config says.

    `endpoint` is an id from the operator's allow-list (never a URL); `model` and `params` override
    what the client asked for. A target without a release (the default route) passes the client's model.
    """

    release: str
    app: str = ""  # the release's app ("" in routes stored before it was recorded)
    tenant: str = ""  # the tenant the release is registered under ("" in routes stored before it was recorded)
    endpoint: str = "default"
    model: str = ""
    params: dict[str, Any] = {}


class Override(msgspec.Struct, frozen=True, kw_only=True):
    """A break-glass override: an admin let a release take traffic without an allowing decision.

    It covers the one rollout it was given for: kept in the route (so `GET .../{deployment}` and `lockgate
    status` show it) until that rollout ends (promoted, aborted, rolled back, undone), a new one starts, the
    gate BLOCKs its release or an admin clears it; announced in the rollout event's reason. Signed by the
    admin's personal key (`key_id`, `signature` over lockgate.identity.override_bytes), so anyone can check
    who broke the glass.
    """

    release: str
    action: str  # "canary" (weight without a decision) or "promote"
    actor: str  # the admin person whose key signed it (trust file), never free text
    reason: str
    at: float  # when the admin signed it (unix seconds)
    key_id: str = ""
    signature: str = ""
    api_key: str = ""  # the label of the admin API key that sent it, never the key
    weight: float = 100.0  # a canary's: the most traffic the admin signed for it to take without a decision


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's routing state; persisted as JSON in the routes KV bucket."""

    deployment: str
    stable: Target
    canary: Target | None = None
    weight: float = 0.0
    phase: Phase = "idle"
    step: int = 0
    reason: str = ""
    decision_id: str = ""
    next_step_at: float = 0.0  # unix seconds; wall clock so a restarted router resumes on time
    version: int = 0
    # Admission: the verified decision (id) that allows the canary's release, "" while none does, and the id of
    # the key that signed it ("" in routes stored before it was recorded). What raises the canary's traffic reads
    # the release's current decision first (rollouts.Rollouts._admission_now): the admission holds only while
    # that one allows the release.
    admitted: str = ""
    admitted_by: str = ""
    start_weight: float = 0.0  # the weight asked for, served once the canary is admitted (0: first step)
    previous: Target | None = None  # stable before the last promotion: where a later reject rolls back to
    override: Override | None = None
    # Progressive delivery (strategy.py, progress.py): this deployment's own steps and analysis, and
    # where they stand. `paused` holds the weight: nothing advances until an operator resumes.
    strategy: Strategy | None = None
    started_at: float = 0.0  # unix seconds the canary started: analysis and drift look from here on
    paused: bool = False
    analysis: AnalysisStatus | None = None
    # Step kinds (program.py): the next step to run; when the pause step held at began (a PATCH of its
    # `duration_s` times it from then) and when it ends (0: until approved); a header route that sends tagged
    # requests to the canary (or the blue-green preview) whatever the weight.
    cursor: int = 0
    step_pause: bool = False  # paused by a pause step: resume (approval) runs the next step at once
    step_paused_at: float = 0.0
    resume_at: float = 0.0
    header_route: HeaderRoute | None = None
    # Blue-green (bluegreen.py): when the preview went live and when it promotes itself (`auto_promotion_s` after,
    # also when a PATCH changes that); after promotion, the post-promotion analysis (`verifying`) and the end of the
    # window in which the old release swaps back instantly.
    live_at: float = 0.0
    promote_at: float = 0.0
    promoted_at: float = 0.0
    scale_down_at: float = 0.0
    verifying: bool = False
    # Rollback target (known-good history, oldest first): releases that were fully promoted and healthy
    # (no post-promotion analysis pending, never BLOCKed since). Kept in the route's KV record, so a rollback
    # needs no lookup on the path from the triggering event to the weight change.
    good: list[Target] = []
    # Break-glass statements used on this deployment, (digest of the statement, until when it could still
    # verify): each is good once, so a statement seen in a rollout event or the audit log cannot be replayed.
    spent: list[tuple[str, float]] = []
    # The id of the stable's decision an admin's break-glass promotion went past ("" when none did): the admin saw
    # it and overrode it, so it does not roll the stable back (the check at start, every few seconds, a redelivery);
    # any decision made since does. Before (probe p18 F2), the promote answered 200 and the next check undid it.
    glass_over: str = ""
    # The statement of the admin's break-glass promote the stable serves by: kept (and shown by `lockgate status` and
    # `rollout get`) until a decision admits the stable or another release takes its place (`_bump`). Before (probe
    # p28), a promote kept it nowhere in the route: a never-gated release served all traffic while status said "no
    # break-glass overrides".
    glass_stable: Override | None = None
    # This rollout's id, drawn when it starts: its sticky buckets are keyed with the router's secret over it
    # (`sticky_salt`), so a client cannot compute which arm a user id lands on, and cannot aim one kind of request at
    # the canary and another at stable. Not a secret itself: whoever reads the route (the CLI's NATS roles) lacks the
    # router's. "" in routes stored before.
    rollout: str = ""
    # The secret of a sticky split drawn before the router's secret existed (kept in the record, which the CLI's NATS
    # roles read): a rollout started then keeps its split until it ends. "" otherwise (`sticky_salt`). The admin API
    # leaves it out (`shown`).
    salt: str = ""


GOOD_KEPT = 10  # known-good releases a route remembers


def remember(good: list[Target], target: Target) -> list[Target]:
    """The known-good history with `target` as its newest entry (once, at most GOOD_KEPT kept)."""
    if not target.release:
        return good
    return [*(t for t in good if t.release != target.release), target][-GOOD_KEPT:]


def forget(good: list[Target], release: str) -> list[Target]:
    """The known-good history without `release` (it failed, was BLOCKed or rejected)."""
    return [t for t in good if t.release != release]


# No decisions read: what a rollback given none has, so it puts nothing back (fail-closed).
NO_DECISIONS: Mapping[str, GateDecided | None] = MappingProxyType({})


def last_good(route: Route, failing: str,
              decisions: Mapping[str, GateDecided | None]) -> tuple[Target | None, list[str]]:
    """Where a rollback goes: the newest known-good release other than the failing one that its current decision
    (`decisions`, verified, by release; absent: none) allows now, else None; and the newer ones skipped.

    Known-good once is not allowed now, as for `undo --to`: a release a break-glass override promoted never had a
    decision, and one that had may be awaiting review since, or its key revoked. Never `route.previous` by itself:
    an empty history cannot tell a route stored before known-good history existed from one whose history BLOCKs
    emptied, and in the second the previous release is BLOCKed (a rollback once put it back at 100%)."""
    skipped: list[str] = []
    for t in reversed(route.good):
        if t.release == failing:
            continue
        if allows(decisions.get(t.release), t.release):
            return t, skipped
        skipped.append(t.release)
    return None, skipped


class BreakGlass(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An admin's explicit override of the admission invariant, with the reason, signed by the admin's
    personal key (`lockgate break-glass` prints it); unsigned ones are refused with 403."""

    reason: Annotated[str, msgspec.Meta(min_length=3, max_length=500)]
    at: int = 0  # unix seconds when signed
    key_id: str = ""
    signature: str = ""
    # A canary's: the percent of traffic the admin signed for it (the canary starts there and gets no more
    # without a decision allowing it); none for a promote.
    weight: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None


class ManualRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional body of `POST .../{deployment}/promote|abort|retry|undo|clear-override`."""

    break_glass: BreakGlass | None = None
    to: Name | None = None  # undo only: the earlier known-good release to go back to
    # The rollout the operator acts on, as the route showed it (`canary.release`, `started_at`): refused (409
    # `rollout_changed`) once the deployment runs another (progress.expect); unnamed, whatever it runs then.
    canary: OptName = ""
    started_at: float | None = None


class CanaryRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of `PUT /lockgate/v1/deployments/{deployment}`: a canary of `canary_release` from `stable_release`,
    or, without `canary_release`, a deployment's first release (`first`)."""

    stable_release: Name
    # Releases only: endpoint and model come from each release's model config. Empty: a first release.
    canary_release: OptName = ""
    initial_weight: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None  # percent; None: the first step
    break_glass: BreakGlass | None = None
    strategy: Strategy | None = None  # this deployment's steps, interval and analysis

    def __post_init__(self) -> None:
        check_names(self)
        if not self.stable_release.strip():
            raise ValueError("stable_release must be non-empty")
        if self.first:
            # A first release has nothing to compare a canary with (Argo Rollouts' first rollout goes
            # straight to 100%), so nothing about a canary applies; and break-glass covers a canary only,
            # never a release that takes all traffic (a new stable always needs an allowing decision).
            given = [f for f in ("initial_weight", "strategy", "break_glass") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} apply to a canary only: without canary_release, "
                                 "stable_release is the deployment's first release and serves all traffic once a "
                                 "verified gate decision allows it (break-glass never covers a release that serves "
                                 "everyone)")
        elif self.canary_release == self.stable_release:
            raise ValueError("canary_release must differ from stable_release")

    @property
    def first(self) -> bool:
        """True for a first release: `stable_release` alone."""
        return not self.canary_release


_canary_decoder = msgspec.json.Decoder(CanaryRequest)
_manual_decoder = msgspec.json.Decoder(ManualRequest)


def decode_json(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """`body` decoded by `decoder`; a body that is no JSON at all raises its DecodeError (`Input data was truncated`),
    not the field error msgspec meets first: `{"x":` was refused for its unknown field `x` (probe p70 H2)."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError:
        msgspec.json.decode(body)  # raises when the syntax is what is wrong
        raise


def decode_manual(body: bytes) -> ManualRequest:
    """A promote/abort/undo body (empty means no override), or InvalidRequest."""
    if not body.strip():
        return ManualRequest()
    try:
        return decode_json(_manual_decoder, body)
    except UNDECODABLE as exc:  # a string that is not UTF-8 too (was a 500)
        raise InvalidRequest(f"invalid request: {undecodable(exc)}") from None


class NotAdmitted(InvalidRollout):
    """The release has no verified decision allowing it (HTTP 409); only an admin's break-glass overrides."""


class OverrideExceeded(InvalidRollout):
    """A request for more traffic than a break-glass statement was signed for (HTTP 403 `invalid_break_glass`)."""


class OverrideReplayed(InvalidRollout):
    """A break-glass statement used once already (HTTP 403 `invalid_break_glass`)."""


def admission(decision: GateDecided) -> dict[str, str]:
    """The route fields of a canary that `decision` (verified, allowing it) admits."""
    return {"admitted": decision.id, "admitted_by": decision.key_id}


def allows(decision: GateDecided | None, release: str) -> bool:
    """True when a (verified) decision allows exactly this release: PASS, which an approved review also yields."""
    return decision is not None and decision.release == release and decision.decision == "PASS"


def other_content(decision: GateDecided, bound: Mapping[str, str] | None) -> str:
    """How the release artifacts (`kind/name` -> hash) `decision` judged differ from `bound`, what its release
    name holds now (None: not registered); "" when they are exactly the same.

    A decision speaks for the content it judged, not for whatever its release name holds later: an allowing one
    admits the release only while the two are the same. The suite and policy a decision also names (bare keys
    `eval_suite` and `policy`) are not release content."""
    if bound is None:
        return f"release {decision.release!r} is not registered"
    diffs = decision.differences(bound, "bound to")
    if not diffs:
        return ""
    return f"decision {decision.id} judged other content than release {decision.release!r} holds ({'; '.join(diffs)})"


class AlreadyServing(InvalidRollout):
    """A first release for a deployment that already serves one (HTTP 409)."""


class ReleaseNotInScope(InvalidRollout):
    """A key of one tenant asked to roll out, or change the rollout of, another tenant's release (HTTP 403
    `release_not_in_scope`)."""


def require_allowed(release: str, decision: GateDecided | None, what: str, also: str = "") -> None:
    """NotAdmitted unless `decision` (verified; None if there is none) allows `release`, naming the decision in the
    way (or its absence) and what to do; `what` is the release's part ("stable release"), `also` a last word."""
    if allows(decision, release):
        return
    subject = f"{what} {release!r}"
    if decision is None or decision.release != release:
        msg = (f"refused: {subject} has no verified gate decision allowing it (none stored, or it does not verify): "
               f"gate it first (lockgate eval run SUITE --candidate {release} --policy POLICY), then try again")
    else:
        why = f": {decision.reason}" if decision.reason else ""
        if decision.decision == "BLOCK":
            msg = f"refused: {subject} is BLOCKed by the gate (decision {decision.id}{why}); fix it and gate a new release"
        elif decision.decision == "NEEDS_REVIEW":
            msg = (f"refused: {subject} is awaiting review (decision {decision.id} is NEEDS_REVIEW{why}); it is "
                   f"allowed once a reviewer approves it (lockgate gate approve {release})")
        else:
            msg = (f"refused: the current gate decision of {subject} ({decision.id}) is {decision.decision}{why}, "
                   "which does not allow it")
    raise NotAdmitted(f"{msg}{'; ' + also if also else ''}")


def decode_canary(body: bytes) -> CanaryRequest:
    """A canary request from its JSON body, or InvalidRequest naming the path of what is wrong."""
    try:
        return decode_json(_canary_decoder, body)
    except UNDECODABLE as exc:  # ValidationError included, and a string that is not UTF-8 (was a 500)
        raise InvalidRequest(f"invalid canary request: {undecodable(exc)}") from None


def normalize_steps(steps: tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """Sorted distinct steps in (0, 100], always ending at 100."""
    out = sorted({float(s) for s in steps if 0 < s <= 100})
    if not out or out[-1] != 100.0:
        out.append(100.0)
    return tuple(out)


SECRET_BYTES = 32  # the router's secret (Rollouts.secret): random, shared by its replicas, read by no other identity


@functools.lru_cache(maxsize=1024)
def _derived(secret: bytes, purpose: str, *parts: str) -> bytes:
    # One secret, a key per purpose: a sticky salt is never a user hash of some other input.
    return hmac.digest(secret, "\x00".join((purpose, *parts)).encode(), "sha256")


def sticky_salt(secret: bytes, route: Route) -> str:
    """The key of a rollout's sticky buckets: the router's secret over the deployment and the rollout's id, the same on
    every replica and for the whole rollout, and computed by the router only. A rollout started before it kept its
    own salt in the route (Route.salt), and one started before salts none (""): each keeps the split it began with."""
    if route.salt or not route.rollout:
        return route.salt
    return _derived(secret, "sticky", route.deployment, route.rollout).hex()


def bucket(deployment: str, user: str, salt: str = "") -> int:
    """Stable bucket in [0, 10000) for a user within a deployment and rollout (same user and salt, same bucket).

    Keyed with the rollout's secret salt (`sticky_salt`): anyone can hash a deployment and a user id, and a client
    that knew its users' arms could send long prompts to the canary's and short ones to stable's, and abort a
    healthy canary on the difference. "" (a route stored before salts): the unsalted hash it was routed by."""
    data = f"{deployment}\x00{user}".encode()
    digest = hmac.digest(salt.encode(), data, "sha256") if salt else hashlib.sha256(data).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def by_header(route: Route, headers: Mapping[str, str] | None, key_id: str = "", role: str = "") -> bool:
    """True when a live rollout's header route sends this request to the canary (or blue-green preview): it carries
    the header and its API key (id, role) may test (HeaderRoute.honours). Anyone else's header is ignored."""
    return (route.header_route is not None and route.canary is not None and route.phase == "progressing"
            and headers is not None and route.header_route.honours(headers, key_id, role))


def choose(route: Route, user: str, headers: Mapping[str, str] | None = None, *, salt: str, key_id: str = "",
           role: str = "") -> tuple[Variant, Target]:
    """The variant and target for a sticky key (user, session or client key), split with the rollout's `salt`
    (`sticky_salt`). Raising the weight only moves stable users to canary (the salt stays for the whole rollout). Without a key each request draws its own bucket: the split holds,
    stickiness cannot (the client's IP is never used, see README). A live rollout's header route sends a tester's
    requests that carry its header (`by_header`) to the canary (or blue-green preview) first, at any weight; any
    other request is routed as if it had no header, never refused (an ordinary client library may send one)."""
    if route.canary is not None and by_header(route, headers, key_id, role):
        return "canary", route.canary
    if route.canary is None or route.weight <= 0:
        return "stable", route.stable
    spot = bucket(route.deployment, user, salt) if user else random.randrange(BUCKETS)
    if route.weight >= 100 or spot < route.weight * (BUCKETS // 100):
        return "canary", route.canary
    return "stable", route.stable


def stable_only(route: Route) -> Route:
    """The route as a replica cut off from the bus serves it: no canary weight, header route or shadow (it
    would not hear a BLOCK of the canary), everyone on stable."""
    return msgspec.structs.replace(route, canary=None, weight=0.0, header_route=None)


@functools.lru_cache(maxsize=8192)  # the same users call again and again: an HMAC per user, not per request
def user_hash(secret: bytes, tenant: str, user: str) -> str:
    """Pseudonymous user id for events: never the raw id, and keyed with the router's secret. An unkeyed hash of a
    user id (a small integer, an email) is reversed by hashing candidates; whoever reads the events lacks the key.
    The same for a tenant's user on every replica and rollout, so per-user analysis still groups."""
    return hmac.digest(secret, "\x00".join(("user", tenant, user)).encode(), "sha256").hex()[:16] if user else ""


def default_route(deployment: str) -> Route:
    """A deployment nobody configured: all traffic to the `default` endpoint with the client's model. The proxy
    serves it only when passthrough is opted in to (Proxy.route_of); else it is where a first rollout starts."""
    return Route(deployment=deployment, stable=Target(release=""), reason="default route")


# A finished rollout holds no step, header route, timed pause or running analysis.
_FINISHED: dict[str, object] = {"header_route": None, "step_pause": False, "step_paused_at": 0.0, "resume_at": 0.0,
                                "promote_at": 0.0, "live_at": 0.0, "verifying": False}


def _bump(route: Route, **changes: object) -> Route:
    new = msgspec.structs.replace(route, version=route.version + 1, **changes)
    if new.glass_stable is not None and new.glass_stable.release != new.stable.release:
        # The release a break-glass promote put in serves no more (rolled back, undone, replaced): nothing to show.
        new = msgspec.structs.replace(new, glass_stable=None)
    return new


def glass_admitted(route: Route, decision: GateDecided) -> Route | None:
    """`route` without the break-glass statement its stable serves by, once `decision` (verified) admits the stable:
    the gate speaks for it now. None when the route has none, or the decision does not admit its stable."""
    glass = route.glass_stable
    if glass is None or decision.release != route.stable.release or not allows(decision, decision.release):
        return None
    return _bump(route, glass_stable=None,
                 reason=f"{route.reason}; break-glass promote of {glass.release} by {glass.actor} ended: gate "
                        f"decision {decision.id} admits it")


def same_app(route: Route, *targets: Target) -> None:
    """InvalidRollout unless every target is of the app the deployment serves (its stable's, else the first
    target's). A deployment serves one app's releases, so the gates file's requirement for that app (which
    the gatekeeper applies by a release's registered app) cannot be sidestepped by registering a release
    under another app and rolling it out here. An app unknown ("": a route stored before apps were recorded)
    constrains nothing."""
    known = [t for t in (route.stable if route.stable.release else None, *targets) if t is not None and t.app]
    if not known:
        return
    serving = known[0]
    for t in known[1:]:
        if t.app != serving.app:
            raise InvalidRollout(f"refused: release {t.release!r} is of app {t.app!r}, but {route.deployment!r} "
                                 f"serves app {serving.app!r} ({serving.release}): a deployment's releases are of "
                                 "one app, so that app's gates apply to every release it serves")


def serves_tenant(route: Route, tenant: str | None) -> bool:
    """Whether a key of `tenant` (None: an admin's, every tenant's) may send traffic to `route`: its releases are
    of one tenant (`same_tenant`), recorded on its targets. A tenant unknown ("": a route stored before tenants
    were recorded) constrains nothing."""
    return tenant is None or route.stable.tenant in ("", tenant)


def same_tenant(route: Route, *targets: Target) -> None:
    """InvalidRollout unless every target is of the tenant whose releases the deployment serves (its stable's,
    else the first target's). The gate judges a release's drift by its own tenant's reports only, and the
    deployment's operators are that tenant's keys: another tenant's release on it would be judged and changed
    by neither. A tenant unknown ("": a route stored before tenants were recorded) constrains nothing."""
    known = [t for t in (route.stable if route.stable.release else None, *targets) if t is not None and t.tenant]
    for t in known[1:]:
        if t.tenant != known[0].tenant:
            raise InvalidRollout(f"refused: release {t.release!r} is of tenant {t.tenant!r}, but {route.deployment!r} "
                                 f"serves tenant {known[0].tenant!r}'s releases ({known[0].release}): a deployment's "
                                 "releases are of one tenant")


def start_canary(route: Route, req: CanaryRequest, *, stable: Target, canary: Target, first_step: float,
                 override: Override | None = None, now: float = 0.0, rollout: str = "") -> Route:
    """Begin a canary at 0%, waiting for a decision that allows it; with an override, at its initial weight.

    `stable` and `canary` are the targets the releases' bundles resolve to, of the app the deployment serves.
    `rollout` is the new rollout's id, which keys its sticky buckets (`sticky_salt`; drawn by the caller: this stays
    deterministic). A salt stored by a rollout before is dropped: this one's is the router's to compute.
    """
    same_app(route, stable, canary)
    same_tenant(route, stable, canary)
    if override is not None and req.initial_weight not in (None, override.weight):
        raise OverrideExceeded(f"refused: the break-glass statement by {override.actor} lets {canary.release!r} take "
                               f"{override.weight:g}% of {route.deployment!r}, not the {req.initial_weight:g}% asked; "
                               "leave initial_weight out, or have the admin sign another")
    # With an override, the weight its admin signed for; else the one asked, given once a decision allows it.
    asked = override.weight if override is not None else first_step if req.initial_weight is None else req.initial_weight
    weight = asked if override is not None else 0.0
    # The stable a canary starts from serves everyone by a decision (or override): known-good unless
    # it is the same release that was already there unverified (a promotion whose analysis was cut short).
    good = route.good
    if stable.release and (not good or stable.release != route.stable.release):
        good = remember(good, stable)
    why = (f"BREAK-GLASS by {override.actor}: {override.reason}" if override is not None
           else "0% until a verified gate decision allows it")
    # An override covers the rollout it was signed for, never a later one: a new rollout has its own or none.
    return _bump(route, stable=stable, canary=canary, weight=float(weight), phase="idle", step=0, cursor=0,
                 **_FINISHED, promoted_at=0.0, scale_down_at=0.0,
                 reason=override_ended(route, f"canary {req.canary_release} started at {weight:g}%; {why}",
                                         "a new rollout started" + (" with its own" if override else " without one")),
                 decision_id="", next_step_at=0.0, admitted="", start_weight=float(asked), good=good,
                 override=override, spent=route.spent if override is None else spend(route, override, now),
                 rollout=rollout, salt="")


def first_release(route: Route, target: Target, decision: GateDecided | None, actor: str = "") -> Route:
    """A deployment's first release: `target` serves all traffic at once (a finished rollout: phase promoted, no
    canary), if and only if `decision` (its verified current one, None if none) allows it (NotAdmitted otherwise).

    Only for a deployment without a stable release (AlreadyServing otherwise): a serving release changes through
    a canary or blue-green rollout, which gates the new one step by step against it.
    """
    current = route.stable.release
    if current:
        if current == target.release:
            raise AlreadyServing(f"refused: {target.release!r} is already the stable release of "
                                 f"{route.deployment!r}: a first release is for a deployment that serves none")
        raise AlreadyServing(
            f"refused: {route.deployment!r} already serves {current!r}, and stable_release alone only gives a "
            f"deployment its first release; a serving release changes through a rollout that gates the new one "
            f"against it: PUT stable_release {current!r} with canary_release {target.release!r} (canary or "
            "blue-green strategy)")
    require_allowed(target.release, decision, "first release",
                    "a first release serves all traffic at once, so a break-glass override cannot cover it")
    assert decision is not None  # allowed
    return _bump(route, stable=target, canary=None, weight=0.0, phase="promoted", step=0, cursor=0, **_FINISHED,
                 promoted_at=0.0, scale_down_at=0.0, next_step_at=0.0, start_weight=0.0, previous=None,
                 strategy=None, started_at=0.0, paused=False, analysis=None, override=None,
                 good=remember(route.good, target), decision_id=decision.id, **admission(decision),
                 reason=f"first release {target.release} serves 100% (rolled out by {actor or 'operator'}): "
                        f"verified gate decision {decision.id} allows it; later releases roll out as a canary "
                        "from it")


def restore(route: Route, release: str, decision: GateDecided | None, actor: str, revision: int, why: str) -> Route:
    """A deployment whose route record was made unreadable (`why`) back on `route`, its last readable revision
    (`revision` in KV), as the operator's `stable_release` alone asks: only with the release that revision serves
    (AlreadyServing otherwise, as on a readable route), and only while its verified current decision (`decision`)
    allows it, as a first release needs (NotAdmitted otherwise).

    The revision keeps the deployment's app, tenant, rollout and known-good history: a record made unreadable is
    no way to give the deployment another app's or tenant's release, nor to skip a canary."""
    current = route.stable.release
    if release != current:
        raise AlreadyServing(
            f"refused: the route record of {route.deployment!r} is unreadable ({why}); its last readable revision "
            f"({revision}) serves {current!r}, so stable_release alone restores it only with that release: PUT "
            f"stable_release {current!r} (lockgate rollout start {route.deployment} --stable {current}), then roll "
            f"{release!r} out as a canary from it")
    require_allowed(release, decision, "stable release",
                    "restoring an unreadable route serves it to everyone at once, as a first release does")
    return _bump(route, reason=f"route restored by {actor or 'operator'} from its last readable revision "
                               f"({revision}) after its record was made unreadable ({why}): {route.reason}")


# How long after its signing time a statement may still verify (identity.OVERRIDE_MAX_AGE_S, plus the skew
# it allows ahead): a spent one is remembered that long, then forgotten, as it can no longer be used.
STATEMENT_LIFE_S = 600.0 + 60.0


def spend(route: Route, override: Override, now: float) -> list[tuple[str, float]]:
    """The route's spent statements with `override`'s added (those past their life dropped); OverrideReplayed
    if it was spent already: an admin's signature allows one action, not every repeat of it for ten minutes."""
    # Of what was signed and of the signature's bytes, never its text: base64 has several spellings of one
    # signature (the unused bits of its last character), each of which verifies.
    try:
        sig = base64.b64decode(override.signature, validate=True).hex()
    except (binascii.Error, ValueError):
        sig = override.signature
    signed = (override.release, override.action, override.reason, override.at, override.key_id, sig)
    digest = hashlib.sha256(msgspec.json.encode(signed)).hexdigest()[:32]
    live = [(d, until) for d, until in route.spent if until > now]
    if any(d == digest for d, _ in live):
        raise OverrideReplayed(f"refused: this break-glass statement ({override.action} of {override.release} by "
                               f"{override.actor}, signed at {override.at:.0f}) was used already; each is good "
                               "once: sign a fresh one with `lockgate break-glass`")
    return [*live, (digest, override.at + STATEMENT_LIFE_S)]


def override_ended(route: Route, reason: str, why: str) -> str:
    """The reason of a change that ends the route's break-glass override (if it has one), saying so: the
    override covered only the rollout it was signed for, and must not let its release back in later."""
    glass = route.override
    if glass is None:
        return reason
    return f"{reason}; break-glass override by {glass.actor} for {glass.release} ended: {why}"


def on_decision(route: Route, decision: GateDecided, steps: tuple[float, ...], interval_s: float,
                now: float, decisions: Mapping[str, GateDecided | None] = NO_DECISIONS) -> Route | None:
    """Apply a gate decision to the canary it names, or to the serving stable or a known-good release it does not
    allow (`on_reject_known_good`); None when nothing changes.
    `decisions`: the current verified decisions of the route's known-good releases, where a rollback may go.
    A BLOCK also ends a break-glass override of its release: the override was signed before the gate said no, and
    must not let the release back in later (a PATCH or set-weight of it)."""
    glass = route.override
    if decision.decision != "BLOCK" or glass is None or glass.release != decision.release:
        return _forget_blocked(route, decision, _on_decision(route, decision, steps, interval_s, now, decisions))
    # Ended here, said once: the abort or rollback the BLOCK also makes finds no override left to end.
    bare = msgspec.structs.replace(route, override=None)
    base = _on_decision(bare, decision, steps, interval_s, now, decisions) or _bump(bare)
    ended = msgspec.structs.replace(base, reason=f"{base.reason}; break-glass override by {glass.actor} ended by "
                                                 "the gate's BLOCK")
    return _forget_blocked(route, decision, ended)


def _forget_blocked(route: Route, decision: GateDecided, new: Route | None) -> Route | None:
    """`new` (None: no change) without the release a BLOCK names in its known-good history, whatever part the
    release plays in the route (an aborted canary's release may have been known-good before), so no later
    rollback puts it back."""
    base = new or route
    if decision.decision != "BLOCK" or all(t.release != decision.release for t in base.good):
        return new
    return msgspec.structs.replace(new or _bump(route), good=forget(base.good, decision.release))


def _on_decision(route: Route, decision: GateDecided, steps: tuple[float, ...], interval_s: float,
                 now: float, decisions: Mapping[str, GateDecided | None]) -> Route | None:
    if decision.id == route.decision_id:
        return None  # a redelivery
    if route.canary is None or route.canary.release != decision.release or (
            route.phase == "aborted" and route.stable.release == decision.release):
        # An aborted canary's release is the route's canary no longer, and may serve again as its stable (`undo
        # --to` it after an undo away from it): a decision about it is about the serving stable. Before, the abort
        # being terminal for the canary swallowed a BLOCK of it, and the BLOCKed release kept all traffic.
        return on_reject_known_good(route, decision, decisions)
    why = f": {decision.reason}" if decision.reason else ""
    if route.phase == "promoted":
        if decision.decision == "PASS" or route.stable.release != decision.release:
            return glass_admitted(route, decision)
        return rollback(route, f"gate {decision.decision} after promotion{why}", decision_id=decision.id,
                        decisions=decisions)
    if route.phase == "aborted":
        return None  # terminal for this canary: a new one starts with PUT
    if decision.decision == "PASS":
        if route.phase == "progressing":
            return None
        first = route.start_weight if route.weight <= 0 < route.start_weight else 0.0
        if first:
            # The weight the operator asked for, now that a decision allows it.
            nxt = next((i for i, s in enumerate(steps) if s >= first), len(steps) - 1)
            return _bump(route, weight=first, phase="progressing", step=nxt + 1, **admission(decision),
                         reason=f"gate PASS{why}; canary at {first:g}%", decision_id=decision.id,
                         next_step_at=now + interval_s)
        nxt = next((i for i, s in enumerate(steps) if s > route.weight), None)
        if nxt is None:
            return promote(msgspec.structs.replace(route, **admission(decision)), f"gate PASS at {route.weight:g}%",
                           decision_id=decision.id)
        return _bump(route, weight=steps[nxt], phase="progressing", step=nxt + 1, **admission(decision),
                     reason=f"gate PASS{why}; step {nxt + 1}/{len(steps)}: canary at {steps[nxt]:g}%",
                     decision_id=decision.id, next_step_at=now + interval_s)
    if decision.decision == "NEEDS_REVIEW":
        # Awaiting review is not allowed: the canary waits at 0% until an approval (a signed PASS).
        return _bump(route, phase="idle", weight=0.0, next_step_at=0.0, decision_id=decision.id, admitted="",
                     reason=f"gate NEEDS_REVIEW{why}; canary at 0% until approved")
    return abort(route, f"gate {decision.decision}{why}", decision_id=decision.id)


def tick(route: Route, steps: tuple[float, ...], interval_s: float, now: float) -> Route | None:
    """Advance a progressing canary whose step is due: next step, or promotion after 100%."""
    if route.phase != "progressing" or route.canary is None or now < route.next_step_at:
        return None
    nxt = next((i for i, s in enumerate(steps) if s > route.weight), None)
    if nxt is None:
        return promote(route, f"canary held {route.weight:g}% for one interval")
    return _bump(route, weight=steps[nxt], step=nxt + 1, next_step_at=now + interval_s,
                 reason=f"step {nxt + 1}/{len(steps)}: canary at {steps[nxt]:g}%")


def promote(route: Route, why: str, *, decision_id: str | None = None) -> Route:
    """The canary becomes stable; its target stays recorded (weight 0) until the next canary."""
    if route.canary is None:
        raise InvalidRollout(f"deployment {route.deployment!r} has no canary to promote")
    return _bump(route, stable=route.canary, previous=route.stable, weight=0.0, phase="promoted", next_step_at=0.0,
                 reason=override_ended(route, f"promoted {route.canary.release}: {why}", "its rollout was promoted"),
                 **_FINISHED, good=remember(route.good, route.canary), override=None,
                 decision_id=route.decision_id if decision_id is None else decision_id)


def abort(route: Route, why: str, *, decision_id: str | None = None) -> Route:
    """All traffic back to stable at once."""
    if route.canary is None:
        raise InvalidRollout(f"deployment {route.deployment!r} has no canary to abort")
    return _bump(route, weight=0.0, phase="aborted", next_step_at=0.0,
                 reason=override_ended(route, f"aborted {route.canary.release}: {why}", "its rollout was aborted"),
                 **_FINISHED, scale_down_at=0.0, override=None,
                 decision_id=route.decision_id if decision_id is None else decision_id)


def rollback(route: Route, why: str, *, decision_id: str, failed: bool = True,
             decisions: Mapping[str, GateDecided | None]) -> Route:
    """The stable release failed (analysis, BLOCK, reject) or an operator undid it: the last known-good release
    that a verified decision allows now (`decisions`: the current ones of the route's known-good releases) takes
    all traffic back (phase aborted); newer known-good ones no decision allows are skipped, and the reason says so.
    A failed release also leaves the known-good history."""
    failing = route.stable.release
    good = forget(route.good, failing) if failed else route.good
    target, skipped = last_good(route, failing, decisions)
    unallowed = (f" (known-good {', '.join(skipped)} skipped: no verified gate decision allows "
                 f"{'it' if len(skipped) == 1 else 'them'} now)") if skipped else ""
    if target is None:
        # Nothing to fall back to: keep serving, but say so loudly in the status. A failed release's
        # post-promotion analysis ends here: were it to pass later, it would make the failed release known-good.
        # A live canary of another release goes on, admitted by its own decision, which is kept: whatever raises
        # it must still check that one (cleared, the timer stepped the canary on without any check).
        live = route.canary is not None and route.phase in ("idle", "progressing")
        return _bump(route, decision_id=decision_id, admitted=route.admitted if live else "", good=good,
                     verifying=route.verifying and not failed,
                     reason=f"{why}; NO known-good release to roll back to{unallowed}: still serving {failing}")
    back = "" if route.previous is not None and target.release == route.previous.release else \
        f"; back on last known-good {target.release}"
    return _back_to(route, target, f"{why}{back}{unallowed}", decision_id=decision_id, good=good)


def _back_to(route: Route, target: Target, why: str, *, decision_id: str, good: list[Target]) -> Route:
    return _bump(route, stable=target, previous=None, weight=0.0, phase="aborted", next_step_at=0.0,
                 decision_id=decision_id, admitted="", good=good, **_FINISHED, scale_down_at=0.0, override=None,
                 reason=override_ended(route, f"rolled back {route.stable.release}: {why}", "its rollout was rolled back"))


def undo(route: Route, decision: GateDecided | None, actor: str) -> Route:
    """An operator's `undo`: the release the last promotion replaced (`previous`) takes all traffic back, exactly
    that one, if and only if its current decision (`decision`, verified, None if none) allows it (NotAdmitted
    otherwise). Never another release in its place: the newest known-good one a decision allows, where an automatic
    rollback goes, is not the release the operator checked, and `previous` need not be in the known-good history
    (a blue-green promotion still under post-promotion analysis when the next rollout began)."""
    if route.phase != "promoted" or route.previous is None:
        raise InvalidRollout(f"deployment {route.deployment!r} has no promoted release to undo")
    require_allowed(route.previous.release, decision, "previous release", also="roll forward with a new release instead")
    return _back_to(route, route.previous, f"undone by {actor or 'operator'}", decision_id=route.decision_id,
                    good=route.good)


def on_reject_known_good(route: Route, decision: GateDecided,
                         decisions: Mapping[str, GateDecided | None] = NO_DECISIONS) -> Route | None:
    """A decision naming a release that is not this route's canary (or is the aborted canary serving again as its
    stable). One that does not allow the serving stable (a BLOCK, a NEEDS_REVIEW, a person's reject) rolls it back
    to the last known-good release a decision allows now, whatever the canary slot holds: a live canary of another
    release is aborted with it. Before, only a BLOCK did: a NEEDS_REVIEW of a stable whose route had any other
    canary recorded (a new 0% one, an aborted one) left it all traffic for good (probe p14).

    A BLOCK of a known-good release that is not serving drops it from the history. A NEEDS_REVIEW of one leaves it
    there: no rollback goes to it while no decision allows it (`last_good` reads its current one), and an approval
    makes it a target again."""
    if route.stable.release == decision.release:
        if allows(decision, decision.release) or decision.id == route.glass_over:
            return glass_admitted(route, decision)
        return rollback(route, _why(route, decision), decision_id=decision.id, decisions=decisions)
    if decision.decision != "BLOCK" or not _known(route, decision.release):
        return None
    return _bump(route, good=forget(route.good, decision.release), reason=f"{route.reason}; {_why(route, decision)}")


def _known(route: Route, release: str) -> bool:
    return any(t.release == release for t in route.good)


def _why(route: Route, decision: GateDecided) -> str:
    return f"gate {decision.decision} of {'known-good' if _known(route, decision.release) else 'stable'} " \
        f"{decision.release}" + (f": {decision.reason}" if decision.reason else "")


def hold_stable(route: Route, decision: GateDecided | None,
                decisions: Mapping[str, GateDecided | None] = NO_DECISIONS) -> Route | None:
    """The serving stable checked again against its current decision (`decision`: verified against the trust file
    as it is now, None when none is stored or it does not verify; `decisions`: those of the known-good releases),
    as the router does at start, every few seconds and after an operator's abort: rolled back as when that decision
    arrived, if it does not allow the stable and a known-good release a decision allows now is there to take all
    traffic; else None.

    A decision the route never acted on (a replica that missed it, a route stored before this check) or one whose
    rollback had nowhere to go then (a known-good release approved since) takes effect so. No verified decision at
    all changes nothing: a release a break-glass override promoted never had one, and one whose decision's key was
    retired since keeps serving (README: rotating the gatekeeper's key). With nowhere to go it keeps serving too,
    its reason said once when the decision arrived, not rewritten on every check."""
    stable = route.stable.release
    if not stable or decision is None or decision.release != stable:
        return None
    if allows(decision, stable) or decision.id == route.glass_over:
        return glass_admitted(route, decision)  # a break-glass promote's statement ends once the gate admits it
    if last_good(route, stable, decisions)[0] is None:
        return None
    return rollback(route, _why(route, decision), decision_id=decision.id, decisions=decisions)


def undo_to(route: Route, release: str, decision: GateDecided | None, actor: str) -> Route:
    """An operator's `undo --to RELEASE`: that earlier known-good release takes all traffic at once.

    Refused (InvalidRollout) unless the release was fully promoted and healthy on this deployment; and
    (NotAdmitted) unless its current decision (`decision`, verified, None if none) allows it as admission
    requires: a release BLOCKed, awaiting review or with no decision since does not go back to 100% by hand.
    """
    if release == route.stable.release:
        raise InvalidRollout(f"refused: {release!r} is already the stable release of {route.deployment!r}")
    target = next((t for t in reversed(route.good) if t.release == release), None)
    if target is None:
        known = ", ".join(t.release for t in reversed(route.good) if t.release != route.stable.release) or "none"
        raise InvalidRollout(f"refused: {release!r} was never fully promoted and healthy on {route.deployment!r} "
                             f"(known-good releases, newest first: {known})")
    if not allows(decision, release):
        # Known-good once is not allowed now: the gate may have re-gated it since (a drift, a new eval).
        why = f": {decision.reason}" if decision is not None and decision.reason else ""
        if decision is None or decision.release != release:
            raise NotAdmitted(f"refused: {release!r} has no verified gate decision now (none stored, or it does "
                              "not verify), and a release goes back to all traffic only with one allowing it: gate it "
                              f"again (lockgate eval run --candidate {release} ... --policy ...) or choose another "
                              "known-good release; in an emergency an admin may roll it out as a canary with "
                              "break_glass")
        if decision.decision == "BLOCK":
            raise NotAdmitted(f"refused: {release!r} is now BLOCKed by the gate{why}; choose another known-good "
                              "release")
        if decision.decision == "NEEDS_REVIEW":
            raise NotAdmitted(f"refused: {release!r} is awaiting review (its current gate decision is NEEDS_REVIEW"
                              f"{why}); it serves again once a reviewer approves it (lockgate gate approve {release}), "
                              "or choose another known-good release")
        raise NotAdmitted(f"refused: the current gate decision of {release!r} is {decision.decision}{why}, which does "
                          "not allow it; choose another known-good release")
    return _bump(route, stable=target, previous=route.stable, weight=0.0,
                 phase="aborted" if route.canary is not None else route.phase, next_step_at=0.0, admitted="",
                 reason=override_ended(route, f"undone to known-good {release} by {actor or 'operator'} "
                                                f"(was {route.stable.release})", "its rollout was undone"),
                 **_FINISHED, scale_down_at=0.0, override=None)


def manual_promote(route: Route, override: Override | None, now: float = 0.0, over: str = "") -> Route:
    """An operator's promote: only an admitted canary, unless an admin's break-glass override is given (`over`:
    the id of the canary's current verified decision it goes past, "" if none)."""
    if route.canary is None:
        raise InvalidRollout(f"deployment {route.deployment!r} has no canary to promote")
    if route.phase in ("promoted", "aborted"):
        raise InvalidRollout(f"canary of {route.deployment!r} is already {route.phase}")
    if override is None:
        if not route.admitted:
            raise NotAdmitted(f"refused: canary {route.canary.release!r} has no verified gate decision allowing it "
                              "(PASS, or NEEDS_REVIEW approved); an admin may override with "
                              '{"break_glass": {"reason": "..."}}')
        return promote(route, "by operator")
    if override.release != route.canary.release:  # the canary changed after the admin signed for another one
        raise NotAdmitted(f"refused: the break-glass override is for {override.release!r}, but the canary of "
                          f"{route.deployment!r} is now {route.canary.release!r}")
    # The promotion ends the rollout, so the statement is no canary's override any more (nor is an override the
    # rollout was started with); it is kept as what the stable serves by (`glass_stable`), until the gate admits it.
    return msgspec.structs.replace(promote(route, f"BREAK-GLASS by {override.actor}: {override.reason}"),
                                   spent=spend(route, override, now), glass_over=over, glass_stable=override)


def rests_on_admission(route: Route) -> bool:
    """True for a live canary that takes (or may take) traffic on a decision it was admitted by: what raises its
    traffic must check that admission again first. A progressing canary rests on one even when the route records
    none (a route stored before admissions were recorded): it is checked all the same, never stepped on unchecked.

    A break-glass override covering the canary changes nothing here: it holds a canary no decision admitted at its
    signed weight (phase idle, no admission), and a decision that admitted it past that is what the steps, the
    operator's raises and promote rest on from then on. (Before, probe p64 F1, a break-glass canary a PASS then
    admitted was never checked again: with that PASS's key revoked it stepped on to 100% and was promoted.)"""
    return route.canary is not None and route.phase in ("idle", "progressing") and bool(
        route.admitted or route.phase == "progressing")


def readmit(route: Route, decision: GateDecided | None, why_not: str = "") -> Route | None:
    """Check a live canary's admission again against its release's current decision (`decision`, verified against
    the trust file as it is now; None when none is stored or it no longer verifies, `why_not` saying why): None
    while it allows the release; else the canary back to 0%, waiting for a decision as a new canary does.

    The decision that admitted the canary was current when it was read, and may not be now: the gate may have
    decided again since in a way this route never heard of (a BLOCK acted on while an operator's change of the
    route was in flight, or by a replica that did not have the canary yet), or the gatekeeper's key that signed it
    may have been revoked (or dropped from the trust file) since; what that key signed no longer counts, neither
    for a new rollout nor for raising or promoting one it admitted before."""
    if not rests_on_admission(route) or allows(decision, route.canary.release if route.canary else ""):
        return None
    assert route.canary is not None
    release = route.canary.release
    if decision is None or decision.release != release:
        now = f"it no longer verifies ({why_not})" if why_not else "no verified decision allows it now"
    else:
        now = f"the current decision {decision.id} is {decision.decision}"
    by = f"gate decision {route.admitted}" if route.admitted else "a gate decision the route does not record"
    glass = route.override
    # The override still covers its canary, at no more than its signed weight (an operator may give it that again):
    # what the revoked or superseded decision gave beyond it is gone.
    still = f"; the break-glass override by {glass.actor} covers it still, at no more than {glass.weight:g}%" \
        if glass is not None and glass.release == release else ""
    return _bump(route, phase="idle", weight=0.0, next_step_at=0.0, admitted="", admitted_by="", decision_id="",
                 reason=f"canary {release} back to 0%: admitted by {by}, but {now}; it waits for a decision a trusted "
                        f"key signed{still}")


def clear_override(route: Route, why: str = "") -> Route:
    """End a break-glass override (`why`: it no longer counts, else an admin cleared it): a canary that no decision
    allows goes back to 0%."""
    if route.override is None:
        raise InvalidRollout(f"deployment {route.deployment!r} has no break-glass override to clear")
    ended = f"ended: {why}" if why else "cleared"
    changes: dict[str, object] = {"override": None, "reason": f"break-glass override by {route.override.actor} {ended}"}
    if route.canary is not None and route.phase in ("idle", "progressing") and not route.admitted:
        changes.update(weight=0.0, phase="idle", next_step_at=0.0)
        changes["reason"] = f"{changes['reason']}; canary {route.canary.release} back to 0% until a decision allows it"
    return _bump(route, **changes)


def due_at(route: Route) -> float | None:
    """When the route next needs a tick, if ever."""
    return route.next_step_at if route.phase == "progressing" else None


def shown(route: Route) -> dict[str, Any]:
    """The route as the admin API shows it (get, list, watch, every change's answer): all of it but its salt,
    which only the router needs; whoever read it (a viewer, an operator, a log of their output) could tell which
    arm each user id lands on."""
    out = msgspec.to_builtins(route)
    del out["salt"]
    return out


def attempt(route: Route, before: Route | None) -> tuple[float, bool]:
    """The rollout attempt the change from `before` (None: no route yet) to `route` is part of (its `started_at`, 0
    for none) and whether the change began it. An attempt ends when it is promoted or aborted: a later change keeps
    the route's `started_at` (a rollback of the promoted release, a BLOCK forgetting it), but is no step of that
    rollout, which already has its outcome."""
    if not route.started_at:
        return 0.0, False  # a first release: no rollout
    if before is None or before.started_at != route.started_at:
        # A route restored already promoted or aborted begins nothing it could end.
        return (route.started_at, True) if route.phase not in ("promoted", "aborted") else (0.0, False)
    if before.phase in ("promoted", "aborted"):
        return 0.0, False
    return route.started_at, False


def to_state(route: Route, before: Route | None = None) -> RolloutState:
    """The event announcing a route change (`before`: the route it changed, None if there was none)."""
    started_at, began = attempt(route, before)
    return RolloutState(
        deployment=route.deployment,
        stable_release=route.stable.release,
        canary_release=route.canary.release if route.canary else "",
        canary_weight=route.weight,
        phase=route.phase,
        step=route.step,
        reason=route.reason,
        decision_id=route.decision_id,
        started_at=started_at,
        began=began,
        promoted_at=route.promoted_at if route.phase == "promoted" else 0.0,
    )
