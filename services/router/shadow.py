"""Shadow traffic: a sampled copy of live requests sent to the rollout's candidate, off the request path.

`maybe_mirror` only decides (budget, sample) and schedules a task: it never awaits, so the user's
request is neither delayed nor changed, and the shadow answer is never returned to anyone. Each
mirrored call is recorded as an inference event with variant "shadow", the served request's trace
id and the candidate's release, so the sink stores it and `Ledger` pairs it with the served one.

A rollout with `max_cost_usd` keeps its spend in the budget bucket (`SpendStore`): the task reserves the copy's
worst case there before making it, and settles its real cost after, so every replica's copies, those in flight
and those of replicas started since included, stay within the cap. A store that does not answer (or holds no
spend) makes no copy: shadowing is optional, the candidate's spend is not.
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
from lockgate.kvcas import CasStore, KVUnavailable
from lockgate.llmwire import ApiRequest, OutputLimits, last_user_text
from lockgate.outbox import Outbox
from lockgate.pricebook import ModelPrice, load_price_book
from lockgate.server.apikeys import ApiKey
from lockgate.services.router import domain, shadowstats
from lockgate.services.router.admission import GatewayFile
from lockgate.services.router.budgets import cost_of, pointed_at, worst_case
from lockgate.services.router.endpoints import Endpoints, UnknownEndpoint
from lockgate.services.router.fit import encode_served
from lockgate.services.router.providers import Unsupported, provider
from lockgate.services.router.rollouts import Rollouts
from lockgate.services.router.shadowstats import Budget, Spend
from lockgate.services.router.wire import (
    CHAT,
    USAGE_WARNING,
    Choices,
    ErrorAnswer,
    as_released,
    parse_completion,
    top_level,
)

log = logging.getLogger("lockgate.router.shadow")
_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
_TIMEOUT = aiohttp.ClientTimeout(total=60)  # a hung candidate must free its concurrency slot
_encoder = msgspec.json.Encoder()
_limits = msgspec.json.Decoder(OutputLimits)
_spend = msgspec.json.Decoder(Spend)


class _Answer:
    """What the candidate answered (the fields `parse_completion` fills)."""

    __slots__ = ("attributes", "cached_tokens", "input_tokens", "out", "output_tokens", "response_model")

    def __init__(self) -> None:
        self.response_model = ""
        self.input_tokens = self.output_tokens = self.cached_tokens = 0
        self.out = Choices()
        self.attributes: dict[str, str] = {}  # a usage warning (usage not believed)

    @property
    def text(self) -> str:
        return self.out.text(0)

    @property
    def finish_reason(self) -> str:
        return self.out.finish.get(0, "")


class SpendStore:
    """The rollouts' shadow spend in the budget bucket (`shadowstats.Spend` under `shadowstats.spend_key`), changed
    by compare-and-set as the budget counters are (lockgate.kvcas)."""

    def __init__(self, bus: Any, timeout_s: float) -> None:
        self.store = CasStore(bus, bus.subjects.kv_budgets if bus is not None else "", timeout_s=timeout_s,
                              what="the shadow spend store")

    async def reserve(self, key: str, need: int, cap_usd: float) -> tuple[bool, int]:
        """Reserve `need` nano-USD under the rollout's cap: whether it fitted (else the spend is left as it was), and
        the spend then. KVUnavailable when the store does not answer or holds no spend."""
        def step(state: Spend | None) -> tuple[Spend | None, tuple[bool, int]]:
            after = shadowstats.reserve(state, need, cap_usd)
            return after, (True, after.spent) if after is not None else (False, (state or Spend()).spent)

        return await self.store.update(key, lambda b: _spend.decode(b or b"{}"), step, f"shadow spend {key}")

    async def settle(self, key: str, reserved: int, used: int) -> int:
        """Replace a copy's reservation by what it cost: the spend after it (KVUnavailable as `reserve`)."""
        def step(state: Spend | None) -> tuple[Spend, int]:
            after = shadowstats.settle(state, reserved, used)
            return after, after.spent

        return await self.store.update(key, lambda b: _spend.decode(b or b"{}"), step, f"shadow spend {key}")


