"""A router that restarts mid-rollout reads back the served inference events of the rollouts under analysis from
JetStream: its evidence lives in memory, and after a blue-green promotion the old release gets no traffic, so
without the replay a restarted router never again had the baseline its post-promotion analysis compares with. On
the real nats-server with the simulator: the router process is stopped and another started on the same bus."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import msgspec
import nats.errors
import pytest

from lockgate.bus import Bus
from lockgate.contracts import InferenceEvent
from lockgate.retry import RetryPolicy
from lockgate.server.apikeys import bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.router import handlers
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.store import Store
from lockgate.subjects import Subjects
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import Relay, Replicas, chat_releases
from tests.integration.test_rollout_analysis import CANARY, ERRORS, STABLE, _pass, _start, _traffic_until

pytestmark = pytest.mark.timeout(120)
_events = msgspec.json.Decoder(list[InferenceEvent])


class Stack(Replicas):
    """Router processes, each on a bus connection of its own, that can be stopped as a process dies."""

    def __init__(self, context: ServiceContext, store: Store) -> None:
        super().__init__()
        self.context, self.store = context, store

    async def start(self, url: str = "") -> Any:
        """A router on a connection of its own (to `url`, default the test's server)."""
        s = self.context.settings
        bus = Bus(url or s.nats_url, Subjects(s.prefix), name=f"router-{len(self.sets)}")
        await bus.connect()
        return await self.router(bus, s, self.store)

    async def stop(self, router: Any) -> None:
        """Stop the router and close its connection (what a restart leaves of it: KV and the streams)."""
        svcs = next(svcs for svcs in self.sets if svcs["router"] is router)
        await svcs.stop()
        self.sets.remove(svcs)
        bus = router.ctx.bus
        self.buses.remove(bus)
        await bus.close()


@pytest.fixture
async def stack(context: ServiceContext, store: Store) -> AsyncIterator[tuple[Stack, Signer]]:
    signer = Signer.generate()
    trust_key(trust_file_path(context.settings), signer.public)
    async with SimServer(STABLE) as stable, SimServer(CANARY) as canary:
        await chat_releases(context, signer, stable.url, canary.url, ("bad",))
        s = Stack(context, store)
        try:
            yield s, signer
        finally:
            await s.close()


@pytest.fixture
async def http(context: ServiceContext) -> AsyncIterator[aiohttp.ClientSession]:
    keys = bootstrap(context.settings.home, tenant="acme", app="shop")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as s:
        yield s


async def test_a_failing_release_promoted_before_a_router_restart_is_rolled_back_after_it(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any]) -> None:
    # Before: the old release's baseline lived only in the router's memory, and after the promotion it gets no
    # traffic: the restarted router's post-promotion analysis waited for 100 of its events for ever ("canary 7594,
    # stable 0") while the failing release served everyone.
    replicas, signer = stack
    await run_services("query")  # the record is empty (no sink): the replay completes on what the stream holds
    router = await replicas.start()
    await _start(http, router, "bad", {"interval_s": 0.1, "blue_green": {"post_promotion_analysis": ERRORS}})
    await _pass(router, signer, "bad")
    before = await _traffic_until(http, router, lambda r: False, limit=400)  # the old release's evidence
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/promote") as resp:
        body = await resp.json()
        assert resp.status == 200 and body["verifying"], body
    await replicas.stop(router)  # its outbox flushed: every served event is in the stream

    router = await replicas.start()
    route = router.rollouts.route("chat")
    assert (route.phase, route.verifying, route.stable.release) == ("promoted", True, "bad")
    async with asyncio.timeout(30):  # read back in the background
        await router.rollouts.replayed.wait()
    # Read back: each served event of the old release once (none taken twice, live and stored).
    bus = router.ctx.bus
    stored = [e for _, _, data in [m async for m in bus.stored_since(bus.subjects.streams["inference"].name,
                                                                      bus.subjects.served_all, 0)]
              for e in _events.decode(data) if e.release == "r1"]
    assert len(stored) >= before and router.rollouts.evidence.sample("chat", "r1", route.started_at).n == len(stored)
    sent = await _traffic_until(http, router, lambda r: r.phase == "aborted", limit=3000)
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"not rolled back after {sent} requests: {route.reason}"
    assert route.stable.release == "r1" and route.reason.startswith(
        "rolled back bad: post-promotion analysis failed: error_rate ")


