"""The router refuses what a KV key holding JetStream's own JSON governs, never serves it ungoverned or uncounted.

JetStream answers a publish, and any `$JS.API.*` request, on whatever reply subject the requester names: named
`$KV.<bucket>.<key>`, its answer becomes the key's value (operator, approver and viewer roles and the services can
still aim one). Here the real nats-server stores each such answer (tests.helpers.aim_jetstream_reply) under a
deployment's route key, a budget counter and a shared rate-limit bucket, and the real router, asked through the
`openai` client, refuses the deployment or the request until an operator writes the key again."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import BudgetEvent
from lockgate.server.apikeys import Bootstrap, KeyStore, bootstrap
from lockgate.services.router.budgets import period_id
from lockgate.services.router.ratelimit import kv_key
from lockgate.store import Store
from lockgate.subjects import Subjects, token
from lockgate_dev.sim import SimServer
from tests.helpers import Replicas
from tests.integration import test_router as router_tests
from tests.integration.test_kv_jetstream_json import SHAPES, _aim
from tests.integration.test_router_admission import ANSWER, Stack, ask, client, gateway, sim, stack  # noqa: F401

services, router, http, keys, sims, signer, passthrough, gateway_policy = (
    router_tests.services, router_tests.router, router_tests.http, router_tests.keys, router_tests.sims,
    router_tests.signer, router_tests.passthrough, router_tests.gateway_policy)

pytestmark = pytest.mark.timeout(120)
HI = [{"role": "user", "content": "hi"}]
_budget_events: Codec[BudgetEvent] = Codec(BudgetEvent)


async def _refused(r: Any, key: str, ask: dict[str, Any]) -> openai.InternalServerError:
    async with router_tests._openai(r, key) as c:
        with pytest.raises(openai.InternalServerError) as caught:
            await c.chat.completions.create(messages=HI, **ask)
    return caught.value


async def _served_by(r: Any, key: str, ask: dict[str, Any]) -> str:
    """The release that served `ask`, sent with `key` (an admin key's: only its answers name the release)."""
    async with router_tests._openai(r, key) as c:
        answer = await c.chat.completions.with_raw_response.create(messages=HI, **ask)
    return answer.headers["x-lockgate-release"]


@pytest.mark.parametrize("passthrough", [True])
@pytest.mark.parametrize("shape", SHAPES)
async def test_a_deployment_whose_route_key_holds_jetstream_json_is_refused_never_served_ungoverned(
        router: Any, http: aiohttp.ClientSession, keys: Bootstrap, sims: Any, store: Store, shape: str) -> None:
    # Before: a router (re)started then had no route for `support`, so with passthrough on the default route served
    # its requests ungoverned (the client's own model, no release); a running one went on serving its last route.
    bus = router.ctx.bus
    async with http.put(f"{router.url}/lockgate/v1/deployments/support", json={"stable_release": "r1"}) as resp:
        assert resp.status == 200, await resp.text()
    by_header = {"model": "m", "extra_headers": {"x-lockgate-deployment": "support"}}
    by_name = {"model": "support"}
    assert await _served_by(router, keys.admin_key, by_header) == "r1"

    await _aim(bus, bus.subjects.kv_routes, token("support"), shape)
    await router.rollouts.wait_for(lambda _: "support" in router.rollouts.unreadable, timeout=10)
    assert router.rollouts.routes["support"].stable.release == "r1"  # kept: an operator's change starts from it
    replicas = Replicas()
    try:
        b = Bus(router.ctx.settings.nats_url, Subjects(router.ctx.settings.prefix), name="router-restarted")
        await b.connect()
        restarted = await replicas.router(b, router.ctx.settings, store)
        assert "support" not in restarted.rollouts.routes and "support" in restarted.rollouts.unreadable
        for r in (router, restarted):
            for ask_ in (by_header, by_name):
                err = await _refused(r, keys.app_key, ask_)
                assert (err.status_code, err.code, err.type) == (503, "route_unreadable", "service_unavailable")
                assert "Deployment 'support' is not served: its route record (KV " in err.message
                assert "is unreadable (" in err.message and "which release serves it is unknown" in err.message
                assert "`lockgate rollout get support` names the stable of its last readable revision" in err.message
            async with router_tests._openai(r, keys.app_key) as c:
                assert "support" not in {m.id async for m in c.models.list()}
        assert sims[0].requests == {"m": 1}  # nothing reached an upstream since (governed or not)

        # The operator's repair (`lockgate rollout start support --stable r1`), through either replica (the one that
        # holds no route, or the one that kept its last): written by compare-and-set over the unreadable value, and
        # every replica serves the release again.
        repairer, other = (restarted, router) if SHAPES.index(shape) % 2 else (router, restarted)
        async with http.put(f"{repairer.url}/lockgate/v1/deployments/support",
                            json={"stable_release": "r1"}) as resp:
            assert resp.status == 200, await resp.text()
        await other.rollouts.wait_for(lambda _: "support" not in other.rollouts.unreadable, timeout=10)
        for r in (router, restarted):
            assert "support" not in r.rollouts.unreadable
            for ask_ in (by_header, by_name):
                assert await _served_by(r, keys.admin_key, ask_) == "r1"
        assert sims[0].requests == {"m": 5}
    finally:
        await replicas.close()


@pytest.mark.parametrize("shape", SHAPES)
async def test_an_unreadable_budget_counter_or_rate_limit_bucket_refuses_even_with_fail_open(
        settings: Settings, store: Store, stack: Stack, sim: SimServer, tmp_path: Path, shape: str) -> None:  # noqa: F811
    # Before: the router took an unreadable counter as its store down, so `fail_open: true` let the tenant's traffic
    # through uncounted; a shared rate limit fell back to each replica's own bucket (the limit times the replicas).
    s = settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat", gateway_file=gateway(
        tmp_path, fail_open=True, budgets={"acme-daily": {"tenant": "acme", "usd": 1.0}},
        rate_limits=[{"tenant": "acme", "rpm": 600, "shared": True}]))
    keys = bootstrap(s.home, tenant="acme", app="shop")
    router = await stack.add(s, store, "router-a")
    bus = router.ctx.bus
    kv = await bus.kv(bus.subjects.kv_budgets)
    bucket = kv_key((0, "requests", KeyStore(s.home).authenticate(keys.app_key).id))
    counter = f"acme-daily.{period_id('day', datetime.now(UTC))}"
    await _aim(bus, bus.subjects.kv_budgets, bucket, shape)
    await _aim(bus, bus.subjects.kv_budgets, counter, shape)
    events = await bus.nc.subscribe(bus.subjects.budget("acme"))
    c = client(router, keys.app_key)

    with pytest.raises(openai.InternalServerError) as caught:
        await ask(c)
    err = caught.value
    assert (err.status_code, err.code) == (503, "rate_limit_unreadable")
    assert "(600 requests per minute, shared) cannot be checked: rate-limit bucket _rl.requests.0." in err.message
    assert "is unreadable: " in err.message and f"nats kv del {bus.subjects.kv_budgets} {bucket}" in err.message
    await kv.delete(bucket)  # reset as the message says

    with pytest.raises(openai.InternalServerError) as caught:
        await ask(c)
    err = caught.value
    assert (err.status_code, err.code) == (503, "budget_counter_unreadable")
    assert f"budget acme-daily (1 USD per day) cannot be checked: budget counter {counter} is unreadable" in err.message
    assert "whatever `fail_open` says" in err.message
    assert f"nats kv del {bus.subjects.kv_budgets} {counter}" in err.message
    event = _budget_events.decode((await events.next_msg(timeout=10)).data)
    assert (event.reason, event.budget, event.counter, event.fail_open) == (
        "counter_unreadable", "acme-daily", counter, False)
    assert sim.requests == {}  # nothing went through uncounted

    await kv.delete(counter)
    assert (await ask(c)).choices[0].message.content == ANSWER  # counted again from zero
    await events.unsubscribe()
