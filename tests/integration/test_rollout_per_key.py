"""Canary analysis judged per API key, through the real router, nats-server and chDB: one caller's successful
requests aimed at the canary cannot dilute the failures the other callers' requests see.

Found by a probe: with one valid key, a caller sent successful requests from users that hash to the canary;
pooled with everyone's, about 12x the real canary traffic made a canary failing 20% of real requests pass."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from lockgate.server.apikeys import Bootstrap, KeyStore
from lockgate.server.service import ServiceContext
from lockgate.services.router import evidence
from lockgate.services.router.domain import bucket
from lockgate.signing import Signer
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import ChatUpstream, sink_stored
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start, serving

http, keys, signer = analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)

# alpha 0.1: client_error_rate is judged with error_rate (AnalysisSpec.judged), and the false-abort budget is split
# over both; each then has the level error_rate alone had at 0.05, which the counts below were chosen for.
ANALYSIS = {"metrics": [{"name": "error_rate", "max_increase": 0.01}], "min_sample": 100, "failure_limit": 0,
            "inconclusive_limit": 1000, "alpha": 0.1}
_ANSWER = msgspec.json.encode({
    "id": "c1", "object": "chat.completion", "created": 0, "model": "picky",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "picky canary"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
_ERROR = msgspec.json.encode({"error": {"message": "cannot answer that", "type": "server_error"}})


class PickyCanary(ChatUpstream):
    """A canary upstream that answers every prompt but `tricky`, which it answers with an error body (HTTP 200:
    the router's `upstream_error`, a failure of the release, not retried): a release that breaks on some of
    its real users' prompts and on none of the prompts a caller who knows it chooses."""

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        tricky = body["messages"][-1]["content"] == "tricky"
        return web.Response(body=_ERROR if tricky else _ANSWER, content_type="application/json")


@asynccontextmanager
async def _picky(context: ServiceContext, run_services: Any, signer: Signer) -> AsyncIterator[Any]:
    """A router whose canary `picky` fails `tricky` prompts, stable none."""
    stable_sim = SimServer(SimConfig(models={"m": ModelSpec(default="stable says hi")}, seed=3))  # never fails
    async with stable_sim as stable, PickyCanary() as canary:
        yield await serving(context, run_services, signer, stable.url, canary.url, ("picky",))


@pytest.fixture
async def router(context: ServiceContext, run_services: Any, signer: Signer) -> AsyncIterator[Any]:
    async with _picky(context, run_services, signer) as router:
        yield router


RING = 500  # evidence rows per release for `small_ring_router`: a flood past it stays small on a shared machine


@pytest.fixture
async def small_ring_router(monkeypatch: pytest.MonkeyPatch, context: ServiceContext, run_services: Any,
                            signer: Signer) -> AsyncIterator[Any]:
    monkeypatch.setattr(evidence, "MAX_ROWS", RING)  # read as the router makes its evidence
    async with _picky(context, run_services, signer) as router:
        yield router


def _users(router: Any, prefix: str, canary: bool, n: int) -> list[str]:
    """n user ids that the 50% step sends to the canary (or to stable): found with the rollout's secret salt, as
    the router finds them (a client cannot compute it); here, the worst case of a caller who learnt its arms."""
    salt = router.rollouts.sticky_salt(router.rollouts.route("chat"))
    found = (u for u in (f"{prefix}-{i}" for i in range(100 * n)) if (bucket("chat", u, salt) < 5000) == canary)
    return [next(found) for _ in range(n)]


async def _send(router: Any, key: str, users: list[str], prompts: list[str], variant: str,
                canary_says: str | None = "picky canary") -> None:
    """One request per user (prompts[i] from users[i]) with `key`, 50 at a time; each served by `variant` (its
    answer's text says which, `canary_says` for the canary, None: no text tells; an app key's headers do not)."""
    url = f"{router.url}/v1/chat/completions"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        async def one(user: str, prompt: str) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
            async with session.post(url, json=body, headers={"x-lockgate-user": user}) as resp:
                answer = await resp.json()
                assert resp.status == (502 if prompt == "tricky" else 200)
                if resp.status == 200:
                    text = answer["choices"][0]["message"]["content"]
                    if variant == "stable" or canary_says is not None:
                        assert text == (canary_says if variant == "canary" else "stable says hi")

        for i in range(0, len(users), 50):
            await asyncio.gather(*(one(u, p) for u, p in zip(users[i:i + 50], prompts[i:i + 50], strict=True)))


async def _flooded(router: Any, http: aiohttp.ClientSession, signer: Signer, flood: int) -> tuple[Any, Any, Any]:
    """A canary of `picky` judged per key: the real callers' 120 canary requests (12 failing) among stable's first
    60, then mallory's `flood` good canary requests, then stable's last 60; the route once the first look that judges
    (no look judges before stable's last 60: until then it has fewer than min_sample) moved it, and both keys."""
    store = KeyStore(router.ctx.settings.home)
    # Of the releases' tenant (chat_releases: `default`), as `keys` is: only its keys are served `chat`.
    real, real_key = store.create("default", "shop", description="the application's real traffic")
    mallory, mallory_key = store.create("default", "shop", description="a caller who floods the canary")
    await _start(http, router, "picky", {"steps": [50, 100], "interval_s": 0.1, "analysis": ANALYSIS})
    await _pass(router, signer, "picky")
    stable_users, canary_users = _users(router, "user", False, 120), _users(router, "user", True, 120)
    for i in range(6):
        await _send(router, real, stable_users[10 * i:10 * i + 10], ["hi"] * 10, "stable")
        await _send(router, real, canary_users[20 * i:20 * i + 20],
                    ["tricky" if j % 10 == 0 else "hi" for j in range(20 * i, 20 * i + 20)], "canary")
    await _send(router, mallory, _users(router, "mallory", True, flood), ["hi"] * flood, "canary")
    await _send(router, real, stable_users[60:], ["hi"] * 60, "stable")
    await router.rollouts.wait_for(lambda r: r["chat"].phase != "progressing" or r["chat"].weight > 50, timeout=30)
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"not aborted: {route.phase} at {route.weight:g}%: {route.reason}"
    assert route.reason.startswith(f"aborted picky: analysis failed at step 1 (50%): error_rate 0.1 > threshold "
                                   f"0.01 on API key {real_key.id} (stable 0; 120 canary vs ")  # stable's count: however many had arrived
    assert route.analysis is not None and route.analysis.last is not None
    return route, real_key, mallory_key


async def test_one_key_flooding_the_canary_with_good_requests_cannot_get_a_failing_canary_promoted(
        router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    # Every canary request is in the first look that judges: the real callers' 120, of which 12 fail (10%; pooled
    # with mallory's, 0.74%: under stable's 0% + 1%), then mallory's 1,500 good ones (12.5x the real canary
    # traffic). Analysis compares the canary's requests with stable's of the same time, so stable's real traffic
    # comes along with them: half of it among the real callers' canary requests, the other half after mallory's.
    route, real_key, mallory_key = await _flooded(router, http, signer, 1500)
    assert route.analysis.last.canary_n == 1620  # every canary request was in the look, mallory's too
    failed, *implied = route.analysis.last.metrics  # judged with error_rate: none refused, none hung up on
    assert [(i.name, i.canary) for i in implied] == [("client_error_rate", 0.0), ("hang_up_rate", 0.0)]
    assert (failed.verdict, failed.group, failed.canary_n) == ("FAILED", f"API key {real_key.id}", 120)

    # The stored events name the key that sent them, and the signed analysis record the key that failed.
    await router.rollouts.flush()
    await sink_stored(router.sink.handlers, analysis_runs=route.analysis.look)
    await router.sink.handlers.events.wait_for(1740, 30)
    db = router.sink.ctx.store
    by_key = db.rows("SELECT key_id, count() AS n FROM inference_events WHERE variant = 'canary' GROUP BY key_id "
                     "ORDER BY n")
    assert by_key == [{"key_id": real_key.id, "n": 120}, {"key_id": mallory_key.id, "n": 1500}]
    (record,) = db.rows("SELECT metrics FROM analysis_runs WHERE phase = 'Failed'")
    metric, *implied_records = msgspec.json.decode(record["metrics"])  # the record names every metric judged
    assert [(i["name"], i["condition"]) for i in implied_records] == [("client_error_rate", "<= stable + 0.01"),
                                                                      ("hang_up_rate", "<= stable + 0.01")]
    assert metric["why"] == f"significantly above threshold; judged on API key {real_key.id}"


async def test_one_key_flooding_past_the_evidence_ring_cannot_push_the_others_failures_out_of_the_look(
        small_ring_router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    # Probe p46 F1: the router keeps MAX_ROWS rows per release (here RING); full, it overwrote its oldest row
    # whoever sent it, so one key's good requests between the real callers' failures and the next look left the look
    # the flood's rows alone (one key: all requests together, 0 errors) and a failing canary was promoted. Now a
    # full ring evicts the oldest row of the key holding the most: the flood churns its own.
    router = small_ring_router
    assert router.rollouts.evidence._max == RING
    # As above, mallory's 1,000 twice the ring.
    route, real_key, _ = await _flooded(router, http, signer, 1000)
    assert route.analysis.last.canary_n == RING  # the ring full: the real callers' 120 and mallory's newest 380


# Each caller against its own stable requests. Found by a probe: two callers of one application, A sending short
# chats and B long prompts (a summariser); B's canary requests were judged against stable's whole window, mostly
# A's short chats, and a canary answering both exactly as stable does was aborted (`tokens_per_request ... on API
# key ...`), while A's limit was set by B's stable requests.
_LONG = "summarise this: " + " ".join(f"word{i}" for i in range(600))
MIXED = {"metrics": [{"name": "error_rate", "max_increase": 0.05}, {"name": "tokens_per_request", "max_ratio": 1.5}],
         # min_step_sample: every canary request below is in the look that passes the step (failures need none)
         "min_sample": 20, "min_step_sample": 90, "failure_limit": 0, "inconclusive_limit": 1000}


@pytest.fixture
async def mixed_router(context: ServiceContext, run_services: Any, signer: Signer) -> AsyncIterator[Any]:
    """Stable and two canaries answering every prompt as stable does, but `verbose`: B's long prompts with an
    answer as long (twice the tokens of B's requests; A's are unchanged)."""
    same = ModelSpec(default="stable says hi")
    stable_sim = SimServer(SimConfig(models={"m": same}, seed=3))
    canary_sim = SimServer(SimConfig(models={"same": same, "verbose": ModelSpec(default="stable says hi",
                                                                                 answers={_LONG: _LONG})}, seed=3))
    async with stable_sim as stable, canary_sim as canary:
        yield await serving(context, run_services, signer, stable.url, canary.url, ("same", "verbose"))


async def _two_callers(router: Any, http: aiohttp.ClientSession, signer: Signer, release: str) -> tuple[Any, Any]:
    """A canary of `release` at 50% and two callers in different mixes on the two arms: A (short chats) 100 stable
    and 60 canary requests, B (long prompts) 20 stable and 30 canary ones (7% of stable's, 33% of the canary's).
    Half of stable's first: no look before the canary has min_sample; then A's canary requests, then B's, then the
    other half of stable's (analysis compares the canary's requests with stable's of the same time: none after
    stable's last is compared, so a look before them is inconclusive)."""
    store = KeyStore(router.ctx.settings.home)
    a, a_key = store.create("default", "shop", description="chats")
    b, b_key = store.create("default", "shop", description="a summariser")
    await _start(http, router, release, {"steps": [50, 100], "interval_s": 0.1, "analysis": MIXED})
    await _pass(router, signer, release)
    same = None  # the canaries answer as stable does (B's prompts aside): their text cannot tell the arm
    a_stable, b_stable = _users(router, "a", False, 100), _users(router, "b", False, 20)
    await _send(router, a, a_stable[:50], ["hi"] * 50, "stable", same)
    await _send(router, b, b_stable[:10], [_LONG] * 10, "stable", same)
    await _send(router, a, _users(router, "a", True, 60), ["hi"] * 60, "canary", same)
    await _send(router, b, _users(router, "b", True, 30), [_LONG] * 30, "canary", same)
    await _send(router, a, a_stable[50:], ["hi"] * 50, "stable", same)
    await _send(router, b, b_stable[10:], [_LONG] * 10, "stable", same)
    await router.rollouts.wait_for(lambda r: r["chat"].phase != "progressing" or r["chat"].weight > 50, timeout=30)
    return a_key, b_key


async def test_a_caller_whose_requests_differ_from_the_others_does_not_abort_a_healthy_canary(
        mixed_router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    await _two_callers(mixed_router, http, signer, "same")
    route = mixed_router.rollouts.route("chat")
    assert (route.phase, route.weight) == ("progressing", 100.0), route.reason
    assert route.analysis is not None and route.analysis.last is not None
    last = route.analysis.last
    assert (last.verdict, last.canary_n, last.stable_n) == ("SUCCESSFUL", 90, 120)
    tokens = next(m for m in last.metrics if m.name == "tokens_per_request")
    assert tokens.verdict == "SUCCESSFUL" and tokens.canary == pytest.approx(tokens.stable)  # like with like


async def test_a_canary_worse_for_one_caller_only_is_aborted_naming_that_callers_key(
        mixed_router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    a_key, b_key = await _two_callers(mixed_router, http, signer, "verbose")
    route = mixed_router.rollouts.route("chat")
    assert route.phase == "aborted", f"not aborted: {route.phase} at {route.weight:g}%: {route.reason}"
    assert route.reason.startswith("aborted verbose: analysis failed at step 1 (50%): tokens_per_request ")
    # B's canary requests came between its two halves of stable's: held to those of their time (the first half's last
    # MIN_STRATUM), not to stable's after them.
    assert f" on API key {b_key.id} (stable " in route.reason and "30 canary vs 10 stable requests" in route.reason


# Like with like in time. Found by a probe (p5): one app key sent short prompts first and long ones later while the
# canary's share of its requests rose; both arms answer alike, yet the canary's requests (mostly the later, long
# ones) were compared with stable's whole window (mostly the earlier, short ones): `tokens_per_request 210 >
# threshold 123`, a healthy canary aborted.
IN_TIME = {"metrics": [{"name": "tokens_per_request", "max_ratio": 1.5}], "min_sample": 100, "failure_limit": 0,
           "inconclusive_limit": 1000}


async def test_a_caller_whose_prompts_grow_longer_as_the_canary_takes_more_does_not_abort_it(
        mixed_router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    router = mixed_router
    app, _ = KeyStore(router.ctx.settings.home).create("default", "shop", description="one app")
    await _start(http, router, "same", {"steps": [50, 100], "interval_s": 0.1, "analysis": IN_TIME})
    await _pass(router, signer, "same")
    stable, canary = _users(router, "s", False, 100), _users(router, "c", True, 135)
    # Stable has 90 requests until the last batch, so the first look that judges sees them all. First short
    # prompts, a fifth of them the canary's; then long ones, four fifths the canary's (as a rising weight does).
    for i in range(3):
        await _send(router, app, stable[20 * i:20 * i + 20], ["hi"] * 20, "stable", None)
        await _send(router, app, canary[5 * i:5 * i + 5], ["hi"] * 5, "canary", None)
    for i in range(3):
        await _send(router, app, stable[60 + 10 * i:70 + 10 * i], [_LONG] * 10, "stable", None)
        await _send(router, app, canary[15 + 40 * i:55 + 40 * i], [_LONG] * 40, "canary", None)
    await _send(router, app, stable[90:], [_LONG] * 10, "stable", None)
    await router.rollouts.wait_for(lambda r: r["chat"].phase != "progressing" or r["chat"].weight > 50, timeout=30)
    route = router.rollouts.route("chat")
    assert (route.phase, route.weight) == ("progressing", 100.0), route.reason
    assert route.analysis is not None and route.analysis.last is not None
    assert (route.analysis.last.verdict, route.analysis.last.canary_n, route.analysis.last.stable_n) == \
        ("SUCCESSFUL", 135, 100)


# A key without values of the metric judged. Found by a probe (p36 F2): judged on `ttft_p95` (streamed calls only
# have a time to first token), a tenant's batch app (another app's unscoped key, never streaming) had a group of its
# own with no TTFT at all (`ttft_p95 on API key 5bddb6ae35a2: no data: never a pass`), every look was INCONCLUSIVE
# and a healthy canary paused at its weight, never promoted.
TTFT = {"metrics": [{"name": "ttft_p95", "max_ratio": 3.0}], "min_sample": 30, "failure_limit": 0,
        "inconclusive_limit": 0}


@pytest.fixture
async def ttft_router(context: ServiceContext, run_services: Any, signer: Signer) -> AsyncIterator[Any]:
    """Stable and the canary `same` both sending their first token after 200 ms; `late` after 2 s. Not 20 ms: the
    canary's 40 streamed calls at once queue in the router longer than stable's 10, which on a loaded machine (CI)
    added 130 ms to a 20 ms first token, more than `max_ratio` 3."""
    stable_sim = SimServer(SimConfig(models={"m": ModelSpec(default="stable says hi", ttft_ms=200)}, seed=3))
    canary_sim = SimServer(SimConfig(models={"same": ModelSpec(default="same canary", ttft_ms=200),
                                             "late": ModelSpec(default="late canary", ttft_ms=2000)}, seed=3))
    async with stable_sim as stable, canary_sim as canary:
        yield await serving(context, run_services, signer, stable.url, canary.url, ("same", "late"))


async def _calls(router: Any, key: str, users: list[str], stream: bool) -> None:
    """One chat request per user with `key` (its app need not be `shop`: it names deployment `chat`), streamed or
    not, all at once."""
    headers = {"Authorization": f"Bearer {key}", "x-lockgate-deployment": "chat"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async def one(user: str) -> None:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            async with session.post(f"{router.url}/v1/chat/completions", json=body,
                                    headers={"x-lockgate-user": user}) as resp:
                await resp.read()
                assert resp.status == 200

        await asyncio.gather(*(one(u) for u in users))


async def _streaming_and_batch_callers(router: Any, http: aiohttp.ClientSession, signer: Signer,
                                       release: str) -> str:
    """A canary of `release` at 50% judged on ttft_p95, with shop's streaming key and a batch app's key that never
    streams, each with 40 canary requests (min_sample alone, counted in requests). Stable's first 20 before them
    (no look: stable has fewer than min_sample), shop's last 10 streamed after them (the look then compares every
    canary TTFT with stable's of its time). Returns the batch key's id."""
    store = KeyStore(router.ctx.settings.home)
    shop, _ = store.create("default", "shop", description="a chat app: streams")
    batch, batch_key = store.create("default", "batch", description="another app of the tenant: never streams")
    await _start(http, router, release, {"steps": [50, 100], "interval_s": 0.1, "analysis": TTFT})
    await _pass(router, signer, release)
    shop_stable = _users(router, "s", False, 20)
    await _calls(router, shop, shop_stable[:10], stream=True)
    await _calls(router, batch, _users(router, "b", False, 10), stream=False)
    await _calls(router, shop, _users(router, "s", True, 40), stream=True)
    await _calls(router, batch, _users(router, "b", True, 40), stream=False)
    await _calls(router, shop, shop_stable[10:], stream=True)
    await router.rollouts.wait_for(lambda r: r["chat"].phase != "progressing" or r["chat"].weight > 50
                                   or r["chat"].paused, timeout=30)
    return batch_key.id


async def test_a_caller_that_never_streams_does_not_pause_a_healthy_canary_judged_on_ttft(
        ttft_router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    await _streaming_and_batch_callers(ttft_router, http, signer, "same")
    route = ttft_router.rollouts.route("chat")
    assert (route.phase, route.weight, route.paused) == ("progressing", 100.0, False), route.reason
    assert route.analysis is not None and route.analysis.last is not None
    last = route.analysis.last
    assert (last.verdict, last.canary_n) == ("SUCCESSFUL", 80)  # the batch app's requests are in the look
    (ttft,) = last.metrics
    # Judged on the streamed calls, all together: only shop's key has TTFT values.
    assert (ttft.verdict, ttft.group, ttft.canary_n) == ("SUCCESSFUL", "", 80)


async def test_a_canary_late_to_its_first_token_is_still_aborted_beside_a_caller_that_never_streams(
        ttft_router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    await _streaming_and_batch_callers(ttft_router, http, signer, "late")
    route = ttft_router.rollouts.route("chat")
    assert route.phase == "aborted", f"not aborted: {route.phase} at {route.weight:g}%: {route.reason}"
    assert route.reason.startswith("aborted late: analysis failed at step 1 (50%): ttft_p95 "), route.reason
