"""Admin HTTP API: read a deployment's route, start a canary, abort or promote it by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from aiohttp import web

from lockgate.contracts.names import check_name
from lockgate.errors import InvalidName, Retryable
from lockgate.identity import verify_override
from lockgate.server.apikeys import (
    ROUTE_CHANGERS,
    ApiKey,
    AuthError,
    Forbidden,
    KeyStore,
    bearer,
    require_role,
    while_allowed,
)
from lockgate.server.body import read_body
from lockgate.services.router.actions import (
    PREFIX,
    REFUSED,
    Actions,
    DeploymentNotFound,
    refusal,
    require_served,
    served,
)
from lockgate.services.router.audit import record_action
from lockgate.services.router.domain import (
    BreakGlass,
    Override,
    ReleaseNotInScope,
    Route,
    decode_canary,
    decode_manual,
    default_route,
    shown,
)
from lockgate.services.router.patch import CONTENT_TYPES
from lockgate.services.router.patch import decode as decode_patch
from lockgate.services.router.rollouts import Rollouts
from lockgate.services.router.shadowstats import ShadowSummary
from lockgate.services.router.wire import error_response
from lockgate.signing import TRUST_CHECK_S

_encoder = msgspec.json.Encoder()
KEY = web.RequestKey("lockgate.key", ApiKey)  # the authenticated caller of an admin request
_PATHS = (f"GET {PREFIX}, GET|PUT|PATCH {PREFIX}/{{deployment}}, GET .../{{deployment}}/watch|shadow, POST "
          ".../{deployment}/pause|resume|approve|set-weight|abort|promote|retry|undo and DELETE "
          ".../{deployment}/break-glass")


def _json(route: Route | list[Route], status: int = 200, rollouts: Rollouts | None = None) -> web.Response:
    routes = route if isinstance(route, list) else [route]
    shows = [_marked(shown(r), rollouts, r) if rollouts is not None else shown(r) for r in routes]
    body = shows if isinstance(route, list) else shows[0]
    return web.Response(body=_encoder.encode(body), status=status, content_type="application/json")


def _marked(body: dict[str, Any], rollouts: Rollouts, route: Route) -> dict[str, Any]:
    """`body` (a route as shown) with `unreadable` when the deployment's route record in KV is unreadable: why, and
    the revision shown instead (its last readable one, `Rollouts.recover`; 0: none, the default route shown), so
    that a reader is not told it serves what it shows (the proxy refuses it until a route is written)."""
    why = rollouts.unreadable.get(route.deployment)
    if why is not None and rollouts.route(route.deployment) is route:
        body["unreadable"] = {"why": why, "last_readable_revision": rollouts.restorable(route.deployment)}
    return body


def not_routed(request: web.Request, allowed: set[str], serves: str) -> web.Response:
    """The JSON error (the shape of every other answer, not aiohttp's plain text) for a path nothing serves (404,
    saying what `serves`), or a method its path does not take (405 with `Allow`)."""
    if allowed:
        methods = sorted(allowed)
        return error_response(405, f"{request.method} {request.path} is not supported: use {' or '.join(methods)}",
                              "invalid_request_error", headers={"Allow": ", ".join(methods)})
    return error_response(404, f"Invalid URL ({request.method} {request.path}): {serves}", "invalid_request_error",
                          code="unknown_url")


@web.middleware
async def _unrouted(request: web.Request, handler: Any) -> web.StreamResponse:
    """An admin path or method no route takes: `not_routed`, before any key is asked for (nothing is read)."""
    exc = request.match_info.http_exception
    if exc is None:
        return await handler(request)
    allowed = exc.allowed_methods if isinstance(exc, web.HTTPMethodNotAllowed) else set()
    return not_routed(request, set(allowed), f"the admin API serves {_PATHS}")


async def unrouted(request: web.Request) -> web.Response:
    """The router's last route (outside `/v1/`, whose own catch-all answers in OpenAI's words, and the admin API):
    `not_routed`, with the methods the path's own routes take, if any, for a 405."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    return not_routed(request, allowed, f"the router serves the OpenAI API under /v1/, the admin API under {PREFIX} "
                                        "and GET /healthz and /metrics")


@web.middleware
async def _finish_when_client_leaves(request: web.Request, handler: Any) -> web.StreamResponse:
    """The server cancels a handler whose client left (handler_cancellation, for the proxy's upstream
    calls); an admin call runs to its end anyway, so a change is never left half made."""
    return await asyncio.shield(handler(request))


def _require_scope(key: ApiKey, deployment: str | None) -> None:
    """Forbidden (403 `deployment_not_in_scope`) if `deployment` is not in the key's scope: another team's, on a
    router several share, not to be read or changed with this key."""
    if deployment is not None and not key.may_use(deployment):
        raise Forbidden(f"{key.label} may only use {key.scope}, not deployment {deployment!r}")