async def _consume_as_the_other_readers(bus: Bus, sink_events: Any, events: int) -> None:
    """What the stack's consumers do with the served events: the sink stores them (awaited), the evaluator, drift
    monitor and cost service take them (acked here), after which the stream keeps none of them."""
    await sink_events.wait_for(events)
    spec = bus.subjects.streams["inference"]
    others = [d for d in spec.readers if not d.endswith("_sink_inference")]
    subs = [await bus.js.pull_subscribe_bind(d, spec.name) for d in others]
    for _ in range(100):
        for sub in subs:
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                for msg in await sub.fetch(1000, timeout=0.2):
                    await msg.ack_sync()
        if (await bus.js.stream_info(spec.name)).state.messages == 0:
            return
    raise AssertionError("the inference stream kept events every reader acknowledged")


async def _promoted_and_stopped(stack: tuple[Stack, Signer], http: aiohttp.ClientSession,
                                run_services: Callable[..., Any], requests: int) -> tuple[Any, list[Any]]:
    """Sink and query running; a router served `requests` to r1 and `bad`, promoted `bad` blue-green (post-promotion
    analysis running) and stopped. The sink, and the served events the inference stream holds."""
    replicas, signer = stack
    sink = (await run_services("sink", "query"))["sink"]
    router = await replicas.start()
    await _start(http, router, "bad", {"interval_s": 0.1, "blue_green": {"post_promotion_analysis": ERRORS}})
    await _pass(router, signer, "bad")
    await _traffic_until(http, router, lambda r: False, limit=requests)
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/promote") as resp:
        assert resp.status == 200, await resp.text()
    await replicas.stop(router)
    bus = replicas.context.bus
    served = [e async for _, _, data in bus.stored_since(
        bus.subjects.streams["inference"].name, bus.subjects.inference_all, 0) for e in _events.decode(data)]
    return sink, served


async def test_a_restarted_router_reads_back_evidence_its_stream_no_longer_keeps_from_the_record(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any],
        store: Store) -> None:
    # The inference stream keeps an event only until every consumer took it (interest retention): the served events
    # of the old release are then only in ClickHouse, and the restarted router must read them from there (through
    # the query service). Before: read from the stream alone, the baseline was gone and the analysis never judged.
    replicas, _ = stack
    sink, served = await _promoted_and_stopped(stack, http, run_services, 400)
    await _consume_as_the_other_readers(replicas.context.bus, sink.handlers.events, len(served))
    stored = store.rows("SELECT count() AS n FROM inference_events WHERE served AND release = 'r1'")[0]["n"]
    assert stored >= 400

    router = await replicas.start()
    route = router.rollouts.route("chat")
    async with asyncio.timeout(30):
        await router.rollouts.replayed.wait()
    assert router.rollouts.evidence.sample("chat", "r1", route.started_at).n == stored
    sent = await _traffic_until(http, router, lambda r: r.phase == "aborted", limit=3000)
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"not rolled back after {sent} requests: {route.reason}"


async def test_a_restarted_router_counts_once_the_evidence_both_its_stream_and_the_record_hold(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any],
        store: Store) -> None:
    # Found while extending the read-back to shadow comparisons: a batch is in the stream until its last consumer
    # takes it, and in the record once the sink has stored it. Read from the stream, then from the record, each such
    # event was counted twice: a restarted router held twice the evidence of what was served (both releases alike,
    # so twice as sure of the same rates), and a shadow comparison twice the copies.
    replicas, _ = stack
    sink, served = await _promoted_and_stopped(stack, http, run_services, 200)
    await sink.handlers.events.wait_for(len(served))  # in the record, and still in the stream (no other reader ran)
    stored = store.rows("SELECT count() AS n FROM inference_events WHERE served AND release = 'r1'")[0]["n"]
    assert stored == sum(e.release == "r1" for e in served) >= 200

    router = await replicas.start()
    route = router.rollouts.route("chat")
    async with asyncio.timeout(30):
        await router.rollouts.replayed.wait()
    assert router.rollouts.evidence.sample("chat", "r1", route.started_at).n == stored


