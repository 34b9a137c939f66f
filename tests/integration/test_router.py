"""The router against a real nats-server, chDB and the LLM simulator."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
import yaml

from lockgate.bus import Bus
from lockgate.cli.status import read_overrides, read_status
from lockgate.codec import Codec
from lockgate.contracts import DeadLetter, GateDecided, InferenceEvent, RolloutState
from lockgate.errors import NotFound
from lockgate.identity import sign_override
from lockgate.server.apikeys import Bootstrap, KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.router import domain
from lockgate.services.router.domain import Route, Target
from lockgate.signing import Signer, publish_key, revoke_key, trust_file_path, trust_key
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import (
    break_glass,
    gate_decided,
    judged,
    person,
    raw_http,
    register_model_release,
    served_events,
    sink_stored,
    store_pass,
)

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
def passthrough() -> bool:
    """Governed by default: a test about the wire opts in with `@pytest.mark.parametrize("passthrough", [True])`."""
    return False


@pytest.fixture
def gateway_policy() -> dict[str, Any] | None:
    """No gateway file (budgets, rate limits, cache) unless a test parametrizes one."""
    return None


@pytest.fixture
async def services(context: ServiceContext, run_services: Any, sims: tuple[SimServer, SimServer],
                   signer: Signer, passthrough: bool, gateway_policy: dict[str, Any] | None, tmp_path: Path) -> Any:
    """The router, and the sink that stores what it announces."""
    stable, canary = sims
    # r1 (stable) and r2 (canary) are registered releases whose model configs send them to the two
    # simulators (the `default` and `canary` endpoints the upstream settings define). They are the keys' tenant's
    # (`keys`): its app key is served only the deployments of its own tenant's releases.
    await register_model_release(context.bus, "r1", "m", "default", tenant="acme")
    await register_model_release(context.bus, "r2", "m", "canary", tenant="acme")
    # r1, the stable release the tests start from, passed its gate (a new stable needs an allowing decision).
    kv = await context.bus.kv(context.bus.subjects.kv_gates)
    await kv.put(token("r1"), msgspec.json.encode(await gate(context.bus, signer, release="r1", decision="PASS")))
    context.settings = context.settings.replace(stable_upstream=stable.url, canary_upstream=canary.url,
                                                deployment="chat", app="shop", passthrough=passthrough)
    if gateway_policy is not None:
        (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(gateway_policy))
        context.settings = context.settings.replace(gateway_file=str(tmp_path / "gateway.yaml"))
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


async def gate(bus: Bus, signer: Signer, **fields: Any) -> GateDecided:
    """A signed decision (the router ignores unsigned ones) naming the content its release is bound to, as the
    gatekeeper's do (the router admits a release only with a decision about exactly that content)."""
    release = fields.get("release", "r2")
    try:
        bound = await judged(bus, release)
    except NotFound:  # a decision for a name nobody registered
        bound = {}
    return signer.sign(GateDecided(**{"release": release, "rules": [], "artifacts": bound, **fields}))


@pytest.fixture
def keys(context: ServiceContext) -> Bootstrap:
    """An admin key and an app key (tenant acme, app shop) in the test's home."""
    return bootstrap(context.settings.home, tenant="acme", app="shop")


@pytest.fixture
async def http(keys: Bootstrap) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that presents the admin key (same tenant and app as the app key) unless a request names another."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as s:
        yield s


def bearer(key: str) -> dict[str, str]:
    """Headers presenting one key."""
    return {"Authorization": f"Bearer {key}"}


def _chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


async def _start_canary(http: aiohttp.ClientSession, router: Any, **body: Any) -> dict[str, Any]:
    payload = {"stable_release": "r1", "canary_release": "r2", **body}
    async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=payload) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.fixture
async def governed(router: Any, http: aiohttp.ClientSession) -> None:
    """Deployment `chat` (the default) governed: r1, gated, serves everyone; canary r2 waits at 0% for a decision."""
    await _start_canary(http, router)


async def test_non_streaming_completion_and_event_with_incoming_trace(router: Any, http: aiohttp.ClientSession,
                                                                      sims: Any, keys: Bootstrap, governed: None) -> None:
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.served("shop", "acme"))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    # The tenant and app headers are the client's choice, so the event takes both from the key instead.
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "Authorization": f"Bearer {keys.app_key}",
               "x-lockgate-user": "alice", "x-lockgate-tenant": "evil", "x-lockgate-app": "other"}
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat(), headers=headers) as resp:
        assert resp.status == 200
        data = await resp.json()
        # The arm is the event's (below), never an app key's to read: it could aim requests at one (README).
        assert "x-lockgate-variant" not in resp.headers and "x-lockgate-release" not in resp.headers
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
    assert keys.app_key not in msg.data.decode()
    assert sims[0].authorizations == [None]  # the client's key is never forwarded upstream
    assert event.latency_ms > 0 and event.provider == "openai"


async def test_streaming_completion_hides_injected_usage(router: Any, http: aiohttp.ClientSession,
                                                         governed: None) -> None:
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.served("shop", "acme"))
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


async def test_streaming_usage_kept_when_asked(router: Any, http: aiohttp.ClientSession, governed: None) -> None:
    body = _chat(stream=True, stream_options={"include_usage": True})
    async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
        lines = [ln.decode().strip() async for ln in resp.content if ln.strip()]
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] > 0


async def test_canary_split_by_weight_is_sticky(router: Any, http: aiohttp.ClientSession, sims: Any) -> None:
    # No decision for r2: only an admin's break-glass lets it take a weight (and holds it there).
    state = await _start_canary(http, router, initial_weight=30,
                                break_glass=break_glass(router.ctx.settings, "chat", "r2", "canary", "split test",
                                                        weight=30))
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


async def _half_canary(http: aiohttp.ClientSession, router: Any, why: str) -> dict[str, Any]:
    """Canary r2 at 50% of `chat` (an admin's break-glass: no decision allows it)."""
    return await _start_canary(http, router, initial_weight=50,
                               break_glass=break_glass(router.ctx.settings, "chat", "r2", "canary", why, weight=50))


