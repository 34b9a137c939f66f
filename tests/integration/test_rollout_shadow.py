"""Shadow rollouts on the real nats-server, chDB and the simulator: a sampled share of live requests is
mirrored to the candidate off the request path, users get only stable's answers, shadow events are
stored with variant "shadow" and compared with the served ones, and the budget caps the mirror: the cost cap over
every replica, those started mid-rollout included."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.contracts.inference import REQUEST_DIGEST
from lockgate.server.apikeys import KeyStore
from lockgate.server.service import ServiceContext
from lockgate.services.router.analysis import describe
from lockgate.services.router.domain import Route
from lockgate.services.router.shadowstats import spend_key
from lockgate.signing import Signer
from lockgate.store import Store
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import ChatUpstream, chat_releases, eventually, register_model_release
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import CANARY, STABLE, _pass, _start, serving
from tests.integration.test_rollout_per_key import PickyCanary
from tests.integration.test_router_evidence_replay import Stack

# The router stack of the analysis tests (simulated stable and canary upstreams, releases, signed decisions).
router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer
pytestmark = pytest.mark.timeout(120)
WIDE = {"max_rps": 10_000, "max_concurrency": 256}


async def _answers(http: aiohttp.ClientSession, router: Any, n: int, batch: int = 20) -> list[tuple[int, str, str]]:
    """(status, release, answer) of n requests from distinct users, a batch at a time."""
    url = f"{router.url}/v1/chat/completions"

    async def one(i: int) -> tuple[int, str, str]:
        body = {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}], "user": f"user-{i}"}
        async with http.post(url, json=body) as resp:
            data = await resp.json()
            text = data["choices"][0]["message"]["content"] if resp.status == 200 else ""
            return resp.status, resp.headers["x-lockgate-release"], text

    out: list[tuple[int, str, str]] = []
    for start in range(0, n, batch):
        out += await asyncio.gather(*(one(i) for i in range(start, min(n, start + batch))))
    return out


async def _summary(http: aiohttp.ClientSession, router: Any) -> Any:
    async with http.get(f"{router.url}/lockgate/v1/deployments/chat/shadow") as resp:
        assert resp.status == 200
        return await resp.json()


async def test_shadow_mirrors_a_sampled_share_users_get_only_stable_answers(
        router: Any, http: aiohttp.ClientSession, signer: Signer, store: Store) -> None:
    await _start(http, router, "long", {"shadow": {"sample": 0.5, **WIDE}})
    await _pass(router, signer, "long")
    assert router.rollouts.route("chat").weight == 0.0
    answers = await _answers(http, router, 200)
    ok = [a for a in answers if a[0] == 200]
    assert len(ok) >= 190  # stable fails 0.5% of calls by design
    assert {(release, text) for _, release, text in answers} <= {("r1", "stable says hi"), ("r1", "")}
    assert all(text == "stable says hi" for _, _, text in ok)  # never the candidate's answer

    summary = await _summary(http, router)
    mirrored = summary["mirrored"]
    assert mirrored + summary["skipped"].get("not_sampled", 0) == 200 and set(summary["skipped"]) <= {"not_sampled"}
    assert 60 <= mirrored <= 140  # half of 200, give or take 4.5 standard deviations

    # every shadow call is an event with variant "shadow" for the candidate, paired with the served one
    summary = await router.rollouts.wait_for_shadow("chat", lambda s: s.pairs >= mirrored, timeout=30)
    assert summary.shadow_events == mirrored and summary.candidate == "long"
    assert summary.exact_match_rate is not None and summary.exact_match_rate < 0.05  # the candidate says otherwise
    assert summary.mean_length_delta is not None and summary.mean_length_delta > 0  # and says more

    def stored() -> dict[str, int]:
        rows = store.rows("SELECT variant, release, count() AS n FROM inference_events WHERE deployment = 'chat' "
                          "GROUP BY variant, release")
        return {f"{r['variant']}/{r['release']}": r["n"] for r in rows}

    await eventually(lambda: stored().get("shadow/long", 0) == mirrored and stored().get("stable/r1", 0) == 200,
                     [router.sink.handlers.events], what="shadow events stored")
    assert "canary/long" not in stored()
    # A copy carries the digest of the request it copies (probe p12 F5): the candidate's recorded eval scores it as
    # it would the candidate's own served call of that request.
    digests = {(r["variant"], r["trace_id"]): r["d"] for r in store.rows(
        f"SELECT variant, trace_id, attributes['{REQUEST_DIGEST}'] AS d FROM inference_events WHERE deployment = "
        "'chat' AND variant IN ('stable', 'shadow') AND NOT mapContains(attributes, 'lockgate.attempt')")}
    copies = [(trace, d) for (variant, trace), d in digests.items() if variant == "shadow"]
    assert len(copies) == mirrored
    assert all(d.startswith("sha256:") and d == digests[("stable", trace)] for trace, d in copies)

    # `rollout get` shows the comparison
    s = router.ctx.settings
    got = await asyncio.to_thread(CliRunner().invoke, cli, ["--home", s.home, "--nats", s.nats_url, "--prefix",
                                                           s.prefix, "rollout", "--router", router.url, "get", "chat"])
    assert got.exit_code == 0, got.output
    assert "shadow" in got.output and "exact match" in got.output


async def test_shadow_budget_caps_the_mirror_whatever_the_traffic(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    await _start(http, router, "same", {"shadow": {"sample": 1.0, "max_requests": 7, **WIDE}})
    await _pass(router, signer, "same")
    answers = await _answers(http, router, 60, batch=5)
    assert {release for _, release, _ in answers} == {"r1"}
    summary = await _summary(http, router)
    assert summary["mirrored"] == 7 and summary["skipped"] == {"over_max_requests": 53}
    paired = await router.rollouts.wait_for_shadow("chat", lambda s: s.shadow_events >= 7, timeout=30)
    assert paired.shadow_events == 7
    # promotion ends the mirror: the candidate now serves everyone, nothing is copied
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/promote") as resp:
        assert resp.status == 200
    await _answers(http, router, 20)
    assert (await _summary(http, router))["mirrored"] == 7


# The candidate `long` answers 9 words (12 tokens) at 1,000 USD per million output tokens: 0.012 USD a copy, and
# at most 0.016 with max_tokens 16 (input is free). A cap of 0.1 USD holds 8 copies, 6 when all are in flight at once.
COPY_USD, CAP_USD = 0.012, 0.1
CAPPED = {"shadow": {"sample": 1.0, "max_cost_usd": CAP_USD, **WIDE}}


@pytest.fixture
async def replicas(context: ServiceContext, store: Store, run_services: Any, signer: Signer,
                   tmp_path: Path) -> AsyncIterator[tuple[Stack, Any]]:
    """Router processes (each on a bus connection of its own) of deployment `chat`, with the sink and the query
    service (what a starting router reads back from), and the candidates' simulator."""
    (tmp_path / "prices.yaml").write_text(json.dumps({"version": "t", "currency": "USD", "models": {
        "m": {"input_per_mtok": 0, "output_per_mtok": 1}, "long": {"input_per_mtok": 0, "output_per_mtok": 1000}}}))
    async with SimServer(STABLE) as stable, SimServer(CANARY) as canary:
        await chat_releases(context, signer, stable.url, canary.url, ("long",), price_book=str(tmp_path / "prices.yaml"))
        await run_services("sink", "query")
        stack = Stack(context, store)
        try:
            yield stack, canary
        finally:
            await stack.close()


