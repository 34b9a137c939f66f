"""A router replica killed -9 mid-load while it holds a budget allowance and reservations: two
`lockgate serve router` processes share a budget (KV counter on a real nats-server), one dies.

What the lease design promises (docs/budgets.md, services/router/budgets.py):
- no overshoot: every reservation the dead replica made was granted by the counter, so what the
  provider served stays within the limit (plus the documented bound: calls outrunning their
  reservation, none here: max_tokens is set);
- what the dead replica held and did not spend is *stranded*, not lost into spend: nobody can tell
  it from spend (settlements are local), so the counter keeps it until the period ends (fail
  closed). It is bounded: at most one lease chunk plus the replica's reservations in flight;
- the rest of the budget stays usable: the surviving replica admits requests until the counter
  reaches the limit, and the counter still adds up (leased = spent + stranded)."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
import yaml

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.llmwire import ApiRequest
from lockgate.pricebook import load_price_book
from lockgate.server.apikeys import bootstrap
from lockgate.services.router.budgets import NANO, Counter, cost_of, input_estimate
from lockgate.subjects import Subjects
from lockgate_dev.cluster import ServiceProcess
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer

pytestmark = pytest.mark.timeout(300)

MODEL = "sim-good"  # priced in the shipped price book
ANSWER = "one two three four five six seven eight nine ten eleven twelve"
PRICE = load_price_book().models[MODEL]
MAX_TOKENS = 20
LIMIT_USD = 0.004  # room for about 160 calls
LEASE_FRACTION = 0.05  # the default: a lease is 5% of the limit, at least what a request lacks
WORKERS = 6  # concurrent clients per replica: at most this many reservations in flight on each
KILL_AFTER = 15  # answered calls on replica b before it is killed -9


def reservation() -> int:
    """Nano-USD the router reserves for one `hi` with max_tokens 20 (the input bounded by its body's bytes, as
    the openai client sends it: compact JSON)."""
    body = msgspec.json.encode({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS})
    return cost_of(PRICE, input_estimate(len(body), msgspec.json.decode(body, type=ApiRequest), 1.0), MAX_TOKENS).usd


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig(models={MODEL: ModelSpec(default=ANSWER)})) as s:
        yield s


def _client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                              timeout=openai.Timeout(60.0, connect=30.0))


async def _ask(c: openai.AsyncOpenAI) -> Any:
    return await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=MAX_TOKENS)


async def _leased(settings: Settings) -> int:
    bus = Bus(settings.nats_url, Subjects(settings.prefix), name="test-reader", manage_topology=False)
    await bus.connect()
    try:
        kv = await bus.kv(bus.subjects.kv_budgets)
        key = f"shared.{datetime.now(UTC):%Y-%m-%d}"
        return msgspec.json.decode((await kv.get(key)).value, type=Counter).leased.usd
    finally:
        await bus.close()


async def _drain(url: str, key: str, answered: list[Any], stop: asyncio.Event | None = None,
                 on_answer: Callable[[], None] | None = None) -> None:
    """Ask until refused over budget (or the replica is gone, or `stop`); answered usages are appended."""
    c = _client(url, key)
    try:
        while stop is None or not stop.is_set():
            try:
                answered.append((await _ask(c)).usage)
                if on_answer is not None:
                    on_answer()
            except openai.RateLimitError as exc:
                assert exc.code == "budget_exceeded", exc.body
                return
            except openai.APIConnectionError:
                return  # the replica was killed under this call
            except openai.InternalServerError:
                return  # ... or while answering it
    finally:
        await c.close()


async def test_a_router_killed_mid_load_never_overshoots_and_strands_at_most_its_allowance(
        settings: Settings, sim: SimServer, tmp_path: Path) -> None:
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text(yaml.safe_dump({"budgets": {"shared": {"app": "shop", "usd": LIMIT_USD}},
                                       "lease_fraction": LEASE_FRACTION}))
    keys = bootstrap(settings.home, tenant="acme", app="shop")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOCKGATE_NATS_URL": settings.nats_url,
           "LOCKGATE_PREFIX": settings.prefix, "LOCKGATE_HOME": settings.home,
           "LOCKGATE_CLICKHOUSE_URL": settings.clickhouse_url, "LOCKGATE_DATABASE": settings.database,
           "LOCKGATE_STABLE_UPSTREAM": sim.url, "LOCKGATE_DEPLOYMENT": "chat", "LOCKGATE_PASSTHROUGH": "true",
           "LOCKGATE_GATEWAY_FILE": str(gateway)}
    a, b = (ServiceProcess(f"router-{n}", ["serve", "router", "--router-port", "0"], env) for n in "ab")
    try:
        for p in (a, b):
            p.start()
        await asyncio.gather(*(asyncio.to_thread(p.wait_ready, 120) for p in (a, b)))
        url_a, url_b = a.endpoints["router"], b.endpoints["router"]
        # The readiness probe of deploy/k8s: /healthz answers once routes are restored and reports the bus.
        async with aiohttp.ClientSession() as http, http.get(f"{url_a}/healthz") as health:
            assert health.status == 200
            assert {k: (await health.json())[k] for k in ("status", "bus", "ready")} == {
                "status": "ok", "bus": "connected", "ready": True}

        # Load on both; once b has answered KILL_AFTER calls it dies with its allowance and reservations.
        on_a: list[Any] = []
        on_b: list[Any] = []
        b_killed = asyncio.Event()

        def answered_on_b() -> None:
            if len(on_b) == KILL_AFTER:
                b.kill()  # its other workers' calls are in flight: reservations held, some served
                b_killed.set()

        await asyncio.gather(*(_drain(url_b, keys.app_key, on_b, on_answer=answered_on_b) for _ in range(WORKERS)),
                             *(_drain(url_a, keys.app_key, on_a, stop=b_killed) for _ in range(WORKERS)))
        assert b_killed.is_set()
        assert b.proc is not None and b.proc.returncode == -9

        # a keeps serving after b's death; then it stops gracefully, returning everything it holds.
        await asyncio.gather(*(_drain(url_a, keys.app_key, on_a) for _ in range(WORKERS)))
        assert await asyncio.to_thread(a.stop) == 0

        per_call = cost_of(PRICE, on_a[0].prompt_tokens, on_a[0].completion_tokens).usd
        limit = round(LIMIT_USD * NANO)
        spent = sim.requests[MODEL] * per_call  # what the provider served, calls cut by the kill included
        assert spent <= limit, (spent, limit)  # no overshoot (max_tokens set: the documented bound is 0)

        # What b held and did not spend stays leased: bounded by one lease chunk plus its reservations in flight.
        leased = await _leased(settings)
        stranded = leased - spent
        bound = math.ceil(limit * LEASE_FRACTION) + (WORKERS + 1) * reservation()
        assert 0 <= stranded <= bound, (stranded, bound, leased, spent)

        # The rest was usable: a, serving on after the kill, took the budget up to the limit less what
        # b stranded. What is left under the limit is less than one more reservation, plus what the calls
        # still in flight at a's last refusal gave back when they settled (reserved - used each).
        left = limit - (spent + stranded)
        assert left < reservation() + WORKERS * (reservation() - per_call), (limit, spent, stranded)
        # b started again refuses over budget too, and the counter still adds up (spent + stranded).
        b.start()
        await asyncio.to_thread(b.wait_ready, 120)
        c = _client(b.endpoints["router"], keys.app_key)
        with pytest.raises(openai.RateLimitError) as refused:
            await _ask(c)
        await c.close()
        assert refused.value.code == "budget_exceeded"
        assert await asyncio.to_thread(b.stop) == 0
        assert await _leased(settings) == spent + stranded and sim.requests[MODEL] * per_call == spent
        print(f"\nbudget {limit} nano-USD: spent {spent} ({sim.requests[MODEL]} calls, {len(on_a)} on a, "
              f"{len(on_b)} answered on b before its kill), stranded by the kill {stranded} "
              f"({stranded / limit:.1%} of the limit; bound {bound})")
    finally:
        for p in (a, b):
            p.stop()