# What differs from one answer to the next whatever the arm: the request's own ids, time and size.
_PER_ANSWER = {"x-lockgate-trace-id", "date", "content-length", "x-request-id"}


async def test_only_an_admin_keys_answer_names_its_arm(router: Any, http: aiohttp.ClientSession,
                                                       keys: Bootstrap) -> None:
    # Probe p1: every answer said `x-lockgate-variant` and `x-lockgate-release`, so one request told a client
    # which arm a user id was on. Operators debugging (an admin key) still read them; the events keep them.
    await _half_canary(http, router, "headers test")
    url = f"{router.url}/v1/chat/completions"
    seen: set[str] = set()
    for stream in (False, True):
        for user in [f"u{i}" for i in range(20)]:  # both arms, but once in 2**19
            body = _chat(user=user, stream=stream)
            async with http.post(url, json=body, headers=bearer(keys.app_key)) as resp:
                assert resp.status == 200 and await resp.read()
                assert "x-lockgate-variant" not in resp.headers and "x-lockgate-release" not in resp.headers
                assert resp.headers["x-lockgate-trace-id"]
            async with http.post(url, json=body, headers=bearer(keys.admin_key)) as resp:
                assert resp.status == 200 and await resp.read()
                arm = resp.headers["x-lockgate-variant"]
                assert resp.headers["x-lockgate-release"] == {"canary": "r2", "stable": "r1"}[arm]
            seen.add(arm)
    assert seen == {"canary", "stable"}  # both arms' answers were read


async def test_an_app_key_can_neither_compute_nor_read_which_of_its_user_ids_are_on_the_canary(
        router: Any, http: aiohttp.ClientSession, keys: Bootstrap) -> None:
    # Probe p1: the sticky bucket was sha256(deployment, user id), which any client computes, and the answer's
    # headers said the arm; an app key sent long prompts (or max_tokens 1) to its canary user ids only, and
    # aborted a healthy canary through its analysis and through the canary-versus-stable drift report.
    bus = router.ctx.bus
    served = await bus.nc.subscribe(bus.subjects.served("shop", "acme"))
    await _half_canary(http, router, "steering test")
    salt = router.rollouts.sticky_salt(router.rollouts.route("chat"))
    # The admin API never shows the secret: a change's answer, a read, the list, a watch.
    base = f"{router.url}/lockgate/v1/deployments"
    for path in ("/chat", "", "/chat/watch"):
        async with http.get(base + path) as resp:
            shown = (await resp.content.readline()).decode()
            assert resp.status == 200 and "canary" in shown and "salt" not in shown and salt not in shown, shown
    users = [f"victim-{i}" for i in range(200)]
    looks: dict[str, dict[str, str]] = {}
    async with aiohttp.ClientSession(headers=bearer(keys.app_key)) as app:
        for user in users:
            async with app.post(f"{router.url}/v1/chat/completions", json=_chat(user=user)) as resp:
                assert resp.status == 200 and await resp.read()
                looks[user] = {k.lower(): v for k, v in resp.headers.items() if k.lower() not in _PER_ANSWER}
    by_hash = {e.user_hash: e.variant for e in await served_events(served, len(users))}
    arm = {u: by_hash[router.rollouts.user_hash("acme", u)] for u in users}
    assert 60 < sum(v == "canary" for v in arm.values()) < 140  # both arms served
    # Nothing in the headers says which: canary and stable users' answers carry the same names and values.
    canary = {json.dumps(looks[u], sort_keys=True) for u in users if arm[u] == "canary"}
    stable = {json.dumps(looks[u], sort_keys=True) for u in users if arm[u] == "stable"}
    assert canary == stable and len(canary) == 1, (canary, stable)
    # Nor does the hash a client can compute predict it: it agrees with the arm by chance only.
    guessed = sum((domain.bucket("chat", u) < 5000) == (arm[u] == "canary") for u in users)
    assert 60 < guessed < 140, guessed
    # The next rollout of the deployment splits its users afresh, under a key of its own.
    answer = await _half_canary(http, router, "steering test, again")
    again = router.rollouts.route("chat")
    assert router.rollouts.sticky_salt(again) not in ("", salt) and salt and "salt" not in answer
    moved = sum(domain.choose(again, u, salt=router.rollouts.sticky_salt(again))[0] != arm[u] for u in users)
    assert 60 < moved < 140, moved


async def test_gate_pass_promotes_step_by_step(router: Any, services: Any, http: aiohttp.ClientSession,
                                               signer: Signer) -> None:
    bus, store = router.ctx.bus, router.ctx.store
    sub = await bus.nc.subscribe(bus.subjects.rollout("chat"))
    await _start_canary(http, router)
    await gate_decided(bus, await gate(router.ctx.bus, signer, decision="PASS"))
    states: list[RolloutState] = []
    while not states or states[-1].phase != "promoted":
        states.append(_states.decode((await sub.next_msg(timeout=10)).data))
    assert [(s.phase, s.canary_weight) for s in states] == [
        ("idle", 0.0), ("progressing", 10.0), ("progressing", 25.0), ("progressing", 50.0), ("progressing", 100.0), ("promoted", 0.0)]
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
    await _start_canary(http, router, initial_weight=100,
                        break_glass=break_glass(router.ctx.settings, "chat", "r2", "canary", "block test", weight=100))
    decision = await gate(router.ctx.bus, signer, decision="BLOCK", reason="toxicity too high")
    await gate_decided(bus, decision)
    await router.rollouts.wait_for(lambda routes: routes["chat"].phase == "aborted", timeout=10)
    route = router.rollouts.route("chat")
    assert route.weight == 0.0 and route.decision_id == decision.id and "toxicity" in route.reason
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat()) as resp:
        assert resp.headers["x-lockgate-variant"] == "stable"


