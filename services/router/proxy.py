"""The OpenAI surface of the gateway: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/responses`, `GET /v1/models` and `/v1/models/{model}` (any other /v1 path or method: OpenAI's error shape,
`unknown`). Every POST takes one path (`forward`): pick the deployment by
model name, the variant by route, proxy to its upstream through the endpoint's provider, record one event.
Each operation only brings its codec (wire.Operation); each provider its translation (providers/).

Hot path: no logging, no blocking calls, the request body is forwarded as received unless
the model must be overridden or stream usage requested; events go to the batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from opentelemetry.trace import INVALID_SPAN, Status, StatusCode
from yarl import URL

from lockgate import metrics, telemetry
from lockgate.codec import UNDECODABLE, undecodable
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.contracts.inference import (
    ATTEMPT,
    CLIENT_DISCONNECTED,
    KEPT_WAITING,
    REQUEST_DIGEST,
    ROUTED_BY,
    STICKY,
    SUPERSEDED,
    UPSTREAM_UNANSWERED,
)
from lockgate.contracts.names import NAME_RULE, is_name
from lockgate.errors import UnreadableBody
from lockgate.llmwire import ApiRequest, OutputLimits
from lockgate.modelnames import same_model
from lockgate.outbox import Outbox
from lockgate.pricebook import PriceBookError, load_price_book, priced_model
from lockgate.server.apikeys import ApiKey, AuthError, Forbidden, KeyStore, bearer
from lockgate.server.body import closing, read_body
from lockgate.services.router import domain
from lockgate.services.router.admission import OPEN_ADMISSION, Admission, Call
from lockgate.services.router.budgets import most_output, named_containers, named_state, referenced_items
from lockgate.services.router.cache import MAX_KEYED_BYTES
from lockgate.services.router.endpoints import Endpoint, Endpoints, UnknownEndpoint
from lockgate.services.router.fit import Tally, encode_served
from lockgate.services.router.h1 import BrokenReply, H1Pool
from lockgate.services.router.owners import UNAVAILABLE, Claims, Owners, Withheld, too_many
from lockgate.services.router.providers import Unsupported, UpstreamStreamError, provider
from lockgate.services.router.rollouts import Rollouts
from lockgate.services.router.shadow import Shadow
from lockgate.services.router.upstream import (
    Cover,
    Failed,
    Hop,
    Lane,
    Reply,
    Underway,
    Upstream,
    UpstreamUnavailable,
    chain,
    forward_headers,
    scrub,
    shapes_answer,
)
from lockgate.services.router.wire import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    LIMIT_FIELDS,
    OPERATOR_FIELDS,
    OTHER_MODEL,
    OUTPUT_MESSAGES,
    RESPONSES,
    SERVICE_TIER,
    TRUNCATED,
    USAGE_WARNING,
    Choices,
    ErrorAnswer,
    Operation,
    chat_digest,
    error_response,
    interrupted_event,
    is_openai_error,
    openai_error,
    own_answer,
    patch_body,
    stream_error,
)
from lockgate.subjects import token
from lockgate.textbound import TEXT_BYTES

# The router reads every body it forwards (usage, finish reason), and auto_decompress is off so
# bytes pass through untouched: ask upstreams for identity encoding, never what the client accepts.
_UP_BASE = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
_api_request = msgspec.json.Decoder(ApiRequest)
_output_limits = msgspec.json.Decoder(OutputLimits)
# Why a named state's value is refused when it is no id, by its field.
_NO_ID = {"previous_response_id": "'previous_response_id' must be an id (a string)",
          "conversation": "'conversation' must be an id (a string, or an object with a string id)",
          "input": "an item_reference in 'input' must name its item by its id (a non-empty string)",
          "tools": "a code interpreter tool's 'container' must be a container's id (a non-empty string) or an object"}
_good_names: set[str] = set()  # names already checked (the same few deployments on every request)
log = logging.getLogger(__name__)
_model_list = msgspec.json.Decoder(dict[str, Any])
# The methods of the gateway's own paths, for the 405 of another method (server.py routes them).
_METHODS = {"/v1/chat/completions": ("POST",), "/v1/completions": ("POST",), "/v1/embeddings": ("POST",),
            "/v1/responses": ("POST",), "/v1/models": ("GET",)}


class _ClientGone(Exception):
    """The client closed its connection while the answer was being streamed to it."""


class Proxy:
    """The OpenAI-compatible gateway handler."""

    def __init__(self, settings: Settings, rollouts: Rollouts, batcher: Outbox, spans: telemetry.ServerSpans,
                 keys: KeyStore, endpoints: Endpoints) -> None:
        self.settings = settings
        self.keys = keys
        self.endpoints = endpoints
        self.rollouts = rollouts
        self.batcher = batcher
        self.spans = spans
        # Its session is opened by the router's start; its pool's slots are per endpoint and tenant (h1.Slots).
        self.upstream = Upstream(pool=H1Pool(settings.router_endpoint_slots, share=settings.router_tenant_slot_share))
        self.admission: Admission = OPEN_ADMISSION  # budgets, rate limits, cache: set by the service
        self.owners = Owners(settings, None)  # which tenant owns each Responses state: set by the service
        self.shadow = Shadow(rollouts, endpoints, batcher, lambda: self.upstream.session,
                             admission=lambda: self.admission)
        # The price book the ledger prices events by (settings.price_book), for what an answer of another model is
        # priced as (_answered_by); an unreadable one is the cost accountant's to report.
        try:
            self.prices = load_price_book(settings.price_book).models
        except PriceBookError:
            self.prices = {}
        self._other_models: set[tuple[str, str]] = set()  # (deployment, model) answers already logged

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`."""
        return await self.forward(request, CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/completions` (legacy text completions)."""
        return await self.forward(request, COMPLETIONS)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/embeddings`."""
        return await self.forward(request, EMBEDDINGS)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/responses` (streamed as Responses API events when asked)."""
        return await self.forward(request, RESPONSES)

    def deployment_of(self, headers: Any, model: str, tenant: str | None) -> str:
        """Which deployment serves a request of a key of `tenant` (`ApiKey.tenants`): the `x-lockgate-deployment`
        header, else the endpoints file's `models:` entry for the model, else a configured deployment of the
        tenant's releases named like the model, else the router's default deployment (settings.deployment)."""
        explicit = headers.get("x-lockgate-deployment")
        if explicit:
            return explicit
        # Another tenant's deployment, named or mapped to (the `models:` map is the router's, every tenant's), is a
        # name nobody configured (route_of): the default deployment, as for any such model, so the answer (404,
        # 403 out of scope or passthrough) does not tell that it exists. One whose route is unreadable is still
        # that deployment (refused as such), never the default one.
        mapped = self.endpoints.models.get(model)
        if mapped and not self._foreign(mapped, tenant):
            return mapped
        route = self.rollouts.routes.get(model)
        known = (route is not None and domain.serves_tenant(route, tenant)) or model in self.rollouts.unreadable
        return model if known else self.settings.deployment

    def _foreign(self, deployment: str, tenant: str | None) -> bool:
        """Whether `deployment` serves another tenant's releases than a key of `tenant`'s."""
        route = self.rollouts.routes.get(deployment)
        return route is not None and not domain.serves_tenant(route, tenant)

    def route_of(self, deployment: str, tenant: str | None) -> domain.Route | None:
        """The route that serves a deployment to a key of `tenant` (`ApiKey.tenants`): its governed one (a release
        was rolled out; stable only while this replica is cut off from the bus), else the default route when
        passthrough is opted in to, else None (the request is refused). None too while its route in KV is
        unreadable (`_unreadable_route`): which release governs it is unknown, so neither its last route nor the
        ungoverned default serves it.

        Another tenant's deployment is served as one nobody rolled out (passthrough or 404, so its existence is
        not told): its releases, upstream credentials and budgets are not this key's to spend, and what a key
        sends there would be served evidence in that tenant's canary analysis, free to sink or pass it (the
        admin API reads and changes such a deployment the same way, admin.py). Under passthrough its answer is
        recorded as one for a name nobody configured is: under the name asked, the caller's tenant (`_record`,
        from the key) and no release. So it is the caller's own: the rollouts' evidence (`rollouts._evidence_of`)
        and the evaluator's plan and judge (online_handler.Plans) are of the deployment's own tenant, and keep
        to it (probe p25 F2: counted as that deployment's, such answers aborted its good canary)."""
        if deployment in self.rollouts.unreadable:
            return None
        route = self.rollouts.routes.get(deployment)
        if route is not None and not domain.serves_tenant(route, tenant):
            # Not rollouts.route(deployment): that is the governed route, the other tenant's releases.
            return domain.default_route(deployment) if self.settings.passthrough else None
        if route is not None and route.stable.release:
            # Cut off from the bus, this replica would not hear a BLOCK of the canary: stable only.
            return domain.stable_only(route) if self.rollouts.cut_off else route
        return self.rollouts.route(deployment) if self.settings.passthrough else None

    def _ungoverned(self, headers: Any, deployment: str, model: str) -> web.Response:
        """OpenAI's answer for a model that does not exist, saying why and what to do: without the opt-in, a
        deployment no release was rolled out to is not served (no API key reaches an upstream ungoverned)."""
        param: str | None = "model"
        if headers.get("x-lockgate-deployment"):
            what, param = f"Deployment {deployment!r} (x-lockgate-deployment) has no rolled-out release", None
        elif self.endpoints.models.get(model) == deployment:
            what = (f"The model {model!r} maps to deployment {deployment!r} (the endpoints file's models:), which "
                    "has no rolled-out release")
        else:
            what = (f"The model {model!r} does not exist here: no deployment is named like it or mapped to it (the "
                    f"endpoints file's models:), and the default deployment {deployment!r} has no rolled-out release")
        return error_response(404, f"{what}. The router serves governed releases only: roll out a release for "
                                   f"{deployment!r} once the gate allows one (lockgate rollout start {deployment} --stable "
                                   f"RELEASE), send a model that has "
                                   "one (GET /v1/models lists them), or have the operator opt in to ungoverned "
                                   "passthrough (LOCKGATE_PASSTHROUGH=true)",
                              "invalid_request_error", code="model_not_found", param=param)

    def _unreadable_route(self, deployment: str) -> web.Response:
        """503 for a deployment whose route record cannot be read, saying how an operator writes it again."""
        why = self.rollouts.unreadable.get(deployment, "")
        bucket = self.rollouts.ctx.bus.subjects.kv_routes
        return error_response(503, f"Deployment {deployment!r} is not served: its route record (KV {bucket}, key "
                                   f"{token(deployment)}) is unreadable ({why}), so which release serves it is "
                                   f"unknown. `lockgate rollout get {deployment}` names the stable of its last "
                                   f"readable revision, and `lockgate rollout start {deployment} --stable THAT_RELEASE` "
                                   "restores it (with none readable, an admin key gives it a first release)",
                              "service_unavailable", code="route_unreadable")

    def _cut_off(self, deployment: str) -> web.Response:
        """503 for a governed deployment while this replica, cut off from the bus, refuses (Rollouts.refusing)."""
        bound = self.settings.router_cut_off_s + self.settings.router_cut_off_refuse_s
        return error_response(503, f"Deployment {deployment!r} is not served by this router replica: it has been cut "
                                   f"off from lockgate's bus for more than {bound:g} s, so it cannot tell whether the "
                                   "gate still allows the release it serves (router_cut_off_refuse_s). Retry: another "
                                   "replica serves it, and this one does once it is back on the bus",
                              "service_unavailable", code="cut_off_from_bus")

    def _out_of_scope(self, headers: Any, key: ApiKey, deployment: str, model: str) -> web.Response:
        """OpenAI's answer for a model the key's project may not use (403 `model_not_found`): the deployment the
        request picked, how, and the key's scope, by its label (never the key)."""
        param: str | None = "model"
        if headers.get("x-lockgate-deployment"):
            what, param = f"Deployment {deployment!r} (x-lockgate-deployment)", None
        elif self.endpoints.models.get(model) == deployment:
            what = f"The model {model!r} maps to deployment {deployment!r} (the endpoints file's models:), which"
        elif model == deployment:
            what = f"The model {model!r} names deployment {deployment!r}, which"
        else:
            what = (f"The model {model!r} is no deployment's name nor mapped to one, so it goes to the default "
                    f"deployment {deployment!r}, which")
        return error_response(403, f"{what} is outside the scope of API key {key.label}: it may use "
                                   f"{key.scope}. Send a model of those (GET /v1/models lists them), or ask an "
                                   f"operator to widen the key's scope (lockgate keys scope {key.id})",
                              "invalid_request_error", code="model_not_found", param=param)

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: the model names the calling key can send, within its deployment scope: every
        name with a governed deployment behind it (the `models:` map and deployments named like a model);
        with passthrough opted in, also the `models:` names of unconfigured deployments and, when the default
        deployment passes the client's model through to an OpenAI-compatible endpoint, whatever that
        endpoint lists."""
        try:
            key = self.keys.authenticate(bearer(request.headers.get("Authorization")))
        except AuthError as exc:
            return error_response(401, exc.message, "invalid_request_error", code="invalid_api_key")
        return own_answer({"object": "list", "data": await self._listed(key)})

    async def model(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{model}` (the SDK's `models.retrieve`): the model as `GET /v1/models` lists it for
        the calling key, else OpenAI's 404 `model_not_found` (a name outside the key's scope is not found)."""
        try:
            key = self.keys.authenticate(bearer(request.headers.get("Authorization")))
        except AuthError as exc:
            return error_response(401, exc.message, "invalid_request_error", code="invalid_api_key")
        name = request.match_info["model"]
        found = next((m for m in await self._listed(key) if m.get("id") == name), None)
        if found is None:
            return error_response(404, f"The model {name!r} does not exist here or is not one API key {key.label} "
                                       "may use (GET /v1/models lists those it may)", "invalid_request_error",
                                  code="model_not_found", param="model")
        return own_answer(found)

    async def unknown(self, request: web.Request) -> web.Response:
        """Any other `/v1/` path or method, answered in OpenAI's error shape as OpenAI answers it (the SDK raises
        NotFoundError or an APIStatusError) rather than aiohttp's plain-text 404/405."""
        allowed = _METHODS.get(request.path.rstrip("/"))
        if allowed is not None and request.method not in allowed:
            return error_response(405, f"{request.method} {request.path} is not supported: use "
                                       f"{' or '.join(allowed)}", "invalid_request_error",
                                  headers={"Allow": ", ".join(allowed)})
        return error_response(404, f"Invalid URL ({request.method} {request.path}): the router serves POST "
                                   "/v1/chat/completions, /v1/completions, /v1/embeddings and /v1/responses, and GET "
                                   "/v1/models", "invalid_request_error", code="unknown_url")

    async def _listed(self, key: ApiKey) -> list[dict[str, Any]]:
        """The models `GET /v1/models` lists for a key."""
        owners = {m: d for m, d in self.endpoints.models.items()
                  if not self._foreign(d, key.tenants) and self.route_of(d, key.tenants) is not None}
        for name, route in self.rollouts.routes.items():
            if route.stable.model and name not in self.rollouts.unreadable and domain.serves_tenant(route, key.tenants):
                owners.setdefault(name, name)
        # A name is listed when the deployment it would reach (as `forward` picks it) is in the key's scope.
        def listable(model: str) -> bool:
            return key.may_use(self.deployment_of({}, model, key.tenants))

        data = [{"id": m, "object": "model", "created": 0, "owned_by": f"lockgate:{d}"} for m, d in owners.items()
                if listable(m)]
        default = self.route_of(self.settings.deployment, key.tenants) if key.may_use(self.settings.deployment) else None
        target = default.stable if default is not None else None
        endpoint = self.endpoints.by_id.get(target.endpoint) if target is not None else None
        if target is not None and not target.model and endpoint is not None and endpoint.provider == "openai":
            try:
                async with self._get(endpoint, "/models") as resp:
                    listed = _model_list.decode(await resp.read()).get("data") if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, *UNDECODABLE):
                listed = None  # the configured names still answer; the upstream's are a bonus
            data += [m for m in listed or () if isinstance(m, dict) and m.get("id") not in owners
                     and listable(str(m.get("id")))]
        return data

    async def forward(self, request: web.Request, op: Operation) -> web.StreamResponse:
        """Proxy one request of any operation to the stable or canary upstream of its deployment."""
        t0 = time.perf_counter()
        h = request.headers
        try:
            key = self.keys.authenticate_sender(bearer(h.get("Authorization")))
        except AuthError as exc:
            return error_response(401, exc.message, "invalid_request_error", code="invalid_api_key")
        except Forbidden as exc:  # a viewer's key (say) reading its dashboards spends no provider money
            return error_response(403, exc.message, "permission_denied", code="insufficient_role")
        if (bad := _undecodable_header(h)) is not None:
            return error_response(400, f"invalid {op.api} request: header {bad} is not UTF-8 text",
                                  "invalid_request_error")
        try:
            body = await read_body(request)
            req = _api_request.decode(body)
            # The stored state a Responses request names (a few byte scans when none): whose it is decides below.
            named = named_state(body) + referenced_items(body, req.input) if op is RESPONSES else ()
            # Its containers too (owners.py), though they bring no input for admission's reservation.
            owned = named + named_containers(req.tools) if op is RESPONSES else ()
        except UnreadableBody as exc:
            return closing(error_response(exc.http_status, f"invalid {op.api} request: {exc.message}",
                                          "invalid_request_error"))
        except UNDECODABLE as exc:
            return error_response(400, f"invalid {op.api} request: {undecodable(exc)}", "invalid_request_error",
                                  param=_param_of(exc))
        if (bad_state := next((field for field, state_id in owned if state_id is None), None)) is not None:
            # Checked as an id or refused: a value the router cannot read as one is never passed on unchecked.
            return error_response(400, f"invalid {op.api} request: {_NO_ID[bad_state]}", "invalid_request_error",
                                  param=bad_state)
        if (refused := too_many(op.api, owned)) is not None:
            return refused
        if req.stream and op.chunk is None:  # as OpenAI's embeddings API, which has no stream parameter
            return error_response(400, f"invalid {op.api} request: 'stream' is not a parameter of {op.api}; "
                                       "its answer comes whole", "invalid_request_error", param="stream")
        if (foreign := _foreign_limit(req, op)) is not None:
            if not op.max_fields:  # embeddings: before, accepted and ignored (with 4,096 output tokens reserved)
                return error_response(400, f"invalid {op.api} request: {foreign!r} is not a parameter of {op.api}, "
                                           "which generate no output (admission reserves their input alone); leave "
                                           "it out", "invalid_request_error", param=foreign)
            return error_response(400, f"invalid {op.api} request: {foreign!r} is not a parameter of {op.api}, whose "
                                       f"upstreams ignore it, so it would not bound the answer (nor what admission "
                                       f"reserves for it); set {' or '.join(repr(f) for f in op.max_fields)} instead",
                                  "invalid_request_error", param=foreign)
        deployment = self.deployment_of(h, req.model, key.tenants)
        # Names become subjects and KV keys downstream: refuse a bad one here, not as a dead letter later.
        for header, value in (("x-lockgate-deployment", deployment), ("x-lockgate-app", h.get("x-lockgate-app")),
                              ("x-lockgate-tenant", h.get("x-lockgate-tenant"))):
            if value and value not in _good_names:
                if not is_name(value):
                    return error_response(400, f"invalid {header} {value!r}: {NAME_RULE}", "invalid_request_error")
                if len(_good_names) > 4096:  # names come from clients: keep the memo bounded
                    _good_names.clear()
                _good_names.add(value)
        # Before the route is looked up, so before admission (budgets, rate limits, cache), shadowing and any
        # upstream: another deployment's releases, credentials and limits are not this key's to spend. Refused
        # alike whether or not a release was rolled out to it.
        if not key.may_use(deployment):
            return self._out_of_scope(h, key, deployment, req.model)
        route = self.route_of(deployment, key.tenants)
        if route is None:
            if deployment in self.rollouts.unreadable:
                return self._unreadable_route(deployment)
            return self._ungoverned(h, deployment, req.model)
        if route.stable.release and self.rollouts.refusing:
            return self._cut_off(deployment)
        if route.stable.release and (field := req.routing_field()) is not None:
            # A governed deployment's release says the model, endpoint and parameters: no client field lets an
            # aggregator upstream answer with another model (probe p50 F1). Under passthrough the client's model is
            # served anyway, its routing fields too.
            return error_response(400, f"invalid {op.api} request: {field!r} is not accepted: it would let an "
                                       "aggregator upstream (OpenRouter, LiteLLM) choose another model, provider, "
                                       f"endpoint or key than the release serving deployment {deployment!r} names, "
                                       "which only the operator chooses; leave it out", "invalid_request_error",
                                  code="unsupported_parameter", param=field)
        user = req.user or h.get("x-lockgate-user") or ""
        session = h.get("x-lockgate-session") or ""
        # Sticky by user, else session, else the client's own key; never by the client's IP, which
        # would send every user behind one app host or NAT to the same variant.
        # A header route is honoured for a tester's key only (HeaderRoute.honours): anyone else is routed by weight.
        sticky = "" if user or session else h.get("x-lockgate-sticky-key") or ""
        variant, target = domain.choose(route, user or session or sticky, h,
                                        salt=self.rollouts.sticky_salt(route), key_id=key.id, role=key.role)
        by_header = variant == "canary" and domain.by_header(route, h, key.id, key.role)
        model = target.model or req.model
        stream = req.stream
        want_usage = bool(req.stream_options and req.stream_options.get("include_usage"))
        # Streams without usage would leave token counts unknown: ask for them, hide them again.
        inject_usage = stream and op.stream_usage and not want_usage
        # A failing canary falls back to stable for this request: stable's body goes along.
        starts = [(variant, target)] if variant == "stable" else [(variant, target), ("stable", route.stable)]
        try:
            # A breaker counts one release's calls (of its tenant), or, with no release, one caller tenant's: another
            # tenant's or release's failing calls never divert these, hold their canary nor are charged to it.
            hops = chain(self.endpoints, [(t.endpoint, _body_for(body, req, t, inject_usage, op), (v, t),
                                           Lane(t.model, t.tenant if t.release else key.tenant, t.release))
                                          for v, t in starts], partial(_prepare, op),
                         partial(self.upstream.members, self.endpoints))
        except UnknownEndpoint as exc:  # a route persisted before the allow-list changed
            return error_response(502, exc.message, "upstream_not_configured")
        except Unsupported as exc:
            # The chosen release's endpoint cannot take this request (chain raises for the first hop only): an event
            # of its arm refused with a 400, as its upstream's refusal would be, so canary analysis weighs the share
            # of requests each arm refuses (client_error_rate), not only those it served (probe p15 F2).
            rec = _Record(status="error", provider=self.endpoints.get(target.endpoint).provider)
            rec.error_type, rec.latency_ms = "400", (time.perf_counter() - t0) * 1000.0
            asyncio.get_running_loop().call_soon(self._record, INVALID_SPAN, key, secrets.token_hex(16),
                                                 secrets.token_hex(8), deployment, variant, target, model, req, user,
                                                 session, rec, op, by_header, b"", sticky)
            return error_response(400, exc.message, "invalid_request_error")
        # Budgets and rate limits, once the model the upstream will bill is known: 429/503 or a ticket. The input
        # is bounded by the bodies the upstreams get (a release's patch or a translation may lengthen them).
        # The output too: a release's params or a translation may set another max_tokens than the client's.
        sent = [req if hop.body is body else _output_limits.decode(hop.body) for hop in hops]
        if op is RESPONSES and req.background is True and min(most_output(req, op.max_fields, 0, (s,))
                                                              for s in sent) < 1:
            # Answered `queued` at once and generated afterwards: the router never sees its usage (it serves no GET
            # /v1/responses/{id}), so it is charged its worst case, which only its output limit bounds. Before, probe
            # p60 F3, it was charged default_max_tokens while the provider's generation had no bound at all.
            return error_response(400, f"invalid {op.api} request: a background response needs 'max_output_tokens': "
                                       "the router never sees its usage (it is generated after the answer), so it is "
                                       "charged as if it used all of it, and without it its output has no bound",
                                  "invalid_request_error", code="missing_required_parameter", param="max_output_tokens")
        ticket = await self.admission.admit(key, deployment, model, req, max(len(hop.body) for hop in hops), sent,
                                            body, also=[t.model or req.model for _, t in starts[1:]],
                                            max_fields=op.max_fields, writes=any(_writes(hop) for hop in hops),
                                            named=named if op is RESPONSES else None)
        if isinstance(ticket, web.Response):
            return ticket
        claim = None
        if op is RESPONSES:
            # Another tenant's or app's stored response, conversation, item or container (or one created through a
            # deployment outside the key's scope) is answered as one that does not exist, before any upstream call, its reservation given back; the answer's own ids, and those nobody
            # owned yet, are claimed as it comes. After admission, so a key over its rate limit or budget costs the
            # store nothing (probe p49 F3); reading, never writing a claim, so a refused request leaves none.
            try:
                unowned = await self.owners.admit(key, deployment, owned)
            except BaseException:
                # The client left while the store was asked (the server cancels the handler): nothing went upstream,
                # so nothing was spent. Before, probe p66 F1, the reservation stayed counted until the period ended.
                self.admission.release(ticket)
                raise
            if isinstance(unowned, web.Response):
                self.admission.release(ticket)
                return unowned
            claim = Claims(self.owners, key, deployment, unowned)

        call_of = partial(_call_of, hops, sent, req.model)
        # A fallback after calls abandoned once sent takes a further reservation first (Admission.cover).
        cover = partial(self._cover, ticket, call_of) if ticket.reserved else None

        span = self.spans.start(f"{op.name} {model}", h.get("traceparent"))
        sc = span.get_span_context()
        trace_id, span_id = f"{sc.trace_id:032x}", f"{sc.span_id:016x}"
        flags = "01" if sc.trace_flags.sampled else "00"
        up_headers = {**_UP_BASE, "traceparent": f"00-{trace_id}-{span_id}-{flags}"}
        forward_headers(h, up_headers)
        shaped = shapes_answer(h)  # then not the body alone: no cached answer, no digest (probe p18 F3)
        out_headers = {**ticket.limits, "x-lockgate-trace-id": trace_id}
        if key.role == "admin":  # the arm, for an operator debugging; a client that learnt it could steer (README)
            out_headers |= {"x-lockgate-variant": variant, "x-lockgate-release": target.release}
        rec = _Record(status="ok", provider=hops[0].endpoint.provider)
        streamed: list[bytes] | None = None
        underway = Underway()  # the upstream call in flight, should the client leave before one answers
        # Looks count a call unanswered past router_unanswered_s as its release's failure before it has an event
        # (Rollouts.unanswered): one that never answers has none until a timeout ends it (probe p26).
        inflight = self.rollouts.inflight
        inflight.begin(deployment, underway, key.id)
        try:
            hit = None if shaped else await self.admission.lookup(ticket, op.path, deployment, target.release,
                                                                  hops[0].body, rec, out_headers, want_usage)
            # Shadow: a sampled copy to the candidate, scheduled off the request path (`body` is as the client
            # sent it, before this release's patches). On a cache miss only: a hit replays an answer, no evidence
            # of anything, and costs its caller nothing; copied, an app would choose the candidate's sample by
            # repeating one request, spending the rollout's shadow budget for free (probe p9).
            if hit is None and op is CHAT:  # shadow rollouts compare chat answers
                self.shadow.maybe_mirror(route, variant, key, deployment, body, req, trace_id, user, session,
                                         rec.attributes)
            if hit is not None:
                response = hit
                rec.replayed(op, hit.body, stream)
            elif stream:
                # A cacheable stream keeps the lines the client received, for the cache to replay.
                streamed = [] if ticket.cache_key is not None else None
                response = await self._stream(request, op, hops, up_headers, out_headers, want_usage, t0, rec,
                                              streamed, cover, underway, claim)
            else:
                response = await self._once(op, hops, up_headers, out_headers, rec, cover, underway, claim)
                if request.transport is None:  # the client left while the upstream worked: nobody got the answer
                    # As the answer came (else the handler was cancelled): the client waited the whole call. The answer
                    # was there: any hold of the loop may have kept it unread (probe p18 F4), none is the upstream's.
                    lag = self.upstream.lag
                    since = rec.reply.since if rec.reply is not None else None
                    rec.hung_up(lag.silent_s(since, lag.held_s()) if since is not None else 0.0, self.settings)
        except asyncio.CancelledError:
            # The client closed its connection (the server cancels the handler, server.py): the upstream
            # call was cancelled with it and its connection closed. A stream's provider stops generating then; a
            # non-streamed one goes on and bills the whole answer: a call under way when the client left (before
            # any answered) is abandoned after its request went out, charged its worst case like a first-byte
            # timeout. The calls that failed before it are evidence (and charged) as when one answers.
            # But a stream whose end marker reached the client was answered whole: the openai SDK closes as it reads
            # `[DONE]`, while this was still reading the upstream's end of body (before, such an answer was recorded
            # `client_disconnected` now and then, and left out of analysis, drift and scores).
            if not rec.delivered:
                # How long the upstream had kept the client waiting: the call under way, or a stream's silence, less the
                # holds of the loop up to the answer's latest bytes, which they may have kept unread; a hold after them,
                # or with none come, hid nothing: the upstream was silent through it (probes p18 F4, p21 F3).
                hop, reply = underway.hop, rec.reply
                silent_s = 0.0
                if hop is not None:
                    silent_s = self.upstream.lag.silent_s(underway.since, underway.heard.at)
                elif reply is not None and reply.waiting is not None and reply.heard is not None:
                    silent_s = self.upstream.lag.silent_s(reply.waiting, reply.heard.at)
                # A stream whose every choice has its finish reason reached its client whole: it may stop reading
                # there (`if choice.finish_reason: break`) before the usage chunk and end marker (probe p71 F1).
                rec.hung_up(silent_s, self.settings, whole=stream and rec.out.finished())
                if hop is not None and rec.error_type == UPSTREAM_UNANSWERED and hop.tag[0] != variant:
                    # Stable, called after the canary failed, kept the client waiting: stable's failure, timed from
                    # its own call (the canary's failed call is an event of its own).
                    rec.served, rec.lost_s = hop.tag, underway.started - rec.sent
            if rec.hop is None:
                rec.earlier = underway.earlier
                rec.gone = underway.hop
            raise
        finally:
            inflight.end(deployment, underway)
            rec.latency_ms = (time.perf_counter() - t0 - rec.lost_s) * 1000.0
            if rec.served is not None:  # a fallback served: the event says which variant answered
                variant, target = rec.served
                model = target.model or req.model
            if not rec.response_model and rec.reply is not None and rec.reply.status == 200:
                rec.response_model = model  # an answer naming no model (`"model": null`) is the one asked for
            # Calls that failed before the answer (retried, or fallen back from) are events of their own,
            # so a canary's failures count in its analysis even when a retry or stable answered.
            attempts = [_Record.attempt(failed) for failed in rec.earlier]
            charged = self._answered_by(deployment, model, rec)
            # At the price of the model that answered, as the ledger; each call abandoned after its request went out
            # at its worst case, whatever the last call did (its record, the request's own for the chosen hop's, says
            # so). Whatever the ticket: with no policy nothing is counted, but the worst cases are on the events.
            abandoned = [(a, call_of(f.hop)) for f, a in zip(rec.earlier, attempts, strict=True) if f.abandoned]
            if rec.gone is not None:
                abandoned.append((rec, call_of(rec.gone)))
            self.admission.settle(ticket, rec, charged, call_of(rec.hop) if rec.hop is not None else None, abandoned)
            # The event and the span's attributes are bookkeeping: build them on the next loop
            # turn, after aiohttp has handed the response to the socket, not before.
            loop = asyncio.get_running_loop()
            loop.call_soon(self._record, span, key, trace_id, span_id, deployment, variant, target, model, req, user,
                           session, rec, op, by_header, b"" if shaped else body, sticky)
            for failed, attempt in zip(rec.earlier, attempts, strict=True):
                f_variant, f_target = failed.hop.tag
                loop.call_soon(self._record, INVALID_SPAN, key, trace_id, secrets.token_hex(8), deployment, f_variant,
                               f_target, f_target.model or req.model, req, user, session, attempt, op, by_header,
                               b"", sticky)
        self.admission.remember(ticket, deployment, response, rec, streamed)
        return response

    def _answered_by(self, deployment: str, model: str, rec: _Record) -> str:
        """The model the call `rec` records is priced as (pricebook.priced_model, as the ledger prices its event). An
        answer whose `model` names another than the one asked for (`model`: the release's; a version suffix or a
        provider's prefix is the same model, modelnames.same_model) has its event say so (OTHER_MODEL), logged once
        per deployment and model: an aggregator upstream answered with a model nobody gated."""
        answered = rec.response_model
        if not answered or answered == model or same_model(model, answered):
            return model
        priced = priced_model(model, answered, self.prices)
        if priced == answered:
            how = f"priced as {answered!r}"
        elif priced:
            how = f"priced as {model!r}: the price book has no {answered[:200]!r}"
        else:
            how = "the price book has neither"
        rec.attributes[OTHER_MODEL] = f"answered by {answered[:200]!r}, not {model!r}; {how}"
        if (deployment, answered) not in self._other_models:
            if len(self._other_models) > 4096:  # names come from upstreams: keep the memo bounded
                self._other_models.clear()
            self._other_models.add((deployment, answered))
            log.warning("deployment %r asked for model %r and was answered by %r (%s); an upstream that routes "
                        "(an aggregator) chose another model", deployment, model, answered[:200], how)
        return priced or model

    async def _cover(self, ticket: Any, call_of: Callable[[Hop], Call], hop: Hop, gone: list[Hop]) -> str | None:
        """Upstream.send's Cover: reserve for `hop`'s call what the calls `gone` may have spent beyond the request's
        reservation (None), or say why it may not be made."""
        return await self.admission.cover(ticket, [call_of(h) for h in gone], call_of(hop))

    def _record(self, span: Any, key: ApiKey, trace_id: str, span_id: str, deployment: str, variant: str,
                target: domain.Target, model: str, req: ApiRequest, user: str, session: str,
                rec: _Record, op: Operation = CHAT, by_header: bool = False, body: bytes = b"",
                sticky: str = "") -> None:
        """Queue the request's inference event and end its span (runs after the response is sent). `body`: the
        request as the client sent it, digested on a chat request's own event (the calls it went past have none).
        `sticky`: the `x-lockgate-sticky-key` the request was split by, when it named no user nor session."""
        try:
            attributes = rec.attributes  # the cache's verdict, if any
            # What the client asked, whole: a recorded eval scores only requests its release's own prompt makes, so
            # an application's own system message, tools or sampling never choose what it scores (probe p12 F5).
            # Not a body over MAX_KEYED_BYTES: the digest decodes it whole on the event loop, as the cache key would,
            # and held every request of the replica seconds for a 30 MB body (probe p18 F4); no eval case is that big.
            if (body and op is CHAT and len(body) <= MAX_KEYED_BYTES
                    and (digest := chat_digest(body, target.model, target.params)) is not None):
                attributes[REQUEST_DIGEST] = digest
            if op.api == "responses":  # its operation name is "chat": say which API it came through
                attributes["lockgate.api"] = op.api
            if sticky:  # the user analysis counts the request as, keyed as a user id is: never the raw key (STICKY)
                attributes[STICKY] = self.rollouts.user_hash(key.tenant, sticky)
            if by_header:  # a tester's request sent to the candidate by its header route, not by weight (README)
                attributes[ROUTED_BY] = "header"
            cut: dict[str, int] = {}  # the fields cut to fit one bus message, and their sizes before (fit.py)
            tally = Tally()  # the secrets masked in the output messages: online pii_free counts them (fit.masked)
            if rec.out.has_more_than_text():
                attributes[OUTPUT_MESSAGES], size = rec.out.output_messages(TEXT_BYTES, tally.scrub)
                if size is not None:
                    cut[OUTPUT_MESSAGES] = size
            text = rec.text
            event = InferenceEvent(
                tenant=key.tenant,  # from the key, never from a header the client chooses
                trace_id=trace_id,
                span_id=span_id,
                source="lockgate-router",
                app=key.app,
                deployment=deployment,
                variant=variant,
                release=target.release,
                model=model,
                response_model=rec.response_model,
                provider=rec.provider,  # what the serving endpoint speaks, from the operator's endpoint config
                operation=op.name,
                input_tokens=rec.input_tokens,
                output_tokens=rec.output_tokens,
                cached_tokens=rec.cached_tokens,
                cache_write_tokens=rec.cache_write_tokens,
                cache_write_1h_tokens=rec.cache_write_1h_tokens,
                latency_ms=rec.latency_ms,
                ttft_ms=rec.ttft_ms,
                status=rec.status,
                error_type=rec.error_type,
                finish_reason=rec.finish_reason,
                prompt=op.prompt(req),
                response=text if op is not EMBEDDINGS and (rec.status == "ok" or text) else None,
                user_hash=self.rollouts.user_hash(key.tenant, user),
                session_id=session,  # scrubbed with the rest of the event in the outbox
                attributes=attributes,
                key_id=key.id,  # the caller, so canary analysis judges each key's requests apart
            )
        except Exception:  # the request is answered already: end the span, let the loop log the bug
            span.end()
            raise
        # Scrubbed, cut to fit one bus message (a larger one is never published) and encoded, after the answer was sent.
        self.batcher.add(encode_served(event, cut, tally.counts))
        if not rec.superseded:  # a request, not a call it went past (those are events, not requests)
            metrics.router_request(variant, rec.status, rec.latency_ms / 1000.0)
        _end_span(span, event, tuple(r for _, r in sorted(rec.out.finish.items()) if r))

    def _get(self, endpoint: Endpoint, path: str) -> Any:
        """GET an endpoint's path with lockgate's credential (an async context manager)."""
        return self.upstream.session.get(endpoint.url_for(path), headers=dict(endpoint.auth_headers))  # type: ignore[union-attr]

    async def _once(self, op: Operation, hops: list[Hop], up_headers: dict[str, str], out_headers: dict[str, str],
                    rec: _Record, cover: Cover | None = None, underway: Underway | None = None,
                    claim: Claims | None = None) -> web.StreamResponse:
        rec.sent = asyncio.get_running_loop().time()
        try:
            reply = await self.upstream.send(hops, up_headers, stream=False, cover=cover, underway=underway)
        except UpstreamUnavailable as exc:
            return rec.unavailable(exc, out_headers)
        endpoint, target = rec.took(reply, out_headers)
        prov = provider(endpoint.provider)
        if reply.status != 200:
            return rec.upstream_failed(reply.status, prov.error(reply.body), endpoint, target, out_headers)
        try:
            data = prov.response(reply.body)
            op.parse(data, rec)
            if rec.status != "ok":  # a 200 that reports a failure (a failed response): passed on, scrubbed
                data = scrub(data, endpoint)
        except UNDECODABLE:
            return rec.fail(502, f"endpoint {endpoint.id} answered a body that is not a {op.api} response",
                            "upstream_bad_response", out_headers)
        except ErrorAnswer:  # a 200 whose body is an error: to the client a failure, as a 5xx would be
            return rec.fail(502, f"endpoint {endpoint.id} for release {target.release!r} answered HTTP 200 with "
                                 f"an error: {openai_error(scrub(reply.body, endpoint))}", "upstream_error", out_headers)
        if claim is not None and (withheld := await claim(rec.kept)) is not None:
            return rec.withhold(withheld)
        # The upstream's charset stays when its body passes as it came (an OpenAI-compatible provider's).
        charset = reply.charset if prov.name == "openai" else ""
        return web.Response(body=data, status=200, content_type="application/json", charset=charset or None,
                            headers=out_headers)

    async def _stream(self, request: web.Request, op: Operation, hops: list[Hop], up_headers: dict[str, str],
                      out_headers: dict[str, str], want_usage: bool, t0: float, rec: _Record,
                      streamed: list[bytes] | None = None, cover: Cover | None = None,
                      underway: Underway | None = None, claim: Claims | None = None) -> web.StreamResponse:
        chunk = op.chunk
        assert chunk is not None  # forward refuses a stream of an operation that has none
        rec.sent = asyncio.get_running_loop().time()
        try:
            reply = await self.upstream.send(hops, up_headers, stream=True, cover=cover, underway=underway)
        except UpstreamUnavailable as exc:
            return rec.unavailable(exc, out_headers)
        endpoint, target = rec.took(reply, out_headers)
        prov = provider(endpoint.provider)
        async with reply:
            if reply.status != 200:
                return rec.upstream_failed(reply.status, prov.error(reply.body), endpoint, target, out_headers)
            out = web.StreamResponse(headers={**out_headers, "Content-Type": "text/event-stream",
                                              "Cache-Control": "no-cache"})
            await out.prepare(request)
            hiding = False
            ended = False  # the upstream's end marker came (`data: [DONE]`; a Responses stream's is its last event)
            failure = ""  # why the stream broke off, for the error event that ends it
            events = 0  # the upstream's events so far: a Responses stream's next sequence_number (they count from 0)
            # An event's lines go out in one write when the event ends (its blank line): one send for
            # each event instead of one for each line.
            pending: list[bytes] = []
            try:
                async for line in prov.lines(reply.lines(), op.stream_usage):
                    if hiding:  # the blank line that closes a hidden event
                        hiding = False
                        if not line.strip():
                            continue
                    if line.startswith(b"data:"):
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            ended = True
                            # Chat and completions streams give each choice its finish reason on its last chunk
                            # (Anthropic's its stop_reason, translated; Responses' terminal event its status): an
                            # end marker before it closes an answer cut short (a proxy or server ending it as if
                            # whole). Judged here, before the marker goes out: the openai SDK hangs up as it reads
                            # it. What the client gets stays as sent. Before, probe p63 C, such a stream was ok.
                            if rec.status == "ok" and not rec.out.finished():
                                rec.status, rec.error_type = "error", TRUNCATED
                        else:  # the client's SDK decodes every other data line as JSON: check it does decode
                            events += 1
                            usage_only = chunk(payload, rec)  # UNDECODABLE when it is no chunk
                            # The ids an event shows (`response.created`: the response's; an output item's as it
                            # begins), before it goes out; an error event first instead created nothing, and
                            # accepted no id.
                            if claim is not None and not claim.begun and rec.status != "ok":
                                claim = None
                            if claim is not None:
                                withheld = await claim(rec.kept)
                                if withheld is not None:
                                    rec.withhold(withheld)
                                    failure, events = withheld.message, events - 1
                                    pending.clear()
                                    reply.close()  # the provider stops generating what nobody will read
                                    break
                            # An error event in any operation's stream, in any shape an upstream sends (chat's
                            # `{"error": ..}` on /v1/responses, vLLM's `{"object": "error"}`): the call failed.
                            # Only error events are scrubbed: an answer's own text passes as generated.
                            if rec.status == "ok" and (err := stream_error(payload)) is not None:
                                rec.status, rec.error_type = "error", "upstream_stream_error"
                                if err is not payload:
                                    line = b"data: " + err + line[len(line.rstrip(b"\r\n")):]
                            if rec.status != "ok":  # the upstream's error event: its address stays internal
                                line = scrub(line, endpoint)
                            if not rec.ttft_ms and rec.out.begun():
                                rec.ttft_ms = (time.perf_counter() - t0 - rec.lost_s) * 1000.0
                            if usage_only and not want_usage:
                                hiding = True
                                continue
                    pending.append(line)
                    if streamed is not None:
                        streamed.append(line)
                    if line.endswith(b"\n\n") or not line.strip():
                        await _write(out, b"".join(pending))
                        pending.clear()
                        rec.delivered = ended
                if pending:
                    await _write(out, b"".join(pending))
                    pending.clear()
            except _ClientGone:
                # Stop reading and drop the upstream connection: the provider stops generating (and billing). The
                # client left as the router wrote it the upstream's latest line: never the upstream's silence (a
                # hang-up during a silence cancels the handler: `forward`), so never one hang_up_rate counts. One
                # leaving once every choice has its finish reason had the whole answer (probe p71 F1).
                rec.hung_up(0.0, self.settings, whole=rec.out.finished())
                reply.close()
                return out  # nobody to write the rest to
            except (BrokenReply, TimeoutError) as exc:
                rec.status, rec.error_type = "error", f"stream_interrupted:{type(exc).__name__}"
                failure = str(exc) if isinstance(exc, TimeoutError) else f"the connection to endpoint {endpoint.id} broke"
            except UpstreamStreamError:  # the provider's error event went out as an OpenAI one already
                rec.status, rec.error_type = "error", "upstream_stream_error"
            except UNDECODABLE:
                rec.status, rec.error_type = "error", "upstream_bad_chunk"
                failure = f"endpoint {endpoint.id} sent a stream event that is not a {op.api} chunk"
            else:
                # A stream that stops before its end marker with a choice unfinished was cut short (a proxy's
                # timeout, a crashed server): an answer cut off, not a complete one.
                if rec.status == "ok" and not ended and not rec.out.finished():
                    rec.status, rec.error_type = "error", TRUNCATED
                    failure = f"endpoint {endpoint.id} ended the stream before the answer was complete"
            if rec.error_type != CLIENT_DISCONNECTED and (pending or failure):
                # What came before the upstream failed, then an OpenAI error event, which the client's SDK
                # raises: the answer it read is incomplete, and the stream's status line said 200.
                tail = b"".join(pending)
                if failure:
                    tail += (b"\n" if tail and not tail.endswith(b"\n\n") else b"") + interrupted_event(
                        op, f"stream interrupted: {failure}", events)
                with contextlib.suppress(_ClientGone):
                    await _write(out, tail)
            if rec.status == "ok":
                with contextlib.suppress(ConnectionResetError):  # gone after the last byte: answered anyway
                    await out.write_eof()
            return out


