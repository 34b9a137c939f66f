"""Two router replicas on one prefix: KV watch keeps their routes in step, CAS announces each step once."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import DriftReport, FeatureDrift, GateDecided, RolloutState
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.store import Store
from lockgate.subjects import Subjects
from lockgate.telemetry import Telemetry
from tests.helpers import admin_headers, gate_decided, judged, register_model_release, sink_stored, store_pass

pytestmark = pytest.mark.timeout(60)

_states: Codec[RolloutState] = Codec(RolloutState)


@pytest.fixture
async def replicas(settings: Settings, store: Store, bus: Bus) -> AsyncIterator[tuple[Any, Any]]:
    """Two routers, each on its own connection (as two processes would be), sharing prefix and store."""
    settings = settings.replace(stable_upstream="http://127.0.0.1:9", canary_upstream="http://127.0.0.1:9",
                                deployment="chat", app="shop")
    buses: list[Bus] = []
    sets: list[ServiceSet] = []
    try:
        for name in ("router-a", "router-b"):
            b = Bus(settings.nats_url, Subjects(settings.prefix), name=name)
            await b.connect()
            buses.append(b)
            ctx = ServiceContext(bus=b, store=store, telemetry=Telemetry(), settings=settings)
            svcs = ServiceSet(ctx, ["router"])
            await svcs.start()
            sets.append(svcs)
        yield sets[0]["router"], sets[1]["router"]
    finally:
        for svcs in sets:
            await svcs.stop()
        for b in buses:
            await b.close()


@pytest.fixture
async def sink(run_services: Any) -> Any:
    """The store owner on the test's own connection: it stores what the replicas announce."""
    return (await run_services("sink"))["sink"].handlers


async def test_canary_on_one_replica_is_routed_and_promoted_once_by_both(
    replicas: tuple[Any, Any], bus: Bus, store: Store, sink: Any
) -> None:
    a, b = replicas
    signer = Signer.generate()
    trust_key(trust_file_path(a.ctx.settings), signer.public)
    sub = await bus.nc.subscribe(bus.subjects.rollout("chat"))

    await register_model_release(bus, "r1")
    await register_model_release(bus, "r2")
    await store_pass(bus, "r1", a.ctx.settings)  # the stable release passed its gate
    async with aiohttp.ClientSession(headers=admin_headers(a.ctx.settings.home)) as http:
        body = {"stable_release": "r1", "canary_release": "r2"}
        async with http.put(f"{a.url}/lockgate/v1/deployments/chat", json=body) as resp:
            assert resp.status == 200, await resp.text()
    await b.rollouts.wait_for(lambda r: "chat" in r and r["chat"].canary is not None
                              and r["chat"].canary.release == "r2", timeout=10)
    assert b.rollouts.route("chat").weight == a.rollouts.route("chat").weight
    # Both split users with one key, the router's secret (read from its KV bucket) over the rollout's id: a user gets
    # one arm from either replica.
    assert b.rollouts.sticky_salt(b.rollouts.route("chat")) == a.rollouts.sticky_salt(a.rollouts.route("chat")) != ""

    await gate_decided(bus, signer.sign(GateDecided(release="r2", rules=[], decision="PASS",
                                                    artifacts=await judged(bus, "r2"))))
    for router in (a, b):
        await router.rollouts.wait_for(lambda r: r["chat"].phase == "promoted", timeout=20)
        assert router.rollouts.route("chat").stable.release == "r2"
    await a.rollouts.flush()
    await b.rollouts.flush()

    states: list[RolloutState] = []
    while not states or states[-1].phase != "promoted":
        states.append(_states.decode((await sub.next_msg(timeout=10)).data))
    steps = [(s.phase, s.canary_weight, s.step) for s in states]
    assert steps == [("idle", 0.0, 0), ("progressing", 10.0, 1), ("progressing", 25.0, 2), ("progressing", 50.0, 3),
                     ("progressing", 100.0, 4), ("promoted", 0.0, 4)]
    # The router's own flush has finished, so any duplicate announcement would already be here.
    await bus.nc.flush()
    assert sub.pending_msgs == 0

    await sink_stored(sink, rollout_events=len(states))
    rows = store.rows("SELECT phase, canary_weight, step FROM rollout_events WHERE deployment = 'chat' "
                      "ORDER BY time")
    assert [(r["phase"], r["canary_weight"], r["step"]) for r in rows] == steps


