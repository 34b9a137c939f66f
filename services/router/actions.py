"""Admin API for operator rollout actions: pause, resume, approve (of one pause step), set-weight (behind the admin
middleware)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
from aiohttp import web

from lockgate.codec import UNDECODABLE, undecodable
from lockgate.contracts.names import check_name
from lockgate.errors import InvalidEvent, LockgateError, NotFound, Retryable, UnreadableBody
from lockgate.identity import IdentityRefused
from lockgate.server.apikeys import ApiKey, Forbidden
from lockgate.server.body import closing, read_body
from lockgate.services.router.audit import record_action
from lockgate.services.router.domain import (
    AlreadyServing,
    InvalidRequest,
    InvalidRollout,
    NotAdmitted,
    OverrideExceeded,
    OverrideReplayed,
    ReleaseNotInScope,
    decode_json,
    shown,
)
from lockgate.services.router.progress import NotAtStep, RolloutChanged
from lockgate.services.router.rollouts import Rollouts, Unpersisted
from lockgate.services.router.wire import error_response

_encoder = msgspec.json.Encoder()
PREFIX = "/lockgate/v1/deployments"


class DeploymentNotFound(NotFound):
    """A deployment nothing serves (HTTP 404 `deployment_not_found`), or one a key may not read, told alike."""

    def __init__(self, deployment: str) -> None:
        # One message for both: a key of one tenant learns nothing of another's deployments (admin.Admin._shown).
        super().__init__(f"no deployment {deployment!r}: nothing is rolled out to it that this key may read "
                         f"(GET {PREFIX} lists those it may; `lockgate rollout start {deployment} --stable RELEASE`, "
                         f"PUT {PREFIX}/{deployment}, gives it its first release)")


def served(rollouts: Rollouts, deployment: str) -> bool:
    """Whether anything serves `deployment`, so that it has a route to read or act on: a route was rolled out to it
    (its record unreadable included: refused by the proxy, still written anew by a PUT), or passthrough serves
    every deployment nobody rolled out with the ungoverned default route (Proxy.route_of)."""
    return deployment in rollouts.routes or deployment in rollouts.unreadable or rollouts.ctx.settings.passthrough


def require_served(rollouts: Rollouts, deployment: str) -> None:
    """DeploymentNotFound unless something serves `deployment` (`served`)."""
    if not served(rollouts, deployment):
        raise DeploymentNotFound(deployment)


# Why an action was refused, as HTTP: first match wins (NotAdmitted is an InvalidRollout).
_REFUSALS: tuple[tuple[type[LockgateError], int, str, str | None], ...] = (
    (IdentityRefused, 403, "permission_denied", "invalid_break_glass"),
    (OverrideReplayed, 403, "permission_denied", "invalid_break_glass"),
    (OverrideExceeded, 403, "permission_denied", "invalid_break_glass"),
    (ReleaseNotInScope, 403, "permission_denied", "release_not_in_scope"),
    (Forbidden, 403, "permission_denied", "insufficient_role"),
    (DeploymentNotFound, 404, "invalid_request_error", "deployment_not_found"),
    (InvalidRequest, 400, "invalid_request_error", None),  # malformed whatever the deployment's state
    (NotAdmitted, 409, "conflict", "not_admitted"),
    (AlreadyServing, 409, "conflict", "already_serving"),
    (NotAtStep, 409, "conflict", "not_at_step"),
    (RolloutChanged, 409, "conflict", "rollout_changed"),
    (InvalidEvent, 400, "invalid_request_error", None),  # a bad name, an unreadable body
)
REFUSED = (IdentityRefused, Forbidden, InvalidEvent, InvalidRollout, DeploymentNotFound, Retryable)  # `refusal`'s


def refusal(exc: LockgateError, action: str, invalid: int = 409) -> web.Response:
    """The answer to an admin action refused with `exc`, one of REFUSED. A malformed request (InvalidRequest,
    InvalidEvent) is a 400; another InvalidRollout is `invalid`: 409 when it contradicts the deployment's state, 400
    for a PUT's release or spec."""
    if isinstance(exc, UnreadableBody):
        return closing(error_response(exc.http_status, exc.message, "invalid_request_error"))
    for kind, status, kind_name, code in _REFUSALS:
        if isinstance(exc, kind):
            return error_response(status, exc.message, kind_name, code=code)
    if isinstance(exc, Unpersisted):  # said only of a change applied (rollouts.Rollouts._settle, audit)
        return error_response(503, f"{action} {exc.message}", "unavailable")
    if isinstance(exc, Retryable):
        # Before (probe p67 F1), every one was "applied but not yet persisted": an abort that a failed read had kept
        # from being applied at all was reported applied.
        return error_response(503, f"{action} not applied: {exc.message}; nothing changed, retry", "unavailable")
    return error_response(invalid, exc.message, "invalid_request_error" if invalid == 400 else "conflict")


class ActionRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of `POST .../{deployment}/pause|resume|approve|set-weight` (empty for resume)."""

    weight: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None  # percent, set-weight only
    # approve: the pause step approved (the route's `step`, approve only), of the canary of this release (its
    # `canary.release`), in the rollout attempt that started then (its `started_at`). Optional for the others: the
    # rollout they act on, refused (409 `rollout_changed`) once the deployment runs another (progress.expect).
    step: Annotated[int, msgspec.Meta(ge=0)] | None = None
    canary: str = ""
    started_at: float | None = None
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


_decoder = msgspec.json.Decoder(ActionRequest)


class Actions:
    """`pause`, `resume`, `approve` and `set-weight`; each records the caller's key identity as the actor, and is
    appended to the audit log."""

    def __init__(self, rollouts: Rollouts, key: web.RequestKey[ApiKey]) -> None:
        self.rollouts = rollouts
        self.key = key

    def add_routes(self, app: web.Application) -> None:
        """Register the action endpoints on the admin application."""
        for action in ("pause", "resume", "approve", "set-weight"):
            app.router.add_post(f"/{{deployment}}/{action}", self._handler(action))

    def _handler(self, action: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await self._act(request, action)

        return handle

    async def _act(self, request: web.Request, action: str) -> web.Response:
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
            raw = await read_body(request)
            body = decode_json(_decoder, raw) if raw.strip() else ActionRequest()
            if action == "set-weight" and body.weight is None:
                raise InvalidRequest('set-weight needs {"weight": PERCENT}')
            if action == "approve" and (body.step is None or not body.canary or body.started_at is None):
                # Unbound, a repeated or concurrent approval ended the next pause too (probe p9); bound to the step
                # alone, the same step of another canary or rollout attempt (probe p13); without the attempt, the
                # same pause of a retried attempt (probe p18 F5: `started_at` was optional over HTTP).
                raise InvalidRequest('approve needs {"step": N, "canary": RELEASE, "started_at": T}: the pause step '
                                     'approved, the canary release it holds and the rollout attempt, as the route '
                                     'shows them (its `step`, `canary.release` and `started_at`); an approval ends '
                                     'that pause only (`resume` ends whichever holds the rollout)')
            if action != "approve" and body.step is not None:
                raise InvalidRequest(f'"step" binds an approval to its pause: {action} takes none ("canary" and '
                                     '"started_at" name the rollout it acts on)')
        except REFUSED as exc:
            return refusal(exc, action)
        except UNDECODABLE as exc:  # a string that is not UTF-8 too (was a 500)
            return error_response(400, f"invalid request: {undecodable(exc)}", "invalid_request_error")
        try:
            require_served(self.rollouts, deployment)
            route = await self.rollouts.operate(deployment, action, request[self.key].label,
                                                weight=body.weight or 0.0, why=body.reason, step=body.step or 0,
                                                canary=body.canary, started_at=body.started_at)
            await record_action(self.rollouts.ctx.bus, request[self.key], action, route, None)
        except REFUSED as exc:
            return refusal(exc, action)
        return web.Response(body=_encoder.encode(shown(route)), content_type="application/json")
