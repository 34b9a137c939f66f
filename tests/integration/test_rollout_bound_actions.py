"""An operator's rollout action is applied, or said not to be, truthfully; and it acts on the rollout the operator
saw, never on one that replaced it. Through the real admin API and CLI of two router replicas on a nats-server with
auth on: one replica cut off from the bus by a relay (probe p67 F1), a PUT on one replica racing an action on the other (F2)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.cli.main import cli
from lockgate.subjects import Subjects
from tests.helpers import Relay, Replicas, admin_headers, register_model_release, store_pass
from tests.integration.test_router_drift_replay import Stack, stack

pytestmark = pytest.mark.timeout(120)
__all__ = ["stack"]  # the fixture, imported
DEPLOYMENT = "/lockgate/v1/deployments/chat"
STRATEGY = {"steps": [10, 50, 100], "interval_s": 3600}  # no step falls due during a test


async def _call(router: Any, method: str, path: str = "", body: dict[str, Any] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http, \
            http.request(method, f"{router.url}{DEPLOYMENT}{path}", json=body) as resp:
        return resp.status, await resp.json()


async def _canary(stack: Stack, router: Any, release: str) -> dict[str, Any]:
    """A canary of `release` (registered, a PASS stored) against r1 started on `router`: at 10% at once; its route."""
    admin = stack.named["admin"]
    await register_model_release(admin, release)
    await store_pass(admin, release, stack.settings)
    status, route = await _call(router, "PUT", body={"stable_release": "r1", "canary_release": release,
                                                     "strategy": STRATEGY})
    assert status == 200 and (route["phase"], route["weight"]) == ("progressing", 10.0), route
    await router.rollouts.flush()
    return dict(route)


async def _first(stack: Stack, router: Any) -> None:
    admin = stack.named["admin"]
    await register_model_release(admin, "r1")
    await store_pass(admin, "r1", stack.settings)
    status, route = await _call(router, "PUT", body={"stable_release": "r1"})
    assert status == 200, route


def _same(route: Any, seen: dict[str, Any]) -> bool:
    return route.canary is not None and route.canary.release == seen["canary"]["release"] \
        and route.started_at == seen["started_at"]


async def test_an_abort_while_the_bus_is_away_is_applied_at_once_and_persisted_after_and_one_not_applied_says_so(
        stack: Stack) -> None:
    # Before (probe p67 F1): the abort read the stable's decision first; with the bus hung that read failed, nothing
    # was applied, the answer said "abort applied but not yet persisted", and the canary went on serving and was
    # promoted at its next step (all nats-servers frozen; here one replica loses the server). A promote that could not read its admission said "promote applied" too.
    a = await stack.replica("router-a")
    await _first(stack, a)
    seen = await _canary(stack, a, "r2")
    relay, partitioned = Relay(int(stack.settings.nats_url.rpartition(":")[2])), Replicas()
    try:
        bus = Bus(f"nats://127.0.0.1:{await relay.start()}", Subjects(stack.settings.prefix), name="router-b",
                  auth=credentials.for_identity(stack.settings, "router"), manage_topology=False)
        await bus.connect()
        b = await partitioned.router(bus, stack.settings, stack.store)
        await b.rollouts.wait_for(lambda r: "chat" in r and _same(r["chat"], seen), timeout=10)
        aimed = {"canary": "r2", "started_at": seen["started_at"]}
        relay.cut()  # router-b alone loses the server (a hang would still let its writes through)
        await bus.wait_state("reconnecting", timeout_s=10)

        before = b.rollouts.route("chat")
        status, body = await _call(b, "POST", "/promote", aimed)
        assert status == 503, body
        message = body["error"]["message"]
        assert message.startswith("promote not applied: ") and message.endswith("nothing changed, retry"), message
        assert b.rollouts.route("chat") is before  # said so, and so
        # The CLI reads the route (this replica's, in memory) and sends the rollout it shows: the same line, exit 4.
        said = await asyncio.to_thread(CliRunner().invoke, cli, ["--home", stack.settings.home, "rollout", "--router",
                                                                 b.url, "promote", "chat"])
        assert said.exit_code == 4 and "router refused (503): promote not applied: " in said.output, said.output
        assert b.rollouts.route("chat") is before

        status, body = await _call(b, "POST", "/abort", aimed)
        assert status == 503, body
        assert body["error"]["message"].startswith("abort applied but not yet persisted"), body
        route = b.rollouts.route("chat")
        assert (route.phase, route.weight) == ("aborted", 0.0), route.reason  # in effect at once on this replica

        # Meanwhile the other replica writes the route first: the abort's compare-and-set loses, and it is run again
        # on the route that won (the same rollout, paused), not dropped.
        status, paused = await _call(a, "POST", "/pause", {"reason": "looking"})
        assert status == 200 and paused["paused"], paused
        relay.heal()
        for replica in (a, b):
            await replica.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=30)
        await b.rollouts.flush()
        kept = a.rollouts.route("chat")
        assert (kept.phase, kept.weight, kept.version) == ("aborted", 0.0, b.rollouts.route("chat").version)
        assert "aborted r2: by operator" in kept.reason, kept.reason
    finally:
        relay.release()
        await partitioned.close()  # through the relay, while it still relays
        await relay.close()


@pytest.mark.parametrize("action", ["promote", "abort", "set-weight"])
async def test_an_action_aimed_at_one_canary_is_refused_once_a_put_on_another_replica_replaced_it(
        stack: Stack, action: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before (probe p67 F2): a promote meant for canary r2, made on a replica that had not yet seen a PUT on the other
    # start canary r3, lost its compare-and-set and was run again on the route that won: r3 went to 100% with no step
    # at all. An abort aimed at r2 aborted r3.
    a, b = await stack.replica("router-a"), await stack.replica("router-b")
    await _first(stack, a)
    seen = await _canary(stack, a, "r2")
    await b.rollouts.wait_for(lambda r: "chat" in r and _same(r["chat"], seen), timeout=10)

    # router-a's watch lags (its entries held back) while router-b starts r3: router-a acts on r2 as it still holds
    # it, and its write loses to router-b's.
    held: list[Any] = []
    watched, conflicts = a.rollouts._on_entry, a.rollouts.conflicts
    monkeypatch.setattr(a.rollouts, "_on_entry", held.append)
    replaced = await _canary(stack, b, "r3")
    body = {"canary": "r2", "started_at": seen["started_at"]} | ({"weight": 60.0} if action == "set-weight" else {})
    status, answer = await _call(a, "POST", f"/{action}", body)
    monkeypatch.setattr(a.rollouts, "_on_entry", watched)
    for entry in held:
        watched(entry)
    assert status == 409 and answer["error"]["code"] == "rollout_changed", answer
    assert "now canaries 'r3'" in answer["error"]["message"], answer
    assert a.rollouts.conflicts > conflicts  # refused on the route that won, after its compare-and-set was lost
    for replica in (a, b):
        await replica.rollouts.wait_for(lambda r: _same(r["chat"], replaced), timeout=10)
        route = replica.rollouts.route("chat")
        assert (route.phase, route.weight) == ("progressing", 10.0), route.reason

    # Through the CLI: named with --canary, refused (exit 4); unnamed, the canary the route shows now, read first.
    base = ["--home", stack.settings.home, "rollout", "--router", a.url]
    refused = await asyncio.to_thread(CliRunner().invoke, cli, [*base, "pause", "chat", "--canary", "r2"])
    assert refused.exit_code == 4, refused.output
    assert "rollout_changed" in refused.output or "now canaries 'r3'" in refused.output, refused.output
    paused = await asyncio.to_thread(CliRunner().invoke, cli, [*base, "pause", "chat"])
    assert paused.exit_code == 0 and a.rollouts.route("chat").paused, paused.output
    # A request naming no rollout acts on the deployment's, as before.
    status, resumed = await _call(a, "POST", "/resume")
    assert status == 200 and not resumed["paused"], resumed
