"""A budget added mid-period holds the period's earlier spend, through real routers, nats-server, the sink, the cost
service and the query service on chDB, and the `openai` client (probe p23 F5 and F6).

Before, a budget's counter was created empty at its first lease: an app that had spent 0.12 USD that day was
admitted 53 more requests under a new "0.001 USD per day" budget, and `lockgate budget list` without the gateway
file said "no budgets" while the router refused requests over it."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest
from click.testing import CliRunner

from lockgate.bus import Bus
from lockgate.cli.main import cli
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts.cost import CostLedger
from lockgate.contracts.inference import ADMITTED_AT
from lockgate.server.apikeys import bootstrap
from lockgate.services.query.registry import run
from lockgate.services.router.budgets import NANO, Amount, Counter
from lockgate.store import Store
from lockgate_dev.sim import SimServer
from tests.helpers import sink_stored
from tests.integration.test_router_admission import (
    Stack,
    ask,
    client,
    gateway,
    reservation,
    sim,
    spent,
    stack,
)

__all__ = ["sim", "stack"]  # fixtures of test_router_admission, used here

pytestmark = pytest.mark.timeout(120)

_ledgers: Codec[CostLedger] = Codec(CostLedger)


async def _spend_unbudgeted(settings: Settings, store: Store, stack: Stack, run_services: Any, sim: SimServer,
                            key: str, at_least: int) -> list[Any]:
    """Requests through a router without budgets until they cost at least `at_least` nano-USD; returns once the
    store holds every one of them: its event and its ledger entry (the seed counts the ledger's served calls)."""
    svcs = await run_services("sink", "cost", "query")
    bus = svcs["sink"].ctx.bus
    facts = await bus.nc.subscribe(bus.subjects.cost_ledger)
    router = await stack.add(settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat"), store,
                             "router-unbudgeted")
    usages: list[Any] = []
    async with client(router, key) as c:
        while spent(usages) < at_least:
            usages.append((await ask(c)).usage)
    entries = messages = 0
    while entries < len(usages):
        entries += len(_ledgers.decode((await facts.next_msg(timeout=30)).data).entries)
        messages += 1
    await facts.unsubscribe()
    await sink_stored(svcs["sink"].handlers, cost_ledger=messages)
    await svcs["sink"].handlers.rows.wait_for(len(usages))
    return usages


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


async def _counter(bus: Bus, key: str) -> Counter:
    kv = await bus.kv(bus.subjects.kv_budgets)
    return msgspec.json.decode((await kv.get(key)).value, type=Counter)


@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_budget_added_mid_period_holds_the_periods_earlier_spend(
        settings: Settings, store: Store, stack: Stack, run_services: Any, sim: SimServer, tmp_path: Path,
        replicas: int) -> None:
    keys = bootstrap(settings.home, tenant="acme", app="shop")
    # Spend more than the budget about to be declared, while no budget covers the app.
    limit_usd = 1.5 * reservation().usd / NANO  # one request fits it: the refusal is over budget, not too large
    usages = await _spend_unbudgeted(settings, store, stack, run_services, sim, keys.app_key,
                                     at_least=3 * reservation().usd)

    # The routers restart with a day's budget for the app: its counter starts this period, after that spend.
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat", gateway_file=gateway(
        tmp_path, budgets={"shop-day": {"tenant": "acme", "app": "shop", "period": "day", "usd": limit_usd}}))
    routers = [await stack.add(s, store, f"router-{i}") for i in range(replicas)]
    clients = [client(r, keys.app_key) for r in routers]
    # Every replica's first request at once: each creates or finds the counter and may seed it; one seed lands.
    answers = await asyncio.gather(*(ask(c) for c in clients), return_exceptions=True)
    for answer in answers:
        assert isinstance(answer, openai.RateLimitError), answer  # before: 200, the counter started at 0
        assert answer.code == "budget_exceeded" and "shop-day" in answer.body["message"]
    for c in clients:
        await c.close()

    state = await _counter(routers[0].ctx.bus, f"shop-day.{_today()}")
    assert state.since is not None and state.seeded is not None
    # What the ledger booked for those calls (summed, then rounded; each call rounded up: at most 1 nano-USD each
    # apart), added once: two replicas seeding at once do not double it, and no lease was granted past it.
    assert abs(state.seeded.usd - spent(usages)) <= len(usages)
    assert state.leased == state.seeded

    # `lockgate budget list` in a shell that sets no gateway file lists the counter the routers enforce.
    env = {"LOCKGATE_HOME": settings.home, "LOCKGATE_NATS_URL": settings.nats_url, "LOCKGATE_PREFIX": settings.prefix,
           "LOCKGATE_ROLE": None, "LOCKGATE_GATEWAY_FILE": None}
    listed = await asyncio.to_thread(CliRunner().invoke, cli, ["budget", "list", "--json"], env=env,
                                     catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert (row["budget"], row["split"], row["period"], row["seeded"]) == ("shop-day", "", _today(), "ledger")
    assert row["usd_used"] == round(state.leased.usd / NANO, 6) and row["usd_limit"] is None
    assert row["seeded_usd"] == round(state.seeded.usd / NANO, 6)
    assert row["counting_since"] == state.since.isoformat(timespec="seconds")
    table = await asyncio.to_thread(CliRunner().invoke, cli, ["budget", "list"], env=env, catch_exceptions=False)
    assert "shop-day" in table.stdout and "no budgets" not in table.stdout, table.stdout


async def test_a_request_admitted_before_midnight_and_ended_after_counts_on_its_admission_days_counter_alone(
        settings: Settings, store: Store, stack: Stack, run_services: Any, sim: SimServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by a probe (p88 F2): a request admitted on day D and ending on D+1 was reserved and settled on D's counter,
    # its event dated as it ended (D+1), and D+1's counter, seeded at its first lease from the ledger's D+1, counted it
    # again: 1.01 USD on D's counter and 2.02 on D+1's for 2.02 spent. Now the seed leaves out what was admitted before
    # the period: a request counts in the period its admission counted it in (its event's `lockgate.admitted_at`).
    keys = bootstrap(settings.home, tenant="acme", app="shop")
    svcs = await run_services("sink", "cost", "query")
    bus = svcs["sink"].ctx.bus
    facts = await bus.nc.subscribe(bus.subjects.cost_ledger)
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat", gateway_file=gateway(
        tmp_path, budgets={"shop-day": {"tenant": "acme", "app": "shop", "period": "day",
                                        "usd": 100 * reservation().usd / NANO}}))
    router = await stack.add(s, store, "router-a")
    admitted = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(seconds=1)
    async with client(router, keys.app_key) as c:
        # Admitted a second before midnight (day D), on D's counter; its event, dated as it ends, is on D+1.
        monkeypatch.setattr(router.admission, "wall", lambda: admitted)
        late = (await ask(c)).usage
        monkeypatch.undo()
        _ledgers.decode((await facts.next_msg(timeout=30)).data)  # booked: the next counter's seed would see it
        await sink_stored(svcs["sink"].handlers, cost_ledger=1)
        await svcs["sink"].handlers.rows.wait_for(1)
        # The app's first request of D+1 creates D+1's counter, seeded from what the ledger booked that day before.
        early = (await ask(c)).usage
    await facts.unsubscribe()
    await router.admission.return_expired(force=True)
    day_d = await _counter(router.ctx.bus, f"shop-day.{admitted:%Y-%m-%d}")
    day_after = await _counter(router.ctx.bus, f"shop-day.{_today()}")
    assert (day_d.leased.usd, day_d.seeded) == (spent([late]), Amount(0, 0))
    # Before: seeded with the late request's cost, counted on both days.
    assert (day_after.leased.usd, day_after.seeded) == (spent([early]), Amount(0, 0))
    rows = store.rows("SELECT attributes['lockgate.admitted_at'] AS at FROM inference_events ORDER BY time")
    assert rows[0]["at"] == admitted.isoformat(timespec="microseconds")


