"""A restarted router reads the served evidence of its rollouts back from the record (the `served_events` query) in
pages that fit one NATS message, whatever the answers held: before (probe p36 F1) it asked for 500 rows of every
tenant and deployment with every attribute, ~2 kB tool calls of ANY tenant made the page too large, and the read
failed on every try: every rollout under analysis on that replica got no evidence, and past its progress deadline a
canary paused, a promoted blue-green release was rolled back. On the real nats-server (1 MB max_payload), chDB, the
sink, the query service and the simulator; the router process is stopped and another started on the same bus."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import aiohttp
import msgspec
import pytest

from lockgate.contracts import GateDecided, InferenceEvent
from lockgate.queryclient import ask
from lockgate.retry import RetryPolicy
from lockgate.server.apikeys import KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.router import handlers
from lockgate.services.router.rollouts import EVIDENCE_ATTRIBUTES
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.store import Store
from lockgate_dev.sim import SimServer
from tests.helpers import chat_releases, judged, register_model_release, store_decision
from tests.integration.test_rollout_analysis import CANARY, ERRORS, STABLE, _pass, _start
from tests.integration.test_router_evidence_replay import Stack

pytestmark = pytest.mark.timeout(120)
# No look before the restart nor soon after it: the test reads the evidence the read-back left, nothing else.
STRATEGY = {"steps": [50, 100], "interval_s": 600, "analysis": ERRORS}
_events = msgspec.json.Decoder(list[InferenceEvent])
_CHAT = "SELECT release, count() AS n FROM inference_events WHERE served AND deployment = 'chat' GROUP BY release"


@pytest.fixture
async def stack(context: ServiceContext, store: Store,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Stack, Signer, aiohttp.ClientSession]]:
    signer = Signer.generate()
    trust_key(trust_file_path(context.settings), signer.public)
    # A read-back that fails is tried again soon: a test that fails shows the stall, not the backoff.
    monkeypatch.setattr(handlers, "REPLAY_RETRY", RetryPolicy(attempts=None, initial_s=0.05, max_s=0.2))
    keys = bootstrap(context.settings.home, tenant="acme", app="shop")
    async with SimServer(STABLE) as stable, SimServer(CANARY) as canary, aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {keys.admin_key}"}) as http:
        await chat_releases(context, signer, stable.url, canary.url, ("same",))
        s = Stack(context, store)
        try:
            yield s, signer, http
        finally:
            await s.close()


async def _chat(http: aiohttp.ClientSession, router: Any, n: int, session: str = "") -> None:
    """`n` requests to deployment chat from distinct users (with `session` as each one's session id)."""
    async def one(i: int) -> None:
        headers = {"x-lockgate-session": f"{i}-{session}"} if session else {}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": f"user-{i}"}
        async with http.post(f"{router.url}/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()

    for start in range(0, n, 25):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 25))))


async def _canary_served(stack: tuple[Stack, Signer, aiohttp.ClientSession], run_services: Callable[..., Any]) \
        -> tuple[Any, Any]:
    """Sink and query running, and a router whose canary `same` of chat is live at 50% under analysis."""
    replicas, signer, http = stack
    sink = (await run_services("sink", "query"))["sink"]
    router = await replicas.start()
    await _start(http, router, "same", STRATEGY)
    await _pass(router, signer, "same")
    return sink, router


async def _restarted(replicas: Stack, router: Any, sink: Any, store: Store, caplog: pytest.LogCaptureFixture) \
        -> tuple[Any, dict[str, int]]:
    """Stop `router` once its served events are all stored, start another and wait for its read-back (at most 20 s:
    one that cannot complete is tried again for ever). The new router, and chat's stored events per release."""
    await replicas.stop(router)  # its outbox flushed: every served event is in the stream
    bus = replicas.context.bus
    served = [e async for _, _, data in bus.stored_since(bus.subjects.streams["inference"].name,
                                                          bus.subjects.served_all, 0) for e in _events.decode(data)]
    await sink.handlers.events.wait_for(len(served))
    caplog.set_level(logging.INFO, logger="lockgate.router")
    router = await replicas.start()
    async with asyncio.timeout(20):
        await router.rollouts.replayed.wait()
    return router, {r["release"]: r["n"] for r in store.rows(_CHAT)}


def _evidence(router: Any) -> dict[str, int]:
    route = router.rollouts.route("chat")
    return {r: router.rollouts.evidence.sample("chat", r, route.started_at).n for r in ("r1", "same")}


def _read_back(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("served events replay ")]


