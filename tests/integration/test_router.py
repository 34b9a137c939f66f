"""The router against a real nats-server, chDB and the LLM simulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest

from lockgate.codec import Codec
from lockgate.contracts import DeadLetter, GateDecided, InferenceEvent, RolloutState
from lockgate.server.service import ServiceContext
from lockgate.services.router.domain import Route, Target
from lockgate.signing import Signer, publish_key, revoke_key, trust_file_path, trust_key
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import sink_stored

pytestmark = pytest.mark.timeout(60)

STABLE = SimConfig(models={"m": ModelSpec(answers={"hi": "hello there"}, default="stable says hi"),
                           "broken": ModelSpec(error_rate=1.0)})
CANARY = SimConfig(models={"m": ModelSpec(default="canary says hi")})
_events: Codec[list[InferenceEvent]] = Codec(list[InferenceEvent])
_states: Codec[RolloutState] = Codec(RolloutState)


@pytest.fixture
async def sims() -> AsyncIterator[tuple[SimServer, SimServer]]:
    async with SimServer(STABLE) as stable, SimServer(CANARY) as canary:
        yield stable, canary


@pytest.fixture
async def services(context: ServiceContext, run_services: Any, sims: tuple[SimServer, SimServer]) -> Any:
    """The router, and the sink that stores what it announces."""
    stable, canary = sims
    context.settings = context.settings.replace(stable_upstream=stable.url, canary_upstream=canary.url,
                                                deployment="chat", app="shop")
    return await run_services("sink", "router")


@pytest.fixture
def router(services: Any) -> Any:
    return services["router"]


@pytest.fixture
async def signer(context: ServiceContext) -> Signer:
    """A gatekeeper stand-in whose public key is in the trust file, so the router trusts its decisions."""
    s = Signer.generate()
    trust_key(trust_file_path(context.settings), s.public)
    return s


def gate(signer: Signer, **fields: Any) -> GateDecided:
    """A signed decision (the router ignores unsigned ones)."""
    return signer.sign(GateDecided(**{"release": "r2", "rules": [], **fields}))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


async def _start_canary(http: aiohttp.ClientSession, router: Any, **body: Any) -> dict[str, Any]:
    payload = {"stable_release": "r1", "canary_release": "r2", **body}
    async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=payload) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_non_streaming_completion_and_event_with_incoming_trace(router: Any, http: aiohttp.ClientSession,
                                                                      sims: Any) -> None:
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.inference("shop"))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "Authorization": "Bearer sk-secret",
               "x-lockgate-user": "alice", "x-lockgate-tenant": "acme"}
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat(), headers=headers) as resp:
        assert resp.status == 200
        data = await resp.json()
        assert resp.headers["x-lockgate-variant"] == "stable"
        assert resp.headers["x-lockgate-trace-id"] == trace_id
    assert data["choices"][0]["message"]["content"] == "hello there"
    assert sims[0].requests == {"m": 1}

    msg = await sub.next_msg(timeout=10)
    assert trace_id in msg.headers["traceparent"]
    (event,) = _events.decode(msg.data)
    assert (event.trace_id, event.tenant, event.app, event.deployment) == (trace_id, "acme", "shop", "chat")
    assert (event.variant, event.model, event.response_model, event.status) == ("stable", "m", "m", "ok")
    assert (event.input_tokens, event.output_tokens) == (data["usage"]["prompt_tokens"],
                                                        data["usage"]["completion_tokens"])
    assert (event.prompt, event.response, event.finish_reason) == ("hi", "hello there", "stop")
    assert event.user_hash and "alice" not in event.user_hash
    assert "sk-secret" not in msg.data.decode()
    assert event.latency_ms > 0 and event.provider == "openai"


async def test_streaming_completion_hides_injected_usage(router: Any, http: aiohttp.ClientSession) -> None:
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.inference("shop"))
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat(stream=True)) as resp:
        assert resp.status == 200
        lines = [ln.decode().strip() async for ln in resp.content if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(c["choices"] for c in chunks)  # the client did not ask for usage
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "hello there"

    (event,) = _events.decode((await sub.next_msg(timeout=10)).data)
    assert event.response == "hello there" and event.output_tokens > 0 and event.input_tokens > 0
    assert event.ttft_ms > 0 and event.finish_reason == "stop"


async def test_streaming_usage_kept_when_asked(router: Any, http: aiohttp.ClientSession) -> None:
    body = _chat(stream=True, stream_options={"include_usage": True})
    async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
        lines = [ln.decode().strip() async for ln in resp.content if ln.strip()]
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] > 0


async def test_canary_split_by_weight_is_sticky(router: Any, http: aiohttp.ClientSession, sims: Any) -> None:
    state = await _start_canary(http, router, initial_weight=30)
    assert (state["weight"], state["phase"], state["canary"]["release"]) == (30.0, "idle", "r2")
    seen: dict[str, str] = {}
    for i in range(300):
        body = _chat(user=f"user-{i}")
        async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
            seen[f"user-{i}"] = resp.headers["x-lockgate-variant"]
            text = (await resp.json())["choices"][0]["message"]["content"]
            assert text == ("canary says hi" if seen[f"user-{i}"] == "canary" else "hello there")
    share = sum(v == "canary" for v in seen.values()) / len(seen)
    assert 0.2 < share < 0.4
    assert sims[1].requests["m"] == sum(v == "canary" for v in seen.values())
    for user in list(seen)[:20]:
        async with http.post(f"{router.url}/v1/chat/completions", json=_chat(user=user)) as resp:
            assert resp.headers["x-lockgate-variant"] == seen[user]


async def test_gate_pass_promotes_step_by_step(router: Any, services: Any, http: aiohttp.ClientSession,
                                               signer: Signer) -> None:
    bus, store = router.ctx.bus, router.ctx.store
    sub = await bus.nc.subscribe(bus.subjects.rollout("chat"))
    await _start_canary(http, router)
    await bus.publish(bus.subjects.gate_decided("r2"), gate(signer, decision="PASS"))
    states: list[RolloutState] = []
    while not states or states[-1].phase != "promoted":
        states.append(_states.decode((await sub.next_msg(timeout=10)).data))
    assert [(s.phase, s.canary_weight) for s in states] == [
        ("idle", 10.0), ("progressing", 25.0), ("progressing", 50.0), ("progressing", 100.0), ("promoted", 0.0)]
    assert states[-1].stable_release == "r2"
    await router.rollouts.flush()
    await sink_stored(services["sink"].handlers, rollout_events=len(states))
    rows = store.rows("SELECT phase, canary_weight, stable_release FROM rollout_events ORDER BY time")
    assert [(r["phase"], r["canary_weight"]) for r in rows] == [(s.phase, s.canary_weight) for s in states]
    kv = await bus.kv(bus.subjects.kv_routes)
    persisted = msgspec.json.decode((await kv.get("chat")).value, type=Route)
    assert persisted.phase == "promoted" and persisted.stable.release == "r2"
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat()) as resp:
        assert resp.headers["x-lockgate-release"] == "r2"
        assert (await resp.json())["choices"][0]["message"]["content"] == "canary says hi"


async def test_gate_block_sends_canary_to_zero_at_once(router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    bus = router.ctx.bus
    await _start_canary(http, router, initial_weight=100)
    decision = gate(signer, decision="BLOCK", reason="toxicity too high")
    await bus.publish(bus.subjects.gate_decided("r2"), decision)
    await router.rollouts.wait_for(lambda routes: routes["chat"].phase == "aborted", timeout=10)
    route = router.rollouts.route("chat")
    assert route.weight == 0.0 and route.decision_id == decision.id and "toxicity" in route.reason
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat()) as resp:
        assert resp.headers["x-lockgate-variant"] == "stable"


async def test_decision_already_in_kv_applies_when_canary_starts(router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    bus = router.ctx.bus
    kv = await bus.kv(bus.subjects.kv_gates)
    await kv.put(token("r2"), msgspec.json.encode(gate(signer, decision="BLOCK")))
    state = await _start_canary(http, router)
    assert (state["phase"], state["weight"]) == ("aborted", 0.0)


async def test_malformed_gate_message_goes_to_dlq_and_router_keeps_working(
    router: Any, http: aiohttp.ClientSession, signer: Signer
) -> None:
    bus = router.ctx.bus
    dlq = await bus.nc.subscribe(bus.subjects.dlq("router"))
    await _start_canary(http, router)
    await bus.publish(bus.subjects.gate_decided("r2"), b'{"type":"lockgate.gate.decided","release":5}',
                      msg_id="bad-gate")
    letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=10)).data)
    assert letter.origin == "router" and b'"release":5' in letter.payload
    await bus.publish(bus.subjects.gate_decided("r2"), gate(signer, decision="BLOCK"))
    await router.rollouts.wait_for(lambda routes: routes["chat"].phase == "aborted", timeout=10)


async def test_upstream_failure_is_502_and_error_event(router: Any, http: aiohttp.ClientSession) -> None:
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.inference("shop"))
    async with http.post(f"{router.url}/v1/chat/completions", json={**_chat(), "model": "broken"}) as resp:
        assert resp.status == 502
        err = (await resp.json())["error"]
    assert "HTTP 500" in err["message"] and "simulated" in err["message"]
    async with http.post(f"{router.url}/v1/chat/completions", json={**_chat(), "model": "nope"}) as resp:
        assert resp.status == 404  # the caller's mistake passes through as the upstream said it
    events = _events.decode((await sub.next_msg(timeout=10)).data)
    while len(events) < 2:
        events += _events.decode((await sub.next_msg(timeout=10)).data)
    assert [(e.status, e.error_type) for e in events] == [("error", "500"), ("error", "404")]


@pytest.mark.parametrize(
    ("body", "part"),
    [({"stable_release": "r1"}, "canary_release"), ({"stable_release": "a", "canary_release": "a"}, "differ"),
     ({"stable_release": "a", "canary_release": "b", "initial_weight": 300}, "initial_weight"),
     ({"stable_release": "a", "canary_release": "b", "bogus": 1}, "bogus")],
)
async def test_admin_rejects_bad_canary_requests(router: Any, http: aiohttp.ClientSession, body: dict,
                                                 part: str) -> None:
    async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
        assert resp.status == 400
        assert part in (await resp.json())["error"]["message"]


async def test_routes_restored_from_kv(context: ServiceContext, run_services: Any, sims: Any,
                                       http: aiohttp.ClientSession) -> None:
    stable, canary = sims
    route = Route(deployment="chat", stable=Target(release="r1", upstream=stable.url),
                  canary=Target(release="r2", upstream=canary.url), weight=100.0)
    kv = await context.bus.kv(context.bus.subjects.kv_routes)
    await kv.put("chat", msgspec.json.encode(route))
    router = (await run_services("router"))["router"]
    async with http.get(f"{router.url}/lockgate/v1/deployments/chat") as resp:
        assert (await resp.json())["weight"] == 100.0
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat(),
                         headers={"x-lockgate-deployment": "chat"}) as resp:
        assert resp.headers["x-lockgate-variant"] == "canary"
    assert router.endpoints == {"router": router.url}


async def test_secrets_in_prompts_never_reach_the_bus(router: Any, http: aiohttp.ClientSession) -> None:
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.inference("shop"))
    secret = "sk-live0123456789abcdefghijkl"
    body = {"model": "m", "messages": [{"role": "user", "content": f"my key is {secret}, keep it safe"}]}
    async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
    msg = await sub.next_msg(timeout=10)
    (event,) = _events.decode(msg.data)
    assert secret not in msg.data.decode()
    assert event.prompt == "my key is [REDACTED], keep it safe"


async def test_bad_deployment_names_are_refused_and_later_changes_still_apply(
    router: Any, http: aiohttp.ClientSession, context: ServiceContext
) -> None:
    # Issue 7: a deployment named `a*b` stuck at the head of the route outbox and every later
    # route change failed until restart. Now it is refused at the edge with a clear 400.
    base = f"{router.url}/lockgate/v1/deployments"
    body = {"stable_release": "r1", "canary_release": "r2"}
    for bad in ("a%2Ab", "a%20b", "a%3Eb", ".a"):
        async with http.put(f"{base}/{bad}", json=body) as resp:
            assert resp.status == 400, await resp.text()
            assert "invalid deployment" in (await resp.json())["error"]["message"]
        async with http.post(f"{base}/{bad}/promote") as resp:
            assert resp.status == 400
    async with http.put(f"{base}/chat", json={"stable_release": "r1", "canary_release": "r*2"}) as resp:
        assert resp.status == 400 and "canary_release" in (await resp.json())["error"]["message"]
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat(),
                         headers={"x-lockgate-deployment": "a*b"}) as resp:
        assert resp.status == 400 and "x-lockgate-deployment" in (await resp.json())["error"]["message"]

    # A later valid change applies, and a dotted name gets a key of its own, not `chat_eu`'s.
    for name in ("chat.eu", "chat_eu"):
        async with http.put(f"{base}/{name}", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["deployment"] == name
    kv = await context.bus.kv(context.bus.subjects.kv_routes)
    for name in ("chat.eu", "chat_eu"):
        stored = msgspec.json.decode((await kv.get(token(name))).value, type=Route)
        assert (stored.deployment, stored.canary.release) == (name, "r2")


async def test_routes_with_escaped_keys_are_restored_under_their_names(
    context: ServiceContext, run_services: Any, sims: Any, http: aiohttp.ClientSession
) -> None:
    stable, canary = sims
    route = Route(deployment="chat.eu", stable=Target(release="r1", upstream=stable.url),
                  canary=Target(release="r2", upstream=canary.url), weight=100.0)
    kv = await context.bus.kv(context.bus.subjects.kv_routes)
    await kv.put(token("chat.eu"), msgspec.json.encode(route))
    router = (await run_services("router"))["router"]
    async with http.get(f"{router.url}/lockgate/v1/deployments/chat.eu") as resp:
        assert (await resp.json())["weight"] == 100.0
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat(),
                         headers={"x-lockgate-deployment": "chat.eu"}) as resp:
        assert resp.headers["x-lockgate-variant"] == "canary"


async def test_untrusted_decisions_move_no_traffic_and_are_dead_lettered(
    router: Any, http: aiohttp.ClientSession, signer: Signer, context: ServiceContext
) -> None:
    # Issue 7: a PASS signed with a freshly generated key, announced in the open keys bucket, moved
    # a canary from 10% to 25%. Trust now comes only from the trust file; the bucket is never read.
    bus = router.ctx.bus
    dlq = await bus.nc.subscribe(bus.subjects.dlq("router"))
    await _start_canary(http, router)
    rogue, retired = Signer.generate(), Signer.generate()
    await publish_key(bus, rogue)
    trust_file = trust_file_path(context.settings)
    trust_key(trust_file, retired.public)
    revoke_key(trust_file, retired.key_id)
    attacks = [
        (rogue.sign(GateDecided(release="r2", decision="PASS", rules=[])), "unknown key id"),
        (GateDecided(release="r2", decision="PASS", rules=[]), "is not signed"),
        (retired.sign(GateDecided(release="r2", decision="PASS", rules=[])), "revoked key id"),
        # A genuine PASS for r1 replayed on r2's subject must not count for r2 either.
        (gate(signer, release="r1", decision="PASS"), "arrived on"),
    ]
    for forged, _ in attacks:
        await bus.publish(bus.subjects.gate_decided("r2"), forged)
    for forged, reason in attacks:
        letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=10)).data)
        assert letter.error.startswith("signature invalid") or "refusing it" in letter.error, letter.error
        assert reason in letter.error and forged.id in letter.error
    route = router.rollouts.route("chat")
    assert (route.phase, route.weight) == ("idle", 10.0)
    # The consumer is still acting on trusted decisions.
    await bus.publish(bus.subjects.gate_decided("r2"), gate(signer, decision="BLOCK"))
    await router.rollouts.wait_for(lambda routes: routes["chat"].phase == "aborted", timeout=10)