async def test_decision_already_in_kv_applies_when_canary_starts(router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    bus = router.ctx.bus
    kv = await bus.kv(bus.subjects.kv_gates)
    await kv.put(token("r2"), msgspec.json.encode(await gate(router.ctx.bus, signer, decision="BLOCK")))
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
    await gate_decided(bus, await gate(router.ctx.bus, signer, decision="BLOCK"))
    await router.rollouts.wait_for(lambda routes: routes["chat"].phase == "aborted", timeout=10)


@pytest.mark.parametrize("passthrough", [True])  # the client's own models reach the simulator as it sent them
async def test_upstream_failure_is_502_and_error_event(router: Any, http: aiohttp.ClientSession) -> None:
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.served("shop", "acme"))
    async with http.post(f"{router.url}/v1/chat/completions", json={**_chat(), "model": "broken"}) as resp:
        assert resp.status == 502
        err = (await resp.json())["error"]
    assert "HTTP 500" in err["message"] and "simulated" in err["message"]
    async with http.post(f"{router.url}/v1/chat/completions", json={**_chat(), "model": "nope"}) as resp:
        assert resp.status == 404  # the caller's mistake passes through as the upstream said it
    events = _events.decode((await sub.next_msg(timeout=10)).data)
    while len(events) < 4:  # the 500 was retried: its two earlier calls are error events of their own
        events += _events.decode((await sub.next_msg(timeout=10)).data)
    own = [e for e in events if "lockgate.attempt" not in e.attributes]
    assert [(e.status, e.error_type) for e in own] == [("error", "500"), ("error", "404")]
    assert [e.error_type for e in events if e not in own] == ["500", "500"]


@pytest.mark.parametrize(
    ("body", "part"),
    # A stable release alone is a first release (test_router_first_release.py): nothing of a canary applies to it.
    [({"stable_release": "r1", "initial_weight": 10}, "initial_weight apply to a canary only"),
     ({"stable_release": "a", "canary_release": "a"}, "differ"),
     ({"stable_release": "a", "canary_release": "b", "initial_weight": 300}, "initial_weight"),
     ({"stable_release": "a", "canary_release": "b", "bogus": 1}, "bogus")],
)
async def test_admin_rejects_bad_canary_requests(router: Any, http: aiohttp.ClientSession, body: dict,
                                                 part: str) -> None:
    async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
        assert resp.status == 400
        assert part in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/chat/completions"), ("PUT", "/lockgate/v1/deployments/chat"),
    ("PATCH", "/lockgate/v1/deployments/chat"), ("POST", "/lockgate/v1/deployments/chat/pause"),
    ("POST", "/lockgate/v1/deployments/chat/abort")])
