"""Shadow traffic: a sampled copy of live requests sent to the rollout's candidate, off the request path.

`maybe_mirror` only decides (budget, sample) and schedules a task: it never awaits, so the user's
request is neither delayed nor changed, and the shadow answer is never returned to anyone. Each
mirrored call is recorded as an inference event with variant "shadow", the served request's trace
id and the candidate's release, so the sink stores it and `Ledger` pairs it with the served one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

from lockgate.contracts import InferenceEvent
from lockgate.llmwire import ApiRequest, last_user_text
from lockgate.outbox import Outbox, encode_event
from lockgate.server.apikeys import ApiKey
from lockgate.services.router import domain
from lockgate.services.router.endpoints import Endpoints, UnknownEndpoint
from lockgate.services.router.providers import Unsupported, provider
from lockgate.services.router.rollouts import Rollouts
from lockgate.services.router.wire import CHAT, Choices, parse_completion

log = logging.getLogger("lockgate.router.shadow")
_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
_TIMEOUT = aiohttp.ClientTimeout(total=60)  # a hung candidate must free its concurrency slot
_encoder = msgspec.json.Encoder()


class _Answer:
    """What the candidate answered (the fields `parse_completion` fills)."""

    __slots__ = ("cached_tokens", "input_tokens", "out", "output_tokens", "response_model")

    def __init__(self) -> None:
        self.response_model = ""
        self.input_tokens = self.output_tokens = self.cached_tokens = 0
        self.out = Choices()

    @property
    def text(self) -> str:
        return self.out.text(0)

    @property
    def finish_reason(self) -> str:
        return self.out.finish.get(0, "")


class Shadow:
    """Mirrors requests of deployments whose rollout has a shadow strategy (budgets in `Rollouts.shadow_budget`)."""

    def __init__(self, rollouts: Rollouts, endpoints: Endpoints, batcher: Outbox,
                 session_of: Callable[[], aiohttp.ClientSession | None],
                 draw: Callable[[], float] = random.random) -> None:
        self.rollouts = rollouts
        self.endpoints = endpoints
        self.batcher = batcher
        self.session_of = session_of
        self.draw = draw
        self._tasks: set[asyncio.Task[None]] = set()

    def maybe_mirror(self, route: domain.Route, variant: str, key: ApiKey, deployment: str, body: bytes,
                     req: ApiRequest, trace_id: str, user: str, session: str) -> None:
        """Schedule a shadow call for a request stable served, if the rollout mirrors and its budget allows."""
        if variant != "stable" or route.canary is None:
            return
        budget = self.rollouts.shadow_budget(route)
        if budget is None or not budget.admit(self.draw(), self.rollouts.shadows.spent(deployment)):
            return
        task = asyncio.get_running_loop().create_task(
            self._call(budget, route.canary, key, deployment, body, req, trace_id, user, session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel shadow calls still in flight (at shutdown: nobody waits for their answers)."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, budget: Any, target: domain.Target, key: ApiKey, deployment: str, body: bytes,
                    req: ApiRequest, trace_id: str, user: str, session: str) -> None:
        t0 = time.perf_counter()
        answer = _Answer()
        status, error, provider_name = "ok", "", "openai"
        try:
            endpoint = self.endpoints.get(target.endpoint)
            http = self.session_of()
            if http is None:
                return
            prov = provider(provider_name := endpoint.provider)  # the candidate may speak another provider
            headers = {**_HEADERS, **prov.headers, "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"}
            if endpoint.auth_headers:
                headers.update(endpoint.auth_headers)
            elif endpoint.authorization:
                headers["Authorization"] = endpoint.authorization
            async with http.post(endpoint.url_for(prov.path(CHAT)), data=prov.request(CHAT, _candidate_body(
                    body, target)), headers=headers, timeout=_TIMEOUT) as resp:
                data = await resp.read()
                if resp.status != 200:
                    status, error = "error", str(resp.status)
                else:
                    parse_completion(prov.response(data), answer)  # type: ignore[arg-type]  # duck-typed record
        except UnknownEndpoint:
            status, error = "error", "upstream_not_configured"
        except Unsupported:
            status, error = "error", "unsupported_by_candidate"
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, error = "error", f"upstream_unreachable:{type(exc).__name__}"
        except msgspec.DecodeError:
            status, error = "error", "upstream_bad_response"
        finally:
            budget.done()
        try:
            event = InferenceEvent(
                tenant=key.tenant, trace_id=trace_id, span_id=os.urandom(8).hex(), source="lockgate-router",
                app=key.app, deployment=deployment, variant="shadow", release=target.release,
                model=target.model or req.model, response_model=answer.response_model, provider=provider_name,
                operation="chat", input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                cached_tokens=answer.cached_tokens, latency_ms=(time.perf_counter() - t0) * 1000.0, status=status,
                error_type=error, finish_reason=answer.finish_reason, prompt=last_user_text(req.messages),
                response=answer.text if status == "ok" else None, user_hash=domain.user_hash(user),
                session_id=session, key_id=key.id)
        except (msgspec.ValidationError, ValueError) as exc:
            log.warning("shadow event for %s not recorded: %s", deployment, exc)
            return
        with contextlib.suppress(Exception):  # bookkeeping of a copy never raises into the loop
            self.batcher.add(encode_event(event))


def _candidate_body(body: bytes, target: domain.Target) -> bytes:
    """The request as the candidate's release serves it, never streamed (the answer is only compared)."""
    data = msgspec.json.decode(body)
    if target.model:
        data["model"] = target.model
    data.update(target.params)
    data["stream"] = False
    data.pop("stream_options", None)
    return _encoder.encode(data)