def reads_router_wide(key: ApiKey, keys: Iterable[ApiKey]) -> bool:
    """Whether `key`'s scope covers every tenant and deployment the router serves, so that it may read what counts
    all their requests together (`/metrics`): an admin key's (every tenant's, no deployment scope), or a key scoped to
    no deployment on a router whose every key, revoked ones too, is of its tenant (its counters run since the process
    started, so a revoked key's requests are in them)."""
    return not key.deployments and (key.tenants is None or all(k.tenant == key.tenant for k in keys))


def require_router_wide(key: ApiKey, keys: Iterable[ApiKey]) -> None:
    """Forbidden unless `key` reads router-wide (`reads_router_wide`)."""
    if reads_router_wide(key, keys):
        return
    # Never names the other tenants: which tenants have keys is not this key's to learn either.
    why = f"is scoped to {key.scope}" if key.deployments else \
        f"is of tenant {key.tenant!r} and the router serves other tenants' keys too"
    raise Forbidden(f"{key.label} may not read the router's metrics: they count the requests of every tenant and "
                    f"deployment, and this key {why}; read them with an admin key (or, on a router whose keys are all of "
                    "one tenant, with a key of it scoped to no deployment)")


class Admin:
    """Handlers for `/lockgate/v1/deployments/...`."""

    def __init__(self, rollouts: Rollouts, keys: KeyStore) -> None:
        self.rollouts = rollouts
        self.keys = keys

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every admin call needs a key: reads a viewer role or above, changes operator or admin."""
        try:
            key = self._caller(request)
        except AuthError as exc:
            return error_response(401, exc.message, "invalid_request_error", code="invalid_api_key")
        except Forbidden as exc:
            return error_response(403, exc.message, "permission_denied", code="insufficient_role")
        deployment = request.match_info.get("deployment")
        try:
            _require_scope(key, deployment)
        except Forbidden as exc:
            return error_response(403, exc.message, "permission_denied", code="deployment_not_in_scope")
        if deployment is not None and request.method not in ("GET", "HEAD"):
            try:
                await self.rollouts.check_tenant(deployment, key.tenants)
            except ReleaseNotInScope:
                # Another tenant's deployment in the key's scope (an unscoped key): its releases are not this
                # tenant's to roll out, pause, abort or promote, and a change of it is answered as a read of it is
                # (`_shown`): as of a deployment never configured, so that the refusal does not tell that it exists
                # (before: 403 naming it, against 404 for a name nobody configured).
                return refusal(DeploymentNotFound(deployment), request.method)
            except Retryable as exc:
                return error_response(503, exc.message, "unavailable")
        request[KEY] = key
        try:
            return await handler(request)
        except DeploymentNotFound as exc:  # a read of a deployment nothing serves, or another tenant's (`_shown`)
            return refusal(exc, request.method)
        except Retryable as exc:  # a release's binding `_shown` needed could not be read
            return error_response(503, exc.message, "unavailable")

    def _caller(self, request: web.Request) -> ApiKey:
        """The live key `request` presents, of a role that may make it: AuthError (401) or Forbidden (403)."""
        key = self.keys.authenticate(bearer(request.headers.get("Authorization")))
        if request.method in ("GET", "HEAD"):
            require_role(key, "viewer", "approver", "operator", "admin")
        else:
            require_role(key, *ROUTE_CHANGERS)
        return key

    def app(self) -> web.Application:
        """The admin API, mounted at PREFIX as a sub-application: its middlewares (authentication, and
        finishing a call whose client left) run for admin calls only, never on the data plane's path."""
        app = web.Application(middlewares=[_finish_when_client_leaves, _unrouted, self.middleware])
        app.router.add_get("", self.list)
        app.router.add_get("/{deployment}", self.get)
        app.router.add_get("/{deployment}/shadow", self.shadow)
        app.router.add_put("/{deployment}", self.put)
        app.router.add_patch("/{deployment}", self.patch)
        app.router.add_get("/{deployment}/watch", self.watch)
        app.router.add_post("/{deployment}/retry", self.retry)
        app.router.add_post("/{deployment}/abort", self.abort)
        app.router.add_post("/{deployment}/promote", self.promote)
        app.router.add_post("/{deployment}/undo", self.undo)
        app.router.add_delete("/{deployment}/break-glass", self.clear_override)
        Actions(self.rollouts, KEY).add_routes(app)  # pause, resume, set-weight
        return app

    async def _readable(self, key: ApiKey, route: Route) -> bool:
        """Whether `key` may read `route`: a deployment something serves (actions.served), serving its own
        tenant's releases or none yet (an admin key reads every route). Another tenant's route tells its release
        names, decision ids and the gate's and drift's reasons, so to such a key it is as if never configured
        (BusUnavailable if a binding cannot be read). One whose route record is unreadable is read as its last
        readable revision (`Rollouts.recover`); with none readable, by an admin key only, as it is changed."""
        if route.deployment in self.rollouts.unreadable and route.deployment not in self.rollouts.routes:
            return key.tenants is None
        return served(self.rollouts, route.deployment) and await self.rollouts.serves_tenant(route, key.tenants)

    def _never_configured(self, deployment: str) -> Route:
        """What is read of a deployment nobody rolled out to (or one a key may not read, told alike): under
        passthrough, the default route that serves it; else nothing serves it, DeploymentNotFound (before, the
        default route was shown, phase idle, for a name the proxy answers 404 `model_not_found`)."""
        if self.rollouts.ctx.settings.passthrough:
            return default_route(deployment)
        raise DeploymentNotFound(deployment)

    async def _shown(self, key: ApiKey, route: Route) -> Route:
        """`route` as `key` reads it: itself, or, when not readable (`_readable`), as a deployment never configured
        (`_never_configured`), so that the answer does not even tell that another tenant's deployment exists."""
        return route if await self._readable(key, route) else self._never_configured(route.deployment)

    async def list(self, request: web.Request) -> web.Response:
        """Every configured deployment's route the key may read (of its scope and tenant)."""
        key: ApiKey = request[KEY]
        for deployment in list(self.rollouts.unreadable):
            if key.may_use(deployment):
                await self.rollouts.recover(deployment)  # a replica restarted since holds no route for it
        names = {*self.rollouts.routes, *self.rollouts.unreadable}
        routes = [self.rollouts.route(d) for d in names if key.may_use(d)]
        return _json(sorted([r for r in routes if await self._readable(key, r)], key=lambda r: r.deployment),
                     rollouts=self.rollouts)

    async def get(self, request: web.Request) -> web.Response:
        """One deployment's current route; 404 `deployment_not_found` if nothing serves it or it is not the key's to
        read (`_shown`)."""
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
        except InvalidName as exc:
            return error_response(400, exc.message, "invalid_request_error")
        await self.rollouts.recover(deployment)
        return _json(await self._shown(request[KEY], self.rollouts.route(deployment)), rollouts=self.rollouts)

    async def shadow(self, request: web.Request) -> web.Response:
        """How the rollout's shadow answers compare with the served ones (this replica's mirror counts)."""
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
        except InvalidName as exc:
            return error_response(400, exc.message, "invalid_request_error")
        readable = await self._readable(request[KEY], self.rollouts.route(deployment))
        if not readable:
            self._never_configured(deployment)  # 404, as `get` answers it
        # Another tenant's under passthrough: the summary of a deployment that never shadowed anything (candidate,
        # answers, costs untold).
        summary = self.rollouts.shadow_summary(deployment) if readable else ShadowSummary(deployment=deployment)
        return web.Response(body=_encoder.encode(summary), content_type="application/json")

    async def put(self, request: web.Request) -> web.Response:
        """Start a canary: {stable_release, canary_release, initial_weight?, strategy?, break_glass?}; or give a
        deployment with no stable release its first one: {stable_release} alone."""
        action = "canary"
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
            req = decode_canary(await read_body(request))
            if req.first:
                action, override = "first-release", None
                route = await self.rollouts.first_release(deployment, req.stable_release, actor=request[KEY].label,
                                                          tenant=request[KEY].tenants)
            else:
                override = self._override(request, deployment, req.break_glass, req.canary_release, "canary")
                route = await self.rollouts.start_canary(deployment, req, override, actor=request[KEY].label,
                                                         tenant=request[KEY].tenants)
            await record_action(self.rollouts.ctx.bus, request[KEY], action, route, override)
        except REFUSED as exc:
            return refusal(exc, action, invalid=400)  # a PUT's release or spec is the request's own fault
        return _json(route)

    async def patch(self, request: web.Request) -> web.Response:
        """Change only what a JSON merge patch (RFC 7396) names: weight, canary_release, strategy fields; the
        rollout keeps its phase, step and analysis (PUT is the full replace that starts a new one)."""
        ctype = request.headers.get("Content-Type", "application/merge-patch+json").split(";")[0].strip()
        if ctype not in CONTENT_TYPES:
            return error_response(415, f"a PATCH body is {CONTENT_TYPES[0]} (got {ctype})", "invalid_request_error")
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
            body = decode_patch(await read_body(request))
            require_served(self.rollouts, deployment)
            route = await self.rollouts.patch(deployment, body, actor=request[KEY].label, tenant=request[KEY].tenants)
            await record_action(self.rollouts.ctx.bus, request[KEY], "patch", route, None)
        except REFUSED as exc:
            return refusal(exc, "patch")
        return _json(route)

    async def watch(self, request: web.Request) -> web.StreamResponse:
        """The deployment's route as JSON lines: now, then after every change (this replica's or another's,
        analysis looks included), until the client goes away or its key may no longer read it (revoked, rescoped
        away: `while_allowed`). Woken by changes, never polled."""
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
        except InvalidName as exc:
            return error_response(400, exc.message, "invalid_request_error")
        key: ApiKey = request[KEY]
        # Nothing served, or not the key's: a 404 (a binding unreadable: a 503), never a stream of an invented route.
        await self.rollouts.recover(deployment)
        await self._shown(key, self.rollouts.route(deployment))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        last: Route | None = None
        # The key asked again before each line and every second (`while_allowed`): one revoked, or rescoped away
        # from the deployment, ends the watch as its next call is refused, and is sent nothing that came after.
        changes = while_allowed(self.rollouts.changes(deployment),
                                lambda: _require_scope(self._caller(request), deployment), every_s=TRUST_CHECK_S)
        try:
            async for route in changes:
                if route is None:
                    await resp.write(b"\n")  # keepalive: a client that went away ends the watch here
                    continue
                # Read as `get` reads it at every change: a deployment serving none may get another tenant's
                # first release while watched, or its route be deleted; then the watch ends (watched again: a 404).
                try:
                    view = await self._shown(key, route)
                except DeploymentNotFound:
                    return resp
                if view != last:
                    await resp.write(_encoder.encode(_marked(shown(view), self.rollouts, view)) + b"\n")
                    last = view
        except (AuthError, Forbidden):
            # Closed, without a last line: every line of a watch is a route (a client reads each as one). A watch
            # opened again is answered 401 or 403, saying why.
            return resp
        except (ConnectionResetError, ConnectionError, Retryable):
            return resp  # a binding unreadable mid-watch ends it (the client watches again), never shows the route
        finally:
            await changes.aclose()
        return resp

    async def retry(self, request: web.Request) -> web.Response:
        """Restart an aborted rollout from step 0 with the same spec and canary release."""
        return await self._manual(request, "retry")

    async def abort(self, request: web.Request) -> web.Response:
        """Send the canary's traffic back to stable now."""
        return await self._manual(request, "abort")

    async def promote(self, request: web.Request) -> web.Response:
        """Make the canary stable now."""
        return await self._manual(request, "promote")

    async def undo(self, request: web.Request) -> web.Response:
        """Put the previous release back (a blue-green one only within its scale-down window)."""
        return await self._manual(request, "undo")

    async def clear_override(self, request: web.Request) -> web.Response:
        """End a break-glass override (admin): a canary no decision allows goes back to 0%."""
        return await self._manual(request, "clear-override")

    async def _manual(self, request: web.Request, action: str) -> web.Response:
        try:
            deployment = check_name(request.match_info["deployment"], "deployment")
        except InvalidName as exc:
            return error_response(400, exc.message, "invalid_request_error")
        try:
            body = decode_manual(await read_body(request))
            require_served(self.rollouts, deployment)
            override = None
            if action == "promote":
                canary = self.rollouts.route(deployment).canary
                override = self._override(request, deployment, body.break_glass, canary.release if canary else "",
                                          "promote")
            elif action == "clear-override":
                require_role(request[KEY], "admin")
            route = await self.rollouts.manual(deployment, action, override, actor=request[KEY].label,
                                               to=body.to or "" if action == "undo" else "", canary=body.canary,
                                               started_at=body.started_at)
            await record_action(self.rollouts.ctx.bus, request[KEY], action, route, override)
        except REFUSED as exc:
            return refusal(exc, action)
        return _json(route)

    def _override(self, request: web.Request, deployment: str, glass: BreakGlass | None, release: str,
                  action: str) -> Override | None:
        """The break-glass override a request asks for: an admin API key (Forbidden otherwise) sending a
        statement signed by an admin person for exactly this deployment, release and action, recently
        (IdentityRefused otherwise)."""
        if glass is None:
            return None
        key: ApiKey = request[KEY]
        require_role(key, "admin")
        person = verify_override(self.rollouts.ctx.settings, deployment=deployment, release=release, action=action,
                                 reason=glass.reason, at=glass.at, key_id=glass.key_id, signature=glass.signature,
                                 now=time.time(), weight=glass.weight)
        return Override(release=release, action=action, actor=person, reason=glass.reason, at=glass.at,
                        key_id=glass.key_id, signature=glass.signature, api_key=key.label,
                        weight=100.0 if glass.weight is None else glass.weight)