async def test_a_body_that_is_not_the_gzip_it_claims_is_a_400_saying_so(
        router: Any, http: aiohttp.ClientSession, method: str, path: str, caplog: pytest.LogCaptureFixture) -> None:
    headers = {"Content-Type": "application/merge-patch+json" if method == "PATCH" else "application/json",
               "Content-Encoding": "gzip"}
    async with http.request(method, router.url + path, data=b"not gzip at all", headers=headers) as resp:
        # closed after the answer: the rest of that body must not be read as the next request
        assert (resp.status, resp.headers.get("Connection")) == (400, "close")
        assert "the request body is not valid gzip data (Content-Encoding: gzip)" in (await resp.json())["error"]["message"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []  # a client's mistake, no traceback


async def test_a_body_over_the_size_limit_is_a_413_in_openais_error_shape(
        router: Any, http: aiohttp.ClientSession) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * (33 * 2**20) + b'"}]}'
    async with http.post(f"{router.url}/v1/chat/completions", data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        assert (resp.status, resp.headers.get("Connection")) == (413, "close")
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("invalid chat.completions request: the request body is too large: Maximum")


async def test_a_request_nested_deeper_than_python_can_decode_is_a_400(
        router: Any, http: aiohttp.ClientSession) -> None:
    content = b"[" * 100_000 + b"]" * 100_000  # `content` may be anything, so msgspec recurses into it
    body = b'{"model": "m", "messages": [{"role": "user", "content": ' + content + b"}]}"
    async with http.post(f"{router.url}/v1/chat/completions", data=body,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == "invalid chat.completions request: JSON is nested too deeply"


async def test_routes_restored_from_kv(context: ServiceContext, run_services: Any, sims: Any,
                                       http: aiohttp.ClientSession) -> None:
    stable, canary = sims
    route = Route(deployment="chat", stable=Target(release="r1", endpoint="default", model="m"),
                  canary=Target(release="r2", endpoint="canary", model="m"), weight=100.0)
    kv = await context.bus.kv(context.bus.subjects.kv_routes)
    await kv.put("chat", msgspec.json.encode(route))
    router = (await run_services("router"))["router"]
    async with http.get(f"{router.url}/lockgate/v1/deployments/chat") as resp:
        assert (await resp.json())["weight"] == 100.0
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat(),
                         headers={"x-lockgate-deployment": "chat"}) as resp:
        assert resp.headers["x-lockgate-variant"] == "canary"
    assert router.endpoints == {"router": router.url}


async def test_secrets_in_prompts_never_reach_the_bus(router: Any, http: aiohttp.ClientSession, governed: None) -> None:
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.served("shop", "acme"))
    secret = "sk-live0123456789abcdefghijkl"
    body = {"model": "m", "messages": [{"role": "user", "content": f"my key is {secret}, keep it safe"}]}
    async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
    msg = await sub.next_msg(timeout=10)
    (event,) = _events.decode(msg.data)
    assert secret not in msg.data.decode()
    assert event.prompt == "my key is [REDACTED], keep it safe"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer lg-not-a-key"}, {"Authorization": "Basic eDp5"}])
async def test_chat_without_a_valid_key_is_401_in_openai_format(router: Any, sims: Any, headers: dict) -> None:
    # Before: the router proxied anyone's request (and forwarded their Authorization upstream).
    async with aiohttp.ClientSession() as anon, \
            anon.post(f"{router.url}/v1/chat/completions", json=_chat(), headers=headers) as resp:
        assert resp.status == 401
        err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
    assert sims[0].total_requests == 0


@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                                         ("GET", "/lockgate/v1/deployments/chat")])
async def test_a_key_that_is_not_utf8_is_a_401(router: Any, sims: Any, method: str, path: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    # Before: hashing the key raised UnicodeEncodeError, a 500 with a traceback on every path.
    status, body = await raw_http(router.url, method, path, {"Authorization": b"Bearer lg-\xff\xfe"}, b"{}")
    assert status == 401 and "invalid API key" in json.loads(body)["error"]["message"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("header", [{"x-stainless-lang": b"py\x00thon"}, {"x-folded": b"a\r\n  b"}],
                         ids=["nul", "folded"])
async def test_malformed_http_is_a_400_and_one_warning_line(router: Any, sims: Any, keys: Bootstrap,
                                                            header: dict[str, bytes],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    # aiohttp's parser answers these before the app runs (its plain-text 400: aiohttp has no supported hook
    # for that body). Before: logged as an ERROR with a traceback, one per malformed request.
    status, _ = await raw_http(router.url, "POST", "/v1/chat/completions",
                               {"Authorization": f"Bearer {keys.app_key}".encode(), **header},
                               json.dumps(_chat()).encode())
    assert status == 400 and sims[0].total_requests == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    (warning,) = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert warning.levelno == logging.WARNING and warning.exc_info is None and "\n" not in warning.getMessage()
    assert "malformed HTTP, answered 400" in warning.getMessage()


@pytest.mark.parametrize("header", ["x-stainless-lang", "OpenAI-Beta", "x-lockgate-user", "x-lockgate-session"])
async def test_a_header_that_is_not_utf8_is_a_400_naming_it(router: Any, sims: Any, keys: Bootstrap, header: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    # Before: a forwarded header was a 500 (the upstream request could not be encoded), and a user or
    # session header made the event unencodable, so the request went unrecorded (cost, drift, analysis).
    status, body = await raw_http(router.url, "POST", "/v1/chat/completions",
                                  {"Authorization": f"Bearer {keys.app_key}".encode(), header: b"caf\xe9"},
                                  json.dumps(_chat()).encode())
    assert status == 400
    assert json.loads(body)["error"]["message"] == (f"invalid chat.completions request: header {header} "
                                                     "is not UTF-8 text")
    assert sims[0].total_requests == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_revoked_key_is_refused_at_once(router: Any, keys: Bootstrap, context: ServiceContext,
                                              governed: None) -> None:
    store = KeyStore(context.settings.home)
    plain, rec = store.create("acme", "shop")
    async with aiohttp.ClientSession() as c:
        async with c.post(f"{router.url}/v1/chat/completions", json=_chat(), headers=bearer(plain)) as resp:
            assert resp.status == 200
        store.revoke(rec.id)  # the router re-reads the key file when it changes: no restart
        async with c.post(f"{router.url}/v1/chat/completions", json=_chat(), headers=bearer(plain)) as resp:
            assert resp.status == 401


async def test_an_operator_key_scoped_to_deployments_reads_and_changes_only_those(
        router: Any, http: aiohttp.ClientSession, governed: None) -> None:
    # Before: an operator key of tenant acme/app other started, un-analysed and promoted a canary on another team's
    # deployment (its tenant and app named who acted, they limited nothing). On a shared router, scope it.
    store = KeyStore(router.ctx.settings.home)
    theirs, _ = store.create("acme", "other", "operator", deployments=["support"])
    viewer, _ = store.create("acme", "other", "viewer", deployments=["support"])
    base = f"{router.url}/lockgate/v1/deployments"
    for key, method, path in ((theirs, "POST", "/chat/promote"), (theirs, "PATCH", "/chat"), (viewer, "GET", "/chat"),
                              (theirs, "PUT", "/chat")):
        async with http.request(method, base + path, headers=bearer(key), json={"stable_release": "r1"}) as resp:
            body = await resp.json()
            assert (resp.status, body["error"]["code"]) == (403, "deployment_not_in_scope"), (method, path, body)
            assert "may only use support, not deployment 'chat'" in body["error"]["message"] and key not in str(body)
    async with http.get(base, headers=bearer(viewer)) as resp:
        assert resp.status == 200 and await resp.json() == []  # chat's route is not listed to it
    # An unscoped key sees every route of its tenant's releases (chat serves tenant acme's r1); another
    # tenant's unscoped key lists none of them (before, it listed them too, release names, reasons and all).
    async with http.get(base, headers=bearer(store.create("acme", "ops", "viewer")[0])) as resp:
        assert [r["deployment"] for r in await resp.json()] == ["chat"]
    async with http.get(base, headers=bearer(store.create("globex", "ops", "viewer")[0])) as resp:
        assert await resp.json() == []
    assert router.rollouts.route("chat").phase != "promoted"


@pytest.mark.parametrize("action", ["promote", "abort"])
async def test_admin_api_needs_operator_or_admin(router: Any, keys: Bootstrap, action: str) -> None:
    # Before: an unauthenticated POST .../promote made a never-gated canary stable.
    async with aiohttp.ClientSession() as c:
        async with c.post(f"{router.url}/lockgate/v1/deployments/chat/{action}") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with c.post(f"{router.url}/lockgate/v1/deployments/chat/{action}",
                          headers=bearer(keys.app_key)) as resp:
            assert resp.status == 403
            assert "requires role operator" in (await resp.json())["error"]["message"]
        async with c.put(f"{router.url}/lockgate/v1/deployments/chat", headers=bearer(keys.app_key),
                         json={"stable_release": "r1", "canary_release": "r2"}) as resp:
            assert resp.status == 403
        viewer, _ = KeyStore(router.ctx.settings.home).create("acme", "ops", "viewer")
        async with c.get(f"{router.url}/lockgate/v1/deployments/chat", headers=bearer(viewer)) as resp:
            # Reading a route is a viewer's right (nothing is rolled out to chat: not found, neither 401 nor 403).
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "deployment_not_found"
    assert router.rollouts.route("chat").canary is None


# Admission: a release takes traffic only when a verified decision allows exactly it.


async def _put(http: aiohttp.ClientSession, router: Any, headers: dict[str, str] | None = None,
               **body: Any) -> tuple[int, dict[str, Any]]:
    async with http.put(f"{router.url}/lockgate/v1/deployments/chat", headers=headers,
                        json={"stable_release": "r1", "canary_release": "r2", **body}) as resp:
        return resp.status, await resp.json()


async def _post(http: aiohttp.ClientSession, router: Any, action: str, headers: dict[str, str] | None = None,
                **body: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/{action}", headers=headers,
                         json=body or None) as resp:
        return resp.status, await resp.json()


async def test_never_gated_canary_waits_at_zero_and_cannot_be_promoted(router: Any, http: aiohttp.ClientSession,
                                                                        sims: Any) -> None:
    # Before: a never-gated release served 10% at once, and `promote` made it stable (200).
    status, route = await _put(http, router)
    assert status == 200 and (route["weight"], route["phase"]) == (0.0, "idle")
    for i in range(50):
        async with http.post(f"{router.url}/v1/chat/completions", json=_chat(user=f"u{i}")) as resp:
            assert resp.headers["x-lockgate-variant"] == "stable"
    assert sims[1].total_requests == 0
    status, err = await _post(http, router, "promote")
    assert status == 409 and err["error"]["code"] == "not_admitted"
    assert "no verified gate decision" in err["error"]["message"]
    status, err = await _put(http, router, initial_weight=25)  # a weight change is refused the same way
    assert status == 409 and err["error"]["code"] == "not_admitted"
    assert router.rollouts.route("chat").stable.release == "r1"


async def test_blocked_canary_cannot_be_promoted(router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Before: a BLOCKed release was made stable by an unauthenticated promote.
    await _put(http, router)
    await gate_decided(router.ctx.bus, await gate(router.ctx.bus, signer, decision="BLOCK"))
    await router.rollouts.wait_for(lambda routes: routes["chat"].phase == "aborted", timeout=10)
    status, err = await _post(http, router, "promote")
    assert status == 409
    assert router.rollouts.route("chat").stable.release == "r1"


async def test_new_stable_without_decision_is_refused(router: Any, http: aiohttp.ClientSession) -> None:
    await register_model_release(router.ctx.bus, "r0", tenant="acme")
    status, err = await _put(http, router, stable_release="r0", canary_release="r2")
    assert status == 409 and "stable release 'r0'" in err["error"]["message"]


async def test_needs_review_gets_zero_until_approved(router: Any, http: aiohttp.ClientSession,
                                                    signer: Signer) -> None:
    # Before: a release awaiting review served 10% at once.
    bus = router.ctx.bus
    await _put(http, router)
    held = await gate(router.ctx.bus, signer, decision="NEEDS_REVIEW", reason="prompt changed")
    await gate_decided(bus, held)
    await router.rollouts.wait_for(lambda r: r["chat"].decision_id == held.id, timeout=10)
    assert (router.rollouts.route("chat").weight, router.rollouts.route("chat").phase) == (0.0, "idle")
    assert (await _post(http, router, "promote"))[0] == 409
    # An approval is a new decision the gatekeeper signs: PASS for exactly this release.
    await gate_decided(bus, await gate(router.ctx.bus, signer, decision="PASS", reason="approved by ann"))
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "promoted", timeout=20)


async def test_pass_for_another_release_does_not_admit(router: Any, http: aiohttp.ClientSession,
                                                       signer: Signer) -> None:
    bus = router.ctx.bus
    await _put(http, router)
    other = await gate(router.ctx.bus, signer, release="r3", decision="PASS")
    kv = await bus.kv(bus.subjects.kv_gates)
    await kv.put(token("r2"), msgspec.json.encode(other))  # stored under r2's key, but it speaks for r3
    status, route = await _put(http, router, canary_release="r2")
    assert status == 200 and route["weight"] == 0.0 and not route["admitted"]


async def test_reject_after_promotion_rolls_back(router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Before: a reject after promotion changed nothing.
    bus = router.ctx.bus
    await _put(http, router)
    await gate_decided(bus, await gate(router.ctx.bus, signer, decision="PASS"))
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "promoted", timeout=20)
    rejected = await gate(router.ctx.bus, signer, decision="BLOCK", reason="rejected by ann: leaks PII")
    await gate_decided(bus, rejected)
    await router.rollouts.wait_for(lambda r: r["chat"].decision_id == rejected.id, timeout=10)
    route = router.rollouts.route("chat")
    assert (route.stable.release, route.weight, route.phase) == ("r1", 0.0, "aborted")
    assert "rolled back r2" in route.reason
    async with http.post(f"{router.url}/v1/chat/completions", json=_chat()) as resp:
        assert resp.headers["x-lockgate-release"] == "r1"


async def test_break_glass_is_admin_only_signed_recorded_and_shown_until_cleared(
    router: Any, http: aiohttp.ClientSession, keys: Bootstrap
) -> None:
    bus, settings = router.ctx.bus, router.ctx.settings
    sub = await bus.nc.subscribe(bus.subjects.rollout("chat"))
    await _put(http, router)
    glass = break_glass(settings, "chat", "r2", "promote", "hotfix for incident 42")
    operator, _ = KeyStore(settings.home).create("acme", "ops", "operator")  # of the releases' tenant
    status, err = await _post(http, router, "promote", bearer(operator), break_glass=glass)
    assert status == 403 and "requires role admin" in err["error"]["message"]
    status, err = await _post(http, router, "promote", break_glass={})  # a reason is required: a malformed request
    assert status == 400 and "reason" in err["error"]["message"]

    # Before: an admin API key and a free-text reason were enough, recorded but not signed.
    ann = person(settings, "ann", "approver")
    refusals = {
        "is not signed by a person": {"reason": "hotfix for incident 42"},
        "altered after signing": {**glass, "reason": "something else"},  # a forged reason
        "it needs admin": sign_override(ann, deployment="chat", release="r2", action="promote",
                                        reason="hotfix for incident 42", at=int(time.time())),
        "not within": sign_override(person(settings, "boss", "admin"), deployment="chat", release="r2",
                                    action="promote", reason="hotfix for incident 42", at=int(time.time()) - 3600),
    }
    for why, body in refusals.items():
        status, err = await _post(http, router, "promote", break_glass=body)
        assert status == 403 and why in err["error"]["message"], (why, err)
        assert err["error"]["code"] == "invalid_break_glass"
    assert router.rollouts.route("chat").phase == "idle"  # none of them changed anything
    # signed for a canary start, not a promote: not this action
    canary_glass = break_glass(settings, "chat", "r2", "canary", "hotfix for incident 42")
    status, err = await _post(http, router, "promote", break_glass=canary_glass)
    assert status == 403 and "altered" in err["error"]["message"]

    # As a canary start it gives r2 its weight, and is kept in the route for its rollout: shown until cleared.
    status, route = await _put(http, router, initial_weight=10, break_glass=canary_glass)
    assert status == 200 and route["weight"] == 10.0
    override = route["override"]
    assert (override["reason"], override["actor"], override["key_id"]) == (
        "hotfix for incident 42", "boss", canary_glass["key_id"])
    assert override["api_key"].startswith("apikey:") and keys.admin_key not in override["api_key"]
    async with http.get(f"{router.url}/lockgate/v1/deployments/chat") as resp:
        assert (await resp.json())["override"]["reason"] == "hotfix for incident 42"  # still shown
    await router.rollouts.flush()
    [shown] = (await read_status(bus))["overrides"]  # what `lockgate status` shows
    assert (shown["deployment"], shown["release"], shown["by"], shown["reason"]) == (
        "chat", "r2", "boss", "hotfix for incident 42")
    async with http.delete(f"{router.url}/lockgate/v1/deployments/chat/break-glass",
                           headers=bearer(operator)) as resp:
        assert resp.status == 403
    async with http.delete(f"{router.url}/lockgate/v1/deployments/chat/break-glass") as resp:
        cleared = await resp.json()
        assert resp.status == 200 and cleared["override"] is None and cleared["weight"] == 0.0
    await router.rollouts.flush()
    assert await read_overrides(bus) == []

    # The signed promote makes r2 stable; it ends the rollout, so nothing is left in the route to cover a later one
    # (the reason, the rollout event and the audit log record it). The statement r2 serves by is kept, and shown
    # until a decision admits r2 (before, probe p28, status then said "no break-glass overrides").
    status, route = await _post(http, router, "promote", break_glass=glass)
    assert status == 200 and route["phase"] == "promoted" and route["stable"]["release"] == "r2"
    assert route["override"] is None and "BREAK-GLASS by boss: hotfix for incident 42" in route["reason"]
    assert (route["glass_stable"]["release"], route["glass_stable"]["actor"]) == ("r2", "boss")
    states = []
    while not states or states[-1].phase != "promoted":
        states.append(_states.decode((await sub.next_msg(timeout=10)).data))
    await sub.unsubscribe()  # states left unread would hold the bus's drain at teardown (30 s)
    assert "BREAK-GLASS by boss" in states[-1].reason and "hotfix for incident 42" in states[-1].reason
    await router.rollouts.flush()
    [shown] = await read_overrides(bus)
    assert (shown["deployment"], shown["release"], shown["action"], shown["by"], shown["reason"]) == (
        "chat", "r2", "promote", "boss", "hotfix for incident 42")


# Endpoints come from operator configuration; releases are immutable and served as they say.


@pytest.mark.parametrize("field", [{"canary_upstream": "http://attacker.example/v1"}, {"canary_model": "other"},
                                   {"stable_upstream": "http://attacker.example/v1"}, {"stable_model": "x"}])
async def test_rollout_cannot_name_an_upstream_or_a_model(router: Any, http: aiohttp.ClientSession,
                                                          field: dict) -> None:
    # Before: a write to a deployment sent traffic (and the client's key) to the attacker's URL, or
    # rolled a release out on another model than it passed with.
    status, err = await _put(http, router, **field)
    assert status == 400 and next(iter(field)) in err["error"]["message"]


async def test_release_naming_an_unknown_endpoint_is_refused(router: Any, http: aiohttp.ClientSession) -> None:
    await register_model_release(router.ctx.bus, "r9", "m", "attacker", tenant="acme")
    status, err = await _put(http, router, canary_release="r9")
    assert status == 400 and "endpoint 'attacker' is not configured" in err["error"]["message"]
    status, err = await _put(http, router, canary_release="never-registered")
    assert status == 400 and "not registered" in err["error"]["message"]


async def _promoted(router: Any, http: aiohttp.ClientSession, signer: Signer, release: str, **params: Any) -> None:
    """Register `release` (model m on the canary endpoint, with `params`), roll it out and PASS it: promoted."""
    bus = router.ctx.bus
    await register_model_release(bus, release, "m", "canary", tenant="acme", **params)
    await _put(http, router, canary_release=release)
    await gate_decided(bus, await gate(bus, signer, release=release, decision="PASS"))
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "promoted", timeout=20)


async def test_canary_is_served_with_its_releases_model_and_params(router: Any, http: aiohttp.ClientSession,
                                                                   sims: Any, signer: Signer) -> None:
    await _promoted(router, http, signer, "r5", temperature=0)
    # The client asks for another model: the release's model config decides.
    async with http.post(f"{router.url}/v1/chat/completions", json={**_chat(), "model": "gpt-whatever"}) as resp:
        assert resp.status == 200 and resp.headers["x-lockgate-release"] == "r5"
        assert (await resp.json())["choices"][0]["message"]["content"] == "canary says hi"
    assert sims[1].requests == {"m": 1}


@pytest.mark.parametrize("gateway_policy", [{"budgets": {"acme-tokens": {"tenant": "acme", "tokens": 20_000}}}])
async def test_a_releases_own_max_tokens_is_what_admission_reserves(router: Any, http: aiohttp.ClientSession,
                                                                    keys: Bootstrap, sims: Any, signer: Signer) -> None:
    # Before: the reservation read the client's max_tokens (10) while the upstream got the release's (50,000):
    # each such call could spend 5,000 times what was reserved, past any budget or token rate limit.
    await _promoted(router, http, signer, "r6", max_tokens=50_000)
    body = {**_chat(), "max_tokens": 10}
    async with http.post(f"{router.url}/v1/chat/completions", json=body, headers=bearer(keys.app_key)) as resp:
        refused = await resp.json()
        # More than the budget's whole limit: told so, without a Retry-After.
        assert resp.status == 429 and refused["error"]["code"] == "request_too_large", refused
        assert "Retry-After" not in resp.headers
    needs = re.search(r"it alone may use up to (\d+) tokens", refused["error"]["message"])
    assert needs is not None and int(needs.group(1)) > 50_000 and sims[1].total_requests == 0


async def test_release_name_cannot_be_rebound_to_other_content(router: Any) -> None:
    # Before: re-registering a release name with different content was accepted and the newer won.
    from lockgate import artifacts
    from lockgate.errors import ReleaseConflict

    bus = router.ctx.bus
    await register_model_release(bus, "r1", "m", "default", tenant="acme")  # the same content again: accepted
    with pytest.raises(ReleaseConflict, match="already registered with other content"):
        await register_model_release(bus, "r1", "m", "canary", tenant="acme")
    assert (await router.rollouts.target("r1")).endpoint == "default"
    bundle = await artifacts.release_of(bus, "r1")
    assert list(bundle["artifacts"]) == ["model_config/r1-config"]


async def test_provider_key_comes_from_lockgate_config_never_from_the_client(
    context: ServiceContext, run_services: Any, sims: Any, keys: Bootstrap, tmp_path: Any
) -> None:
    stable, _ = sims
    (tmp_path / "endpoints.yaml").write_text(
        f"endpoints:\n  openai-prod: {{url: {stable.url}, credential: PROVIDER_KEY}}\n")
    (tmp_path / "secrets.yaml").write_text("PROVIDER_KEY: sk-provider-held-by-lockgate\n")
    context.settings = context.settings.replace(endpoints_file=str(tmp_path / "endpoints.yaml"),
                                                secrets_file=str(tmp_path / "secrets.yaml"), deployment="chat")
    router = (await run_services("router"))["router"]
    assert list(router.upstreams.by_id) == ["openai-prod"]  # the allow-list replaces the built-in pair
    async with aiohttp.ClientSession() as c, c.post(
            f"{router.url}/v1/chat/completions", json=_chat(), headers=bearer(keys.app_key)) as resp:
        # No release of `chat` was rolled out: refused as an unknown model, nothing sent.
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    assert stable.total_requests == 0
    await register_model_release(context.bus, "p1", "m", "openai-prod", tenant="acme")
    await store_pass(context.bus, "p1", context.settings)
    async with aiohttp.ClientSession(headers=bearer(keys.admin_key)) as c:
        async with c.put(f"{router.url}/lockgate/v1/deployments/chat",
                         json={"stable_release": "p1", "canary_release": "r1"}) as resp:
            assert resp.status == 400  # r1 is not registered in this test's bus
        await register_model_release(context.bus, "p2", "m", "openai-prod", tenant="acme")
        async with c.put(f"{router.url}/lockgate/v1/deployments/chat",
                         json={"stable_release": "p1", "canary_release": "p2"}) as resp:
            assert resp.status == 200, await resp.text()
        async with c.post(f"{router.url}/v1/chat/completions", json=_chat(),
                          headers=bearer(keys.app_key)) as resp:
            assert resp.status == 200
    assert stable.authorizations == ["Bearer sk-provider-held-by-lockgate"]


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
    route = Route(deployment="chat.eu", stable=Target(release="r1"), canary=Target(release="r2", endpoint="canary"),
                  weight=100.0)
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
        (await gate(router.ctx.bus, signer, release="r1", decision="PASS"), "arrived on"),
    ]
    for forged, _ in attacks:
        await bus.publish(bus.subjects.gate_decided("r2"), forged)
    for forged, reason in attacks:
        letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=10)).data)
        assert letter.error.startswith("signature invalid") or "refusing it" in letter.error, letter.error
        assert reason in letter.error and forged.id in letter.error
    route = router.rollouts.route("chat")
    assert (route.phase, route.weight) == ("idle", 0.0)  # r2 was never gated: no forged PASS admits it
    # The consumer is still acting on trusted decisions.
    await gate_decided(bus, await gate(router.ctx.bus, signer, decision="BLOCK"))
    await router.rollouts.wait_for(lambda routes: routes["chat"].phase == "aborted", timeout=10)


