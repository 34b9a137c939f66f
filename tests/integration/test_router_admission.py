"""Budgets, rate limits and the response cache through the real router, nats-server and the `openai` client.

The routers pass ungoverned deployments through to the simulator (`passthrough=True`): these tests are about
admission by budget, rate and cache, not release governance."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import aiohttp
import msgspec
import openai
import pytest
import yaml
from aiohttp import web

from lockgate.bus import Bus
from lockgate.cli.budget import read_budgets
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import BudgetEvent, InferenceEvent
from lockgate.contracts.inference import REQUEST_DIGEST
from lockgate.credentials import NotAllowed
from lockgate.kvcas import RETRY_S
from lockgate.llmwire import ApiRequest
from lockgate.pricebook import load_price_book
from lockgate.server.apikeys import Bootstrap, KeyStore, bootstrap
from lockgate.server.natsserver import NatsServer
from lockgate.services.cost.domain import price_events
from lockgate.services.router.admission import Admission, Ticket
from lockgate.services.router.budgets import NANO, Amount, Counter, cost_of, input_estimate
from lockgate.services.router.cache import MAX_KEYED_BYTES
from lockgate.services.router.ratelimit import Level
from lockgate.store import Store
from lockgate.subjects import Subjects
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import ChatUpstream, Relay, Replicas, identity_buses, served_events

pytestmark = pytest.mark.timeout(120)

MODEL = "sim-good"  # priced in the shipped price book
ANSWER = "one two three four five six seven eight nine ten eleven twelve"
PRICE = load_price_book().models[MODEL]
MAX_TOKENS = 20
_events: Codec[list[InferenceEvent]] = Codec(list[InferenceEvent])
_budget_events: Codec[BudgetEvent] = Codec(BudgetEvent)


HI = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS}


def reservation(body: dict[str, Any] = HI) -> Amount:
    """What the router reserves for one request (by default `ask`'s `hi` with max_tokens 20): its input
    estimate, bounded by the body's bytes as the openai client sends it (compact JSON), + max_tokens."""
    raw = msgspec.json.encode(body)
    req = msgspec.json.decode(raw, type=ApiRequest)
    return cost_of(PRICE, input_estimate(len(raw), req, 1.0), req.max_tokens or req.max_output_tokens or 0)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig(models={MODEL: ModelSpec(default=ANSWER)})) as s:
        yield s


def gateway(tmp_path: Path, **policy: Any) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(policy))
    return str(path)


class Stack(Replicas):
    """Router replicas, each on its own NATS connection as separate processes would be."""

    async def add(self, settings: Settings, store: Store, name: str) -> Any:
        b = Bus(settings.nats_url, Subjects(settings.prefix), name=name)
        await b.connect()
        return await self.router(b, settings, store)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    s = Stack()
    yield s
    await s.close()


def client(router: Any, key: str) -> openai.AsyncOpenAI:
    # A thousand connections at once overflow the listen backlog: the kernel retries the SYNs
    # (1 s, 3 s, ...), longer than the client's default 5 s connect timeout on a busy machine.
    return openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0,
                              timeout=openai.Timeout(90.0, connect=60.0))


async def ask(c: openai.AsyncOpenAI, content: str = "hi", **extra: Any) -> Any:
    return await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                           max_tokens=MAX_TOKENS, **extra)


def spent(usages: list[Any]) -> int:
    """Nano-USD of the answered calls, priced as the router settles them."""
    return sum(cost_of(PRICE, u.prompt_tokens, u.completion_tokens).usd for u in usages)


async def counter(bus: Bus, key: str) -> Amount:
    kv = await bus.kv(bus.subjects.kv_budgets)
    return msgspec.json.decode((await kv.get(key)).value, type=Counter).leased


async def test_over_budget_is_a_429_naming_the_budget_and_settling_frees_the_unused_part(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    limit_usd = 0.0003
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat",
                         gateway_file=gateway(tmp_path, budgets={"acme-daily": {"tenant": "acme", "usd": limit_usd}}))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    router = await stack.add(s, store, "router-a")
    bus = router.ctx.bus
    events = await bus.nc.subscribe(bus.subjects.budget("acme"))
    c = client(router, keys.app_key)

    usages = []
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(50):
            usages.append((await ask(c)).usage)
    err = refused.value
    assert err.status_code == 429 and err.code == "budget_exceeded"
    message = err.body["message"]
    assert "budget acme-daily (0.0003 USD per day) has too little left for day 20" in message
    assert "It resets at" in message and int(err.response.headers["Retry-After"]) > 0

    # Each call reserved more than it used: had the reservations stayed spent, only limit // reservation
    # calls would have fitted. Settlement gave the unused part back, so more did, within the limit.
    limit = round(limit_usd * NANO)
    assert len(usages) > limit // reservation().usd
    assert spent(usages) <= limit
    # What this replica holds goes back to the counter: it then holds exactly what was spent.
    await router.admission.return_expired(force=True)
    assert (await counter(bus, f"acme-daily.{_today()}")).usd == spent(usages)
    # `lockgate budget list` reads the same counter.
    (row,) = await read_budgets(bus, router.admission.budgets, datetime.now(UTC))
    assert (row["budget"], row["selects"], row["usd_limit"], row["tokens_used"]) == ("acme-daily", "tenant=acme",
                                                                                    limit_usd, None)
    assert row["usd_used"] == round(spent(usages) / NANO, 6)

    event = _budget_events.decode((await events.next_msg(timeout=10)).data)
    assert (event.reason, event.budget, event.tenant, event.app, event.period) == (
        "over_budget", "acme-daily", "acme", "shop", "day")
    assert event.limit_usd == limit_usd and event.requested_usd == reservation().usd / NANO
    assert event.replica == "router-a" and event.model == MODEL
    await events.unsubscribe()


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


async def test_every_choice_is_reserved_so_n_cannot_spend_past_the_budget(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    one = reservation()  # n=1: the prompt estimate and max_tokens
    limit_usd = 3 * one.usd / NANO  # room for three such calls, never for one asking for ten choices
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat",
                         gateway_file=gateway(tmp_path, budgets={"acme-daily": {"tenant": "acme", "usd": limit_usd}}))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    c = client(await stack.add(s, store, "router-a"), keys.app_key)
    with pytest.raises(openai.RateLimitError) as refused:
        await ask(c, n=10)
    # More than the whole budget: told so, not to wait for the reset.
    assert refused.value.code == "request_too_large" and f"up to {10 * MAX_TOKENS} output tokens" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError, match=r"Expected `int` >= 1 - at `\$.max_tokens`") as bad:
        await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-10**6)
    assert bad.value.param == "max_tokens"  # OpenAI's `param` names the field (before, null)
    # A count too large for a provider (its cost once overflowed a float: a 500) is the client's mistake too.
    for field in ("max_tokens", "max_completion_tokens", "n"):
        with pytest.raises(openai.BadRequestError, match=rf"Expected `int` <= 2147483647 - at `\$.{field}`") as bad:
            await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            extra_body={field: int("9" * 400)})
        assert bad.value.param == field
    with pytest.raises(openai.BadRequestError) as bad:
        await c.chat.completions.create(model=MODEL, messages=[{"role": 5, "content": "hi"}])  # type: ignore[misc]
    assert bad.value.param == "messages[0].role"
    assert sim.total_requests == 0  # none reached the upstream
    assert (await ask(c)).usage.completion_tokens > 0  # one choice fits


async def test_1000_concurrent_requests_on_two_replicas_overshoot_at_most_one_reservation_each(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    limit_usd = 0.002  # room for roughly 80 of the 1,000 calls
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat",
                         gateway_file=gateway(tmp_path, budgets={"small": {"app": "shop", "usd": limit_usd}}))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    a = await stack.add(s, store, "router-a")
    b = await stack.add(s, store, "router-b")
    clients = [client(a, keys.app_key), client(b, keys.app_key)]

    async def one(i: int) -> Any:
        try:
            return (await ask(clients[i % 2])).usage
        except openai.RateLimitError as exc:
            return exc

    try:
        results = await asyncio.gather(*(one(i) for i in range(1000)))
    finally:
        for c in clients:
            await c.close()
    usages = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert usages and refused and len(usages) + len(refused) == 1000
    assert all(r.code == "budget_exceeded" and "budget small" in r.body["message"] for r in refused)
    limit = round(limit_usd * NANO)
    overshoot = spent(usages) - limit
    assert overshoot <= 2 * reservation().usd, (spent(usages), limit)
    # Both replicas took part, and once their allowances are back the counter holds exactly the spend.
    assert sim.requests[MODEL] == len(usages)
    for r in (a, b):
        await r.admission.return_expired(force=True)
    assert (await counter(a.ctx.bus, f"small.{_today()}")).usd == spent(usages)


