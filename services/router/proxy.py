"""`POST /v1/chat/completions`: pick the variant, proxy to its upstream, record one event.

Hot path: no logging, no blocking calls, the request body is forwarded as received unless
the model must be overridden or stream usage requested; events go to the batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any

import msgspec
from aiohttp import ClientError, web
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, SpanKind, Status, StatusCode, Tracer

from lockgate import metrics, telemetry
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.contracts.names import NAME_RULE, is_name
from lockgate.llmwire import ChatRequest, last_user_text
from lockgate.outbox import Outbox, encode_event
from lockgate.server.apikeys import ApiKey, AuthError, KeyStore, bearer
from lockgate.services.router import domain
from lockgate.services.router.endpoints import Endpoint, Endpoints, UnknownEndpoint
from lockgate.services.router.rollouts import Rollouts
from lockgate.services.router.upstream import (
    Failed,
    Hop,
    Reply,
    Upstream,
    UpstreamUnavailable,
    chain,
    forward_headers,
)
from lockgate.services.router.wire import (
    error_response,
    openai_error,
    parse_chunk,
    parse_completion,
    patch_body,
)

# The client's Authorization is a lockgate key, checked here and never forwarded: the provider's
# key is lockgate's, added per endpoint from operator configuration (headers forwarded: upstream.py).
# The router reads every body it forwards (usage, finish reason), and auto_decompress is off so
# bytes pass through untouched: ask upstreams for identity encoding, never what the client accepts.
_UP_BASE = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
# A server span is a root unless the caller sent a traceparent: an explicit empty context
# skips the SDK's current-context lookups.
_ROOT = Context()
_chat_request = msgspec.json.Decoder(ChatRequest)


class Proxy:
    """The OpenAI-compatible gateway handler."""

    def __init__(self, settings: Settings, rollouts: Rollouts, batcher: Outbox, tracer: Tracer,
                 keys: KeyStore, endpoints: Endpoints) -> None:
        self.settings = settings
        self.keys = keys
        self.endpoints = endpoints
        self.rollouts = rollouts
        self.batcher = batcher
        self.tracer = tracer
        self.upstream = Upstream()  # its session is opened by the router's start

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """Proxy one chat completion to the stable or canary upstream."""
        t0 = time.perf_counter()
        h = request.headers
        try:
            key = self.keys.authenticate(bearer(h.get("Authorization")))
        except AuthError as exc:
            return error_response(401, exc.message, "invalid_request_error", code="invalid_api_key")
        body = await request.read()
        try:
            req = _chat_request.decode(body)
        except msgspec.DecodeError as exc:
            return error_response(400, f"invalid chat completion request: {exc}", "invalid_request_error")
        deployment = h.get("x-lockgate-deployment") or self.settings.deployment
        # Names become subjects and KV keys downstream: refuse a bad one here, not as a dead letter later.
        for header, value in (("x-lockgate-deployment", deployment), ("x-lockgate-app", h.get("x-lockgate-app")),
                              ("x-lockgate-tenant", h.get("x-lockgate-tenant"))):
            if value and not is_name(value):
                return error_response(400, f"invalid {header} {value!r}: {NAME_RULE}", "invalid_request_error")
        user = req.user or h.get("x-lockgate-user") or ""
        session = h.get("x-lockgate-session") or ""
        route = self.rollouts.route(deployment)
        # Sticky by user, else session, else the client's own key; never by the client's IP, which
        # would send every user behind one app host or NAT to the same variant.
        variant, target = domain.choose(route, user or session or h.get("x-lockgate-sticky-key") or "")
        model = target.model or req.model
        want_usage = bool(req.stream_options and req.stream_options.get("include_usage"))
        # Streams without usage would leave token counts unknown: ask for them, hide them again.
        inject_usage = req.stream and not want_usage
        # A failing canary falls back to stable for this request: stable's body goes along.
        starts = [(variant, target)] if variant == "stable" else [(variant, target), ("stable", route.stable)]
        try:
            hops = chain(self.endpoints, [(t.endpoint, _body_for(body, req.model, t, inject_usage), (v, t))
                                          for v, t in starts])
        except UnknownEndpoint as exc:  # a route persisted before the allow-list changed
            return error_response(502, exc.message, "upstream_not_configured")

        traceparent = h.get("traceparent")
        parent = (telemetry.extract({"traceparent": traceparent}) if traceparent else None) or _ROOT
        span = self.tracer.start_span(f"chat {model}", context=parent, kind=SpanKind.SERVER)
        sc = span.get_span_context()
        trace_id, span_id = f"{sc.trace_id:032x}", f"{sc.span_id:016x}"
        flags = "01" if sc.trace_flags.sampled else "00"
        up_headers = {**_UP_BASE, "traceparent": f"00-{trace_id}-{span_id}-{flags}"}
        forward_headers(h, up_headers)
        out_headers = {"x-lockgate-variant": variant, "x-lockgate-release": target.release,
                       "x-lockgate-trace-id": trace_id}
        rec = _Record(status="ok")
        try:
            if req.stream:
                response = await self._stream(request, hops, up_headers, out_headers, want_usage, t0, rec)
            else:
                response = await self._once(hops, up_headers, out_headers, rec)
        finally:
            rec.latency_ms = (time.perf_counter() - t0) * 1000.0
            if rec.served is not None:  # a fallback served: the event says which variant answered
                variant, target = rec.served
                model = target.model or req.model
            # The event and the span's attributes are bookkeeping: build them on the next loop
            # turn, after aiohttp has handed the response to the socket, not before.
            loop = asyncio.get_running_loop()
            loop.call_soon(
                self._record, span, key, trace_id, span_id, deployment, variant, target, model, req, user, session,
                rec)
            # Calls that failed before the answer (retried, or fallen back from) are events of their own,
            # so a canary's failures count in its analysis even when a retry or stable answered.
            for failed in rec.earlier:
                f_variant, f_target = failed.hop.tag
                loop.call_soon(self._record, INVALID_SPAN, key, trace_id, secrets.token_hex(8), deployment, f_variant,
                               f_target, f_target.model or req.model, req, user, session, _Record.attempt(failed))
        return response

    def _record(self, span: Any, key: ApiKey, trace_id: str, span_id: str, deployment: str, variant: str,
                target: domain.Target, model: str, req: ChatRequest, user: str, session: str,
                rec: _Record) -> None:
        """Queue the request's inference event and end its span (runs after the response is sent)."""
        try:
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
                provider="openai",
                operation="chat",
                input_tokens=rec.input_tokens,
                output_tokens=rec.output_tokens,
                cached_tokens=rec.cached_tokens,
                latency_ms=rec.latency_ms,
                ttft_ms=rec.ttft_ms,
                status=rec.status,
                error_type=rec.error_type,
                finish_reason=rec.finish_reason,
                prompt=last_user_text(req.messages),
                response=rec.text if rec.status == "ok" or rec.text else None,
                user_hash=domain.user_hash(user),
                session_id=session,  # scrubbed with the rest of the event in the outbox
                attributes=rec.attributes,
            )
        except Exception:  # the request is answered already: end the span, let the loop log the bug
            span.end()
            raise
        self.batcher.add(encode_event(event))  # scrubbed and encoded once, after the answer was sent
        if not rec.superseded:  # a request, not a call it went past (those are events, not requests)
            metrics.router_request(variant, rec.status, rec.latency_ms / 1000.0)
        _end_span(span, event)

    async def _once(self, hops: list[Hop], up_headers: dict[str, str], out_headers: dict[str, str],
                    rec: _Record) -> web.StreamResponse:
        try:
            reply = await self.upstream.send(hops, up_headers, stream=False)
        except UpstreamUnavailable as exc:
            rec.earlier = exc.earlier
            return rec.fail(exc.http, exc.message, exc.type_, out_headers)
        endpoint, target = rec.took(reply, out_headers)
        if reply.status != 200:
            return rec.upstream_failed(reply.status, reply.body, endpoint, target, out_headers)
        try:
            parse_completion(reply.body, rec)
        except msgspec.DecodeError:
            return rec.fail(502, f"endpoint {endpoint.id} answered a body that is not a chat completion",
                            "upstream_bad_response", out_headers)
        return web.Response(body=reply.body, status=200, content_type="application/json", headers=out_headers)

    async def _stream(self, request: web.Request, hops: list[Hop], up_headers: dict[str, str],
                      out_headers: dict[str, str], want_usage: bool, t0: float, rec: _Record) -> web.StreamResponse:
        try:
            reply = await self.upstream.send(hops, up_headers, stream=True)
        except UpstreamUnavailable as exc:
            rec.earlier = exc.earlier
            return rec.fail(exc.http, exc.message, exc.type_, out_headers)
        endpoint, target = rec.took(reply, out_headers)
        async with reply:
            if reply.status != 200:
                return rec.upstream_failed(reply.status, reply.body, endpoint, target, out_headers)
            out = web.StreamResponse(headers={**out_headers, "Content-Type": "text/event-stream",
                                              "Cache-Control": "no-cache"})
            await out.prepare(request)
            parts: list[str] = []
            hiding = False
            try:
                async for line in reply.lines():
                    if hiding:  # the blank line that closes a hidden event
                        hiding = False
                        if not line.strip():
                            continue
                    if line.startswith(b"data:"):
                        payload = line[5:].strip()
                        if payload.startswith(b"{"):
                            usage_only = parse_chunk(payload, rec, parts)
                            if not rec.ttft_ms and parts:
                                rec.ttft_ms = (time.perf_counter() - t0) * 1000.0
                            if usage_only and not want_usage:
                                hiding = True
                                continue
                    await out.write(line)
            except ConnectionError:  # first: aiohttp's write to a gone client can also be a ClientError
                rec.status, rec.error_type = "error", "client_disconnected"
            except (ClientError, TimeoutError) as exc:
                rec.status, rec.error_type = "error", f"stream_interrupted:{type(exc).__name__}"
            except msgspec.DecodeError:
                rec.status, rec.error_type = "error", "upstream_bad_chunk"
            rec.text = "".join(parts)
            if rec.status == "ok":
                await out.write_eof()
            return out