# The official `openai` client against the router: errors in OpenAI's format become its exceptions.


def _openai(router: Any, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0, timeout=10)


@pytest.mark.parametrize("key", [None, "lg-not-a-key", "sk-" + "a" * 48], ids=["none", "unknown", "openai-key"])
@pytest.mark.parametrize("stream", [False, True], ids=["once", "stream"])
async def test_openai_client_without_a_valid_key_gets_authentication_error(router: Any, sims: Any, key: str,
                                                                           stream: bool) -> None:
    # Before: the router proxied anyone's request; now the official client raises AuthenticationError.
    # `None`: no Authorization header at all (the client refuses an empty key itself, so omit it).
    omit = {"Authorization": openai.Omit()} if key is None else None
    async with _openai(router, key or "unused") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 stream=stream, extra_headers=omit)
    err = caught.value
    assert (err.status_code, err.type, err.code) == (401, "invalid_request_error", "invalid_api_key")
    assert err.body["message"].startswith("missing API key" if key is None else "invalid API key")  # type: ignore[index]
    assert sims[0].total_requests == 0


async def test_openai_client_with_a_key_below_the_role_gets_permission_denied(router: Any, keys: Bootstrap) -> None:
    # The admin API answers in the same format: an app key (or a viewer key changing a route) is 403.
    viewer, _ = KeyStore(router.ctx.settings.home).create("acme", "ops", "viewer")
    for key, method, path, body in ((keys.app_key, "post", "/deployments/chat/promote", None),
                                    (viewer, "put", "/deployments/chat", {"stable_release": "r1"})):
        async with openai.AsyncOpenAI(base_url=f"{router.url}/lockgate/v1", api_key=key, max_retries=0) as client:
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await getattr(client, method)(path, body=body, cast_to=object)
        err = caught.value
        assert (err.status_code, err.type, err.code) == (403, "permission_denied", "insufficient_role")
    assert router.rollouts.route("chat").canary is None