async def test_a_router_restarted_while_the_query_service_is_down_holds_a_canary_that_failed_before_it(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any],
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the read-back from the record failed ("stopped after 0 messages"), the restarted router judged only
    # the healthy events after its restart and promoted a canary whose 16% errors before it were in the record,
    # never judged; and it served nothing while it waited 30 s for the query service.
    replicas, signer = stack
    monkeypatch.setattr(handlers, "REPLAY_RETRY", RetryPolicy(attempts=None, initial_s=0.05, max_s=0.2))
    sink = (await run_services("sink"))["sink"]
    query = await run_services("query")
    context = replicas.context
    failing = SimConfig(models={"bad": ModelSpec(default="bad canary", error_rate=0.5)}, seed=3)
    healthy = SimConfig(models={"bad": ModelSpec(default="bad canary")}, seed=3)
    async with SimServer(failing) as before, SimServer(healthy) as after:
        context.settings = context.settings.replace(canary_upstream=before.url)
        router = await replicas.start()
        # No look before the restart (a look is due one interval after the gate's PASS).
        await _start(http, router, "bad", {"steps": [50, 100], "interval_s": 8, "analysis": ERRORS})
        await _pass(router, signer, "bad")
        await _traffic_until(http, router, lambda r: False, limit=400)
        route = router.rollouts.route("chat")
        assert (route.phase, route.weight, route.analysis) == ("progressing", 50, None), route.reason
        await replicas.stop(router)
        bus = context.bus
        served = [e async for _, _, data in bus.stored_since(
            bus.subjects.streams["inference"].name, bus.subjects.inference_all, 0) for e in _events.decode(data)]
        await _consume_as_the_other_readers(bus, sink.handlers.events, len(served))  # in the record only
        failed = store.rows("SELECT count() AS n FROM inference_events WHERE served AND release = 'bad' "
                            "AND status != 'ok'")[0]["n"]
        assert failed >= 10  # its breaker then diverts the rest to stable (counted as canary failures)

        await query.stop()
        context.settings = context.settings.replace(canary_upstream=after.url)
        router = await replicas.start()
        assert not router.rollouts.replayed.is_set()  # serving while the record cannot be read
        statuses = []
        url = f"{router.url}/v1/chat/completions"
        for i in range(300):  # healthy traffic: enough for a look (100 events per variant) on its own
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": f"after-{i}"}
            async with http.post(url, json=body) as resp:
                statuses.append(resp.status)
        assert statuses.count(200) >= 295, statuses  # stable's and the canary's own 0.5% aside

        def waited(r: Any) -> bool:
            last = r.analysis.last if r.analysis else None
            return r.phase != "progressing" or r.weight != 50 or (last is not None and last.canary_n >= 100)

        await router.rollouts.wait_for(lambda routes: waited(routes["chat"]), timeout=30)
        route = router.rollouts.route("chat")
        assert route.analysis is not None and route.analysis.last is not None
        last = route.analysis.last
        assert (route.phase, route.weight, last.verdict) == ("progressing", 50, "WAITING"), \
            f"judged on the evidence after the restart alone: {route.reason} ({last.verdict})"
        assert route.analysis.look == 0 and route.analysis.successes == 0
        why = last.metrics[0].why
        assert why.startswith("served evidence before the restart not yet read back from the record (query "
                              "service: no query service answers"), why

        await run_services("query")  # back: the read-back completes, and the canary is judged on all of it
        async with asyncio.timeout(30):
            await router.rollouts.replayed.wait()
        assert not router.rollouts.unreplayed
        await router.rollouts.wait_for(lambda routes: routes["chat"].phase != "progressing", timeout=30)
        route = router.rollouts.route("chat")
        assert route.phase == "aborted" and route.reason.startswith(
            "aborted bad: analysis failed at step 1 (50%): error_rate "), \
            route.reason