async def test_steady_traffic_on_one_replica_holds_one_chunk_and_leaves_the_budget_to_the_others(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # Found by a probe (p38 F1). Under steady traffic an expired allowance that covered every request was topped up
    # by a whole chunk (lease_fraction of the limit) at each expiry, and the sweep never found it expired: one
    # replica's counter reached the limit while little was spent, and every other replica got 429 budget_exceeded.
    r = reservation()
    limit, fraction, lease_s = 60 * r.usd, 0.05, 60.0  # a chunk is 3 reservations
    chunk = math.ceil(limit * fraction)
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat",
                         gateway_file=gateway(tmp_path, budgets={"hoard": {"tenant": "acme", "usd": limit / NANO}},
                                              lease_fraction=fraction, lease_s=lease_s,
                                              cache={"deployments": {"chat": {"ttl_s": 10**6}}}))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    a = await stack.add(s, store, "router-a")
    b = await stack.add(s, store, "router-b")
    now = [0.0]  # replica A's clock: the test moves it half a lease at a time, as its sweep runs (Admission.run)
    a.admission.clock = lambda: now[0]
    ca, key = client(a, keys.app_key), f"hoard.{_today()}"
    # A burst first: 20 requests at once lease several chunks, which settle back into A's allowance.
    usages = [u.usage for u in await asyncio.gather(*(ask(ca, f"burst {i}") for i in range(20)))]
    usages.append((await ask(ca, temperature=0)).usage)  # the answer the cache hits below replay
    held = []
    for _ in range(2 * 24):  # 24 lease periods of steady traffic on A: one call and three cache hits a step
        now[0] += lease_s / 2
        usages.append((await ask(ca)).usage)
        for _ in range(3):
            hit = await ca.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0)
            assert hit.headers["x-lockgate-cache"] == "hit"
        await a.admission.return_expired()  # the sweep of this half lease
        held.append((await counter(a.ctx.bus, key)).usd - spent(usages))  # what A holds unreserved
    before = await read_budgets(a.ctx.bus, a.admission.budgets, datetime.now(UTC))
    answer = await ask(client(b, keys.app_key))  # before: 429 "more than the 0.000000 USD left"
    assert answer.choices[0].message.content == ANSWER
    # The counter stayed at the spend plus at most one chunk held by A, whatever the burst leased.
    assert max(held) <= chunk, (held, chunk)
    assert before[0]["usd_used"] <= round((spent(usages) + chunk) / NANO, 6) < limit / NANO
    for router in (a, b):
        await router.admission.return_expired(force=True)
    assert (await counter(a.ctx.bus, key)).usd == spent([*usages, answer.usage])


async def test_a_budget_whose_limit_changed_from_usd_to_tokens_still_admits(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # Before: the counter kept the day's USD spend while the edited budget no longer limited USD (its
    # limit there became 0), so every request was refused "0 of 100000 tokens spent" for the rest of the day.
    usd = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat",
                           gateway_file=gateway(tmp_path, budgets={"acme-daily": {"tenant": "acme", "usd": 1.0}}))
    keys = bootstrap(usd.home, tenant="acme", app="shop")
    before = await stack.add(usd, store, "router-a")
    await ask(client(before, keys.app_key))
    await before.admission.return_expired(force=True)
    assert (await counter(before.ctx.bus, f"acme-daily.{_today()}")).usd > 0
    (tmp_path / "edited").mkdir()
    tokens = usd.replace(gateway_file=gateway(tmp_path / "edited",
                                              budgets={"acme-daily": {"tenant": "acme", "tokens": 100_000}}))
    after = await stack.add(tokens, store, "router-b")  # the replica a rolling restart brings up with the edit
    assert (await ask(client(after, keys.app_key))).choices[0].message.content == ANSWER


async def test_budget_store_down_fails_closed(settings: Settings, store: Store, stack: Stack, sim: SimServer,
                                              tmp_path: Path) -> None:
    own = NatsServer(tmp_path / "own-nats")  # this test stops its bus, so not the session's server
    await own.start()
    try:
        s = settings.replace(nats_url=own.url, stable_upstream=sim.url, passthrough=True, deployment="chat",
                             gateway_file=gateway(tmp_path, budgets={"acme-daily": {"tenant": "acme", "usd": 1.0}}))
        keys = bootstrap(s.home, tenant="acme", app="shop")
        router = await stack.add(s, store, "router-a")
        c = client(router, keys.app_key)
        await asyncio.to_thread(own.stop)
        with pytest.raises(openai.InternalServerError) as down:
            await ask(c)
        assert down.value.status_code == 503 and down.value.code == "budget_store_unavailable"
        assert "budget acme-daily (1 USD per day) cannot be checked" in down.value.body["message"]
        assert "fail closed" in down.value.body["message"]
        assert sim.requests == {}  # nothing reached the upstream
    finally:
        await own.start()  # back on its port, so the router stops cleanly
        await stack.close()
        own.stop()


async def test_budget_store_down_can_fail_open(settings: Settings, store: Store, stack: Stack, sim: SimServer,
                                               tmp_path: Path) -> None:
    own = NatsServer(tmp_path / "own-nats")
    await own.start()
    try:
        s = settings.replace(nats_url=own.url, stable_upstream=sim.url, passthrough=True, deployment="chat",
                             gateway_file=gateway(tmp_path, fail_open=True,
                                                  budgets={"acme-daily": {"tenant": "acme", "usd": 1.0}}))
        keys = bootstrap(s.home, tenant="acme", app="shop")
        router = await stack.add(s, store, "router-a")
        await asyncio.to_thread(own.stop)
        answer = await ask(client(router, keys.app_key))
        assert answer.choices[0].message.content == ANSWER
    finally:
        await own.start()
        await stack.close()
        own.stop()


async def test_rate_limit_429_after_n_requests_per_minute(settings: Settings, store: Store, stack: Stack,
                                                          sim: SimServer, tmp_path: Path) -> None:
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat",
                         gateway_file=gateway(tmp_path, rate_limits=[{"tenant": "acme", "rpm": 3}]))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    router = await stack.add(s, store, "router-a")
    now = [1000.0]
    router.admission.clock = lambda: now[0]  # the minute passes when the test says so
    c = client(router, keys.app_key)
    # Each answer reports the key's own limit as OpenAI reports its, for a client that paces itself on it (before,
    # none: the upstream's, or nothing, while the router's limit was the one that bound).
    for left in (2, 1, 0):
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                                max_tokens=MAX_TOKENS)
        assert (raw.headers["x-ratelimit-limit-requests"], raw.headers["x-ratelimit-remaining-requests"],
                raw.headers["x-ratelimit-reset-requests"]) == ("3", str(left), f"{(3 - left) * 20}s".replace("60s", "1m0s"))
    with pytest.raises(openai.RateLimitError) as limited:
        await ask(c)
    assert limited.value.code == "rate_limit_exceeded"
    assert "3 requests per minute" in limited.value.body["message"]
    headers = limited.value.response.headers
    assert headers["Retry-After"] == "20"
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"],
            headers["x-ratelimit-reset-requests"]) == ("3", "0", "1m0s")
    assert headers["x-request-id"].startswith("req_") and limited.value.request_id == headers["x-request-id"]
    # Another key of the same tenant has its own bucket.
    other, _ = KeyStore(s.home).create("acme", "shop")
    await ask(client(router, other))
    now[0] += 20.0  # one request's worth refilled
    await ask(c)
    with pytest.raises(openai.RateLimitError):
        await ask(c)
    assert sim.requests[MODEL] == 5


async def test_a_shared_rate_limit_admits_n_across_two_replicas(settings: Settings, store: Store, stack: Stack,
                                                                 sim: SimServer, tmp_path: Path) -> None:
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat",
                         gateway_file=gateway(tmp_path, rate_limits=[{"tenant": "acme", "rpm": 10, "shared": True}]))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    a = await stack.add(s, store, "router-a")
    b = await stack.add(s, store, "router-b")
    for r in (a, b):
        r.admission.wall_s = lambda: 1000.0  # the shared bucket refills on the wall clock: not during this test
    clients = [client(a, keys.app_key), client(b, keys.app_key)]

    async def one(i: int) -> Any:
        try:
            return (await ask(clients[i % 2])).usage
        except openai.RateLimitError as exc:
            return exc

    try:
        results = await asyncio.gather(*(one(i) for i in range(40)))
    finally:
        for c in clients:
            await c.close()
    refused = [r for r in results if isinstance(r, Exception)]
    # One bucket for both replicas: 10 per minute in all, not 10 on each (20 with per-replica buckets).
    assert len(results) - len(refused) == 10 == sim.requests[MODEL]
    assert all(r.code == "rate_limit_exceeded" and "10 requests per minute" in r.body["message"] for r in refused)
    # Both asked the KV bucket (neither fell back to its own); which replica leased how much is a race.
    assert all(r.admission.limiter.local_until == -math.inf for r in (a, b))
    assert any(r.admission.limiter.shares for r in (a, b))