async def test_openai_client_with_an_app_key_completes_and_streams(router: Any, keys: Bootstrap, sims: Any,
                                                                   governed: None) -> None:
    async with _openai(router, keys.app_key) as client:
        once = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert once.choices[0].message.content == "hello there" and once.usage and once.usage.total_tokens > 0
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello there"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0  # asked for, so kept
    assert sims[0].requests == {"m": 2} and sims[0].authorizations == [None, None]  # the key stays here


@pytest.mark.parametrize("passthrough", [False, True], ids=["governed", "passthrough"])
async def test_only_a_deployment_with_a_rolled_out_release_reaches_an_upstream_unless_passthrough_is_opted_in(
        router: Any, http: aiohttp.ClientSession, keys: Bootstrap, sims: Any, passthrough: bool) -> None:
    # A team governs `support` (r1 serves it, gated; r2 waits for a decision); `chat`, the router's default
    # deployment, and `anything` were never rolled out. Before: a request naming `anything` by header, or a model
    # no deployment maps (so the default deployment), reached the `default` endpoint with the client's own model
    # and parameters, outside release governance.
    async with http.put(f"{router.url}/lockgate/v1/deployments/support",
                        json={"stable_release": "r1", "canary_release": "r2"}) as resp:
        assert resp.status == 200, await resp.text()
    hi = [{"role": "user", "content": "hi"}]
    bus = router.ctx.bus
    served = await bus.nc.subscribe(bus.subjects.served("shop", "acme"))
    async with _openai(router, keys.app_key) as client:
        await client.chat.completions.create(model="support", messages=hi)
        assert [e.release for e in await served_events(served, 1)] == ["r1"] and sims[0].requests == {"m": 1}
        ungoverned = {"by header": {"model": "m", "extra_headers": {"x-lockgate-deployment": "anything"}},
                      "unmapped model": {"model": "m"}}
        listed = {m.id async for m in client.models.list()}
        if not passthrough:
            for what, ask in ungoverned.items():
                for stream in (False, True):
                    with pytest.raises(openai.NotFoundError) as caught:
                        await client.chat.completions.create(messages=hi, stream=stream, temperature=2, **ask)
                    err = caught.value
                    assert (err.status_code, err.code, err.type) == (404, "model_not_found", "invalid_request_error")
                    assert "governed releases only" in err.message and "LOCKGATE_PASSTHROUGH" in err.message, what
            by_header = await _refusal(client, ungoverned["by header"])
            assert "Deployment 'anything' (x-lockgate-deployment) has no rolled-out release" in by_header
            assert "model 'm' does not exist here" in await _refusal(client, ungoverned["unmapped model"])
            assert (sims[0].requests, sims[1].total_requests) == ({"m": 1}, 0)  # the upstream never heard of them
            assert listed == {"support"}  # no upstream list: its models are not served
        else:
            for ask in ungoverned.values():
                assert (await client.chat.completions.create(messages=hi, **ask)).choices[0].message.content
            assert [e.release for e in await served_events(served, 2)] == ["", ""] and sims[0].requests == {"m": 3}
            assert listed == {"support", "m", "broken"}  # the default deployment passes the upstream's names through