async def test_another_tenants_large_answers_neither_stall_nor_enter_a_restarted_routers_read_back(
        stack: tuple[Stack, Signer, aiohttp.ClientSession], context: ServiceContext, run_services: Callable[..., Any],
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    # Probe p36 F1: tenant beta, with nothing but its own app key, asks its own deployment for tool calls on long
    # text (80 kB of arguments each, kept up to 64 kB in `gen_ai.output.messages`). Before: the restarted router's
    # pages held them ("the result of query 'served_events' is 1,997,122 bytes"), failed on every try, and the
    # canary of chat got no evidence.
    replicas, signer, http = stack
    beta_key, _ = KeyStore(context.settings.home).create("beta", "bapp", "app", description="tenant beta's app")
    await register_model_release(context.bus, "b1", "m", "default", app="bapp", tenant="beta")
    await store_decision(context.bus, signer.sign(GateDecided(release="b1", rules=[], decision="PASS", tenant="beta",
                                                              artifacts=await judged(context.bus, "b1"))))
    sink, router = await _canary_served(stack, run_services)
    async with http.put(f"{router.url}/lockgate/v1/deployments/other", json={"stable_release": "b1"}) as r:
        assert r.status == 200, await r.text()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {beta_key}",
                                              "x-lockgate-deployment": "other"}) as beta:
        for i in range(30):
            async with beta.post(f"{router.url}/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": "x " * 40_000}], "tools": tools,
                    "user": f"b{i}"}) as r:
                assert r.status == 200, await r.text()
    await _chat(http, router, 60)

    router, chat = await _restarted(replicas, router, sink, store, caplog)
    assert _evidence(router) == chat and sum(chat.values()) == 60
    # beta's rows are never read (nor would a page of them fit): only chat's, in one page
    assert store.rows("SELECT count() AS n FROM inference_events WHERE served AND tenant = 'beta'")[0]["n"] == 30
    assert _read_back(caplog) == ["served events replay read 60 stored events of chat (0 skipped)"]


async def test_a_restarted_router_reads_back_pages_too_large_for_one_message_at_half_the_size(
        stack: tuple[Stack, Signer, aiohttp.ClientSession], run_services: Callable[..., Any], store: Store,
        caplog: pytest.LogCaptureFixture) -> None:
    # chat's own clients send 8 kB session ids: 150 rows of them are over 1 MB. Before: the page of 500 was refused
    # on every try (ReplyTooLarge), and the canary waited for its evidence for ever.
    replicas, _, http = stack
    sink, router = await _canary_served(stack, run_services)
    await _chat(http, router, 150, session="s" * 8000)

    router, chat = await _restarted(replicas, router, sink, store, caplog)
    assert _evidence(router) == chat and sum(chat.values()) == 150
    assert _read_back(caplog) == ["served events replay read 150 stored events of chat (0 skipped)"]


async def test_a_stored_event_too_large_for_one_message_alone_is_skipped_and_said_so(
        stack: tuple[Stack, Signer, aiohttp.ClientSession], run_services: Callable[..., Any], store: Store,
        caplog: pytest.LogCaptureFixture) -> None:
    # No router of this version stores such an event (each fits one message, fit.py), but one in the record (an older
    # writer's) must not hold the read-back for ever: halving ends at one row, which is skipped, with a line naming it.
    replicas, _, http = stack
    sink, router = await _canary_served(stack, run_services)
    await _chat(http, router, 20)
    await replicas.stop(router)
    await sink.handlers.events.wait_for(20)
    store.command("INSERT INTO inference_events SELECT * REPLACE ('huge' AS id, repeat('ss', 600000) AS session_id, "
                  "'' AS msg_id) FROM inference_events WHERE served AND deployment = 'chat' ORDER BY time LIMIT 1")
    caplog.set_level(logging.INFO, logger="lockgate.router")
    router = await replicas.start()
    async with asyncio.timeout(20):
        await router.rollouts.replayed.wait()

    chat = {r["release"]: r["n"] for r in store.rows(_CHAT)}
    assert sum(chat.values()) == 21
    evidence = _evidence(router)
    assert sum(evidence.values()) == 20  # all but the one skipped
    assert _read_back(caplog) == ["served events replay skipped stored event huge: too large for one NATS message "
                                  "even alone", "served events replay read 21 stored events of chat (1 skipped)"]


async def test_the_served_events_query_answers_the_deployments_and_attributes_asked_only(
        bus: Any, store: Store, run_services: Callable[..., Any]) -> None:
    # The rows a router reads back carry the attributes its evidence reads, never an answer's tool calls, and are
    # of the deployments it replays (an event without a deployment: of its app), never another's.
    await run_services("query")
    at = datetime(2026, 1, 1)
    attrs = {"cache": "miss", "lockgate.fallback_from": "e1", "gen_ai.output.messages": "x" * 1000}
    columns = ("id", "time", "tenant", "served", "app", "deployment", "release", "attributes")
    store.insert_rows("inference_events", columns, [
        ["a", at, "acme", True, "shop", "chat", "r1", attrs], ["b", at, "acme", True, "chat", "", "r1", attrs],
        ["c", at, "beta", True, "bapp", "other", "b1", attrs], ["d", at, "acme", False, "shop", "chat", "r1", attrs]],
        token=None)
    rows = await ask(bus, "served_events", {"since": "2025-12-31T00:00:00Z", "deployments": ["chat"],
                                            "attributes": list(EVIDENCE_ATTRIBUTES)})
    assert [(r["id"], r["attributes"]) for r in rows] == [
        ("a", {"cache": "miss", "lockgate.fallback_from": "e1"}), ("b", {"cache": "miss", "lockgate.fallback_from": "e1"})]
    key = await ask(bus, "served_events", {"since": "2025-12-31T00:00:00Z", "deployments": ["other"],
                                           "attributes": [], "key_only": True})
    assert [sorted(r) for r in key] == [["id", "key_only", "msg_id", "time"]]
    # A router of the version before asks with neither (a rolling upgrade): every served row, whole, as it read them.
    every = await ask(bus, "served_events", {"since": "2025-12-31T00:00:00Z"})
    assert [(r["id"], r["attributes"]) for r in every] == [("a", attrs), ("b", attrs), ("c", attrs)]
