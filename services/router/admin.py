"""Admin HTTP API: read a deployment's route, start a canary, abort or promote it by hand."""

from __future__ import annotations

import msgspec
from aiohttp import web

from lockgate.contracts.names import check_name
from lockgate.errors import InvalidName, Retryable
from lockgate.services.router.domain import InvalidRollout, Route, decode_canary
from lockgate.services.router.rollouts import Rollouts
from lockgate.services.router.wire import error_response

_encoder = msgspec.json.Encoder()
PREFIX = "/lockgate/v1/deployments"


def _json(route: Route | list[Route], status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(route), status=status, content_type="application/json")


class Admin:
    """Handlers for `/lockgate/v1/deployments/...`."""

    def __init__(self, rollouts: Rollouts) -> None:
        self.rollouts = rollouts

    def add_routes(self, app: web.Application) -> None:
        """Register the admin endpoints."""
        app.router.add_get(PREFIX, self.list)
        app.router.add_get(PREFIX + "/{deployment}", self.get)
        app.router.add_put(PREFIX + "/{deployment}", self.put)
        app.router.add_post(PREFIX + "/{deployment}/abort", self.abort)
        app.router.add_post(PREFIX + "/{deployment}/promote", self.promote)

    async def list(self, request: web.Request) -> web.Response:
        """Every configured deployment's route."""
        return _json(sorted(self.rollouts.routes.values(), key=lambda r: r.deployment))

    async def get(self, request: web.Request) -> web.Response:
        """One deployment's current route (the default route if never configured)."""
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
        except InvalidName as exc:
            return error_response(400, exc.message, "invalid_request_error")
        return _json(self.rollouts.route(deployment))

    async def put(self, request: web.Request) -> web.Response:
        """Start a canary: {stable_release, canary_release, *_upstream?, canary_model?, initial_weight?}."""
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
            req = decode_canary(await request.read())
            route = await self.rollouts.start_canary(deployment, req)
        except (InvalidName, InvalidRollout) as exc:
            return error_response(400, exc.message, "invalid_request_error")
        except Retryable as exc:
            return error_response(503, f"canary applied but not yet persisted: {exc.message}", "unavailable")
        return _json(route)

    async def abort(self, request: web.Request) -> web.Response:
        """Send the canary's traffic back to stable now."""
        return await self._manual(request, "abort")

    async def promote(self, request: web.Request) -> web.Response:
        """Make the canary stable now."""
        return await self._manual(request, "promote")

    async def _manual(self, request: web.Request, action: str) -> web.Response:
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
        except InvalidName as exc:
            return error_response(400, exc.message, "invalid_request_error")
        try:
            route = await self.rollouts.manual(deployment, action)
        except InvalidRollout as exc:
            return error_response(409, exc.message, "conflict")
        except Retryable as exc:
            return error_response(503, f"{action} applied but not yet persisted: {exc.message}", "unavailable")
        return _json(route)
