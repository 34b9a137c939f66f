"""Routing and rollout rules: sticky canary split and the rollout state machine. Pure, no I/O."""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import msgspec

from lockgate.contracts import GateDecided, RolloutState
from lockgate.contracts.names import Name
from lockgate.errors import LockgateError

Phase = Literal["idle", "progressing", "promoted", "aborted"]
Variant = Literal["stable", "canary"]
BUCKETS = 10_000


class InvalidRollout(LockgateError):
    """A canary request is malformed or contradicts the deployment's state (HTTP 400)."""


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """Where one variant's traffic goes."""

    release: str
    upstream: str
    model: str = ""


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


Url = Annotated[str, msgspec.Meta(pattern="^https?://")]


class CanaryRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of `PUT /lockgate/v1/deployments/{deployment}`."""

    stable_release: Name
    canary_release: Name
    stable_upstream: Url | None = None
    canary_upstream: Url | None = None
    stable_model: str | None = None
    canary_model: str | None = None
    initial_weight: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None  # percent; None: the first step

    def __post_init__(self) -> None:
        if not self.canary_release.strip() or not self.stable_release.strip():
            raise ValueError("stable_release and canary_release must be non-empty")
        if self.canary_release == self.stable_release:
            raise ValueError("canary_release must differ from stable_release")


_canary_decoder = msgspec.json.Decoder(CanaryRequest)


def decode_canary(body: bytes) -> CanaryRequest:
    """A canary request from its JSON body, or InvalidRollout naming the path of what is wrong."""
    try:
        return _canary_decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise InvalidRollout(f"invalid canary request: {exc}") from None


def normalize_steps(steps: tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """Sorted distinct steps in (0, 100], always ending at 100."""
    out = sorted({float(s) for s in steps if 0 < s <= 100})
    if not out or out[-1] != 100.0:
        out.append(100.0)
    return tuple(out)


def bucket(deployment: str, user: str) -> int:
    """Stable bucket in [0, 10000) for a user within a deployment (same user, same bucket)."""
    digest = hashlib.sha256(f"{deployment}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def choose(route: Route, user: str) -> tuple[Variant, Target]:
    """The variant and target for a user. Raising the weight only moves stable users to canary."""
    if route.canary is None or route.weight <= 0:
        return "stable", route.stable
    if route.weight >= 100 or bucket(route.deployment, user) < route.weight * (BUCKETS // 100):
        return "canary", route.canary
    return "stable", route.stable


def user_hash(user: str) -> str:
    """Pseudonymous user id for events: never the raw id."""
    return hashlib.sha256(user.encode()).hexdigest()[:16] if user else ""


def default_route(deployment: str, upstream: str) -> Route:
    """A deployment nobody configured: all traffic to the default upstream."""
    return Route(deployment=deployment, stable=Target(release="", upstream=upstream), reason="default route")


def _bump(route: Route, **changes: object) -> Route:
    return msgspec.structs.replace(route, version=route.version + 1, **changes)


def start_canary(route: Route, req: CanaryRequest, *, default_canary_upstream: str,
                 first_step: float) -> Route:
    """Begin a canary at its initial weight; it waits in phase `idle` for the gate decision (`req` is decoded)."""
    weight = first_step if req.initial_weight is None else req.initial_weight
    same_stable = route.stable.release in ("", req.stable_release)
    stable = Target(
        release=req.stable_release,
        upstream=req.stable_upstream or route.stable.upstream,
        model=req.stable_model if req.stable_model is not None else (route.stable.model if same_stable else ""),
    )
    canary = Target(release=req.canary_release, upstream=req.canary_upstream or default_canary_upstream,
                    model=req.canary_model or "")
    return _bump(route, stable=stable, canary=canary, weight=float(weight), phase="idle", step=0,
                 reason=f"canary {req.canary_release} started at {weight:g}%; awaiting gate decision",
                 decision_id="", next_step_at=0.0)


def on_decision(route: Route, decision: GateDecided, steps: tuple[float, ...], interval_s: float,
                now: float) -> Route | None:
    """Apply a gate decision to the canary it names; None when nothing changes."""
    if route.canary is None or route.canary.release != decision.release:
        return None
    if route.phase in ("promoted", "aborted") or decision.id == route.decision_id:
        return None  # terminal for this canary, or a redelivery
    why = f": {decision.reason}" if decision.reason else ""
    if decision.decision == "PASS":
        if route.phase == "progressing":
            return None
        nxt = next((i for i, s in enumerate(steps) if s > route.weight), None)
        if nxt is None:
            return promote(route, f"gate PASS at {route.weight:g}%", decision_id=decision.id)
        return _bump(route, weight=steps[nxt], phase="progressing", step=nxt + 1,
                     reason=f"gate PASS{why}; step {nxt + 1}/{len(steps)}: canary at {steps[nxt]:g}%",
                     decision_id=decision.id, next_step_at=now + interval_s)
    if decision.decision == "NEEDS_REVIEW":
        if route.phase != "progressing":
            return None
        return _bump(route, phase="idle", next_step_at=0.0, decision_id=decision.id,
                     reason=f"gate NEEDS_REVIEW{why}; holding at {route.weight:g}%")
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
    return _bump(route, stable=route.canary, weight=0.0, phase="promoted", next_step_at=0.0,
                 reason=f"promoted {route.canary.release}: {why}",
                 decision_id=route.decision_id if decision_id is None else decision_id)


def abort(route: Route, why: str, *, decision_id: str | None = None) -> Route:
    """All traffic back to stable at once."""
    if route.canary is None:
        raise InvalidRollout(f"deployment {route.deployment!r} has no canary to abort")
    return _bump(route, weight=0.0, phase="aborted", next_step_at=0.0,
                 reason=f"aborted {route.canary.release}: {why}",
                 decision_id=route.decision_id if decision_id is None else decision_id)


def due_at(route: Route) -> float | None:
    """When the route next needs a tick, if ever."""
    return route.next_step_at if route.phase == "progressing" else None


def to_state(route: Route) -> RolloutState:
    """The event announcing a route change."""
    return RolloutState(
        deployment=route.deployment,
        stable_release=route.stable.release,
        canary_release=route.canary.release if route.canary else "",
        canary_weight=route.weight,
        phase=route.phase,
        step=route.step,
        reason=route.reason,
        decision_id=route.decision_id,
    )