def _counted(router: Any) -> tuple[int, int]:
    """The canary's and stable's requests the router's next look of `chat` counts."""
    m = router.rollouts.measurement(router.rollouts.route("chat"), time.time())
    return m.canary_n, m.stable_n


async def _served_so_far(router: Any) -> int:
    """The requests of `chat` the routers served so far, as the inference stream holds them once `router`'s outbox
    has published its own."""
    await router.batcher.flush()
    bus = router.ctx.bus
    return sum(e.deployment == "chat" for _, _, data in [m async for m in bus.stored_since(
        bus.subjects.streams["inference"].name, bus.subjects.served_all, 0)] for e in _events.decode(data))


async def _observed(router: Any, served: int) -> None:
    """Until `router` counts `served` requests (live, or read back)."""
    observe, changed = router.rollouts.observe, asyncio.Event()

    def observed(events: list[InferenceEvent]) -> None:
        observe(events)
        changed.set()

    router.rollouts.observe = observed
    try:
        async with asyncio.timeout(30):
            while sum(_counted(router)) < served:
                await changed.wait()
                changed.clear()
    finally:
        router.rollouts.observe = observe


async def test_a_replica_cut_off_from_the_bus_reads_back_what_the_others_served_meanwhile_before_it_judges(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Before (probe p48 F1): only drift reports were read back after a reconnection. A replica that lost its
    # connection for a second missed for good the events the others served meanwhile (its looks judged 22 + 28
    # requests where the others judged 34 + 46, never catching up), and passed a failing canary's look whose large
    # answers it had not seen.
    replicas, signer = stack
    monkeypatch.setattr(handlers, "REPLAY_RETRY", RetryPolicy(attempts=None, initial_s=0.05, max_s=0.2))
    query = await run_services("query")  # the record is empty (no sink): the stream holds every served event
    a = await replicas.start()
    await _start(http, a, "bad", {"steps": [50, 100], "interval_s": 3600, "analysis": ERRORS})  # no look is due
    await _pass(a, signer, "bad")
    relay = Relay(int(replicas.context.settings.nats_url.rpartition(":")[2]))
    try:
        b = await replicas.start(f"nats://127.0.0.1:{await relay.start()}")
        async with asyncio.timeout(30):
            await b.rollouts.replayed.wait()  # its start's read-back: nothing served yet
        await _traffic_until(http, a, lambda r: False, limit=40)
        await _observed(b, await _served_so_far(a))  # live, as every replica

        await query.stop()  # the read-back after the reconnection cannot complete until it is back
        bus = b.ctx.bus
        reconnects = bus.reconnects
        relay.cut()  # b alone loses the server, which stays up for a and everyone else
        await bus.wait_state("reconnecting", timeout_s=10)
        await _traffic_until(http, a, lambda r: False, limit=200)
        served = await _served_so_far(a)
        await _observed(a, served)
        relay.heal()
        async with asyncio.timeout(30):  # nats-py waits about 2 s between reconnect attempts
            await bus.reconnected(after=reconnects)
        # Its looks wait (never judged: `analysis.incomplete`) until what it missed is read back, and say why.
        why = b.rollouts.unreplayed.get("chat", "")
        assert why.startswith("served evidence published while cut off from the bus not yet read back from the "
                              "record ("), f"judged while evidence is missing: {b.rollouts.unreplayed}"
        assert not b.rollouts.replayed.is_set()

        await run_services("query")
        async with asyncio.timeout(30):
            await b.rollouts.replayed.wait()
        assert not b.rollouts.unreplayed
        # Each request once: the same evidence as the replica that was never cut off, all that was served.
        assert _counted(b) == _counted(a) and sum(_counted(b)) == served, (_counted(b), _counted(a), served)
    finally:
        await relay.close()
