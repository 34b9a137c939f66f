"""Shadow traffic: a sampled copy of live requests sent to the rollout's candidate, off the request path.

`maybe_mirror` only decides (budget, sample) and schedules a task: it never awaits, so the user's
request is neither delayed nor changed, and the shadow answer is never returned to anyone. Each
mirrored call is recorded as an inference event with variant "shadow", the served request's trace
id and the candidate's release, so the sink stores it and `Ledger` pairs it with the served one.

A rollout with `max_cost_usd` keeps its spend in the budget bucket (`SpendStore`): the task reserves the copy's
worst case there before making it, and settles its real cost after, so every replica's copies, those in flight
and those of replicas started since included, stay within the cap. A store that does not answer (or holds no
spend) makes no copy: shadowing is optional, the candidate's spend is not.

A copy is made as the candidate's served call of the request would be: streamed when the client streamed, under the
candidate endpoint's own timeouts (connect, first byte, between chunks, total), so its failures are the candidate's
and no bound of the shadow's own decides them. A request the candidate's served call would refuse before any upstream
is not copied: its endpoint not configured, no evidence either way; its provider unable to take the body, recorded as
that call would be, refused with a 400 (client_error_rate weighs it: probe p83 F1).

A copy is the caller's spend too: it is reserved on the budgets and token rate limits that cover the caller's tenant,
app and key, as a request of its own (`Admission.admit`, counting no request against `rpm`), and settled after as the
served call is (`Admission.settle`: its usage, else its worst case on its event). A copy they cannot cover is not made
(`over_caller_budget`), and the served event says so (SHADOW_SKIPPED): a preview is not judged on fewer copies. Before,
probe p60 F1, copies were booked to the tenant in the ledger but counted in no budget: a tenant of 10 USD a day spent 20.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec

from lockgate.contracts import InferenceEvent
from lockgate.contracts.inference import REQUEST_DIGEST, SHADOW_SKIPPED
from lockgate.kvcas import CasStore, KVUnavailable
from lockgate.llmwire import ApiRequest, OutputLimits, last_user_text
from lockgate.outbox import Outbox
from lockgate.pricebook import ModelPrice, load_price_book
from lockgate.server.apikeys import ApiKey
from lockgate.services.router import domain, shadowstats
from lockgate.services.router.admission import OPEN_ADMISSION, Admission, Call, Ticket
from lockgate.services.router.budgets import cost_of, pointed_at, provider_runs, worst_case
from lockgate.services.router.cache import MAX_KEYED_BYTES
from lockgate.services.router.endpoints import Endpoints, UnknownEndpoint
from lockgate.services.router.fit import encode_served
from lockgate.services.router.providers import Unsupported, UpstreamStreamError, provider
from lockgate.services.router.resilience import may_have_generated
from lockgate.services.router.rollouts import Rollouts
from lockgate.services.router.shadowstats import Budget, Spend
from lockgate.services.router.wire import (
    CHAT,
    TRUNCATED,
    USAGE_WARNING,
    Choices,
    ErrorAnswer,
    as_released,
    chat_digest,
    parse_chunk,
    parse_completion,
    stream_error,
    top_level,
)

log = logging.getLogger("lockgate.router.shadow")
_HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
_encoder = msgspec.json.Encoder()
_limits = msgspec.json.Decoder(OutputLimits)
_spend = msgspec.json.Decoder(Spend)


class _Answer:
    """What the candidate answered (the fields `parse_completion` fills)."""

    __slots__ = ("attributes", "cache_write_1h_tokens", "cache_write_tokens", "cached_tokens", "error_type",
                 "input_tokens", "lines", "out", "output_tokens", "response_model", "status")

    def __init__(self) -> None:
        self.status, self.error_type = "ok", ""  # a stream's error event sets them (`parse_chunk`)
        self.lines = 0  # of a streamed answer, read so far
        self.response_model = ""
        self.input_tokens = self.output_tokens = self.cached_tokens = 0
        self.cache_write_tokens = self.cache_write_1h_tokens = 0
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
                 admission: Callable[[], Admission] = lambda: OPEN_ADMISSION) -> None:
        self.rollouts = rollouts
        self.endpoints = endpoints
        self.batcher = batcher
        self.session_of = session_of
        self.draw = draw
        # The caller's budgets and rate limits, which each copy is reserved on and settled in; and what bounds a
        # copy's worst case (its output without max_tokens, bytes per input token, what a body only points at) as
        # admission reads them: the gateway file's.
        self.admission = admission
        self.prices: dict[str, ModelPrice] = load_price_book(rollouts.ctx.settings.price_book).models
        self._spend: SpendStore | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def spend(self) -> SpendStore:
        """The rollouts' spend, made at first use: the service sets the gateway file (its store timeout) after this."""
        if self._spend is None:
            self._spend = SpendStore(self.rollouts.ctx.bus, self.admission().file.store_timeout_s)
        return self._spend

    def maybe_mirror(self, route: domain.Route, variant: str, key: ApiKey, deployment: str, body: bytes,
                     req: ApiRequest, trace_id: str, user: str, session: str, marks: dict[str, str]) -> None:
        """Schedule a shadow call for a request stable served, if the rollout mirrors and its budget allows (its
        cost is reserved in the task, off the request path). Called on a cache miss only: a hit is no evidence.
        `marks`: the served event's attributes, which say when a budget every key shares left it uncopied
        (SHADOW_SKIPPED): another key's copies may have spent it, and a preview is not judged on theirs alone."""
        if variant != "stable" or route.canary is None:
            return
        budget = self.rollouts.shadow_budget(route)
        if budget is None:
            return
        if not budget.admit(self.draw()):
            if budget.why in shadowstats.SHARED:
                marks[SHADOW_SKIPPED] = budget.why
            return
        task = asyncio.get_running_loop().create_task(
            self._call(budget, route.canary, key, deployment, body, req, trace_id, user, session, marks))
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
                    req: ApiRequest, trace_id: str, user: str, session: str, marks: dict[str, str]) -> None:
        answer = _Answer()
        status, error, provider_name = "ok", "", "openai"
        reserved: int | None = None  # nano-USD reserved in the rollout's spend for this copy
        used: int | None = None  # what it cost, once known (None: unknown, its reservation stays spent)
        ticket: Ticket | None = None  # its reservation on the caller's budgets
        sent = gone = False  # its request went out; it was given up on before its answer's first byte
        slot = True  # the copy holds its place in the budget (in flight) until done, or until refused
        t0 = time.perf_counter()
        try:
            try:
                endpoint = self.endpoints.get(target.endpoint)
                prov = provider(provider_name := endpoint.provider)  # the candidate may speak another provider
                payload = prov.request(CHAT, _candidate_body(body, target, req.stream))
            except (UnknownEndpoint, Unsupported) as exc:
                # The candidate's served call would be refused before any upstream: no copy. A 400 its provider
                # cannot take is recorded as that call's event would be (proxy: an event of its arm refused with a
                # 400), so the preview's look weighs the share of requests it would refuse (client_error_rate, never
                # error_rate: probe p9) as a canary's. Uncounted, a preview whose provider refused half the
                # deployment's requests (`n: 2` to Anthropic) was judged on the other half and promoted (probe p83
                # F1). An endpoint not configured is the route's fault (a 502 with no event): no evidence.
                unsupported = isinstance(exc, Unsupported)
                why = "unsupported_by_candidate" if unsupported else "upstream_not_configured"
                if not budget.skipped[why]:
                    log.warning("shadow of %s: a request not copied: %s", budget.key, exc.message)
                slot = False
                budget.refused(why)
                if unsupported:
                    self._record(key, trace_id, deployment, target, req, body, user, session, provider_name,
                                 answer, "error", "400", (time.perf_counter() - t0) * 1000.0)
                return
            if _acts_at_provider(req):
                # The copy would do again what the served call did on the provider's side: a web search or a tool
                # the provider runs (code in a container, an MCP server's actions), billed and acted on twice
                # (probe p83 F2). Not copied, and the served event says so: the preview is not judged on it.
                slot = False
                budget.refused("provider_side_action")
                marks[SHADOW_SKIPPED] = "provider_side_action"
                return
            http = self.session_of()
            if http is None:
                return
            call = Call(target.model or req.model, len(payload), _output(payload))
            ticket = await self._admit(budget, call, key, deployment, req, body, marks)
            if ticket is None:
                slot = False  # no copy: budget.refused gave its place back
                return
            if budget.spec.max_cost_usd is not None:
                reserved = await self._reserve(budget, target, body, payload, req, marks)
                if reserved is None:
                    slot = False  # no copy: budget.refused gave its place back, counting why
                    self.admission().release(ticket)
                    ticket = None
                    return
                t0 = time.perf_counter()  # the candidate's latency, not the store's
            headers = {**_HEADERS, **prov.headers, "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"}
            if endpoint.auth_headers:
                headers.update(endpoint.auth_headers)
            elif endpoint.authorization:
                headers["Authorization"] = endpoint.authorization
            # The bounds of the candidate's served call (upstream.Upstream._try): the connection within connect_s,
            # the answer's headers and its first event (a whole answer, unstreamed) within first_byte_s, each later
            # event within between_chunks_s of the one before, all within total_s. A hung candidate frees its
            # concurrency slot by them.
            bounds = endpoint.timeouts
            sent = True  # unless it never connects (below)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + bounds.total_s
            async with asyncio.timeout_at(min(loop.time() + bounds.first_byte_s, deadline)) as bound:
                async with http.post(endpoint.url_for(prov.path(CHAT)), data=payload, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=bounds.connect_s)) as resp:
                    if resp.status != 200:
                        await resp.read()
                        status, error = "error", str(resp.status)
                        if not may_have_generated(resp.status):  # a gateway's timeout: its worst case stays spent
                            used = 0  # refused: a provider bills no answer it did not give
                    elif req.stream:
                        await _read_stream(prov.lines(_lines(resp.content, bound, bounds.between_chunks_s, deadline,
                                                             answer), True), answer)
                        status, error = answer.status, answer.error_type
                    else:
                        parse_completion(prov.response(await resp.read()), answer)  # type: ignore[arg-type]
            if resp.status == 200 and (answer.input_tokens or answer.output_tokens) and \
                    USAGE_WARNING not in answer.attributes:
                used = cost_of(self._price(target, req), answer.input_tokens, answer.output_tokens,
                               answer.cached_tokens, answer.cache_write_tokens, answer.cache_write_1h_tokens).usd
        except aiohttp.ClientConnectorError as exc:
            status, error = "error", f"upstream_unreachable:{type(exc).__name__}"
            used, sent = 0, False  # never connected: nothing was sent
        except aiohttp.ConnectionTimeoutError:
            status, error = "error", "upstream_timeout"
            used, sent = 0, False  # never connected: nothing was sent
        except TimeoutError:
            # As the served call's event says it: no answer within its first byte, else a stream that stalled or was
            # still sending when its total time ran out. Given up on once sent, it may have generated its whole answer.
            status, error = "error", "upstream_timeout"
            gone = not answer.lines  # a stream cut later is charged as one (its usage unknown), not given up on
            if answer.lines:
                late = asyncio.get_running_loop().time() >= deadline
                error = f"stream_interrupted:{'TotalTimeout' if late else 'ChunkTimeout'}"
        except aiohttp.ClientError as exc:
            status, error = "error", f"upstream_unreachable:{type(exc).__name__}"
        except UpstreamStreamError:
            status, error = "error", "upstream_stream_error"
        except (msgspec.DecodeError, ErrorAnswer, ValueError, RecursionError):  # ValueError: a line over aiohttp's limit
            status, error = "error", "upstream_bad_response"
        finally:
            if slot:
                budget.done()
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if reserved is not None and used is not None and used != reserved:
            await self._settle(budget, reserved, used)
        if ticket is not None:
            self._charge(ticket, answer, status, error, call, sent, gone)
        self._record(key, trace_id, deployment, target, req, body, user, session, provider_name, answer, status,
                     error, latency_ms)

    def _record(self, key: ApiKey, trace_id: str, deployment: str, target: domain.Target, req: ApiRequest,
                body: bytes, user: str, session: str, provider_name: str, answer: _Answer, status: str, error: str,
                latency_ms: float) -> None:
        """Record the copy's event (variant "shadow", the candidate's release): never raises into the loop."""
        try:
            event = InferenceEvent(
                tenant=key.tenant, trace_id=trace_id, span_id=os.urandom(8).hex(), source="lockgate-router",
                app=key.app, deployment=deployment, variant="shadow", release=target.release,
                model=target.model or req.model, provider=provider_name,
                response_model=answer.response_model or (target.model or req.model if status == "ok" else ""),
                operation="chat", input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                cached_tokens=answer.cached_tokens, cache_write_tokens=answer.cache_write_tokens,
                cache_write_1h_tokens=answer.cache_write_1h_tokens, latency_ms=latency_ms, status=status,
                error_type=error, finish_reason=answer.finish_reason, prompt=last_user_text(req.messages),
                response=answer.text if status == "ok" else None, user_hash=self.rollouts.user_hash(key.tenant, user),
                session_id=session, key_id=key.id, attributes=_digested(answer.attributes, body, target))
        except (msgspec.ValidationError, ValueError) as exc:
            log.warning("shadow event for %s not recorded: %s", deployment, exc)
            return
        with contextlib.suppress(Exception):  # bookkeeping of a copy never raises into the loop
            self.batcher.add(encode_served(event))  # cut to fit one bus message, as the served request's

    async def _admit(self, budget: Budget, call: Call, key: ApiKey, deployment: str, req: ApiRequest, body: bytes,
                     marks: dict[str, str]) -> Ticket | None:
        """Reserve the copy's worst case on the budgets and token rate limits covering the caller (a request of its
        own to them, not counted against `rpm`): its ticket, or None (the copy is not made; the served event's
        `marks` say so) when they cannot cover it."""
        got = await self.admission().admit(key, deployment, call.model, req, call.body_bytes, (call.limits,), body,
                                           requests=0)
        if isinstance(got, Ticket):
            return got
        if not budget.skipped["over_caller_budget"]:
            log.info("shadow of %s: a copy not made: the caller's budget or rate limit cannot cover it (%s)",
                     budget.key, got.status)
        budget.refused("over_caller_budget")
        marks[SHADOW_SKIPPED] = "over_caller_budget"
        return None

    def _charge(self, ticket: Ticket, answer: _Answer, status: str, error: str, call: Call, sent: bool,
                gone: bool) -> None:
        """Settle the copy on the caller's budgets as a served call is (Admission.settle): its usage; its worst case
        when unknown or when it was given up on once sent (the event says so, and the ledger books it: before, probe
        p60 F2, a copy timed out before its first byte was booked 0); nothing when it never went out."""
        admission = self.admission()
        if not sent:
            admission.release(ticket)
            return
        answer.status, answer.error_type = status, error
        admission.settle(ticket, answer, call.model, call, [(answer, call)] if gone else ())

    def _price(self, target: domain.Target, req: ApiRequest) -> ModelPrice | None:
        return self.prices.get(target.model or req.model)

    async def _reserve(self, budget: Budget, target: domain.Target, body: bytes, payload: bytes,
                       req: ApiRequest, marks: dict[str, str]) -> int | None:
        """Reserve the copy's worst case in the rollout's spend: the nano-USD reserved, or None (the copy is not
        made; `budget.refused` says why) when it does not fit `max_cost_usd`, the candidate's model has no price
        (the cap could not be kept) or the store does not answer. Over the cap or without the store's answer, the
        served event's `marks` say so (`maybe_mirror`), if it is not recorded yet: a store's answer comes long before
        a model's, as a rule."""
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
        g = self.admission().file
        need = worst_case(price, len(payload), req, _output(payload), CHAT.max_fields, g.default_max_tokens, g.bytes_per_token,
                          pointed_at(req, body, g.media_tokens, g.stored_input_tokens).tokens)[2].usd
        try:
            fits, spent = await self.spend.reserve(budget.key, need, cap)
        except KVUnavailable as exc:
            if not budget.skipped["cost_store_unavailable"]:
                log.warning("shadow of %s: no copies while its spend cannot be reserved: %s", budget.key, exc.message)
            budget.refused("cost_store_unavailable")
            marks[SHADOW_SKIPPED] = "cost_store_unavailable"
            return None
        budget.spent_usd = spent / shadowstats.NANO
        if not fits:
            budget.refused("over_max_cost")
            marks[SHADOW_SKIPPED] = "over_max_cost"
            return None
        return need

    async def _settle(self, budget: Budget, reserved: int, used: int) -> None:
        try:
            budget.spent_usd = await self.spend.settle(budget.key, reserved, used) / shadowstats.NANO
        except KVUnavailable as exc:  # the rollout's spend stays over-counted, never under
            log.warning("shadow spend %s not settled (the copy's worst case stays spent): %s", budget.key,
                        exc.message)