class _Record:
    """What the proxy learned about one call, for its event."""

    __slots__ = (
        "attributes",
        "cached_tokens",
        "earlier",
        "error_type",
        "finish_reason",
        "input_tokens",
        "latency_ms",
        "output_tokens",
        "response_model",
        "served",
        "status",
        "superseded",
        "text",
        "ttft_ms",
    )

    def __init__(self, status: str) -> None:
        self.status = status
        self.error_type = ""
        self.finish_reason = ""
        self.input_tokens = self.output_tokens = self.cached_tokens = 0
        self.response_model = ""
        self.ttft_ms = self.latency_ms = 0.0
        self.text = ""
        self.served: tuple[str, domain.Target] | None = None
        self.attributes: dict[str, str] = {}
        self.earlier: list[Failed] = []
        self.superseded = False

    @classmethod
    def attempt(cls, failed: Failed) -> _Record:
        """The record of a failed call the request went past (its own event: status error, no tokens)."""
        rec = cls(status="error")
        rec.error_type = failed.reason()
        rec.latency_ms = failed.elapsed_s * 1000.0
        rec.attributes = {"lockgate.endpoint": failed.hop.endpoint.id, "lockgate.attempt": "superseded"}
        rec.superseded = True
        return rec

    def took(self, reply: Reply, headers: dict[str, str]) -> tuple[Endpoint, domain.Target]:
        """Note which hop answered (for the event and the response headers) and pass its headers on."""
        headers.update(reply.headers)
        self.attributes = reply.attributes()
        self.earlier = reply.earlier
        variant, target = reply.hop.tag
        if reply.fallback_from is not None:
            self.served = (variant, target)
            headers["x-lockgate-variant"], headers["x-lockgate-release"] = variant, target.release
            chosen, planned = reply.fallback_from.tag
            if chosen != variant:  # a canary's failure, for its analysis (the event itself is stable's)
                self.attributes["lockgate.fallback_from_variant"] = chosen
                self.attributes["lockgate.fallback_from_release"] = planned.release
        return reply.hop.endpoint, target

    def fail(self, http: int, message: str, type_: str, headers: dict[str, str]) -> web.Response:
        self.status, self.error_type = "error", type_
        return error_response(http, message, type_, headers=headers)

    def upstream_failed(self, status: int, data: bytes, endpoint: Endpoint, target: domain.Target,
                        headers: dict[str, str]) -> web.Response:
        """4xx are the caller's to see as they are; 5xx become a 502 naming the upstream."""
        self.status, self.error_type = "error", str(status)
        if 400 <= status < 500:
            return web.Response(body=data, status=status, content_type="application/json", headers=headers)
        return error_response(502, f"endpoint {endpoint.id} for release {target.release!r} failed with "
                                   f"HTTP {status}: {openai_error(data)}", "upstream_error", headers=headers)


def _body_for(body: bytes, model: str, target: domain.Target, inject_usage: bool) -> bytes:
    """The request as one target's endpoint gets it: its release's model and params, usage asked for."""
    if (target.model and target.model != model) or inject_usage or target.params:
        return patch_body(body, target.model or None, inject_usage, target.params)
    return body


def _end_span(span: Any, e: InferenceEvent) -> None:
    with contextlib.suppress(Exception):  # telemetry never fails a request
        if span.is_recording():
            span.set_attributes({
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": e.provider,
                "gen_ai.request.model": e.model,
                "gen_ai.response.model": e.response_model,
                "gen_ai.usage.input_tokens": e.input_tokens,
                "gen_ai.usage.output_tokens": e.output_tokens,
                "gen_ai.response.finish_reasons": (e.finish_reason,) if e.finish_reason else (),
                "lockgate.variant": e.variant,
                "lockgate.release": e.release,
                "lockgate.deployment": e.deployment,
                "lockgate.app": e.app,
            })
            if e.status != "ok":
                span.set_attribute("error.type", e.error_type)
                span.set_status(Status(StatusCode.ERROR, e.error_type))
        span.end()