class Shadow:
    """Mirrors requests of deployments whose rollout has a shadow strategy (budgets in `Rollouts.shadow_budget`)."""

    def __init__(self, rollouts: Rollouts, endpoints: Endpoints, batcher: Outbox,
                 session_of: Callable[[], aiohttp.ClientSession | None],
                 draw: Callable[[], float] = random.random,
                 gateway: Callable[[], GatewayFile] = GatewayFile) -> None:
        self.rollouts = rollouts
        self.endpoints = endpoints
        self.batcher = batcher
        self.session_of = session_of
        self.draw = draw
        # What bounds a copy's worst case (its output without max_tokens, bytes per input token, what a body only
        # points at) as admission reads them: the gateway file's.
        self.gateway = gateway
        self.prices: dict[str, ModelPrice] = load_price_book(rollouts.ctx.settings.price_book).models
        self._spend: SpendStore | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def spend(self) -> SpendStore:
        """The rollouts' spend, made at first use: the service sets the gateway file (its store timeout) after this."""
        if self._spend is None:
            self._spend = SpendStore(self.rollouts.ctx.bus, self.gateway().store_timeout_s)
        return self._spend

    def maybe_mirror(self, route: domain.Route, variant: str, key: ApiKey, deployment: str, body: bytes,
                     req: ApiRequest, trace_id: str, user: str, session: str) -> None:
        """Schedule a shadow call for a request stable served, if the rollout mirrors and its budget allows (its
        cost is reserved in the task, off the request path)."""
        if variant != "stable" or route.canary is None:
            return
        budget = self.rollouts.shadow_budget(route)
        if budget is None or not budget.admit(self.draw()):
            return
        task = asyncio.get_running_loop().create_task(
            self._call(budget, route.canary, key, deployment, body, req, trace_id, user, session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def idle(self) -> None:
        """Wait until the copies scheduled so far are made, refused or failed, and settled (for tests)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel shadow calls still in flight (at shutdown: nobody waits for their answers)."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, budget: Budget, target: domain.Target, key: ApiKey, deployment: str, body: bytes,
                    req: ApiRequest, trace_id: str, user: str, session: str) -> None:
        answer = _Answer()
        status, error, provider_name = "ok", "", "openai"
        reserved: int | None = None  # nano-USD reserved in the rollout's spend for this copy
        used: int | None = None  # what it cost, once known (None: unknown, its reservation stays spent)
        slot = True  # the copy holds its place in the budget (in flight) until done, or until refused
        t0 = time.perf_counter()
        try:
            endpoint = self.endpoints.get(target.endpoint)
            http = self.session_of()
            if http is None:
                return
            prov = provider(provider_name := endpoint.provider)  # the candidate may speak another provider
            payload = prov.request(CHAT, _candidate_body(body, target))
            if budget.spec.max_cost_usd is not None:
                reserved = await self._reserve(budget, target, body, payload, req)
                if reserved is None:
                    slot = False  # no copy: budget.refused gave its place back, counting why
                    return
                t0 = time.perf_counter()  # the candidate's latency, not the store's
            headers = {**_HEADERS, **prov.headers, "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"}
            if endpoint.auth_headers:
                headers.update(endpoint.auth_headers)
            elif endpoint.authorization:
                headers["Authorization"] = endpoint.authorization
            async with http.post(endpoint.url_for(prov.path(CHAT)), data=payload, headers=headers,
                                 timeout=_TIMEOUT) as resp:
                data = await resp.read()
                if resp.status != 200:
                    status, error = "error", str(resp.status)
                    used = 0  # refused: a provider bills no answer it did not give
                else:
                    parse_completion(prov.response(data), answer)  # type: ignore[arg-type]  # duck-typed record
                    if (answer.input_tokens or answer.output_tokens) and USAGE_WARNING not in answer.attributes:
                        used = cost_of(self._price(target, req), answer.input_tokens, answer.output_tokens,
                                       answer.cached_tokens).usd
        except UnknownEndpoint:
            status, error = "error", "upstream_not_configured"
        except Unsupported:
            status, error = "error", "unsupported_by_candidate"
        except aiohttp.ClientConnectorError as exc:
            status, error = "error", f"upstream_unreachable:{type(exc).__name__}"
            used = 0  # never connected: nothing was sent
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, error = "error", f"upstream_unreachable:{type(exc).__name__}"
        except (msgspec.DecodeError, ErrorAnswer):
            status, error = "error", "upstream_bad_response"
        finally:
            if slot:
                budget.done()
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if reserved is not None and used is not None and used != reserved:
            await self._settle(budget, reserved, used)
        try:
            event = InferenceEvent(
                tenant=key.tenant, trace_id=trace_id, span_id=os.urandom(8).hex(), source="lockgate-router",
                app=key.app, deployment=deployment, variant="shadow", release=target.release,
                model=target.model or req.model, response_model=answer.response_model, provider=provider_name,
                operation="chat", input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                cached_tokens=answer.cached_tokens, latency_ms=latency_ms, status=status,
                error_type=error, finish_reason=answer.finish_reason, prompt=last_user_text(req.messages),
                response=answer.text if status == "ok" else None, user_hash=domain.user_hash(user),
                session_id=session, key_id=key.id, attributes=dict(answer.attributes))
        except (msgspec.ValidationError, ValueError) as exc:
            log.warning("shadow event for %s not recorded: %s", deployment, exc)
            return
        with contextlib.suppress(Exception):  # bookkeeping of a copy never raises into the loop
            self.batcher.add(encode_served(event))  # cut to fit one bus message, as the served request's

    def _price(self, target: domain.Target, req: ApiRequest) -> ModelPrice | None:
        return self.prices.get(target.model or req.model)

    async def _reserve(self, budget: Budget, target: domain.Target, body: bytes, payload: bytes,
                       req: ApiRequest) -> int | None:
        """Reserve the copy's worst case in the rollout's spend: the nano-USD reserved, or None (the copy is not
        made; `budget.refused` says why) when it does not fit `max_cost_usd`, the candidate's model has no price
        (the cap could not be kept) or the store does not answer."""
        cap = budget.spec.max_cost_usd
        assert cap is not None
        price = self._price(target, req)
        if price is None:
            if not budget.skipped["model_unpriced"]:
                log.warning("shadow of %s: model %r has no price in the price book, so max_cost_usd cannot be kept: "
                            "no copies (add the model to the price book, settings.price_book)", budget.key,
                            target.model or req.model)
            budget.refused("model_unpriced")
            return None
        g = self.gateway()
        try:
            limits = _limits.decode(payload)
        except msgspec.DecodeError:
            limits = OutputLimits()
        need = worst_case(price, len(payload), req, limits, CHAT.max_fields, g.default_max_tokens, g.bytes_per_token,
                          pointed_at(req, body, g.media_tokens, g.stored_input_tokens).tokens)[2].usd
        try:
            fits, spent = await self.spend.reserve(budget.key, need, cap)
        except KVUnavailable as exc:
            if not budget.skipped["cost_store_unavailable"]:
                log.warning("shadow of %s: no copies while its spend cannot be reserved: %s", budget.key, exc.message)
            budget.refused("cost_store_unavailable")
            return None
        budget.spent_usd = spent / shadowstats.NANO
        if not fits:
            budget.refused("over_max_cost")
            return None
        return need

    async def _settle(self, budget: Budget, reserved: int, used: int) -> None:
        try:
            budget.spent_usd = await self.spend.settle(budget.key, reserved, used) / shadowstats.NANO
        except KVUnavailable as exc:  # the rollout's spend stays over-counted, never under
            log.warning("shadow spend %s not settled (the copy's worst case stays spent): %s", budget.key,
                        exc.message)


def _candidate_body(body: bytes, target: domain.Target) -> bytes:
    """The request as the candidate's release serves it, never streamed (the answer is only compared)."""
    data = top_level(body)
    as_released(data, target.model, target.params, CHAT)  # the client's service_tier neither (a dearer copy)
    data["stream"] = False
    data.pop("stream_options", None)
    return _encoder.encode(data)