async def _asked(http: aiohttp.ClientSession, router: Any, n: int, batch: int = 5) -> None:
    """n requests from distinct users, a batch at a time, each answered 200 by stable; then the router's copies of
    them are made (or refused) and settled."""
    url = f"{router.url}/v1/chat/completions"

    async def one(i: int) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": f"q {i}"}], "user": f"u-{i}", "max_tokens": 16}
        async with http.post(url, json=body) as resp:
            assert (resp.status, resp.headers["x-lockgate-release"]) == (200, "r1"), await resp.text()

    for start in range(0, n, batch):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + batch))))
    await router.proxy.shadow.idle()


async def test_a_shadow_rollouts_cost_cap_holds_across_replicas_started_mid_rollout(
        replicas: tuple[Stack, Any], http: aiohttp.ClientSession, signer: Signer) -> None:
    # Found by a probe: the spend was kept in each replica's memory, from the shadow events it saw since it started,
    # so a replica started mid-rollout (a restart, a rolling deploy, one more replica) mirrored another full
    # max_cost_usd to the candidate (a cap of 0.0001 USD spent 0.000336 with one more router), and its comparison
    # held only what it had seen since.
    stack, candidate = replicas
    a = await stack.start()
    await _start(http, a, "long", CAPPED)
    await _pass(a, signer, "long")
    await _asked(http, a, 30)
    first = candidate.requests.get("long", 0)
    # each copy's worst case is reserved before it is made, so copies in flight count too
    assert 6 <= first <= 8, f"{first} copies of 0.012 USD on a cap of 0.1 USD"
    summary = await _summary(http, a)
    assert summary["mirrored"] == first and summary["skipped"] == {"over_max_cost": 30 - first}
    await a.rollouts.wait_for_shadow("chat", lambda s: s.shadow_events == first, timeout=30)

    b = await stack.start()  # a replica started mid-rollout: the rollout's spend is the store's, not its own
    await _asked(http, b, 30)
    await asyncio.gather(_asked(http, a, 20), _asked(http, b, 20))
    copies = candidate.requests.get("long", 0)
    assert copies <= 8, f"{copies} copies of 0.012 USD on a cap of 0.1 USD: a replica started mid-rollout " \
                        "mirrored past the cap"
    shown = await _summary(http, b)
    assert shown["mirrored"] + (await _summary(http, a))["mirrored"] == copies
    assert shown["mirrored"] + shown["skipped"]["over_max_cost"] == 50
    bus = a.ctx.bus
    kv = await bus.kv(bus.subjects.kv_budgets)
    stored = json.loads((await kv.get(spend_key("chat", "long", a.rollouts.route("chat").started_at))).value)
    assert stored == {"spent": pytest.approx(copies * COPY_USD * 1e9, abs=copies)}  # every copy settled, none held

    # and its comparison is the rollout's, read back at its start: the same as the replica that saw every copy
    async with asyncio.timeout(30):
        await b.rollouts.replayed.wait()
    whole = await a.rollouts.wait_for_shadow("chat", lambda s: s.pairs == copies, timeout=30)
    try:
        started = await b.rollouts.wait_for_shadow("chat", lambda s: s.pairs == copies, timeout=10)
    except TimeoutError:
        started = b.rollouts.shadow_summary("chat")
    assert (started.shadow_events, started.pairs) == (whole.shadow_events, whole.pairs) == (copies, copies)
    assert started.shadow_cost_usd == pytest.approx(whole.shadow_cost_usd) == pytest.approx(copies * COPY_USD)