async def test_a_counter_the_ledger_cannot_seed_counts_from_its_creation_and_says_so(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path) -> None:
    # No query service answers: the router does not wait for one at every lease; the counter says it is unseeded.
    keys = bootstrap(settings.home, tenant="acme", app="shop")
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat", gateway_file=gateway(
        tmp_path, budgets={"shop-day": {"tenant": "acme", "app": "shop", "usd": 100 * reservation().usd / NANO}}))
    router = await stack.add(s, store, "router-a")
    async with client(router, keys.app_key) as c:
        used = [(await ask(c)).usage for _ in range(3)]
    await router.admission.return_expired(force=True)
    state = await _counter(router.ctx.bus, f"shop-day.{_today()}")
    assert state.since is not None and state.seeded is None and state.leased.usd == spent(used)
    assert math.isclose(state.since.timestamp(), datetime.now(UTC).timestamp(), abs_tol=60)


def test_budget_spend_counts_served_calls_of_its_scope_and_span_only(store: Store) -> None:
    t0 = datetime(2026, 12, 6, 10, tzinfo=UTC)
    # (id, minutes after t0, tenant, app, key_id, served, cost_usd, input, output)
    calls = [("a", 0, "acme", "shop", "k1", True, 0.5, 10, 5), ("b", 1, "acme", "shop", "k2", True, 0.25, 4, 4),
             ("c", 2, "acme", "shop", "", False, 8.0, 100, 100),  # the app's own event: no router counted it
             ("d", 3, "acme", "other", "k3", True, 2.0, 1, 1), ("e", 4, "beta", "shop", "k4", True, 4.0, 1, 1),
             ("f", 90, "acme", "shop", "k1", True, 16.0, 1, 1),  # after the span
             ("g", 5, "acme", "shop", "k1", True, 32.0, 1, 1)]  # ended in it, admitted the day before (p88 F2)
    admitted = {"a": "2026-12-06T09:59:59.500000+00:00", "g": "2026-12-05T23:59:59.000000+00:00"}
    store.insert_rows("inference_events", ["id", "time", "tenant", "app", "key_id", "served", "attributes"],
                      [(i, t0.replace(minute=m % 60, hour=10 + m // 60), t, a, k, s,
                        {ADMITTED_AT: admitted[i]} if i in admitted else {}) for i, m, t, a, k, s, *_ in calls],
                      token=None)
    store.insert_rows("cost_ledger", ["event_id", "time", "tenant", "app", "cost_usd", "input_tokens", "output_tokens"],
                      [(i, t0.replace(minute=m % 60, hour=10 + m // 60), t, a, c, n, o)
                       for i, m, t, a, _, _, c, n, o in calls], token=None)
    def spend(**scope: str) -> tuple[float, int, int]:
        got = run(store, "budget_spend", {"since": "2026-12-06T00:00:00Z", "until": "2026-12-06T11:00:00Z", **scope})
        return got["usd"], got["tokens"], got["calls"]

    assert spend(tenant="acme", app="shop") == (0.75, 23, 2)
    assert spend(tenant="acme", app="shop", key="k1") == (0.5, 15, 1)
    assert spend(tenant="acme") == (2.75, 25, 3)
    assert spend() == (6.75, 27, 4)
    assert spend(tenant="acme", app="shop'; DROP TABLE cost_ledger; --") == (0.0, 0, 0)
    assert store.scalar("SELECT count() FROM cost_ledger") == 7