async def _refusal(client: openai.AsyncOpenAI, ask: dict[str, Any]) -> str:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **ask)
    return caught.value.message


class _CountedPublishes:
    """The router's JetStream context, publishes counted: `reached` is set at the `n`th attempt."""

    def __init__(self, js: Any, n: int) -> None:
        self.js, self.n, self.calls, self.reached = js, n, 0, asyncio.Event()

    async def publish(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        if self.calls >= self.n:
            self.reached.set()
        return await self.js.publish(*args, **kw)


async def test_events_wait_out_an_inference_stream_outage_of_any_length(
        router: Any, http: aiohttp.ClientSession, keys: Bootstrap, governed: None) -> None:
    # The stream taking the router's events goes away (as while JetStream elects a new leader, or
    # is restored): no publish is acknowledged. Requests are still served, and their events
    # are retried until the stream is back, however many attempts that takes (the router gave up
    # after 5 attempts, counting the events failed: lost for drift, cost and canary analysis).
    bus = router.ctx.bus
    stream = bus.subjects.streams["inference"].name
    await bus.js.delete_stream(stream)
    # Each attempt waits out its timeout (the router's own live-event subscription takes the message
    # and answers nothing): a short one keeps the test short.
    router.batcher.publish_timeout_s = 0.2
    # Beyond the 5 attempts a publish used to get: a publisher that gave up makes no 8th attempt.
    attempts = router.batcher.js = _CountedPublishes(router.batcher.js, 8)
    for i in range(5):
        async with http.post(f"{router.url}/v1/chat/completions", json=_chat(f"q{i}"),
                             headers=bearer(keys.app_key)) as resp:
            assert resp.status == 200, await resp.text()
    await asyncio.wait_for(attempts.reached.wait(), 30)
    assert router.batcher.failed == 0
    await bus.ensure_topology()  # the stream is back
    await router.batcher.flush()
    assert (router.batcher.sent, router.batcher.failed, router.batcher.dropped) == (5, 0, 0)
    prompts = [e.prompt for _, _, data in [m async for m in bus.stored_since(stream, bus.subjects.served("shop", "acme"), 0)]
               for e in _events.decode(data)]
    assert sorted(prompts) == [f"q{i}" for i in range(5)]  # each once
