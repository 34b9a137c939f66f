"""The distributed shape (issue 13): the topology of `lockgate dev cluster` on this machine.

- publish latency to an R1 and an R3 stream on the same three-node cluster (the price of replication);
- router throughput through one replica and through two;
- a NATS node (the inference stream's leader) killed under load: the longest stall of SDK acknowledgements;
- the store's owner stopped for 60 s under load: what waited in JetStream and how fast it caught up.

On two cores shared by 18 processes the point is correctness and the shape of scaling, not absolute
numbers. Run alone: `python -m tests.bench.bench_cluster` (prints JSON).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from typing import Any

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.contracts import InferenceEvent
from lockgate.server.natscluster import NatsCluster
from lockgate.subjects import Subjects
from lockgate_dev.cluster import Topology
from tests.bench.common import percentiles
from tests.cluster.conftest import settings_of
from tests.cluster.load import Load, NotYet, drained, until

OUTAGE_S = 60.0
PUBLISHES = 1000
THROUGHPUT_S = 5.0


async def _publish_latency(replicas: int, url: str) -> dict[str, float]:
    bus = Bus(url, Subjects(f"r{replicas}"), replicas=replicas)
    await bus.connect()
    try:
        subject = bus.subjects.inference("bench")
        samples = []
        for _ in range(PUBLISHES):
            started = time.perf_counter()
            await bus.publish(subject, InferenceEvent(app="bench"))
            samples.append((time.perf_counter() - started) * 1000)
        return percentiles(samples)
    finally:
        await bus.close()


async def replication_cost() -> dict[str, Any]:
    """Awaited publishes, one at a time, to an R1 and an R3 stream of the same cluster (no auth, no services)."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster = NatsCluster(tmp)
        await cluster.start()
        try:
            return {f"r{r}_publish_ms": await _publish_latency(r, cluster.url) for r in (1, 3)}
        finally:
            cluster.stop()


async def _served_per_s(topo: Topology, app: str, routers: list[str]) -> float:
    load = Load(topo, app, events_per_tick=0, concurrency=8, routers=routers)
    await load.start()
    started, ok = time.monotonic(), load.ok

    async def elapsed() -> None:
        if time.monotonic() - started < THROUGHPUT_S:
            raise NotYet("measuring")

    await until(elapsed, THROUGHPUT_S + 30, "throughput window")
    rate = (load.ok - ok) / (time.monotonic() - started)
    await load.stop()
    return rate


async def topology_figures(topo: Topology, admin: Bus) -> dict[str, Any]:
    """Scaling, recovery and catch-up on the running topology."""
    out: dict[str, Any] = {}
    routers = [p.endpoints["router"] for p in topo.replicas("router")]
    out["router_requests_per_s"] = {"1_replica": await _served_per_s(topo, "one", routers[:1]),
                                    "2_replicas": await _served_per_s(topo, "two", routers)}

    load = Load(topo, "nodekill")
    await load.start()
    await load.served(20)
    info = await admin.js.stream_info(admin.subjects.streams["inference"].name)
    node = int(info.cluster.leader.removeprefix("n")) - 1
    killed_at = time.monotonic()
    topo.nats.kill(node)
    await load.served(100)
    out["nats_node_killed"] = {"longest_ack_gap_s": load.recovery_s(killed_at), "failed_requests": load.failed}
    await topo.nats.restart(node)
    out["nats_node_killed"]["node_back_s"] = time.monotonic() - killed_at
    await load.stop()
    out["nats_node_killed"]["sdk_failed_events"] = load.client.failed

    load = Load(topo, "outage")
    await load.start()
    await load.served(20)
    topo.processes["store"].stop()
    stopped_at, before = time.monotonic(), len(load.ids) + load.ok

    async def outage() -> None:
        if time.monotonic() - stopped_at < OUTAGE_S:
            raise NotYet("store down")

    await until(outage, OUTAGE_S + 60, "the store's outage")
    await load.stop()
    waiting = len(load.ids) + load.ok - before
    await topo.restart("store")
    back_at = time.monotonic()
    await drained(admin, "inference", timeout_s=600)
    catch_up = time.monotonic() - back_at
    out["store_stopped"] = {"stopped_s": OUTAGE_S, "events_waiting": waiting, "failed_requests": load.failed,
                            "catch_up_s": catch_up, "catch_up_events_per_s": waiting / catch_up}
    return out


async def run(env: Any = None) -> dict[str, Any]:
    """Every figure of the distributed shape (the embedded bench env is not used: this starts its own)."""
    figures = await replication_cost()
    with tempfile.TemporaryDirectory() as tmp:
        topo = Topology(tmp, extra_env={"LOCKGATE_ACK_WAIT_S": "5"})
        started = time.monotonic()
        await topo.start()
        figures["topology_start_s"] = time.monotonic() - started
        s = settings_of(topo)
        admin = Bus(s.nats_url, Subjects(s.prefix), auth=credentials.for_identity(s, "admin"), manage_topology=False)
        await admin.connect()
        try:
            figures |= await topology_figures(topo, admin)
        finally:
            await admin.close()
            await asyncio.to_thread(topo.stop)
    return figures


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run()), indent=2, default=str))