async def test_a_capped_shadow_makes_no_copy_while_its_spend_cannot_be_read(
        replicas: tuple[Stack, Any], http: aiohttp.ClientSession, signer: Signer) -> None:
    # Shadowing is optional: with the rollout's spend unknown (the store away, or a value under its key that is no
    # spend) the candidate gets no copy, and users are served as ever.
    stack, candidate = replicas
    a = await stack.start()
    await _start(http, a, "long", CAPPED)
    await _pass(a, signer, "long")
    bus = a.ctx.bus
    kv = await bus.kv(bus.subjects.kv_budgets)
    await kv.put(spend_key("chat", "long", a.rollouts.route("chat").started_at), b'{"stream":"KV_x","seq":1}')
    await _asked(http, a, 10)
    assert candidate.requests.get("long", 0) == 0
    assert (await _summary(http, a))["skipped"] == {"cost_store_unavailable": 10}


# On an endpoint that allows a call 1 s to its first byte (a streamed answer's first event; a whole answer otherwise)
# and 2 s between two events: `slow`, as healthy as stable, takes 3 s to generate its answer, the first token at once
# (a long answer); `stalls` takes 5 s between two of its words.
STEADY = SimConfig(models={"m": ModelSpec(default="stable says hi")}, seed=3)
TIMED = SimConfig(models={"same": ModelSpec(default="same canary"),
                          "slow": ModelSpec(default=" ".join(["slow"] * 20), latency_ms=3000, ttft_ms=5),
                          "stalls": ModelSpec(default="one two three", latency_ms=10_000, ttft_ms=5)}, seed=3)