async def test_every_replica_holds_the_drift_report_its_analysis_reads(replicas: tuple[Any, Any], bus: Bus) -> None:
    """The durable consumer that acts on a drift report reaches one replica; the analysis' `drift` metric must
    see it on whichever replica takes the look, so every replica takes reports as evidence."""
    a, b = replicas
    signer = Signer.generate()
    trust_key(trust_file_path(a.ctx.settings), signer.public)
    await register_model_release(bus, "r1")
    await register_model_release(bus, "r2")
    await store_pass(bus, "r1", a.ctx.settings)
    strategy = {"steps": [50, 100], "interval_s": 60, "analysis": {"metrics": [{"name": "drift", "max": 0}]}}
    async with aiohttp.ClientSession(headers=admin_headers(a.ctx.settings.home)) as http:
        body = {"stable_release": "r1", "canary_release": "r2", "strategy": strategy}
        async with http.put(f"{a.url}/lockgate/v1/deployments/chat", json=body) as resp:
            assert resp.status == 200, await resp.text()
    await gate_decided(bus, signer.sign(GateDecided(
        release="r2", rules=[], decision="PASS", artifacts=await judged(bus, "r2"))))
    for router in (a, b):  # under analysis on both: each keeps evidence
        await router.rollouts.wait_for(lambda r: "chat" in r and r["chat"].phase == "progressing", timeout=10)

    seen = {id(r): asyncio.Event() for r in (a, b)}
    for router in (a, b):
        observe = router.rollouts.observe_drift

        def recorded(report: DriftReport, observe: Any = observe, done: asyncio.Event = seen[id(router)]) -> None:
            observe(report)
            done.set()

        router.rollouts.observe_drift = recorded
    now = datetime.now(UTC)
    report = DriftReport(served=True, deployment="chat", window_start=now - timedelta(seconds=30), window_end=now,
                         reference_n=100, current_n=100, features=[], drifted=False, comparison="canary_vs_stable",
                         release="r2", reference_release="r1")
    await bus.publish(bus.subjects.drift("chat"), report)
    async with asyncio.timeout(10):
        await asyncio.gather(*(e.wait() for e in seen.values()))
    assert [r.rollouts.evidence.drift("chat", "r2", 0.0) for r in (a, b)] == [report, report]