class _HeldUpstream(ChatUpstream):
    """An upstream that holds every request until the test releases those it holds: requests in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = 0
        self._arrival = asyncio.Condition()
        self._release = asyncio.Event()

    async def chat(self, request: web.Request) -> web.Response:
        await request.read()
        release = self._release
        async with self._arrival:
            self.arrived += 1
            self._arrival.notify_all()
        await release.wait()
        return web.Response(body=_COMPLETION, content_type="application/json")  # 13 tokens used

    async def reached(self, n: int) -> None:
        """Wait until `n` requests in all arrived."""
        async with self._arrival:
            await self._arrival.wait_for(lambda: self.arrived >= n)

    def release_held(self) -> None:
        self._release.set()
        self._release = asyncio.Event()

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        await super().__aexit__(*exc)


async def test_a_shared_tpm_limit_never_admits_a_settled_refund_on_top_of_its_refilled_bucket(
        settings: Settings, store: Store, stack: Stack, tmp_path: Path) -> None:
    # Found by a probe (p45 F1). Under `tpm: 2000, shared: true` a request of 1,990 tokens held past its share's
    # lease settled its 1,977 unused tokens into a new, expired share here, uncapped, while the KV bucket refilled;
    # the next lease was added to them and made them live: 3 requests of 1,013 tokens admitted at once (an unshared
    # bucket admits 1), then 4 the next round.
    def body(max_tokens: int) -> dict[str, Any]:
        return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}

    big, small = body(1897), body(921)
    assert (reservation(big).tokens, reservation(small).tokens) == (1990, 1013)
    async with _HeldUpstream() as upstream:
        s = settings.replace(stable_upstream=upstream.url, passthrough=True, deployment="chat", gateway_file=gateway(
            tmp_path, rate_limits=[{"tenant": "acme", "tpm": 2000, "shared": True}], lease_s=300))
        keys = bootstrap(s.home, tenant="acme", app="shop")
        router = await stack.add(s, store, "router-a")
        now = [1000.0]  # the lease expires and the KV bucket refills when the test moves this (the sweep: not before)
        router.admission.clock = router.admission.wall_s = lambda: now[0]
        c = client(router, keys.app_key)
        held = [asyncio.create_task(c.chat.completions.create(**big))]
        await upstream.reached(1)
        admitted = []
        for _ in range(2):
            now[0] += 301.0  # past the share's lease, the KV bucket full again: then the held requests settle
            upstream.release_held()
            assert all(a.usage.total_tokens == 13 for a in await asyncio.gather(*held))
            held = []
            for _ in range(4):  # each admitted one is held at the upstream; a refused one is answered 429
                arrival = asyncio.create_task(upstream.reached(upstream.arrived + 1))
                request = asyncio.create_task(c.chat.completions.create(**small))
                await asyncio.wait((arrival, request), return_when=asyncio.FIRST_COMPLETED)
                if request.done():
                    arrival.cancel()
                    with pytest.raises(openai.RateLimitError) as refused:
                        await request
                    assert "2000 tokens per minute" in refused.value.body["message"]
                else:
                    held.append(request)
            admitted.append(len(held))
        upstream.release_held()
        await asyncio.gather(*held)
    assert admitted == [1, 1]  # before: [3, 4]


async def test_a_shared_rate_limit_falls_back_to_the_replicas_bucket_while_the_store_is_down(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    own = NatsServer(tmp_path / "own-nats")  # this test stops its bus, so not the session's server
    await own.start()
    try:
        s = settings.replace(nats_url=own.url, stable_upstream=sim.url, passthrough=True, deployment="chat",
                             gateway_file=gateway(tmp_path, rate_limits=[{"tenant": "acme", "rpm": 2, "shared": True}]))
        keys = bootstrap(s.home, tenant="acme", app="shop")
        router = await stack.add(s, store, "router-a")
        router.admission.clock = lambda: 1000.0  # nothing refills during the test
        c = client(router, keys.app_key)
        await asyncio.to_thread(own.stop)
        # Still limited, by this replica's own bucket: 2 answered, the third refused.
        assert [(await ask(c)).choices[0].message.content for _ in range(2)] == [ANSWER, ANSWER]
        with pytest.raises(openai.RateLimitError) as limited:
            await ask(c)
        assert limited.value.code == "rate_limit_exceeded" and sim.requests[MODEL] == 2
    finally:
        await own.start()  # back on its port, so the router stops cleanly
        await stack.close()
        own.stop()


async def test_cache_hit_miss_ttl_and_temperature(settings: Settings, store: Store, stack: Stack, sim: SimServer,
                                                  tmp_path: Path) -> None:
    router, keys, sub = await _caching(settings, store, stack, sim, tmp_path, "faq", 60)
    now = [0.0]
    router.admission.clock = lambda: now[0]
    c = client(router, keys.app_key)

    first = await c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0, user="a")
    assert first.headers["x-lockgate-cache"] == "miss"
    # The same request from another user, keys in another order: served from the cache, byte for byte.
    second = await c.chat.completions.with_raw_response.create(
        temperature=0, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": "hi"}], model=MODEL, user="b")
    assert second.headers["x-lockgate-cache"] == "hit"
    assert second.content == first.content and sim.requests[MODEL] == 1
    # A hit has a request id of its own, as every answer has (before: none, and the SDK's request_id was None).
    assert second.headers["x-request-id"].startswith("req_lockgate_")
    assert second.headers["x-request-id"] != first.headers.get("x-request-id")

    events = []
    while len(events) < 2:
        events += _events.decode((await sub.next_msg(timeout=10)).data)
    miss, hit = events
    assert miss.attributes == {"cache": "miss", "lockgate.endpoint": "default", REQUEST_DIGEST: ANY}
    assert miss.output_tokens > 0
    saved = cost_of(PRICE, miss.input_tokens, miss.output_tokens).usd / NANO
    assert hit.attributes == {"cache": "hit", "cost_saved": f"{saved:.9f}", REQUEST_DIGEST: miss.attributes[REQUEST_DIGEST]}
    assert (hit.input_tokens, hit.output_tokens, hit.response) == (0, 0, ANSWER)  # nothing generated, nothing billed
    await sub.unsubscribe()  # the events of the requests below are not read: do not leave them to the drain

    # Sampled requests are not cached (absent temperature means the provider's 1), nor different ones.
    for extra in ({"temperature": 0.7}, {}, {"temperature": 0, "max_tokens": 5}):
        body = {"max_tokens": MAX_TOKENS, **extra}
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], **body)
        assert raw.headers.get("x-lockgate-cache") in (None, "miss")
    assert sim.requests[MODEL] == 4

    now[0] = 60.0  # the TTL has passed: a miss, answered by the upstream again
    third = await c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0)
    assert third.headers["x-lockgate-cache"] == "miss" and sim.requests[MODEL] == 5


async def test_a_request_whose_headers_may_change_its_answer_is_neither_cached_nor_digested(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # Probe p18 F3: the router forwards `OpenAI-Beta` (beta features) and `Idempotency-Key` (a provider replays the
    # first answer given under a key), which may change the answer; neither was in the cache key nor in the request
    # digest a recorded eval matches, so one body could be answered from another's cache entry or stand for another
    # answer than its digest says.
    router, keys, sub = await _caching(settings, store, stack, sim, tmp_path, "faq", 60)
    c = client(router, keys.app_key)
    for header in ({"Idempotency-Key": "k-1"}, {"OpenAI-Beta": "assistants=v2"}):
        for _ in range(2):
            raw = await c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0,
                extra_headers=header)
            assert "x-lockgate-cache" not in raw.headers, header
    assert sim.requests[MODEL] == 4  # each one answered by the upstream
    events = []
    while len(events) < 4:
        events += _events.decode((await sub.next_msg(timeout=10)).data)
    assert [REQUEST_DIGEST in e.attributes or "cache" in e.attributes for e in events] == [False] * 4
    await sub.unsubscribe()


async def test_under_auth_the_router_leases_and_reports_but_an_app_cannot_touch_the_counters(
        tmp_path: Path, unique: str) -> None:
    async with identity_buses(tmp_path, unique) as (settings, buses):
        one = reservation().tokens
        s = settings.replace(gateway_file=gateway(tmp_path, budgets={"tiny": {"tokens": one + 10}}))
        adm = Admission(s, buses["router"], replica="router-a")
        key = KeyStore(s.home).create("acme", "shop")[1]
        body = msgspec.json.encode(HI)
        req = msgspec.json.decode(body, type=ApiRequest)  # as the router decodes every request
        events = await buses["admin"].nc.subscribe(buses["admin"].subjects.budget("acme"))
        adm.events.start()
        ticket = await adm.admit(key, "chat", MODEL, req, len(body))  # leases from the counter as the router identity
        assert isinstance(ticket, Ticket) and ticket.charges
        refused = await adm.admit(key, "chat", MODEL, req, len(body))  # one reserved, 10 tokens left: no room
        assert refused.status == 429
        await adm.events.flush()
        assert _budget_events.decode((await events.next_msg(timeout=10)).data).budget == "tiny"
        await events.unsubscribe()
        app = buses["app"]
        with pytest.raises(NotAllowed):  # an application cannot forge or reset a budget counter
            await app.publish(f"$KV.{app.subjects.kv_budgets}.tiny.{_today()}", b'{"leased":[0,0]}', msg_id="x")
        with pytest.raises(NotAllowed):  # nor a budget event
            await app.publish(app.subjects.budget("acme"), b"{}", msg_id="y")
        assert (await counter(buses["admin"], f"tiny.{_today()}")).tokens > 0


async def test_a_shared_cache_answers_on_the_other_replica(settings: Settings, store: Store, stack: Stack,
                                                           sim: SimServer, tmp_path: Path) -> None:
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="faq", app="shop",
                         gateway_file=gateway(tmp_path, cache={"deployments": {"faq": {"ttl_s": 60, "shared": True}}}))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    a = await stack.add(s, store, "router-a")
    b = await stack.add(s, store, "router-b")
    first = await client(a, keys.app_key).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0)
    assert first.headers["x-lockgate-cache"] == "miss"
    await a.admission.shared()  # the entry is in the bucket (shared off the request path)
    second = await client(b, keys.app_key).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0)
    assert second.headers["x-lockgate-cache"] == "hit" and second.content == first.content
    assert sim.requests[MODEL] == 1


async def test_a_cached_answer_is_shared_within_one_app_never_with_another_app_of_the_tenant(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # Before (probe p5): the key had the tenant, not the app, so an app key of another app of the tenant sending the
    # same body got `x-lockgate-cache: hit` and the answer: an oracle of what the first app's users asked.
    router, keys, sub = await _caching(settings, store, stack, sim, tmp_path, "faq", 60)
    await sub.unsubscribe()
    store_keys = KeyStore(settings.home)
    shop_again, other = store_keys.create("acme", "shop")[0], store_keys.create("acme", "other")[0]

    async def ask_as(key: str, user: str) -> str:
        raw = await client(router, key).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "my diagnosis is"}], max_tokens=MAX_TOKENS,
            temperature=0, user=user)
        return raw.headers["x-lockgate-cache"]

    assert await ask_as(keys.app_key, "alice") == "miss"
    assert await ask_as(shop_again, "bob") == "hit"  # another key and user of the same app: shared
    assert await ask_as(other, "mallory") == "miss"  # another app of the tenant: its own entry, from the upstream
    assert await ask_as(other, "mallory") == "hit"
    assert sim.requests[MODEL] == 2


async def _caching(settings: Settings, store: Store, stack: Stack, sim: SimServer | ChatUpstream, tmp_path: Path,
                   deployment: str, ttl_s: float) -> tuple[Any, Any, Any]:
    """A router caching `deployment`'s answers for `ttl_s`, an app key of acme/shop, and a subscription to the
    events it serves them."""
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment=deployment, app="shop",
                         gateway_file=gateway(tmp_path, cache={"deployments": {deployment: {"ttl_s": ttl_s}}}))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    router = await stack.add(s, store, "router-a")
    return router, keys, await router.ctx.bus.nc.subscribe(router.ctx.bus.subjects.served("shop", "acme"))


async def test_a_streamed_answer_is_cached_and_replayed_as_sse(settings: Settings, store: Store, stack: Stack,
                                                               sim: SimServer, tmp_path: Path) -> None:
    router, keys, sub = await _caching(settings, store, stack, sim, tmp_path, "faq", 60)
    c = client(router, keys.app_key)

    async def stream(**extra: Any) -> tuple[str, list[Any], Any]:
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0,
            stream=True, **extra)
        chunks = [chunk async for chunk in raw.parse()]
        return raw.headers.get("x-lockgate-cache"), chunks, raw.headers

    first_cache, first, _ = await stream()
    second_cache, second, headers = await stream()
    assert (first_cache, second_cache) == ("miss", "hit") and sim.requests[MODEL] == 1
    assert headers["content-type"].startswith("text/event-stream")
    # The same chunks in the same order, the text streamed piece by piece, no usage chunk (none asked for).
    assert [ch.model_dump() for ch in second] == [ch.model_dump() for ch in first] and len(second) > 2
    assert "".join(ch.choices[0].delta.content or "" for ch in second if ch.choices) == ANSWER
    assert all(ch.usage is None for ch in second)
    # Asking for the usage chunk is another entry (its bytes differ): the upstream answers it.
    third_cache, third, _ = await stream(stream_options={"include_usage": True})
    assert third_cache == "miss" and third[-1].usage is not None and sim.requests[MODEL] == 2
    # An unstreamed request is not answered from a stream's entry.
    plain = await c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0)
    assert plain.headers["x-lockgate-cache"] == "miss" and plain.parse().choices[0].message.content == ANSWER

    events = []
    while len(events) < 2:
        events += _events.decode((await sub.next_msg(timeout=10)).data)
    miss, hit = events[:2]
    assert miss.attributes["cache"] == "miss" and miss.output_tokens > 0
    assert (hit.attributes["cache"], hit.response, hit.output_tokens) == ("hit", ANSWER, 0)
    await sub.unsubscribe()


@pytest.mark.parametrize("stream", [False, True], ids=["once", "stream"])
async def test_a_cache_hits_event_records_every_choice_and_tool_call_as_the_miss_did(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path, stream: bool) -> None:
    # Found by a probe: a hit served both choices and both tool calls, while its event held choice 0's text alone
    # (an empty `response`, no gen_ai.output.messages): what the client got was missing from the record.
    router, keys, sub = await _caching(settings, store, stack, sim, tmp_path, "faq", 60)
    c = client(router, keys.app_key)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    for expected in ("miss", "hit"):
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "cache tools q"}], max_tokens=MAX_TOKENS,
            temperature=0, n=2, tools=tools, stream=stream)  # type: ignore[arg-type]
        if stream:
            [chunk async for chunk in raw.parse()]
        assert raw.headers["x-lockgate-cache"] == expected
    events: list[InferenceEvent] = []
    while len(events) < 2:
        events += _events.decode((await sub.next_msg(timeout=10)).data)
    miss, hit = events
    await sub.unsubscribe()
    output = "gen_ai.output.messages"
    assert output in miss.attributes and len(msgspec.json.decode(miss.attributes[output])) == 2
    assert (hit.attributes["cache"], hit.attributes.get(output), hit.response, hit.finish_reason) == (
        "hit", miss.attributes[output], miss.response, miss.finish_reason)
    assert (hit.input_tokens, hit.output_tokens, hit.response_model) == (0, 0, miss.response_model)


async def test_one_body_sent_to_two_operations_is_two_entries(settings: Settings, store: Store, stack: Stack,
                                                               sim: SimServer, tmp_path: Path) -> None:
    # Before: the key had no operation, so this body sent to /v1/responses after /v1/embeddings came back
    # `x-lockgate-cache: hit` with the embeddings list, and the hit's event recorded it as the turn's answer:
    # any key of the tenant could plant another operation's answers for the TTL.
    router, keys, sub = await _caching(settings, store, stack, sim, tmp_path, "shop-web", 600)
    body = {"model": MODEL, "input": "what is the refund policy?", "temperature": 0}

    async def post(path: str, **extra: Any) -> tuple[str, str, bytes]:
        async with http.post(f"{router.url}/v1/{path}", json={**body, **extra}) as resp:
            assert resp.status == 200
            return resp.headers["x-lockgate-cache"], resp.content_type, await resp.read()

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http:
        embedded = await post("embeddings")
        answered = await post("responses")
        streamed = await post("responses", stream=True)  # nor a stream from the unstreamed turn's entry
        again = [await post("responses", stream=False), await post("embeddings")]  # each from its own entry
    assert (embedded[0], answered[0], streamed[0]) == ("miss", "miss", "miss") and sim.requests[MODEL] == 3
    assert msgspec.json.decode(embedded[2])["object"] == "list"
    turn = msgspec.json.decode(answered[2])
    assert turn["object"] == "response" and turn["output"][0]["content"][0]["text"] == ANSWER
    assert streamed[1] == "text/event-stream" and b"response.output_text.delta" in streamed[2]
    assert again == [("hit", "application/json", answered[2]), ("hit", "application/json", embedded[2])]

    events = []
    while len(events) < 5:
        events += _events.decode((await sub.next_msg(timeout=10)).data)
    await sub.unsubscribe()
    turns = [e for e in events if e.attributes.get("lockgate.api") == "responses"]
    assert [(e.attributes["cache"], e.response) for e in turns] == [("miss", ANSWER)] * 2 + [("hit", ANSWER)]


async def test_embeddings_are_cached_on_a_deployment_that_opted_in(settings: Settings, store: Store, stack: Stack,
                                                                   sim: SimServer, tmp_path: Path) -> None:
    # Before (probe p17): an embeddings request has no temperature, which counted as the provider's 1 (sampled), so
    # embeddings were never cached (no `x-lockgate-cache` at all) unless the deployment cached sampled chat too.
    router, keys, sub = await _caching(settings, store, stack, sim, tmp_path, "faq", 60)
    await sub.unsubscribe()
    c = client(router, keys.app_key)
    answers = [await c.embeddings.with_raw_response.create(model=MODEL, input="what is the refund policy?")
               for _ in range(2)]
    assert [a.headers.get("x-lockgate-cache") for a in answers] == ["miss", "hit"] and sim.requests[MODEL] == 1
    assert answers[1].content == answers[0].content
    assert answers[1].parse().data[0].embedding == answers[0].parse().data[0].embedding
    # A chat turn without a temperature still samples: not cached.
    chat = [await c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "what is the refund policy?"}], max_tokens=MAX_TOKENS)
        for _ in range(2)]
    assert [a.headers.get("x-lockgate-cache") for a in chat] == [None, None] and sim.requests[MODEL] == 3


async def test_a_responses_turn_of_a_conversation_is_never_answered_from_the_cache(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # Before (probe p38 F2): the second identical turn of a `conversation` was a hit, with the first answer's
    # response id and usage: the upstream never saw the turn, so the conversation lacked it from then on.
    router, keys, sub = await _caching(settings, store, stack, sim, tmp_path, "faq", 60)
    await sub.unsubscribe()
    c = client(router, keys.app_key)
    turns = [await c.responses.with_raw_response.create(model=MODEL, input="and then?", temperature=0,
                                                        conversation="conv_1", max_output_tokens=MAX_TOKENS)
             for _ in range(2)]
    assert [t.headers.get("x-lockgate-cache") for t in turns] == [None, None] and sim.requests[MODEL] == 2
    # Without one, the same turn is cached as ever.
    plain = [await c.responses.with_raw_response.create(model=MODEL, input="and then?", temperature=0,
                                                        max_output_tokens=MAX_TOKENS) for _ in range(2)]
    assert [t.headers.get("x-lockgate-cache") for t in plain] == ["miss", "hit"] and sim.requests[MODEL] == 3


async def test_a_cached_responses_answer_never_echoes_another_callers_user_or_metadata(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # Before (probe p76 F1): `user` and `metadata` were in no key, but a Response object echoes both: bob's request
    # was a hit whose body said `"user": "alice@example.com"` and carried alice's metadata.
    router, keys, sub = await _caching(settings, store, stack, sim, tmp_path, "faq", 60)
    await sub.unsubscribe()
    c = client(router, keys.app_key)

    async def ask_as(who: str, stream: bool = False) -> tuple[str | None, str | None, dict[str, str] | None]:
        raw = await c.responses.with_raw_response.create(
            model=MODEL, input="what is my balance?", temperature=0, max_output_tokens=MAX_TOKENS, user=who,
            metadata={"customer_email": who}, stream=stream)
        answer = raw.parse()
        if stream:  # the Response object of its `response.completed` event
            answer = [e async for e in answer if e.type == "response.completed"][0].response
        return raw.headers.get("x-lockgate-cache"), answer.user, answer.metadata

    for stream in (False, True):
        assert await ask_as("alice@example.com", stream) == (
            "miss", "alice@example.com", {"customer_email": "alice@example.com"})
        assert await ask_as("bob@example.com", stream) == (
            "miss", "bob@example.com", {"customer_email": "bob@example.com"})
        # The same caller again is a hit, with its own fields.
        assert await ask_as("alice@example.com", stream) == (
            "hit", "alice@example.com", {"customer_email": "alice@example.com"})
    assert sim.requests[MODEL] == 4


async def test_a_responses_request_with_tools_the_provider_runs_is_never_answered_from_the_cache(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # Before (probe p76 F2): cached at temperature 0, so the second request never reached the provider: no code ran in
    # the container, no ticket was opened on the MCP server, a changed vector store or web page was never read.
    router, keys, sub = await _caching(settings, store, stack, sim, tmp_path, "faq", 60)
    await sub.unsubscribe()
    c = client(router, keys.app_key)
    hosted: list[dict[str, Any]] = [
        {"type": "code_interpreter", "container": "cntr_abc"},
        {"type": "mcp", "server_label": "tickets", "server_url": "https://mcp.example/sse",
         "require_approval": "never"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "web_search_preview"},
        {"type": "image_generation"},
    ]
    calls = 0
    for tool in hosted:
        seen = [(await c.responses.with_raw_response.create(
            model=MODEL, input="append a row to data.csv", temperature=0, max_output_tokens=MAX_TOKENS,
            tools=[tool])).headers.get("x-lockgate-cache") for _ in range(2)]
        calls += 2
        assert (tool["type"], seen, sim.requests[MODEL]) == (tool["type"], [None, None], calls)
    # Chat's own web search reads the live web too.
    for _ in range(2):
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "news?"}], max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"web_search_options": {}})
        assert raw.headers.get("x-lockgate-cache") is None
    assert sim.requests[MODEL] == calls + 2
    # A function the application runs itself (its results come back in the next body) is cached as ever.
    function = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    seen = [(await c.responses.with_raw_response.create(
        model=MODEL, input="look it up", temperature=0, max_output_tokens=MAX_TOKENS,
        tools=[function])).headers.get("x-lockgate-cache") for _ in range(2)]
    assert seen == ["miss", "hit"] and sim.requests[MODEL] == calls + 3


class _Answering(ChatUpstream):
    """An upstream answering every chat request as `model`, with the usage `usage`."""

    def __init__(self, model: str, usage: dict[str, int]) -> None:
        super().__init__()
        self.model, self.usage = model, usage
        self.calls = 0

    async def chat(self, request: web.Request) -> web.Response:
        self.calls += 1
        return web.json_response({
            "id": f"chatcmpl-{self.calls}", "object": "chat.completion", "created": 1, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": self.usage})


@pytest.mark.parametrize(("answered", "usage"), [
    # OpenAI answers with the model's dated version: the price book prices it as the model asked for.
    (MODEL + "-2024-08-06", {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}),
    # Usage the router does not believe (10^8 input tokens for "hi"): the call was charged its worst case.
    (MODEL, {"prompt_tokens": 99_999_999, "completion_tokens": 5, "total_tokens": 100_000_004}),
], ids=["dated-model", "unbelieved-usage"])
async def test_a_cache_hit_saves_what_the_ledger_booked_for_its_miss(
        settings: Settings, store: Store, stack: Stack, tmp_path: Path, answered: str, usage: dict[str, int]) -> None:
    # Before (probe p76 F3): the hit priced the stored answer's raw counts at the answering model's name: a dated
    # model saved 0, and the 10^8 tokens an upstream claimed for "hi" (charged ~111 tokens) saved 50 USD.
    async with _Answering(answered, usage) as up:
        router, keys, sub = await _caching(settings, store, stack, up, tmp_path, "faq", 60)
        c = client(router, keys.app_key)
        for want in ("miss", "hit"):
            raw = await c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0)
            assert raw.headers["x-lockgate-cache"] == want
        miss, hit = await served_events(sub, 2)
        booked = price_events([miss], load_price_book()).entries[0]
        assert booked.priced and booked.cost_usd > 0
        assert hit.attributes["cache"] == "hit" and up.calls == 1
        assert float(hit.attributes["cost_saved"]) == pytest.approx(booked.cost_usd, abs=1e-9)


class _HoldingUpstream(ChatUpstream):
    """An upstream that takes bodies up to 8 MiB and holds a large one until `release` is set: a large request is
    still being forwarded while the test sends others."""

    client_max_size = 8 * 1024 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.release = asyncio.Event()
        self._large = asyncio.Condition()

    async def large_arrived(self) -> None:
        """Wait until a large request reached the upstream."""
        async with self._large:
            await self._large.wait_for(lambda: any(n > MAX_KEYED_BYTES for n in self.sizes))

    async def chat(self, request: web.Request) -> web.Response:
        size = len(await request.read())
        async with self._large:
            self.sizes.append(size)
            self._large.notify_all()
        if size > MAX_KEYED_BYTES:
            await self.release.wait()
        return web.Response(body=_COMPLETION, content_type="application/json")

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await super().__aexit__(*exc)


_COMPLETION = msgspec.json.encode({
    "id": "c1", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 12, "total_tokens": 13}})


async def test_a_body_too_large_to_key_is_served_uncached_while_small_ones_are_cached(
        settings: Settings, store: Store, stack: Stack, tmp_path: Path) -> None:
    # Before (probe p17): the cache key of any body was made on the event loop by decoding it whole and encoding it
    # back sorted: a 31 MB body of small objects (the router takes 32 MB) held every request of the replica, every
    # tenant's, 4-6 s before its upstream call. Now a body over MAX_KEYED_BYTES is not looked up, nor kept.
    async with _HoldingUpstream() as upstream:
        s = settings.replace(stable_upstream=upstream.url, passthrough=True, deployment="faq", app="shop",
                             gateway_file=gateway(tmp_path, cache={"deployments": {"faq": {"ttl_s": 60}}}))
        keys = bootstrap(s.home, tenant="acme", app="shop")
        router = await stack.add(s, store, "router-a")
        c = client(router, keys.app_key)
        pad = [{"a": 1}] * (MAX_KEYED_BYTES // 7 + 1)  # `{"a":1},` each: just over the bound

        def large() -> Any:
            return c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0,
                extra_body={"x_pad": pad})

        held = asyncio.create_task(large())
        await upstream.large_arrived()
        # While the large request is being forwarded, small ones of the same deployment are answered, and cached.
        small = [(await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS, temperature=0))
            .headers.get("x-lockgate-cache") for _ in range(2)]
        assert small == ["miss", "hit"] and not held.done()
        upstream.release.set()
        answers = [await held, await large()]
    # Served, not looked up (no `x-lockgate-cache`), so not kept: the same large body again reached the upstream.
    assert [a.parse().choices[0].message.content for a in answers] == [ANSWER] * 2
    assert [a.headers.get("x-lockgate-cache") for a in answers] == [None, None]
    assert sum(n > MAX_KEYED_BYTES for n in upstream.sizes) == 2 and len(upstream.sizes) == 3


async def test_a_token_budget_per_key_stops_one_key_not_the_others(settings: Settings, store: Store, stack: Stack,
                                                                   sim: SimServer, tmp_path: Path) -> None:
    # 200 tokens a day for each key: a `hi` with max_tokens 20 reserves its body's bytes + 31 and uses 18.
    assert reservation().tokens < 150
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat", gateway_file=gateway(
        tmp_path, budgets={"per-key": {"tenant": "acme", "per": "key", "tokens": 200}}))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    router = await stack.add(s, store, "router-a")
    c = client(router, keys.app_key)
    used = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(10):
            u = (await ask(c)).usage
            used += u.prompt_tokens + u.completion_tokens
    assert used <= 200 and "budget per-key (200 tokens per day)" in refused.value.body["message"]
    other, _ = KeyStore(s.home).create("acme", "shop")
    assert (await ask(client(router, other))).choices[0].message.content == ANSWER


WORDS = "word " * 50_000  # 250 KB: 65,000 tokens as the simulator counts them (1.3 a word)


async def _acme_router(settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path,
                       **policy: Any) -> tuple[Any, Bootstrap]:
    """A router passing `shop-web` through to the simulator under this gateway file's `policy`, and tenant acme's
    keys."""
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="shop-web",
                         gateway_file=gateway(tmp_path, **policy))
    return await stack.add(s, store, "router-a"), bootstrap(s.home, tenant="acme", app="shop")


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    # Compact JSON, as reservation() measures it (aiohttp's `json=` adds spaces)
    async with http.post(url, data=msgspec.json.encode(body), headers={"x-lockgate-deployment": "shop-web",
                                                                       "Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(("policy", "code"), [  # larger than the whole limit: no wait admits it
    ({"budgets": {"day-tokens": {"tenant": "acme", "period": "day", "tokens": 20000}}}, "request_too_large"),
    ({"rate_limits": [{"tenant": "acme", "rpm": 1000, "tpm": 30000}]}, "request_too_large"),
], ids=["budget", "tpm"])
async def test_responses_instructions_are_reserved_so_one_request_cannot_overshoot_a_limit(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path, policy: dict[str, Any],
        code: str) -> None:
    # Before: the input estimate counted messages, `prompt` and `input` only, so this turn reserved about 20
    # tokens, was answered (65,007 tokens used) and left the budget at 65013 / 20000, the TPM bucket 35k below 0.
    router, keys = await _acme_router(settings, store, stack, sim, tmp_path, **policy)
    url = f"{router.url}/v1/responses"
    probe = {"model": MODEL, "instructions": WORDS, "input": "hi", "max_output_tokens": 5}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http:
        status, refused = await _post(http, url, probe)
        assert status == 429 and refused["error"]["code"] == code, (status, sim.total_requests)
        assert f"up to {reservation(probe).tokens}" in refused["error"]["message"]
        assert reservation(probe).tokens > len(WORDS)
        assert sim.total_requests == 0  # refused before any upstream call
        # An ordinary turn still fits, and settles on what it used.
        status, answered = await _post(http, url, {"model": MODEL, "input": "hi", "max_output_tokens": 5})
    assert status == 200 and sim.requests == {MODEL: 1}
    used = answered["usage"]["input_tokens"] + answered["usage"]["output_tokens"]
    if "budgets" in policy:
        await router.admission.return_expired(force=True)
        assert (await counter(router.ctx.bus, f"day-tokens.{_today()}")).tokens == used


TOOL = {"type": "function", "function": {"name": "lookup", "description": WORDS,
                                         "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": msgspec.json.encode(
    {"q": WORDS}).decode()}}


@pytest.mark.parametrize("extra", [
    {"tools": [TOOL]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "found"}, {"role": "user", "content": "hi"}]},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "description": WORDS, "properties": {"a": {"type": "string"}}}}}},
], ids=["tools", "tool-calls", "json-schema"])
async def test_a_chat_request_heavy_outside_its_messages_content_is_refused_before_the_upstream(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path, extra: dict[str, Any]) -> None:
    # Before: tool definitions, assistant tool calls and schemas were not in the estimate: 250 KB of them
    # reserved as a `hi` and reached the upstream under a 20,000-token budget.
    router, keys = await _acme_router(settings, store, stack, sim, tmp_path,
                                      budgets={"day-tokens": {"tenant": "acme", "period": "day", "tokens": 20000}})
    url = f"{router.url}/v1/chat/completions"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http:
        status, refused = await _post(http, url, {**HI, **extra})
        assert status == 429 and refused["error"]["code"] == "request_too_large", (status, sim.total_requests)
        assert sim.total_requests == 0
        status, answered = await _post(http, url, HI)
    assert status == 200 and sim.requests == {MODEL: 1}
    await router.admission.return_expired(force=True)
    assert (await counter(router.ctx.bus, f"day-tokens.{_today()}")).tokens == answered["usage"]["total_tokens"]


@pytest.mark.parametrize(("path", "body"), [
    # A stored response (up to a model's whole context) and a stored conversation: none of it in the body.
    ("/v1/responses", {"model": MODEL, "input": "and now?", "previous_response_id": "resp_1", "max_output_tokens": 5}),
    ("/v1/responses", {"model": MODEL, "input": "and now?", "conversation": "conv_1", "max_output_tokens": 5}),
    # Images by URL: each is tokens the upstream reads that no byte of the body carries.
    ("/v1/chat/completions", {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is in these?"},
        *({"type": "image_url", "image_url": {"url": f"https://img.example/{i}.png"}} for i in range(8))]}]}),
], ids=["previous-response", "conversation", "images"])
async def test_what_a_body_only_points_at_is_reserved_too(settings: Settings, store: Store, stack: Stack,
                                                          sim: SimServer, tmp_path: Path, path: str,
                                                          body: dict[str, Any]) -> None:
    # Before: chaining previous_response_id (each turn's input holds every earlier one), a conversation or image
    # URLs reserved only the few bytes naming them, so a small token budget or rate limit did not hold.
    router, keys = await _acme_router(settings, store, stack, sim, tmp_path,
                                      budgets={"day-tokens": {"tenant": "acme", "period": "day", "tokens": 20000}})
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http:
        status, refused = await _post(http, f"{router.url}{path}", body)
    assert status == 429 and refused["error"]["code"] == "request_too_large", (status, refused)
    assert sim.total_requests == 0


PDF = "data:application/pdf;base64," + "JVBERi0xLjQK" * 100  # the size of a 100-page PDF with object streams
APP_KEYS = {  # the application's own data, with keys named like what a request may point at
    "metadata": {"conversation": "c-42", "file_id": "f-7"},
    "tools": [{"type": "function", "function": {"name": "fetch", "parameters": {
        "type": "object", "properties": {"file_id": {"type": "string"}, "conversation": {"type": "string"}}}}}],
    "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"conversation": {"type": "string"}}}}},
}


@pytest.mark.parametrize(("policy", "code"), [  # larger than the whole limit: no wait admits it
    ({"budgets": {"day-tokens": {"tenant": "acme", "period": "day", "tokens": 20000}}}, "request_too_large"),
    ({"rate_limits": [{"tenant": "acme", "rpm": 1000, "tpm": 20000}]}, "request_too_large"),
], ids=["budget", "tpm"])
async def test_a_file_is_reserved_as_stored_input_and_the_applications_own_keys_are_not(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path, policy: dict[str, Any],
        code: str) -> None:
    # Found by a probe. Before: a chat `file` part (an inline PDF: its text and an image of each page, 50,000 tokens
    # and more from 2 KB) was reserved as its bytes, admitted under a 10,000-token budget and spent 5 times it, while
    # the same PDF through /v1/responses was reserved 200,000; and `conversation` or `file_id` anywhere (metadata,
    # a tool's parameter, a schema's property) reserved 200,000 tokens, refusing an ordinary request unexplained.
    router, keys = await _acme_router(settings, store, stack, sim, tmp_path, **policy)
    c = client(router, keys.app_key)
    for file in ({"filename": "pages.pdf", "file_data": PDF}, {"file_id": "file-abc"}):
        with pytest.raises(openai.RateLimitError) as refused:
            await c.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": [
                {"type": "text", "text": "summarise"}, {"type": "file", "file": file}]}])
        err = refused.value.body
        assert isinstance(err, dict) and err["code"] == code, err
        assert "200000 tokens for input it only points at (a stored response, conversation or file" in err["message"]
    with pytest.raises(openai.RateLimitError) as refused:  # the same PDF through the Responses API
        await c.responses.create(model=MODEL, max_output_tokens=5, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "summarise"}, {"type": "input_file", "filename": "p.pdf", "file_data": PDF}]}])
    assert "200000 tokens for input it only points at" in str(refused.value)
    assert sim.total_requests == 0  # refused before any upstream call
    answered = await c.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS, **APP_KEYS,
                                               messages=[{"role": "user", "content": "hi"}])
    assert sim.requests == {MODEL: 1}
    if "budgets" in policy:
        await router.admission.return_expired(force=True)
        assert answered.usage is not None
        assert (await counter(router.ctx.bus, f"day-tokens.{_today()}")).tokens == answered.usage.total_tokens


async def test_an_anthropic_translated_request_is_bounded_by_the_body_it_sends(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # The upstream reads the translated body (tool calls as tool_use blocks, tools with input_schema): that is
    # the body admission bounds.
    (tmp_path / "endpoints.yaml").write_text(
        f"endpoints:\n  default: {{url: {sim.url}, provider: anthropic, credential: ANTHROPIC_KEY}}\n")
    (tmp_path / "secrets.yaml").write_text("ANTHROPIC_KEY: sk-ant-held-by-lockgate\n")
    s = settings.replace(endpoints_file=str(tmp_path / "endpoints.yaml"), secrets_file=str(tmp_path / "secrets.yaml"),
                         passthrough=True, deployment="shop-web", gateway_file=gateway(
                             tmp_path, budgets={"day-tokens": {"tenant": "acme", "period": "day", "tokens": 20000}}))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    router = await stack.add(s, store, "router-a")
    url = f"{router.url}/v1/chat/completions"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http:
        for extra in ({"tools": [TOOL]}, {"messages": [{"role": "system", "content": WORDS}, *HI["messages"]]}):
            status, refused = await _post(http, url, {**HI, **extra})
            assert status == 429 and refused["error"]["code"] == "request_too_large", (status, sim.total_requests)
        assert sim.total_requests == 0
        status, answered = await _post(http, url, HI)
    assert status == 200 and sim.requests == {MODEL: 1} and "x-api-key" in sim.headers[-1]
    await router.admission.return_expired(force=True)
    assert (await counter(router.ctx.bus, f"day-tokens.{_today()}")).tokens == answered["usage"]["total_tokens"]


@pytest.mark.parametrize(("path", "body", "foreign", "own"), [
    ("/v1/responses", {"model": MODEL, "input": "hi", "max_tokens": 1}, "max_tokens", "'max_output_tokens'"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_completion_tokens": 1}, "max_completion_tokens",
     "'max_tokens'"),
    ("/v1/chat/completions", {**HI, "max_tokens": None, "max_output_tokens": 1}, "max_output_tokens",
     "'max_completion_tokens' or 'max_tokens'"),
], ids=["responses-max_tokens", "completions-max_completion_tokens", "chat-max_output_tokens"])
async def test_a_limit_in_a_field_the_operation_does_not_read_is_refused_not_reserved(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path, path: str,
        body: dict[str, Any], foreign: str, own: str) -> None:
    # Before: admission reserved output from the first max field present, whatever the operation, so
    # `max_tokens: 1` on /v1/responses reserved 1 token while the upstream (which reads max_output_tokens
    # only) generated 3,000: one request spent 9 times a 400-token budget, N concurrent ones N times that.
    router, keys = await _acme_router(settings, store, stack, sim, tmp_path,
                                      budgets={"day-tokens": {"tenant": "acme", "period": "day", "tokens": 400}},
                                      rate_limits=[{"tenant": "acme", "rpm": 1000, "tpm": 400}])
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http:
        status, refused = await _post(http, f"{router.url}{path}", {k: v for k, v in body.items() if v is not None})
    assert status == 400, (status, refused)
    err = refused["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", foreign)
    assert f"{foreign!r} is not a parameter of" in err["message"] and f"set {own} instead" in err["message"]
    assert sim.total_requests == 0


async def test_a_give_back_whose_answer_came_late_is_not_sent_again(settings: Settings, store: Store, stack: Stack,
                                                                    sim: SimServer, bus: Bus, tmp_path: Path) -> None:
    # Before: a sweep's give-back that reached the store but whose answer came after store_timeout_s was read as not
    # applied, kept, and given back again by the next sweep: the counter fell by the allowance twice (below what
    # was spent) and the budget granted a lease more than its limit, at every late answer.
    limit = 10_000
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat", gateway_file=gateway(
        tmp_path, budgets={"acme-daily": {"tenant": "acme", "tokens": limit}}, store_timeout_s=0.5, lease_s=300))
    relay = Relay(int(settings.nats_url.rpartition(":")[2]))  # the router reaches NATS through it
    s = s.replace(nats_url=f"nats://127.0.0.1:{await relay.start()}")
    keys = bootstrap(s.home, tenant="acme", app="shop")
    name = f"acme-daily.{_today()}"
    try:
        router = await stack.add(s, store, "router-a")
        c = client(router, keys.app_key)
        u = (await ask(c)).usage
        used = u.prompt_tokens + u.completion_tokens
        assert (await counter(bus, name)).tokens == limit // 20  # the lease this replica holds

        relay.hold_after(f"$KV.{bus.subjects.kv_budgets}.{name}")
        await router.admission.return_expired(force=True)  # applied by the store, its answer held past the timeout
        relay.release()
        await router.ctx.bus.nc.flush()  # the late answer has arrived
        assert (await counter(bus, name)).tokens == used

        # Past the store's retry pause, the next sweep and a request the budget cannot cover.
        router.admission.counters.clock = lambda: time.monotonic() + RETRY_S
        await router.admission.return_expired(force=True)
        assert (await counter(bus, name)).tokens == used  # never below what was spent
        # A request within the limit that what is left cannot cover: its input and output come to limit - 5 tokens.
        most = limit - 5 - (reservation({**HI, "max_tokens": limit}).tokens - limit)
        assert used > 5 and reservation({**HI, "max_tokens": most}).tokens <= limit
        with pytest.raises(openai.RateLimitError) as refused:
            await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=most)
        assert refused.value.code == "budget_exceeded"
        assert (await counter(bus, name)).tokens == used
        # The give-back it dropped is counted: had it not landed, that much would stay charged (under-use).
        assert router.admission.unconfirmed[name] == Amount(0, limit // 20 - used)
    finally:
        await stack.close()
        await relay.close()


async def test_an_embeddings_request_reserves_its_input_alone(settings: Settings, store: Store, stack: Stack,
                                                             sim: SimServer, tmp_path: Path) -> None:
    # Found by a probe (p5 F1). Before: embeddings have no output limit field, so admission reserved the default
    # 4,096 output tokens for each: under `tpm: 3000` no embeddings request was ever admitted ("may use up to 4159
    # tokens ... lower max_tokens"), a 1,000-token budget admitted none, and `max_tokens: 1` on one was accepted.
    router, keys = await _acme_router(settings, store, stack, sim, tmp_path,
                                      budgets={"day-tokens": {"tenant": "acme", "tokens": 1000}},
                                      rate_limits=[{"tenant": "acme", "rpm": 1000, "tpm": 3000}])
    c = client(router, keys.app_key)
    answered = await c.embeddings.create(model=MODEL, input="hi", encoding_format="float",
                                         extra_headers={"x-lockgate-deployment": "shop-web"})
    assert len(answered.data[0].embedding) > 0 and sim.requests == {MODEL: 1}
    await router.admission.return_expired(force=True)
    assert (await counter(router.ctx.bus, f"day-tokens.{_today()}")).tokens == answered.usage.total_tokens
    # An input larger than the tpm: its reservation is its input estimate, nothing more, and the 429 says what helps.
    big = {"input": "word " * 700, "model": MODEL, "encoding_format": "float"}
    raw = msgspec.json.encode(big)
    estimate = input_estimate(len(raw), msgspec.json.decode(raw, type=ApiRequest), 1.0)
    with pytest.raises(openai.RateLimitError) as refused:
        await c.embeddings.create(**big, extra_headers={"x-lockgate-deployment": "shop-web"})
    message = refused.value.body["message"]
    assert refused.value.code == "request_too_large" and f"may use up to {estimate} tokens," in message, message
    assert message.endswith("; shorten the input") and "max_tokens" not in message
    # A max tokens on embeddings bounds nothing: refused naming it, as a limit in another operation's field is.
    with pytest.raises(openai.BadRequestError) as bad:
        await c.embeddings.create(model=MODEL, input="hi", extra_body={"max_tokens": 1},
                                  extra_headers={"x-lockgate-deployment": "shop-web"})
    assert bad.value.param == "max_tokens" and "generate no output" in bad.value.body["message"]
    assert sim.requests == {MODEL: 1}


async def test_a_request_refused_a_lease_takes_what_a_settlement_gave_back_meanwhile(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # Found by a probe (p5 F2). Request B's lease was refused by the store while request A, which held this replica's
    # allowance, settled and gave most of it back: B was refused "needs up to 3035 tokens, more than the 4982
    # tokens left", although what it needed was held, unreserved, on this very replica.
    router, keys = await _acme_router(settings, store, stack, sim, tmp_path, lease_s=300,
                                      budgets={"day-tokens": {"tenant": "acme", "tokens": 5000}})
    adm = router.admission
    a_leased, b_leasing, a_answered = asyncio.Event(), asyncio.Event(), asyncio.Event()
    # The leases' compare-and-sets (not the counter's creation before A's, which seeds it: admission._seed).
    update, lookup, calls = adm._cas, adm.lookup, []

    async def held_update(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        if len(calls) == 2:  # B's lease: the store answers once A has settled
            b_leasing.set()
            await a_answered.wait()
        try:
            return await update(*args, **kwargs)
        finally:
            a_leased.set()

    async def held_lookup(*args: Any, **kwargs: Any) -> Any:
        await b_leasing.wait()  # A calls its upstream once B is leasing
        return await lookup(*args, **kwargs)

    adm._cas, adm.lookup = held_update, held_lookup
    c = client(router, keys.app_key)
    big = {"max_tokens": 3000, "extra_headers": {"x-lockgate-deployment": "shop-web"}}
    a = asyncio.create_task(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **big))
    await a_leased.wait()  # A holds the lease it took (3,035 of the 5,000 tokens), nothing of it left unreserved
    b = asyncio.create_task(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **big))
    first = await a
    a_answered.set()
    second = await b  # before: openai.RateLimitError, budget_exceeded
    assert (first.choices[0].message.content, second.choices[0].message.content) == (ANSWER, ANSWER)
    await adm.return_expired(force=True)
    assert (await counter(router.ctx.bus, f"day-tokens.{_today()}")).tokens == \
        first.usage.total_tokens + second.usage.total_tokens


async def test_a_request_larger_than_a_whole_limit_is_told_so_and_not_retried(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # Found by a probe (p5 F3). Before: a request whose reservation alone exceeds a budget's whole limit was told the
    # budget "is exhausted ... (0.000000 of 0.050000 USD spent or reserved)" with a Retry-After until the period's
    # end, and one larger than a key's whole tpm got `Retry-After: 60`, which the openai SDK sleeps before each
    # retry: the default client hung 2 minutes on a request no wait could admit.
    one = reservation()
    router, keys = await _acme_router(settings, store, stack, sim, tmp_path,
                                      budgets={"day-usd": {"tenant": "acme", "usd": 3 * one.usd / NANO}},
                                      rate_limits=[{"tenant": "acme", "rpm": 1000, "tpm": 1000}])
    sent: list[Any] = []

    async def count(request: Any) -> None:
        sent.append(request)

    c = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=keys.app_key,  # the SDK's default retries
                           http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [count]}),
                           default_headers={"x-lockgate-deployment": "shop-web"})
    # Within the tpm, more than the whole budget.
    with pytest.raises(openai.RateLimitError) as refused:
        await ask(c, n=10)
    err = refused.value
    assert (err.code, len(sent)) == ("request_too_large", 1)  # told once, not retried
    assert "retry-after" not in err.response.headers and err.response.headers["x-should-retry"] == "false"
    message = err.body["message"]
    assert message.startswith("budget day-usd (") and "can never admit this request: it alone may use up to" in message
    assert "more than its whole limit of" in message and message.endswith("; lower max_tokens (20) or n, or shorten the input")
    assert "exhausted" not in message
    # More than the whole tpm.
    with pytest.raises(openai.RateLimitError) as refused:
        await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2000)
    err = refused.value
    assert (err.code, len(sent)) == ("request_too_large", 2)
    assert "retry-after" not in err.response.headers and err.response.headers["x-should-retry"] == "false"
    assert "more than key" in err.body["message"] and "whole limit of 1000 tokens per minute" in err.body["message"]
    assert sim.total_requests == 0
    await c.close()
    # (A request that fits the limit but not what is left keeps its 429 with a Retry-After: the tests above.)


async def _hang_up_while(held: asyncio.Event, router: Any, key: str, path: str, body: dict[str, Any]) -> None:
    """Send `body` to `path` and hang up once `held` is set (the router waits on the store); return once the router
    has closed its end, as the server does when it cancels the handler of a client that left."""
    host, port = router.url.split("//", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    raw = msgspec.json.encode(body)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                 f"x-lockgate-deployment: shop-web\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    await writer.drain()
    await held.wait()
    writer.write_eof()  # the client closes its end: the router reads the end of its connection
    assert await reader.read() == b""  # no answer: the router closed the connection and cancelled the handler
    writer.close()


async def test_a_client_that_leaves_while_the_owners_of_the_ids_it_names_are_read_is_charged_nothing(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, bus: Bus, tmp_path: Path) -> None:
    # Found by a probe (p66 F1). A client that hung up on a Responses request while the router asked the owners store
    # who owns the ids it names (previous_response_id, item_reference) left the request's whole reservation counted
    # until the period ended, with no upstream call, event or ledger row: a tenant's app hanging up on requests
    # worth 1 USD had another app of the tenant refused 429 budget_exceeded, 4.97 of its 5 USD spent or reserved.
    relay = Relay(int(settings.nats_url.rpartition(":")[2]))  # the router reaches NATS through it
    s = settings.replace(nats_url=f"nats://127.0.0.1:{await relay.start()}")
    try:
        router, keys = await _acme_router(s, store, stack, sim, tmp_path, lease_s=300,
                                          budgets={"day-tokens": {"tenant": "acme", "tokens": 1_000_000}})
        # The owner's read goes out; its answer waits while the client hangs up (the budget's lease came before).
        relay.hold_after(f"$JS.API.STREAM.MSG.GET.KV_{bus.subjects.kv_response_owners}")
        await _hang_up_while(relay.held, router, keys.app_key, "/v1/responses", {
            "model": MODEL, "previous_response_id": "resp_abc", "input": "hi", "max_output_tokens": 5})
        relay.release()
        assert router.admission.allowances  # it leased (200,000 stored input tokens and more are reserved)
        await stack.close()  # the router stops: it returns its allowance to the counter
        assert sim.total_requests == 0
        assert (await counter(bus, f"day-tokens.{_today()}")).tokens == 0  # before: its reservation, 200,097
    finally:
        await stack.close()
        await relay.close()


async def test_a_client_that_leaves_while_its_lease_is_written_leaves_the_counter_at_the_spend(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, bus: Bus, tmp_path: Path) -> None:
    # Found by a probe (p66 F2). A client that hung up on a request while its lease's compare-and-set was on its way
    # left what the store granted counted in the budget's counter, never in the replica's allowance (which returns
    # what it does not use): stranded until the period ended.
    relay = Relay(int(settings.nats_url.rpartition(":")[2]))
    s = settings.replace(nats_url=f"nats://127.0.0.1:{await relay.start()}")
    name = f"day-tokens.{_today()}"
    try:
        router, keys = await _acme_router(s, store, stack, sim, tmp_path, lease_s=300,  # no sweep's give-back meanwhile
                                          budgets={"day-tokens": {"tenant": "acme", "tokens": 1_000_000}})
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http:
            status, answered = await _post(http, f"{router.url}/v1/chat/completions", HI)  # leases one chunk
        assert status == 200
        used = answered["usage"]["total_tokens"]
        # A request the chunk cannot cover leases again; the store applies the write, its answer waits.
        relay.hold_after(f"$KV.{bus.subjects.kv_budgets}.{name}")
        await _hang_up_while(relay.held, router, keys.app_key, "/v1/chat/completions", {**HI, "max_tokens": 100_000})
        relay.release()
        await stack.close()
        assert sim.total_requests == 1
        assert (await counter(bus, name)).tokens == used  # before: 50,131, the lease's 50,113 more
    finally:
        await stack.close()
        await relay.close()


async def test_a_client_that_leaves_while_its_share_of_a_shared_tpm_limit_is_leased_leaves_the_bucket_at_the_spend(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, bus: Bus, tmp_path: Path) -> None:
    # Found by a probe (p66 F2), as a budget's lease above: the units a shared rate limit's bucket leased to a request
    # whose client hung up while the write was on its way stayed out of the bucket, in no replica's share.
    relay = Relay(int(settings.nats_url.rpartition(":")[2]))
    s = settings.replace(nats_url=f"nats://127.0.0.1:{await relay.start()}")
    tpm = 1_000_000
    try:
        router, keys = await _acme_router(s, store, stack, sim, tmp_path, lease_s=300,
                                          rate_limits=[{"tenant": "acme", "tpm": tpm, "shared": True}])
        router.admission.wall_s = lambda: 1000.0  # the KV bucket refills on the wall clock: not during this test
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http:
            status, answered = await _post(http, f"{router.url}/v1/chat/completions", HI)  # leases a share
        assert status == 200 and router.admission._refunding is not None
        await router.admission._refunding  # what it did not use is given back to the KV bucket
        relay.hold_after(f"$KV.{bus.subjects.kv_budgets}._rl.tokens.")  # the next lease's write
        await _hang_up_while(relay.held, router, keys.app_key, "/v1/chat/completions", {**HI, "max_tokens": 100_000})
        relay.release()
        await stack.close()  # the router stops: it gives its share back
        assert sim.total_requests == 1
        (level,) = [msgspec.json.decode(v, type=Level) for k, v in
                    (await bus.kv_entries(bus.subjects.kv_budgets)).items() if k.startswith("_rl.tokens.")]
        assert level.level == tpm - answered["usage"]["total_tokens"]  # before: 949,776, the lease's 50,206 fewer
    finally:
        await stack.close()
        await relay.close()
