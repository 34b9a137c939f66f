"""Faults on the distributed topology (tests/cluster/conftest.py), under a steady load of SDK events and
router requests: a NATS node killed, a replica of each scalable service killed, the store's owner
stopped. Nothing acknowledged is lost, nothing is stored twice, requests keep being served.

Figures (recovery time, catch-up rate) are printed with `[cluster]` (pytest -s), never asserted.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from lockgate.bus import Bus
from lockgate.contracts import GateDecided
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate_dev.cluster import SCALED, Topology
from tests.cluster.conftest import settings_of
from tests.cluster.load import Load, NotYet, drained, report, stored, until, viewer
from tests.helpers import gate_decided, judged, register_model_release, store_pass

pytestmark = pytest.mark.timeout(300)


async def _check_stored(topo: Topology, admin: Bus, load: Load, *, router_events_exact: bool = True) -> None:
    """Every acknowledged SDK event stored exactly once; router events without duplicates."""
    assert load.client.failed == 0 and load.client.dropped == 0, (load.client.failed, load.client.dropped)
    await drained(admin, "inference")
    bus = await viewer(topo)
    try:
        rows, distinct = await stored(bus, "inference_events", "id", f"{load.app}-sdk")
        assert (rows, distinct) == (len(load.ids), len(load.ids))
        if router_events_exact:
            # One event per request served, none lost in the routers' outboxes. Those retry until the bus is
            # back, so after a fault the last of them may still be on their way when the sink has drained.
            async def all_router_events() -> None:
                if (await stored(bus, "inference_events", "id", f"{load.app}-web"))[0] < load.ok:
                    raise NotYet("router events")

            waited = time.monotonic()
            await until(all_router_events, 60, f"{load.ok} router events stored")
            report("router events after the sink drained", wait_s=time.monotonic() - waited)
        rows, distinct = await stored(bus, "inference_events", "id", f"{load.app}-web")
        assert rows == distinct
        if router_events_exact:
            assert rows == load.ok
    finally:
        await bus.close()


async def _stream_leader(admin: Bus, stream: str) -> int:
    info = await admin.js.stream_info(admin.subjects.streams[stream].name)
    return int(info.cluster.leader.removeprefix("n")) - 1


async def test_nats_node_killed_under_load(topology: Topology, admin: Bus, unique: str) -> None:
    load = Load(topology, unique)
    await load.start()
    await load.served(20)
    # The most disruptive node: the leader of the inference stream (an election must follow).
    node = await _stream_leader(admin, "inference")
    killed_at = time.monotonic()
    topology.nats.kill(node)
    failed_before = load.failed
    await load.served(50)  # requests and SDK acknowledgements go on with two nodes
    recovery = load.recovery_s(killed_at)
    await topology.nats.restart(node)
    rejoined = time.monotonic() - killed_at
    await load.served(20)
    await load.stop()
    report("nats node killed", node=f"n{node + 1}", longest_ack_gap_s=recovery, node_back_s=rejoined,
           events=len(load.ids), requests=load.ok, failed_requests=load.failed - failed_before)
    assert load.failed == 0
    await _check_stored(topology, admin, load)


async def _streams_settled(admin: Bus) -> None:
    """Every stream has a leader and each of its replicas is current: after a node's restart (an earlier test's), a
    publish to a stream still electing went unanswered (NoStreamResponseError) although the node itself was healthy."""

    async def settled() -> None:
        for spec in admin.subjects.streams.values():
            cluster = (await admin.js.stream_info(spec.name)).cluster
            if cluster is None or not cluster.leader or not all(r.current for r in cluster.replicas or []):
                raise NotYet(f"stream {spec.name} has no leader or a replica catching up")

    await until(settled, 60, "every stream led, with current replicas")


async def _rollout(topo: Topology, admin: Bus, deployment: str) -> dict:
    """A canary in progress on `deployment` (stable passed its gate, the canary waits for its own)."""
    await _streams_settled(admin)
    settings = settings_of(topo)
    stable, canary = f"{deployment}-r1", f"{deployment}-r2"
    await register_model_release(admin, stable, model="sim-stable")
    await register_model_release(admin, canary, model="sim-good")
    await store_pass(admin, stable, settings)
    router = topo.replicas("router")[0].endpoints["router"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {topo.keys.admin_key}"}) as http:
        async with http.put(f"{router}/lockgate/v1/deployments/{deployment}",
                            json={"stable_release": stable, "canary_release": canary}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def _route(url: str, key: str, deployment: str) -> dict:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.get(f"{url}/lockgate/v1/deployments/{deployment}") as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


async def test_one_replica_of_each_scaled_service_killed(topology: Topology, admin: Bus, unique: str) -> None:
    before = await _rollout(topology, admin, unique)
    load = Load(topology, unique, spans=True)
    await load.start()
    await load.served(20)
    victims = [topology.replicas(name)[0] for name in SCALED]
    for proc in victims:
        proc.kill()
    killed_at = time.monotonic()
    await load.served(50)  # the other replicas take the work
    report("replicas killed", services=len(victims), longest_ack_gap_s=load.recovery_s(killed_at),
           failovers=load.failovers, failed_requests=load.failed, spans=len(load.traces))
    survivor = topology.replicas("router")[1].endpoints["router"]
    route = await _route(survivor, topology.keys.admin_key, unique)
    assert (route["canary"], route["phase"], route["stable"]) == (before["canary"], before["phase"], before["stable"])
    await asyncio.gather(*(topology.restart(proc.name) for proc in victims))
    # The restarted router restores the rollout from the routes bucket.
    restarted = topology.replicas("router")[0].endpoints["router"]
    assert (await _route(restarted, topology.keys.admin_key, unique))["canary"] == before["canary"]
    await load.served(20)
    await load.stop()
    assert load.failed == 0
    # A killed router loses what its in-memory outbox held (kill -9): only duplicates are ruled out there.
    await _check_stored(topology, admin, load, router_events_exact=False)
    # The cost accountant's work moved to the other replica: each SDK event priced exactly once.
    await drained(admin, "cost_ledger")
    bus = await viewer(topology)
    try:
        assert await stored(bus, "cost_ledger", "event_id", f"{unique}-sdk") == (len(load.ids), len(load.ids))
        # Spans exported through the OTLP receivers, one dying mid-load: every accepted one stored, once.
        await drained(admin, "spans")
        spans = await stored(bus, "otel_traces", "TraceId", f"{unique}-otlp", app_column="ServiceName")
        assert spans == (len(load.traces), len(load.traces)), (spans, len(load.traces))
    finally:
        await bus.close()


async def test_store_owner_stopped(topology: Topology, admin: Bus, unique: str) -> None:
    stopped_for_s = 4.0  # long enough for a backlog; 60 in `make bench` (tests/bench/bench_cluster.py)
    load = Load(topology, unique)
    await load.start()
    await load.served(20)
    store = topology.processes["store"]
    assert store.stop() == 0  # SIGTERM: the sink flushes and closes its consumers
    stopped_at = time.monotonic()
    ok_before, events_before = load.ok, len(load.ids) + load.ok

    async def waited() -> None:
        if time.monotonic() - stopped_at < stopped_for_s:
            raise NotYet("store down")

    await until(waited, stopped_for_s + 30, "the store's outage")  # the load goes on meanwhile
    served_while_down = load.ok - ok_before
    await load.stop()  # the outage's backlog is then all there is to catch up with
    events = len(load.ids) + load.ok - events_before
    info = await admin.js.consumer_info(admin.subjects.streams["inference"].name,
                                        admin.subjects.durable("sink", "inference"))
    waiting = info.num_pending + info.num_ack_pending
    assert waiting > 0  # the events wait in JetStream
    await topology.restart("store")
    back_at = time.monotonic()
    await drained(admin, "inference")
    catch_up_s = time.monotonic() - back_at
    report("store stopped", stopped_s=stopped_for_s, served_while_down=served_while_down, waiting_msgs=waiting,
           waiting_events=events, catch_up_s=catch_up_s, catch_up_events_per_s=events / catch_up_s)
    assert served_while_down > 0 and load.failed == 0
    await _check_stored(topology, admin, load)


async def test_rolling_restart_during_a_canary(topology: Topology, admin: Bus, unique: str) -> None:
    # A canary admitted by a signed PASS and at its first step; every process is then restarted
    # (SIGTERM, as a rollout of a new version does), half of them at a time, under load.
    await _rollout(topology, admin, unique)
    signer = Signer.generate()
    trust_key(trust_file_path(settings_of(topology)), signer.public)
    await gate_decided(admin, signer.sign(GateDecided(release=f"{unique}-r2", rules=[], decision="PASS",
                                                      artifacts=await judged(admin, f"{unique}-r2"))))
    key = topology.keys.admin_key

    async def routes() -> list[dict]:
        return [await _route(p.endpoints["router"], key, unique) for p in topology.replicas("router")]

    async def admitted() -> list[dict]:
        now = await routes()
        if not all(r["admitted"] and r["weight"] > 0 for r in now):
            raise NotYet(f"canary not yet admitted everywhere: {[(r['phase'], r['weight']) for r in now]}")
        return now

    before = (await until(admitted, 60, "the canary admitted on both routers"))[0]
    load = Load(topology, unique)
    await load.start()
    await load.served(20)
    names = list(topology.processes)
    waves = [[n for n in names if not n.endswith("-2") and n != "simulator"], [n for n in names if n.endswith("-2")]]
    for wave in waves:
        codes = await asyncio.gather(*(asyncio.to_thread(topology.processes[n].stop) for n in wave))
        assert codes == [0] * len(wave), [topology.processes[n].tail() for n, c in zip(wave, codes, strict=True) if c]
        await asyncio.gather(*(topology.restart(name) for name in wave))
        await load.served(20)
    await load.stop()
    after = await routes()
    fields = ("phase", "weight", "step", "canary", "stable", "admitted")
    assert all({f: r[f] for f in fields} == {f: before[f] for f in fields} for r in after), (before, after)
    # ... and continues from there: the admitted canary can be promoted (a refused one could not).
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        url = topology.replicas("router")[1].endpoints["router"]
        async with http.post(f"{url}/lockgate/v1/deployments/{unique}/promote") as resp:
            assert resp.status == 200, await resp.text()
    assert load.failed == 0
    report("rolling restart", processes=sum(map(len, waves)), failovers=load.failovers, requests=load.ok)
    await _check_stored(topology, admin, load)  # SIGTERM flushes the routers' outboxes: nothing lost
