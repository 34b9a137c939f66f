"""Admin API for operator rollout actions: pause, resume (approve), set-weight (behind the admin middleware)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
from aiohttp import web

from lockgate.contracts.names import check_name
from lockgate.errors import InvalidName, Retryable
from lockgate.server.apikeys import ApiKey
from lockgate.services.router.audit import record_action
from lockgate.services.router.domain import InvalidRollout, NotAdmitted
from lockgate.services.router.rollouts import Rollouts
from lockgate.services.router.wire import error_response

_encoder = msgspec.json.Encoder()


class ActionRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of `POST .../{deployment}/pause|resume|set-weight` (empty for pause and resume)."""

    weight: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None  # percent, set-weight only
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


_decoder = msgspec.json.Decoder(ActionRequest)


class Actions:
    """`pause`, `resume` and `set-weight`; each records the caller's key identity as the actor, and is
    appended to the audit log."""

    def __init__(self, rollouts: Rollouts, key: web.RequestKey[ApiKey]) -> None:
        self.rollouts = rollouts
        self.key = key

    def add_routes(self, app: web.Application, prefix: str) -> None:
        """Register the action endpoints under the admin prefix."""
        for action in ("pause", "resume", "approve", "set-weight"):
            app.router.add_post(f"{prefix}/{{deployment}}/{action}", self._handler(action))

    def _handler(self, action: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return await self._act(request, action)

        return handle

    async def _act(self, request: web.Request, action: str) -> web.Response:
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
            raw = await request.read()
            body = _decoder.decode(raw) if raw.strip() else ActionRequest()
            if action == "set-weight" and body.weight is None:
                raise InvalidRollout('set-weight needs {"weight": PERCENT}')
        except (InvalidName, InvalidRollout) as exc:
            return error_response(400, exc.message, "invalid_request_error")
        except msgspec.DecodeError as exc:
            return error_response(400, f"invalid request: {exc}", "invalid_request_error")
        try:
            # `approve` is `resume` by another name: it ends a pause step that waits for approval.
            route = await self.rollouts.operate(deployment, "resume" if action == "approve" else action,
                                                request[self.key].label,
                                                weight=body.weight or 0.0, why=body.reason)
            await record_action(self.rollouts.ctx.bus, request[self.key], action, route, None)
        except NotAdmitted as exc:
            return error_response(409, exc.message, "conflict", code="not_admitted")
        except InvalidRollout as exc:
            return error_response(409, exc.message, "conflict")
        except Retryable as exc:
            return error_response(503, f"{action} applied but not yet persisted: {exc.message}", "unavailable")
        return web.Response(body=_encoder.encode(route), content_type="application/json")