@pytest.fixture
async def timed(context: ServiceContext, run_services: Any, signer: Signer, tmp_path: Path) -> AsyncIterator[Any]:
    """The router of deployment `chat` (its answers cached), stable on `default` and the candidates on `canary`, an
    endpoint with its own timeouts."""
    async with SimServer(STEADY) as stable, SimServer(TIMED) as canary:
        (tmp_path / "endpoints.yaml").write_text(json.dumps({"endpoints": {
            "default": {"url": stable.url},
            "canary": {"url": canary.url, "timeouts": {"first_byte_s": 1, "between_chunks_s": 2, "total_s": 30}},
            "claude": {"url": canary.url, "provider": "anthropic"}}}))
        (tmp_path / "gateway.yaml").write_text(json.dumps({"cache": {"deployments": {"chat": {"ttl_s": 600}}}}))
        router = await analysis_tests.serving(context, run_services, signer, stable.url, canary.url, ("same", "slow", "stalls"),
                                              endpoints_file=str(tmp_path / "endpoints.yaml"),
                                              gateway_file=str(tmp_path / "gateway.yaml"))
        await register_model_release(context.bus, "claude-same", "same", "claude")
        router.canary_sim = canary
        yield router


def _app(router: Any, keys: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=keys.app_key, max_retries=0, timeout=30)


async def test_a_cached_answer_is_not_mirrored_to_the_candidate(
        timed: Any, http: aiohttp.ClientSession, signer: Signer, keys: Any) -> None:
    # Found by a probe (p9 F1): the copy was scheduled before the cache lookup, so each cache hit (which costs the
    # caller nothing) made a real candidate call, recorded as the candidate's evidence: an app filled a preview's
    # sample with copies of the one prompt it liked, and spent the rollout's shadow budget, for free.
    await _start(http, timed, "same", {"shadow": {"sample": 1.0, **WIDE}})
    await _pass(timed, signer, "same")
    async with _app(timed, keys) as c:
        caches = []
        for _ in range(5):
            got = await c.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "the one I like"}], temperature=0, user="u-1")
            caches.append(got.headers.get("x-lockgate-cache"))
            assert got.parse().choices[0].message.content == "stable says hi"
    assert caches == ["miss", "hit", "hit", "hit", "hit"]
    await timed.proxy.shadow.idle()
    summary = await _summary(http, timed)
    assert (summary["mirrored"], summary["skipped"]) == (1, {})  # the miss alone
    assert timed.canary_sim.requests.get("same", 0) == 1
    paired = await timed.rollouts.wait_for_shadow("chat", lambda s: s.pairs >= 1, timeout=30)
    assert (paired.shadow_events, paired.pairs) == (1, 1)


@pytest.mark.parametrize(("candidate", "stream", "statuses"), [
    ("slow", True, [("ok", "")] * 3),
    ("slow", False, [("error", "upstream_timeout")] * 3),
    ("stalls", True, [("error", "stream_interrupted:ChunkTimeout")] * 3),
], ids=["streamed-within-its-bounds", "whole-answer-after-its-first-byte-bound", "stream-stalled-between-chunks"])
async def test_a_shadow_copy_is_held_to_the_candidate_endpoints_own_timeouts(
        timed: Any, http: aiohttp.ClientSession, signer: Signer, keys: Any, store: Store, candidate: str,
        stream: bool, statuses: list[tuple[str, str]]) -> None:
    # Found by a probe (p9 F2): copies were made unstreamed under a fixed 60 s in all, whatever the request and the
    # candidate's endpoint: every copy of a long streamed answer (served well in 70 s) failed, and a healthy preview
    # was aborted on error_rate; while a copy outlived the bounds its endpoint puts on a served call. A copy is now
    # made as the served call would be (streamed when the client streamed) under the endpoint's timeouts: a streamed
    # answer longer than its first-byte bound is no failure, a whole one is (a served call would get a 504).
    await _start(http, timed, candidate, {"shadow": {"sample": 1.0, **WIDE}})
    await _pass(timed, signer, candidate)
    async with _app(timed, keys) as c:
        for i in range(3):
            messages = [{"role": "user", "content": f"tell me a long story {i}"}]
            if stream:
                async with await c.chat.completions.create(model="m", messages=messages, stream=True) as s:
                    text = "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])
            else:
                text = (await c.chat.completions.create(model="m", messages=messages)).choices[0].message.content
            assert text == "stable says hi"
    async with asyncio.timeout(20):
        await timed.proxy.shadow.idle()
    summary = await timed.rollouts.wait_for_shadow("chat", lambda s: s.pairs >= 3, timeout=30)
    assert [(p.served_status, p.shadow_status) for p in summary.recent] == [("ok", s) for s, _ in statuses]
    def copies() -> list[dict[str, Any]]:
        return store.rows("SELECT status, error_type, response, output_tokens, latency_ms FROM inference_events "
                          "WHERE deployment = 'chat' AND variant = 'shadow' ORDER BY status, error_type")

    await eventually(lambda: len(copies()) == 3, [timed.sink.handlers.events], what="the copies stored")
    rows = copies()
    assert [(r["status"], r["error_type"]) for r in rows] == statuses
    if statuses[0][0] == "ok":
        assert [r["response"] for r in rows] == [" ".join(["slow"] * 20)] * 3
        assert all(r["output_tokens"] > 0 for r in rows)  # its usage asked for: the copy's cost is known
    else:
        assert all(r["latency_ms"] < 4000 for r in rows)  # given up on at its bound, as a served call would be