async def test_a_replica_behind_on_the_route_cannot_put_back_a_blocked_stable(
    replicas: tuple[Any, Any], bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A canary PUT keeping "the current stable" needs no decision for it; a replica whose KV watch lags checked
    that against its stale route, lost the compare-and-set to the other replica's write, recomputed the change on
    the reloaded route without checking again, and so put a BLOCKed release back as stable at 100%. Before: 200,
    `r0` (BLOCKed) served everyone; now 409, and the route the other replica wrote stays."""
    import msgspec

    from lockgate import artifacts
    from lockgate.subjects import token

    a, b = replicas
    for release in ("r0", "r1", "r2", "r3"):
        await register_model_release(bus, release)
    await store_pass(bus, "r0", a.ctx.settings)
    await store_pass(bus, "r2", a.ctx.settings)
    async with aiohttp.ClientSession(headers=admin_headers(a.ctx.settings.home)) as http:
        async def put(router: Any, body: dict[str, str]) -> tuple[int, str]:
            async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
                return resp.status, await resp.text()

        assert (await put(a, {"stable_release": "r0"}))[0] == 200  # its first release
        await b.rollouts.wait_for(lambda r: "chat" in r and r["chat"].stable.release == "r0", timeout=10)
        signer = Signer.generate()  # the gate BLOCKs r0 since (a re-evaluation, a newer policy)
        trust_key(trust_file_path(a.ctx.settings), signer.public)
        block = GateDecided(release="r0", rules=[], decision="BLOCK", reason="re-evaluated",
                            artifacts=dict((await artifacts.release_of(bus, "r0"))["artifacts"]))
        await (await bus.kv(bus.subjects.kv_gates)).put(token("r0"), msgspec.json.encode(signer.sign(block)))

        monkeypatch.setattr(a.rollouts, "_on_entry", lambda entry: None)  # replica a's watch lags from here
        status, text = await put(b, {"stable_release": "r2", "canary_release": "r3"})
        assert status == 200, text
        assert a.rollouts.route("chat").stable.release == "r0"  # a has not seen it

        status, text = await put(a, {"stable_release": "r0", "canary_release": "r1"})
        assert status == 409, text
        assert "stable release 'r0' is BLOCKed" in text and "the current stable is 'r2'" in text
    route = a.rollouts.route("chat")  # a reloaded the route it lost to
    assert (route.stable.release, route.canary.release if route.canary else None) == ("r2", "r3")


async def canary_passed(bus: Bus, a: Any, strategy: dict[str, Any]) -> Signer:
    """Through replica `a`: deployment `chat` rolling r2 out from r1 (PASSed) with `strategy`, and a PASS of r2 by a
    gatekeeper key trusted now (returned, to sign what comes next)."""
    signer = Signer.generate()
    trust_key(trust_file_path(a.ctx.settings), signer.public)
    for release in ("r1", "r2"):
        await register_model_release(bus, release)
    await store_pass(bus, "r1", a.ctx.settings)
    async with aiohttp.ClientSession(headers=admin_headers(a.ctx.settings.home)) as http:
        body = {"stable_release": "r1", "canary_release": "r2", "strategy": strategy}
        async with http.put(f"{a.url}/lockgate/v1/deployments/chat", json=body) as resp:
            assert resp.status == 200, await resp.text()
    await gate_decided(bus, signer.sign(GateDecided(release="r2", rules=[], decision="PASS",
                                                    artifacts=await judged(bus, "r2"))))
    return signer


async def test_a_block_whose_message_a_replica_swallowed_is_acted_on_by_every_replica(
    replicas: tuple[Any, Any], bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe p19 F2: a decision's message reaches one replica (the durable consumer is shared); one that took a
    person's reject and could not act on it (a partition dropping the server's side, a frozen process) left every
    other replica serving the rejected canary at 50% until redelivery, 30 to 180 s. Here the replica that takes the
    BLOCK's message acks it and does nothing, so it is never redelivered: both replicas abort the canary all the
    same, on its current decision read again (STABLE_CHECK_S), as its message would have."""
    a, b = replicas
    signer = await canary_passed(bus, a, {"steps": [50, 100], "interval_s": 3600})
    for r in (a, b):
        await r.rollouts.wait_for(lambda routes: "chat" in routes and routes["chat"].weight == 50.0, timeout=10)

    taken = asyncio.Event()

    async def swallowed(decision: GateDecided) -> None:
        taken.set()  # acked, acted on by nobody: never redelivered

    for r in (a, b):  # whichever replica the shared consumer hands it to
        monkeypatch.setattr(r.rollouts, "on_decision", swallowed)
    block = signer.sign(GateDecided(release="r2", rules=[], decision="BLOCK", reason="override: rejected by alice",
                                    artifacts=await judged(bus, "r2")))
    await gate_decided(bus, block)
    async with asyncio.timeout(10):
        await taken.wait()
    for r in (a, b):
        await r.rollouts.wait_for(lambda routes: routes["chat"].phase == "aborted", timeout=3 * a.rollouts.stable_check_s)
        route = r.rollouts.route("chat")
        assert (route.weight, route.decision_id) == (0.0, block.id), route.reason
        assert route.reason == "aborted r2: gate BLOCK: override: rejected by alice", route.reason


async def test_a_drift_report_whose_message_a_replica_swallowed_aborts_the_canary_on_every_replica(
    replicas: tuple[Any, Any], bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drift report's message reaches one replica too (the router's durable consumer is shared); one that took a
    DRIFT of a canary whose analysis does not judge drift and could not act on it (a partition dropping the
    server's side, a frozen process) left every other replica serving the drifting canary at 50% until
    redelivery, 30 s each, 8 at most. Here the replica that takes the report's message acks it and does nothing,
    so it is never redelivered, and the monitor's next report of the deployment (now versus reference) follows it:
    both replicas abort the canary all the same, on the report read again from the stream (STABLE_CHECK_S)."""
    a, b = replicas
    await canary_passed(bus, a, {"steps": [50, 100], "interval_s": 3600})
    for r in (a, b):
        await r.rollouts.wait_for(lambda routes: "chat" in routes and routes["chat"].weight == 50.0, timeout=10)

    taken: list[DriftReport] = []
    both = asyncio.Event()

    async def swallowed(report: DriftReport) -> None:
        taken.append(report)  # acked, acted on by nobody: never redelivered
        if len(taken) == 2:
            both.set()

    for r in (a, b):  # whichever replica the shared consumer hands it to
        monkeypatch.setattr(r.rollouts, "on_drift", swallowed)
    now = datetime.now(UTC)
    drift = DriftReport(served=True, deployment="chat", window_start=now - timedelta(seconds=30), window_end=now,
                        reference_n=100, current_n=100, drifted=True, comparison="canary_vs_stable", release="r2",
                        reference_release="r1", features=[
                            FeatureDrift(feature="output_tokens", psi=0.9, ks_stat=0.6, ks_pvalue=1e-6,
                                         reference_mean=12, current_mean=36, drifted=True)])
    whole = DriftReport(served=True, deployment="chat", window_start=now - timedelta(seconds=10), window_end=now,
                        reference_n=100, current_n=100, features=[], drifted=False)
    for report in (drift, whole):
        await bus.publish(bus.subjects.drift("chat"), report)
    async with asyncio.timeout(10):
        await both.wait()
    for r in (a, b):
        await r.rollouts.wait_for(lambda routes: routes["chat"].phase == "aborted", timeout=3 * a.rollouts.stable_check_s)
        route = r.rollouts.route("chat")
        assert (route.weight, route.stable.release) == (0.0, "r1"), route.reason
        assert f"drift report {drift.id}" in route.reason and "DRIFT in output_tokens (PSI 0.9" in route.reason


async def test_a_drift_report_made_before_a_canary_could_be_moved_by_one_never_aborts_it_later(
    replicas: tuple[Any, Any], bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic read acts only on reports stored since a report could move the route. Probe p24 F1: a DRIFT of the
    canary's traffic made while it had 0% (a header step's testers), which its message rightly moved nothing with,
    aborted the canary within seconds of an approval giving it weight, on every replica."""
    a, b = replicas
    await canary_passed(bus, a, {"steps": [50, 100], "interval_s": 3600})
    await a.rollouts.wait_for(lambda routes: "chat" in routes and routes["chat"].weight == 50.0, timeout=10)
    await a.rollouts.operate("chat", "set-weight", "ops", weight=0.0)
    for r in (a, b):
        await r.rollouts.wait_for(lambda routes: "chat" in routes and routes["chat"].weight == 0.0, timeout=10)
    taken: list[DriftReport] = []
    handled = asyncio.Condition()

    async def seen(report: DriftReport, real: Any) -> None:
        await real(report)
        async with handled:
            taken.append(report)
            handled.notify_all()

    async def handled_n(n: int) -> None:
        async with asyncio.timeout(10), handled:
            await handled.wait_for(lambda: len(taken) >= n)

    for r in (a, b):
        monkeypatch.setattr(r.rollouts, "on_drift", functools.partial(seen, real=r.rollouts.on_drift))

    def report() -> DriftReport:
        now = datetime.now(UTC)
        return DriftReport(served=True, deployment="chat", window_start=now - timedelta(seconds=30), window_end=now,
                           reference_n=100, current_n=100, drifted=True, comparison="canary_vs_stable",
                           release="r2", reference_release="r1", features=[
                               FeatureDrift(feature="output_tokens", psi=0.9, ks_stat=0.6, ks_pvalue=1e-6,
                                            reference_mean=12, current_mean=36, drifted=True)])

    early = report()
    await bus.publish(bus.subjects.drift("chat"), early)
    await handled_n(1)  # its message handled at 0%: moved nothing
    await a.rollouts.operate("chat", "set-weight", "ops", weight=50.0)
    for r in (a, b):
        await r.rollouts.wait_for(lambda routes: routes["chat"].weight == 50.0, timeout=10)
        await r.rollouts._hold_drifts()  # the periodic read, now rather than within stable_check_s
        assert r.rollouts.route("chat").phase == "progressing", r.rollouts.route("chat").reason
    # A report made since is acted on by the same read, on a replica whose message was swallowed.
    async def swallow(_: DriftReport) -> None:
        """Acked and acted on by nobody: a replica that took the message and could not act on it."""

    for r in (a, b):
        monkeypatch.setattr(r.rollouts, "on_drift", functools.partial(seen, real=swallow))
    late = report()
    await bus.publish(bus.subjects.drift("chat"), late)
    await handled_n(2)  # its message swallowed
    await b.rollouts._hold_drifts()
    assert b.rollouts.route("chat").phase == "aborted" and f"drift report {late.id}" in b.rollouts.route("chat").reason


async def test_an_operators_change_that_won_is_answered_once_though_another_deployments_write_lost(
    replicas: tuple[Any, Any], bus: Bus
) -> None:
    """Probe p57 F3: each change of `chat` on replica a is written in the same flush as a's change of `busy`, which
    loses its compare-and-set to replica b's (b changed `busy` first): a's change of `busy` runs again on the route b
    wrote, and a's change of `chat`, which won, is answered once. Before, any compare-and-set a lost meanwhile ran it
    again: a pause that was applied was answered 409 "already paused" (likewise resume, PATCH, abort, promote), and a
    retry that was applied failed as "not aborted", its canary never admitted (idle at 0% for good)."""
    a, b = replicas
    for release in ("r1", "r2", "r3"):
        await register_model_release(bus, release)
        await store_pass(bus, release, a.ctx.settings)
    deployments = "/lockgate/v1/deployments"
    async with aiohttp.ClientSession(headers=admin_headers(a.ctx.settings.home)) as http:
        async def call(router: Any, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
            async with http.request(method, f"{router.url}{deployments}/{path}", json=body or {}) as resp:
                return resp.status, await resp.json()

        strategy = {"steps": [10, 50, 100], "interval_s": 3600}  # nothing moves on its own clock
        for deployment, canary in (("busy", "r2"), ("chat", "r3")):
            body = {"stable_release": "r1", "canary_release": canary, "strategy": strategy}
            assert (await call(a, "PUT", deployment, body))[0] == 200
        for r in (a, b):
            await r.rollouts.wait_for(lambda routes: all(
                d in routes and routes[d].phase == "progressing" for d in ("busy", "chat")), timeout=10)
        conflicts = a.rollouts.conflicts

        async def contended(n: int, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
            before = a.rollouts.route("chat")
            async with a.rollouts._persist_lock:  # replica a writes nothing to KV until both changes are pending
                ours = asyncio.create_task(call(a, "POST", "busy/set-weight", {"weight": 20 + n}))
                await a.rollouts.wait_for(lambda routes: routes["busy"].weight == 20 + n, timeout=10)
                theirs = await call(b, "POST", "busy/set-weight", {"weight": 40 + n})  # b's write wins
                assert theirs[0] == 200, theirs
                change = asyncio.create_task(call(a, method, f"chat{path}", body))
                applied = asyncio.create_task(a.rollouts.wait_for(lambda routes: routes["chat"] is not before, 10))
                await asyncio.wait([change, applied], return_when=asyncio.FIRST_COMPLETED)  # or refused unwritten
                applied.cancel()
            assert (await ours)[0] == 200  # run again on b's route: its own write lost
            return await change

        answers = [await contended(0, "POST", "/pause"), await contended(1, "POST", "/resume"),
                   await contended(2, "PATCH", "", {"weight": 30}), await contended(3, "POST", "/abort")]
        retried = await contended(4, "POST", "/retry")
        promoted = await contended(5, "POST", "/promote")
        assert [status for status, _ in [*answers, retried, promoted]] == [200] * 6, [*answers, retried, promoted]
        assert a.rollouts.conflicts == conflicts + 6  # every round's write of `busy` lost, none of `chat`'s
        assert (retried[1]["phase"], retried[1]["weight"], retried[1]["admitted"] != "") == ("progressing", 10.0, True)
        assert (promoted[1]["phase"], promoted[1]["stable"]["release"]) == ("promoted", "r3")
        for r in (a, b):
            await r.rollouts.wait_for(lambda routes: routes["busy"].weight == 25.0, timeout=10)  # a's last, run again