def _output(payload: bytes) -> OutputLimits:
    """The output limits of the body the candidate gets."""
    try:
        return _limits.decode(payload)
    except msgspec.DecodeError:
        return OutputLimits()


def _digested(attributes: dict[str, str], body: bytes, target: domain.Target) -> dict[str, str]:
    """The copy's attributes with the request's digest as the candidate served it: the candidate's recorded eval
    scores a copy as it would the candidate's own served call of the request (proxy.Proxy._record), and a body over
    MAX_KEYED_BYTES has none there either (its digest would hold the event loop for the body's size)."""
    digest = chat_digest(body, target.model, target.params) if len(body) <= MAX_KEYED_BYTES else None
    return {**attributes, REQUEST_DIGEST: digest} if digest is not None else dict(attributes)


def _acts_at_provider(req: ApiRequest) -> bool:
    """Whether the request has the provider act on its side (chat's `web_search_options`, a tool it runs:
    budgets.provider_runs), which a copy would repeat. Tools unreadable to the router count as such."""
    if bytes(req.web_search_options) not in (b"", b"null"):
        return True
    if not req.declares_tools():
        return False
    try:
        return provider_runs(msgspec.json.decode(bytes(req.tools)))
    except msgspec.DecodeError:
        return True


def _candidate_body(body: bytes, target: domain.Target, stream: bool) -> bytes:
    """The request as the candidate's release serves it, streamed as the client's was (with its usage, for the
    copy's cost), so that the candidate's answer is held to the bounds its served call would be; stored nowhere at the
    provider: no `store`, nor the client's `metadata` (which only a stored completion keeps). Before, probe p83 F2, a
    client's `store: true` had the provider store a second completion under the client's metadata."""
    data = top_level(body)
    as_released(data, target.model, target.params, CHAT)  # the client's service_tier neither (a dearer copy)
    data.pop("store", None)  # OpenAI's default: not stored
    data.pop("metadata", None)
    data["stream"] = stream
    data.pop("stream_options", None)
    if stream:
        data["stream_options"] = {"include_usage": True}
    return _encoder.encode(data)


async def _lines(content: aiohttp.StreamReader, bound: asyncio.Timeout, stall_s: float, deadline: float,
                 answer: _Answer) -> AsyncIterator[bytes]:
    """A streamed answer's lines, each within `stall_s` of the one before (the first within `bound` as set), all
    by `deadline` (the loop's time)."""
    loop = asyncio.get_running_loop()
    while line := await content.readline():
        answer.lines += 1
        bound.reschedule(min(loop.time() + stall_s, deadline))
        yield line


async def _read_stream(lines: AsyncIterator[bytes], answer: _Answer) -> None:
    """Fold a chat stream's events into `answer`, as the served call's (proxy): an error event, or a stream that
    ends with a choice unfinished, before its end marker or after it (probe p63 C), makes it an error."""
    async for line in lines:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            continue
        parse_chunk(data, answer)  # type: ignore[arg-type]  # duck-typed record
        if answer.status == "ok" and stream_error(data) is not None:
            answer.status, answer.error_type = "error", "upstream_stream_error"
    if answer.status == "ok" and not answer.out.finished():
        answer.status, answer.error_type = "error", TRUNCATED