def _call_of(hops: list[Hop], sent: list[OutputLimits], model: str, hop: Hop) -> Call:
    """One hop's call as budgets price it: its release's model (else the client's `model`), the length of its body
    and that body's output limits (`sent`, one per hop)."""
    at = next(i for i, h in enumerate(hops) if h is hop)
    return Call(hop.tag[1].model or model, len(hop.body), sent[at], _writes(hop))


def _writes(hop: Hop) -> bool:
    """The hop's upstream may write the prompt cache, billing its input dearer (budgets.reckoned)."""
    return provider(hop.endpoint.provider).writes_cache


def _foreign_limit(req: ApiRequest, op: Operation) -> str | None:
    """An output limit the client set in a field its operation's upstreams do not read (`max_tokens` on the
    Responses API, `max_completion_tokens` on completions), else None. Passed on, the upstream generated up
    to its own default (thousands of tokens) against a limit the client, and admission, believed was 1."""
    for name in LIMIT_FIELDS:
        if name not in op.max_fields and getattr(req, name) is not None:
            return name
    return None


_AT_PATH = re.compile(r" - at `\$\.([^`]+)`$")


def _param_of(exc: BaseException) -> str | None:
    """The request field a validation error is about, as OpenAI's `param` names it (`n`, `messages[0].role`),
    from msgspec's `- at `$.n`` (None for JSON that does not parse, or an error about the whole body)."""
    if isinstance(exc, msgspec.ValidationError) and (found := _AT_PATH.search(str(exc))) is not None:
        return found.group(1)
    return None