async def test_a_request_the_candidates_provider_cannot_take_is_not_copied(
        timed: Any, http: aiohttp.ClientSession, signer: Signer, keys: Any, store: Store) -> None:
    # Found by a probe (p9 F4): served to a candidate on an Anthropic endpoint, a request Anthropic has no counterpart
    # for (`n: 2`) is a 400; its copy was recorded as the candidate's error, so any app failed a preview at will. It
    # is not copied now (counted as skipped), and recorded as the candidate's served call would be: refused with a
    # 400, in client_error_rate only (probe p83 F1), neither paired nor an error.
    await _start(http, timed, "claude-same", {"shadow": {"sample": 1.0, **WIDE}})
    await _pass(timed, signer, "claude-same")
    async with _app(timed, keys) as c:
        for i in range(3):
            got = await c.chat.completions.create(model="m", n=2, user=f"u-{i}",
                                                  messages=[{"role": "user", "content": f"two of them {i}"}])
            assert got.choices[0].message.content == "stable says hi"
        ok = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "one"}], user="u-9")
        assert ok.choices[0].message.content == "stable says hi"
    await timed.proxy.shadow.idle()
    summary = await _summary(http, timed)
    assert (summary["mirrored"], summary["skipped"]) == (1, {"unsupported_by_candidate": 3})
    paired = await timed.rollouts.wait_for_shadow("chat", lambda s: s.shadow_events >= 4 and s.pairs >= 1,
                                                  timeout=30)
    assert (paired.shadow_events, paired.pairs, paired.shadow_error_rate) == (4, 1, 0.0)


async def test_a_preview_whose_provider_refuses_half_the_requests_is_not_promoted(
        timed: Any, http: aiohttp.ClientSession, signer: Signer, keys: Any) -> None:
    # Found by a probe (p83 F1): a blue-green preview on an Anthropic endpoint, judged on shadow copies, while half of
    # the deployment's requests ask for two choices (`n: 2`), which Anthropic cannot take. Those were not copied and
    # counted nowhere, so the look judged the preview on the requests it can serve and promoted it ("pre-promotion
    # analysis passed at step 0"); after the promotion every `n: 2` request got 400. A request the candidate would
    # refuse is now its copy's 400, in client_error_rate as a canary's refusals are: a preview refusing half fails.
    analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.01, "max": 0.05}], "min_sample": 50,
                "failure_limit": 0, "inconclusive_limit": 1000}
    await _start(http, timed, "claude-same", {
        "interval_s": 0.3, "shadow": {"sample": 1.0, **WIDE},
        "blue_green": {"auto_promotion_s": 2, "scale_down_delay_s": 600, "pre_promotion_analysis": analysis}})
    await _pass(timed, signer, "claude-same")
    url, sent, statuses = f"{timed.url}/v1/chat/completions", 0, set()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as app:
        async def one(i: int) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": f"q {i}"}], "user": f"user-{i}",
                    **({"n": 2} if i % 2 else {})}
            async with app.post(url, json=body) as resp:
                statuses.add(resp.status)

        while timed.rollouts.route("chat").phase == "progressing" and sent < 4000:
            await asyncio.gather(*(one(sent + k) for k in range(40)))
            sent += 40
    route = timed.rollouts.route("chat")
    assert (route.phase, route.stable.release) == ("aborted", "r1"), route.reason
    assert "client_error_rate" in route.reason, route.reason
    assert statuses == {200}  # stable served both kinds throughout


