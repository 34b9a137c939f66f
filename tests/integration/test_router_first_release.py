"""A deployment's first release through the real admin API, the `lockgate rollout start` CLI and the official
`openai` client (real nats-server, chDB, the simulator): refused until a verified decision allows it, then
serving all traffic at once; a second first release is refused and later releases roll out as canaries."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from lockgate.codec import Codec
from lockgate.contracts import AuditEntry, RolloutState
from lockgate.server.apikeys import Bootstrap
from tests.helpers import break_glass, register_model_release, served_events, store_pass
from tests.integration import test_router as router_tests
from tests.integration.test_rollout_operate import _cli

services, router, http, keys, sims, signer, passthrough, gateway_policy = (
    router_tests.services, router_tests.router, router_tests.http, router_tests.keys, router_tests.sims,
    router_tests.signer, router_tests.passthrough, router_tests.gateway_policy)

pytestmark = pytest.mark.timeout(120)
_states: Codec[RolloutState] = Codec(RolloutState)
_audit: Codec[AuditEntry] = Codec(AuditEntry)
HI = [{"role": "user", "content": "hi"}]
URL = "/lockgate/v1/deployments/chat"


async def _refused_as_unknown_model(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="m", messages=HI)
    assert (caught.value.status_code, caught.value.code) == (404, "model_not_found")


async def _put(http: aiohttp.ClientSession, router: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with http.put(f"{router.url}{URL}", json=body) as resp:
        return resp.status, await resp.json()


async def test_a_first_release_serves_everyone_once_a_decision_allows_it_and_later_ones_roll_out_as_canaries(
        router: Any, http: aiohttp.ClientSession, keys: Bootstrap, sims: Any) -> None:
    # Before: a PUT needed a stable and a canary, different and both gated, so a team with its first (single)
    # gated release could not serve it at all without inventing a second one.
    bus, admin = router.ctx.bus, keys.admin_key
    # On the canary simulator (its answer tells who served); of the app key's tenant, as r1 is (router_tests.services).
    await register_model_release(bus, "fresh", "m", "canary", tenant="acme")
    states = await bus.nc.subscribe(bus.subjects.rollout("chat"))
    audit = await bus.nc.subscribe(bus.subjects.audit("router"))
    served = await bus.nc.subscribe(bus.subjects.served("shop", "acme"))
    async with router_tests._openai(router, keys.app_key) as client:
        await _refused_as_unknown_model(client)  # `chat`, the router's default deployment, has no release

        # Never gated: refused, naming the missing decision and what to do; nothing is served.
        refused = await _cli(router, "start", "chat", "--stable", "fresh", "--json", key=admin)
        assert refused.exit_code == 4, refused.output
        assert ("router refused (409): refused: first release 'fresh' has no verified gate decision allowing it "
                "(none stored, or it does not verify): gate it first (lockgate eval run SUITE --candidate fresh"
                in refused.output)
        status, err = await _put(http, router, {"stable_release": "fresh"})
        assert (status, err["error"]["code"]) == (409, "not_admitted"), err
        # Nor does an admin's signed break-glass cover it: a release that serves everyone needs a decision.
        glass = break_glass(router.ctx.settings, "chat", "fresh", "canary", "incident 7")
        status, err = await _put(http, router, {"stable_release": "fresh", "break_glass": glass})
        assert status == 400 and "break_glass apply to a canary only" in err["error"]["message"], err
        assert "chat" not in router.rollouts.routes
        await _refused_as_unknown_model(client)

        # Gated: it serves all traffic at once, as its release's model config says.
        await store_pass(bus, "fresh", router.ctx.settings)
        done = await _cli(router, "start", "chat", "--stable", "fresh", "--json", key=admin)
        assert done.exit_code == 0, done.output
        shown = json.loads(done.output)
        assert (shown["stable"]["release"], shown["stable"]["endpoint"], shown["canary"], shown["phase"]) == (
            "fresh", "canary", None, "promoted")
        for user in ("ann", "bob", "cy", ""):
            answer = await client.chat.completions.create(model="m", messages=HI, user=user)
            assert answer.choices[0].message.content == "canary says hi"
        assert [e.release for e in await served_events(served, 4)] == ["fresh"] * 4  # the event names it, not the answer
        assert (sims[1].requests, sims[0].total_requests) == ({"m": 4}, 0)

    # The route's reason, the rollout event and the audit record say what happened, and who did it.
    state = _states.decode((await states.next_msg(timeout=10)).data)
    assert (state.stable_release, state.canary_release, state.phase, state.decision_id) == (
        "fresh", "", "promoted", shown["decision_id"])
    assert state.reason == shown["reason"] and state.actor
    assert state.reason.startswith(f"first release fresh serves 100% (rolled out by {state.actor}): verified gate "
                                   f"decision {shown['decision_id']} allows it")
    entry = _audit.decode((await audit.next_msg(timeout=10)).data)
    assert (entry.action, entry.target, entry.kind, entry.actor, entry.reason) == (
        "first-release", "chat", "rollout", state.actor, state.reason)
    assert (entry.details["stable"], entry.details["phase"]) == ("fresh", "promoted")

    # A second first release is refused: a serving release changes through a rollout.
    status, err = await _put(http, router, {"stable_release": "r1"})
    assert (status, err["error"]["code"]) == (409, "already_serving"), err
    assert "'chat' already serves 'fresh'" in err["error"]["message"]
    again = await _cli(router, "start", "chat", "--stable", "fresh", key=admin)
    assert again.exit_code == 4 and "'fresh' is already the stable release of 'chat'" in again.output
    assert router.rollouts.route("chat").version == shown["version"]

    # The next release rolls out as a canary from the first (r1's PASS is stored: it takes its first step at once).
    canary = await _cli(router, "start", "chat", "--stable", "fresh", "--canary", "r1", "--json", key=admin)
    assert canary.exit_code == 0, canary.output
    route = json.loads(canary.stdout)  # stderr says which steps run (no applied folder declares chat: the router's)
    assert (route["stable"]["release"], route["canary"]["release"], route["phase"]) == ("fresh", "r1", "progressing")
    assert route["weight"] > 0
    await states.unsubscribe()  # messages left unread would hold the bus's drain at teardown
    await audit.unsubscribe()