def _undecodable_header(headers: Any) -> str | None:
    """The name of a header whose value is not UTF-8 text, else None. aiohttp keeps such bytes as
    surrogates, which no encoder takes: forwarded upstream they were a 500, and in `x-lockgate-user` or
    `-session` they made the request's event unencodable, so it was never recorded."""
    for name, value in headers.items():
        if not value.isascii():  # the usual case costs one scan per header
            try:
                value.encode()
            except UnicodeEncodeError:
                return name
    return None


async def _write(out: web.StreamResponse, line: bytes) -> None:
    """Write to the client; a closed connection becomes _ClientGone, never mistaken for the upstream's."""
    try:
        await out.write(line)
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one too
        raise _ClientGone from None


class _Record:
    """What the proxy learned about one call, for its event."""

    __slots__ = (
        "attributes",
        "cache_write_1h_tokens",
        "cache_write_tokens",
        "cached_tokens",
        "delivered",
        "earlier",
        "error_type",
        "gone",
        "hop",
        "input_tokens",
        "latency_ms",
        "lost_s",
        "out",
        "output_tokens",
        "provider",
        "reply",
        "kept",
        "response_model",
        "sent",
        "served",
        "status",
        "superseded",
        "ttft_ms",
        "unstored",
    )

    def __init__(self, status: str, provider: str = "openai") -> None:
        self.status = status
        self.provider = provider
        self.error_type = ""
        self.delivered = False  # a stream's end marker (`[DONE]`) was written to the client
        self.input_tokens = self.output_tokens = self.cached_tokens = 0
        self.cache_write_tokens = self.cache_write_1h_tokens = 0
        self.response_model = ""
        # The ids under which the provider keeps a Responses answer and its output items, as they appear (owners.py
        # claims them), unless the answer said it keeps nothing (`unstored`).
        self.kept: list[str] = []
        self.unstored = False
        self.ttft_ms = self.latency_ms = 0.0
        self.out = Choices()  # every choice's text, tool calls and finish reason
        self.attributes: dict[str, str] = {}
        self.served: tuple[str, domain.Target] | None = None
        self.earlier: list[Failed] = []
        self.superseded = False
        self.hop: Hop | None = None  # the call that answered, for its worst case when its usage is unknown
        self.gone: Hop | None = None  # the chosen hop's call, abandoned after it went out, when none answered
        self.reply: Reply | None = None  # the hop's answer, once one came
        self.sent = 0.0  # when the calls to the upstream began (the loop's clock)
        # The time spent on the other arm's calls before the one that answered (a canary's failed call stable fell
        # back from): not in this event's latency and TTFT, which describe the arm that answered. Before, stable's
        # latency evidence took on every failing canary call's wait and loosened the canary's latency thresholds.
        self.lost_s = 0.0

    @classmethod
    def attempt(cls, failed: Failed) -> _Record:
        """The record of a failed call the request went past (its own event: status error, no tokens)."""
        rec = cls(status="error", provider=failed.hop.endpoint.provider)
        rec.error_type = failed.reason()
        rec.latency_ms = failed.elapsed_s * 1000.0
        rec.attributes = {"lockgate.endpoint": failed.hop.endpoint.id, ATTEMPT: SUPERSEDED}
        rec.superseded = True
        return rec

    def hung_up(self, silent_s: float, settings: Settings, whole: bool = False) -> None:
        """The client left before its answer. The release's failure (`upstream_unanswered`) when the upstream had by
        then kept the router waiting (`silent_s`, timed with looplag; 0: it was not waiting) for longer than
        router_unanswered_s. Else, an answer the client had `whole` (a stream whose every choice has its finish
        reason: it may stop reading there, before the usage chunk and end marker) stays as it was, answered; any other
        is the client's own (`client_disconnected`), in no metric but its arm's hang_up_rate, and there only when the
        upstream had kept it waiting router_hang_up_s or longer (`KEPT_WAITING`). A client leaving while the answer
        flowed chose to, whichever arm served it: counted, an app key closing each stream whose first chunk named
        the canary's model aborted a healthy canary, and so did clients stopping at the finish reason of a canary
        whose usage chunk came 50 ms after it (probe p71 F1/F2). Before, every
        hang-up was the client's: a canary that hung (no first byte, or a stream stalled) below the client's timeout
        lost its failures from its evidence and was promoted with an error rate of 0 (probe p15). And the wait was
        timed on the loop's clock, so the time the loop was held by other work (another request's large body) was the
        upstream's silence: such stalls failed the arms of a good canary (probe p18). Then every hold was left out,
        also where no answer had come that it could hide (probe p21)."""
        if silent_s > settings.router_unanswered_s:
            self.status, self.error_type = "error", UPSTREAM_UNANSWERED
        elif not whole:
            self.status, self.error_type = "error", CLIENT_DISCONNECTED
            if silent_s >= settings.router_hang_up_s:
                self.attributes[KEPT_WAITING] = f"{silent_s:.3f}"

    def unavailable(self, exc: UpstreamUnavailable, headers: dict[str, str]) -> web.Response:
        """No upstream answered: the calls made are evidence, and the error goes to the client."""
        self.earlier = exc.earlier
        if exc.own is not None and exc.own.abandoned:
            self.gone = exc.own.hop
        if exc.retry_after_s is not None:  # whole seconds, at least one: an SDK retrying at once is refused again
            headers = {**headers, "Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return self.fail(exc.http, exc.message, exc.type_, headers, exc.code)

    def took(self, reply: Reply, headers: dict[str, str]) -> tuple[Endpoint, domain.Target]:
        """Note which hop answered (for the event and the response headers) and pass its headers on."""
        _pass_headers(headers, reply.headers)
        self.attributes.update(reply.attributes())
        self.earlier = reply.earlier
        self.hop, self.reply = reply.hop, reply
        self.provider = reply.hop.endpoint.provider
        variant, target = reply.hop.tag
        if reply.fallback_from is not None:
            self.served = (variant, target)
            if "x-lockgate-variant" in headers:  # shown to an admin key only (Proxy.forward)
                headers["x-lockgate-variant"], headers["x-lockgate-release"] = variant, target.release
            chosen, planned = reply.fallback_from.tag
            if chosen != variant:  # a canary's failure, for its analysis (the event itself is stable's)
                self.attributes["lockgate.fallback_from_variant"] = chosen
                self.attributes["lockgate.fallback_from_release"] = planned.release
                if reply.started is not None:
                    self.lost_s = reply.started - self.sent
        return reply.hop.endpoint, target

    @property
    def text(self) -> str:
        """Choice 0's text: the event's `response`."""
        return self.out.text(0)

    @property
    def finish_reason(self) -> str:
        """Choice 0's finish reason."""
        return self.out.finish.get(0, "")

    def replayed(self, op: Operation, body: Any, stream: bool) -> None:
        """A cached answer (`body`: the JSON, or the stream's SSE bytes, the client got): its event records what
        the miss's did, every choice, text and tool call, read from those bytes as they were read then; no usage,
        nothing was generated (the cache's attributes say what the hit saved)."""
        if not isinstance(body, bytes):
            return
        model = self.response_model
        with contextlib.suppress(*UNDECODABLE, ErrorAnswer):  # a stored answer read well once
            if not stream:
                op.parse(body, self)
            elif op.chunk is not None:
                for line in body.splitlines():
                    payload = line[5:].strip() if line.startswith(b"data:") else b""
                    if payload and payload != b"[DONE]":
                        op.chunk(payload, self)
        self.response_model = self.response_model or model
        self.input_tokens = self.output_tokens = self.cached_tokens = 0
        self.cache_write_tokens = self.cache_write_1h_tokens = 0
        self.attributes.pop(USAGE_WARNING, None)
        self.attributes.pop(SERVICE_TIER, None)  # served at no tier: nothing was generated

    def withhold(self, withheld: Withheld) -> web.Response:
        """An answer not passed on, its ids unclaimed (owners.Owners.claim): the call answered, the request failed."""
        self.status, self.error_type = "error", UNAVAILABLE
        return withheld.answer

    def fail(self, http: int, message: str, type_: str, headers: dict[str, str],
             code: str | None = None) -> web.Response:
        self.status, self.error_type = "error", type_
        return error_response(http, message, type_, code=code, headers=headers)

    def upstream_failed(self, status: int, data: bytes, endpoint: Endpoint, target: domain.Target,
                        headers: dict[str, str]) -> web.Response:
        """4xx are the caller's to see as they are (in OpenAI's error shape: an HTML or text page from a
        proxy in front of the upstream becomes one naming the endpoint), but for 401, 403 and 407: they refuse
        lockgate's credential for the endpoint, not the caller's key, and a client told 401 takes its own key for
        bad (the openai SDK raises AuthenticationError); those and 5xx become a 502 naming the upstream."""
        self.status, self.error_type = "error", str(status)
        if status in (401, 403, 407):
            return error_response(502, f"endpoint {endpoint.id} for release {target.release!r} refused lockgate's "
                                       f"credential for it (HTTP {status}: {openai_error(data)}); the operator's "
                                       "endpoint credential needs fixing, not your API key", "upstream_error",
                                  code="upstream_auth_failed", headers=headers)
        if 400 <= status < 500:
            if is_openai_error(data):
                return web.Response(body=data, status=status, content_type="application/json", headers=headers)
            return error_response(status, f"endpoint {endpoint.id} for release {target.release!r} answered HTTP "
                                          f"{status}: {openai_error(data)}", "upstream_error", headers=headers)
        return error_response(502, f"endpoint {endpoint.id} for release {target.release!r} failed with "
                                   f"HTTP {status}: {openai_error(data)}", "upstream_error", headers=headers)


def _pass_headers(headers: dict[str, str], upstream: dict[str, str]) -> None:
    """Add the upstream's headers to the answer's. Where the key has a router rate limit of a kind (`headers`
    holds its `x-ratelimit-*-{requests,tokens}`, ratelimit.RateLimiter.headers), the client sees the binding one:
    the router's, unless the upstream reports fewer remaining (a shared organization's limit running out)."""
    router = {kind for kind in ("requests", "tokens") if f"x-ratelimit-remaining-{kind}" in headers}
    if not router:
        headers.update(upstream)
        return
    theirs = {name.lower(): value for name, value in upstream.items()}
    for kind in tuple(router):
        remaining = theirs.get(f"x-ratelimit-remaining-{kind}", "")
        if remaining.isdigit() and int(remaining) < int(headers[f"x-ratelimit-remaining-{kind}"]):
            for name in (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}"):
                headers.pop(name, None)
            router.discard(kind)
    kept = tuple(f"-{kind}" for kind in router)
    headers.update({name: value for name, value in upstream.items()
                    if not (name.lower().startswith("x-ratelimit-") and name.lower().endswith(kept))})


def _body_for(body: bytes, req: ApiRequest, target: domain.Target, inject_usage: bool, op: Operation) -> bytes:
    """The request as one target's endpoint gets it for `op`: its release's model and the params `op` takes, none of
    the client's fields that choose the operator's price (wire.OPERATOR_FIELDS: its `service_tier`), usage asked
    for."""
    if ((target.model and target.model != req.model) or inject_usage or target.params
            or any(getattr(req, name) is not msgspec.UNSET for name in OPERATOR_FIELDS)):
        return patch_body(body, target.model or None, inject_usage, target.params, op)
    return body


def _prepare(op: Operation, endpoint: Endpoint, body: bytes) -> tuple[URL, bytes, dict[str, str]]:
    """The URL, body and headers of a request to one endpoint, as its provider takes them (Unsupported
    when it cannot serve the operation), with lockgate's key for that endpoint alone."""
    prov = provider(endpoint.provider)
    # The URL and headers depend only on the endpoint and the operation: built once, not per request
    # (the headers dict is shared, so nothing may change it; upstream.py copies before adding to it).
    # The path first: a provider without the operation says so (Unsupported) before its translation of the
    # body meets fields of another API's shape (a Responses tool has no `function`).
    known = _prepared.get((id(endpoint), op.path))
    if known is None or known[0] is not endpoint:
        url = endpoint.url_for(prov.path(op))
        if len(_prepared) > 1024:  # endpoints reloaded many times: forget the old ones
            _prepared.clear()
        known = _prepared[(id(endpoint), op.path)] = (endpoint, url, {**prov.headers, **endpoint.auth_headers})
    return known[1], prov.request(op, body), known[2]


_prepared: dict[tuple[int, str], tuple[Endpoint, URL, dict[str, str]]] = {}


def _end_span(span: Any, e: InferenceEvent, finish_reasons: tuple[str, ...] = ()) -> None:
    with contextlib.suppress(Exception):  # telemetry never fails a request
        if isinstance(span, telemetry.DeferredSpan):  # head-dropped: built only if the tail keeps it
            span = span.kept(failed=e.status != "ok")
            if span is None:
                return
        if span.is_recording():
            span.set_attributes({
                "gen_ai.operation.name": e.operation,
                "gen_ai.provider.name": e.provider,
                "gen_ai.request.model": e.model,
                "gen_ai.response.model": e.response_model,
                "gen_ai.usage.input_tokens": e.input_tokens,
                "gen_ai.usage.output_tokens": e.output_tokens,
                "gen_ai.response.finish_reasons": finish_reasons,
                "lockgate.variant": e.variant,
                "lockgate.release": e.release,
                "lockgate.deployment": e.deployment,
                "lockgate.app": e.app,
                # Whose request: a caller's traceparent puts this span in whatever trace it names, and a tenant's
                # trace view (services/query/traces.py) keeps lockgate's own spans of its tenant or of none.
                "lockgate.tenant": e.tenant,
            })
            if e.status != "ok":
                span.set_attribute("error.type", e.error_type)
                span.set_status(Status(StatusCode.ERROR, e.error_type))
        span.end()