class Recorder(ChatUpstream):
    """An upstream that answers every chat request alike, keeping each body it got (its model, `store`, `metadata`
    and whether it asked for a web search)."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append({k: body.get(k) for k in ("model", "store", "metadata", "web_search_options", "tools")})
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture
async def recorded(context: ServiceContext, run_services: Any, signer: Signer) -> AsyncIterator[Any]:
    """The router of deployment `chat`, stable and the candidate `same` on one upstream that keeps every body."""
    async with Recorder() as up:
        router = await serving(context, run_services, signer, up.url, up.url, ("same",))
        router.up = up
        yield router


async def test_a_copy_repeats_no_provider_side_action(
        recorded: Any, http: aiohttp.ClientSession, signer: Signer, keys: Any) -> None:
    # Found by a probe (p83 F2): a copy was the client's body, `service_tier` aside. A chat request with `store: true`
    # and `metadata` had the provider store a second completion under the client's metadata; one with
    # `web_search_options` ran (and billed) its search again. A copy now stores nothing and carries no metadata, and a
    # request whose copy would repeat what the provider does on its side (a web search, a tool it runs) is not copied.
    await _start(http, recorded, "same", {"shadow": {"sample": 1.0, **WIDE}})
    await _pass(recorded, signer, "same")
    bodies: list[dict[str, Any]] = [
        {"store": True, "metadata": {"customer": "c-77"}},
        {"web_search_options": {}},
        {"tools": [{"type": "web_search_preview"}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as app:
        for i, extra in enumerate(bodies):
            body = {"model": "m", "messages": [{"role": "user", "content": f"my order {i}"}], "user": f"u{i}", **extra}
            async with app.post(f"{recorded.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
    await recorded.proxy.shadow.idle()
    copies = [b for b in recorded.up.bodies if b["model"] == "same"]
    assert [(b["store"], b["metadata"], b["tools"] is not None) for b in copies] == [(None, None, False),
                                                                                     (None, None, True)]
    served = [b for b in recorded.up.bodies if b["model"] != "same"]
    assert [(b["store"], b["metadata"]) for b in served][0] == (True, {"customer": "c-77"})  # the client's own call
    summary = await _summary(http, recorded)
    assert (summary["mirrored"], summary["skipped"]) == (2, {"provider_side_action": 2})


@pytest.fixture
async def picky(context: ServiceContext, run_services: Any, signer: Signer, tmp_path: Path) -> AsyncIterator[Any]:
    """The per-key tests' router: a stable that never fails and the candidate `picky`, which fails the prompt
    `tricky` only (a release that breaks on some of its real users' prompts, on none a caller chooses). `picky`
    answers 2 output tokens at 125 USD per million: a copy costs 0.00025 USD, and reserves as much (max_tokens 2)."""
    (tmp_path / "prices.yaml").write_text(json.dumps({"version": "t", "currency": "USD", "models": {
        "m": {"input_per_mtok": 0, "output_per_mtok": 1}, "picky": {"input_per_mtok": 0, "output_per_mtok": 125}}}))
    stable_sim = SimServer(SimConfig(models={"m": ModelSpec(default="stable says hi")}, seed=3))
    async with stable_sim as stable, PickyCanary() as canary:
        yield await serving(context, run_services, signer, stable.url, canary.url, ("picky",),
                            price_book=str(tmp_path / "prices.yaml"))


async def _ask(router: Any, key: str, prompts: list[str], tag: str, batch: int) -> None:
    """One request per prompt with app key `key`, each from a user of its own, a batch at a time: all served by
    stable (an app key's requests never reach a preview)."""
    url = f"{router.url}/v1/chat/completions"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        async def one(i: int, prompt: str) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
            async with session.post(url, json=body, headers={"x-lockgate-user": f"{tag}-{i}"}) as resp:
                assert (resp.status, (await resp.json())["choices"][0]["message"]["content"]) == (200, "stable")

        for start in range(0, len(prompts), batch):
            await asyncio.gather(*(one(start + i, p) for i, p in enumerate(prompts[start:start + batch])))


PREVIEW = {"metrics": [{"name": "error_rate", "max_increase": 0.01}], "min_sample": 100, "failure_limit": 0,
           "inconclusive_limit": 1000, "alpha": 0.1}


# Each budget the flooder's 600 requests spend first (400 copies, or 400 copies of 0.00025 USD), the requests sent
# so many at a time, and the reason the real key's requests are then not copied. One at a time under the cost cap:
# each copy reserves its cost by compare-and-set on one key of the spend store, and copies that contend for it are
# not made while it does not answer (`cost_store_unavailable`, which would leave the flooder short of 400).
BUDGETS = {"max_requests": ({"max_requests": 400}, 40, "over_max_requests"),
           "max_cost_usd": ({"max_cost_usd": 0.1}, 1, "over_max_cost")}


@pytest.mark.parametrize("budget", list(BUDGETS))
async def test_one_key_spending_the_shadow_budget_first_cannot_get_a_failing_preview_promoted(
        picky: Any, http: aiohttp.ClientSession, signer: Signer, budget: str) -> None:
    # Found by a probe (p46 F3): a blue-green preview judged on shadow copies. One app key of the tenant sent 400
    # good requests first and spent `max_requests` (or `max_cost_usd`); the real users' 600 requests (10% of which the candidate fails)
    # got no copies, and the preview was promoted on the flooder's copies alone ("pre-promotion analysis passed").
    # Now a key whose requests a shared budget left uncopied, short of its own sample of copies, makes every look
    # INCONCLUSIVE: never a pass.
    store = KeyStore(picky.ctx.settings.home)
    real, real_key = store.create("default", "shop", description="the application's real traffic")
    mallory, _ = store.create("default", "shop", description="a caller who spends the shadow budget first")
    await _start(http, picky, "picky", {
        "interval_s": 0.5, "blue_green": {"auto_promotion_s": 20, "pre_promotion_analysis": PREVIEW},
        "shadow": {"sample": 1.0, **BUDGETS[budget][0], **WIDE}})
    await _pass(picky, signer, "picky")
    promote_at = picky.rollouts.route("chat").promote_at  # when a passing look promotes the preview
    _, batch, over = BUDGETS[budget]
    await _ask(picky, mallory, ["hi"] * 600, "m", batch)
    await picky.proxy.shadow.idle()  # its copies made and settled: the budget is spent
    flooded = picky.rollouts.shadow_summary("chat")
    assert flooded.mirrored == 400, (flooded.skipped, flooded.spent_usd, flooded.shadow_cost_usd)
    await _ask(picky, real, ["tricky" if i % 10 == 0 else "hi" for i in range(600)], "u", batch)
    assert time.time() < promote_at, "the traffic took longer than the auto-promotion delay: no test"
    await picky.proxy.shadow.idle()
    summary = picky.rollouts.shadow_summary("chat")
    assert summary.mirrored == 400 and summary.skipped.get(over, 0) >= 600, summary.skipped

    def after_promote_at(routes: dict[str, Route]) -> bool:  # promoted (or aborted), else a look past promote_at
        r = routes["chat"]
        return r.phase != "progressing" or (r.analysis is not None and r.analysis.last is not None
                                            and r.analysis.at >= promote_at)

    await picky.rollouts.wait_for(after_promote_at, timeout=60)
    route = picky.rollouts.route("chat")
    assert (route.phase, route.stable.release) == ("progressing", "r1"), route.reason
    assert route.analysis is not None and route.analysis.last is not None
    last = route.analysis.last
    assert (last.verdict, last.canary_n, last.stable_n) == ("INCONCLUSIVE", 400, 1200)
    culprit = last.failing()
    assert culprit is not None
    assert describe(culprit) == (
        f"error_rate: the shadow left requests of API key {real_key.id} (0 of 600 requests) uncopied (a budget, or "
        f"an action at the provider a copy would repeat), short of the 100 copies needed to judge them: not judged on "
        f"the other keys' copies, never a pass (raise the budget, or promote by hand)")
