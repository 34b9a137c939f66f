"""The distributed shape (issue 13): the topology of `lockgate dev cluster` on this machine.

- publish latency to an R1 and an R3 stream on the same three-node cluster (the price of replication);
- router throughput through one replica and through two;
- ingest through one OTLP receiver replica and through two (pre-encoded 512-span OTLP/gRPC exports):
  spans acknowledged per second, and stored per second (until the sink's consumer has drained them;
  on chDB one process owns the store, so the sink itself is one process: on a ClickHouse server it
  scales out like the receivers);
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
from lockgate.server.apikeys import KeyStore
from lockgate.server.natscluster import NatsCluster
from lockgate.subjects import Subjects
from lockgate_dev.cluster import Topology
from tests.bench.bench_otlp import EXPORT_BATCH, _requests
from tests.bench.common import percentiles
from tests.cluster.conftest import settings_of
from tests.cluster.load import Load, NotYet, drained, stored, until, viewer

OUTAGE_S = 60.0
PUBLISHES = 1000
THROUGHPUT_S = 5.0
INGEST_EXPORTS = 40  # per measurement: 20,480 spans
INGEST_CONCURRENCY = 4


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


async def _ingested_per_s(admin: Bus, key: str, receivers: list[str]) -> dict[str, Any]:
    """INGEST_EXPORTS exports of EXPORT_BATCH distinct spans, INGEST_CONCURRENCY in flight, spread over
    `receivers` (OTLP/gRPC): spans acknowledged per second, and stored per second (the sink drained)."""
    import grpc

    bodies = await asyncio.to_thread(_requests, INGEST_EXPORTS, EXPORT_BATCH)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    channels = [grpc.aio.insecure_channel(r) for r in receivers]
    try:
        exports = [c.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export") for c in channels]

        async def worker(i: int) -> None:
            while not queue.empty():
                await exports[i % len(exports)](queue.get_nowait(), metadata=(("x-api-key", key),))

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(INGEST_CONCURRENCY)))
        acked = time.monotonic()
        await drained(admin, "spans", timeout_s=600)
        stored = time.monotonic()
    finally:
        for c in channels:
            await c.close()
    n = INGEST_EXPORTS * EXPORT_BATCH
    return {"spans": n, "acknowledged_per_s": round(n / (acked - started)),
            "stored_per_s": round(n / (stored - started))}


async def topology_figures(topo: Topology, admin: Bus) -> dict[str, Any]:
    """Scaling, recovery and catch-up on the running topology."""
    out: dict[str, Any] = {}
    routers = [p.endpoints["router"] for p in topo.replicas("router")]
    out["router_requests_per_s"] = {"1_replica": await _served_per_s(topo, "one", routers[:1]),
                                    "2_replicas": await _served_per_s(topo, "two", routers)}
    out["ingest_spans"] = await ingest_figures(topo, admin)

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
    # Nothing lost or doubled by the outage: every event the SDK saw acknowledged is stored once (the cluster tests'
    # outage is shorter, for the suite's time).
    bus = await viewer(topo)
    try:
        rows, distinct = await stored(bus, "inference_events", "id", f"{load.app}-sdk")
    finally:
        await bus.close()
    out["store_stopped"] = {"stopped_s": OUTAGE_S, "events_waiting": waiting, "failed_requests": load.failed,
                            "catch_up_s": catch_up, "catch_up_events_per_s": waiting / catch_up,
                            "sdk_events_acknowledged": len(load.ids), "sdk_events_stored": rows,
                            "sdk_events_stored_distinct": distinct,
                            "stored_exactly_once": rows == distinct == len(load.ids) and load.client.failed == 0}
    return out


async def ingest_figures(topo: Topology, admin: Bus) -> dict[str, Any]:
    """Ingest through one OTLP receiver replica, then through two, in the same run."""
    key, _ = KeyStore(topo.home).create("default", "bench-ingest", description="bench_cluster ingest")
    receivers = [p.endpoints["otlp-grpc"] for p in topo.replicas("otlp")]
    await _ingested_per_s(admin, key, receivers[:1])  # warm-up: connections, the sink's first batches
    return {"1_replica": await _ingested_per_s(admin, key, receivers[:1]),
            "2_replicas": await _ingested_per_s(admin, key, receivers),
            "exports_in_flight": INGEST_CONCURRENCY}


async def run(env: Any = None) -> dict[str, Any]:
    """Every figure of the distributed shape (the embedded bench env is not used: this starts its own)."""
    figures = await replication_cost()
    with tempfile.TemporaryDirectory() as tmp:
        # passthrough: the load's requests name no rolled-out deployment (router throughput, not governance)
        topo = Topology(tmp, extra_env={"LOCKGATE_ACK_WAIT_S": "5", "LOCKGATE_PASSTHROUGH": "true"})
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


async def ingest_only() -> dict[str, Any]:
    """`python -m tests.bench.bench_cluster --ingest`: the topology and the ingest figures alone."""
    with tempfile.TemporaryDirectory() as tmp:
        topo = Topology(tmp, extra_env={"LOCKGATE_ACK_WAIT_S": "5"})
        await topo.start()
        s = settings_of(topo)
        admin = Bus(s.nats_url, Subjects(s.prefix), auth=credentials.for_identity(s, "admin"), manage_topology=False)
        await admin.connect()
        try:
            return {"ingest_spans": await ingest_figures(topo, admin)}
        finally:
            await admin.close()
            await asyncio.to_thread(topo.stop)


if __name__ == "__main__":
    import sys

    print(json.dumps(asyncio.run(ingest_only() if "--ingest" in sys.argv else run()), indent=2, default=str))
