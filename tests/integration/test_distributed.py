"""Distributed mode against a real ClickHouse server (testcontainers).

Needs a Docker engine; where none runs (these development machines) the tests are skipped with
that reason. The same store code is covered on chDB by every other integration test, and the
same processes on the JetStream cluster by tests/cluster.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lockgate.contracts import InferenceEvent
from lockgate.store import open_store
from lockgate.store.tables import INFERENCE_EVENTS


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(not _docker_available(), reason="no Docker engine on this machine (testcontainers)"),
    pytest.mark.timeout(300),
]


def test_migrations_and_idempotent_insert_on_clickhouse_server() -> None:
    from testcontainers.clickhouse import ClickHouseContainer

    with ClickHouseContainer("clickhouse/clickhouse-server:24.8", port=8123) as ch:
        url = f"http://{ch.username}:{ch.password}@{ch.get_container_host_ip()}:{ch.get_exposed_port(8123)}"
        store = open_store(url, "lockgate_it")
        open_store(url, "lockgate_it")  # migrations are safe to run twice
        events = [InferenceEvent(app="shop", model="m", output_tokens=i) for i in range(100)]
        columns = INFERENCE_EVENTS.data(events, {"msg_id": ["m1"] * len(events),
                                                 "served": [False] * len(events)})
        for _ in range(2):
            store.insert_columns("inference_events", INFERENCE_EVENTS.columns, columns, token="batch-1")
        assert store.scalar("SELECT count() FROM inference_events") == 100



def test_sink_and_query_as_compose_runs_them_on_a_clickhouse_server(tmp_path: Path) -> None:
    """`lockgate serve sink` and `lockgate serve query` as two processes (compose.yaml's commands and
    variables) on a three-node JetStream cluster with R3 streams, storing into a ClickHouse server."""
    from testcontainers.clickhouse import ClickHouseContainer

    from lockgate import credentials
    from lockgate.bus import Bus
    from lockgate.config import Settings
    from lockgate.subjects import Subjects
    from lockgate_dev.cluster import Topology
    from tests.cluster.load import drained, stored, viewer

    with ClickHouseContainer("clickhouse/clickhouse-server:24.8", port=8123) as ch:
        url = f"http://{ch.username}:{ch.password}@{ch.get_container_host_ip()}:{ch.get_exposed_port(8123)}"
        # The gateway relays the application's events: the `app` user publishes on `ingest`, no stream's subject.
        topo = Topology(tmp_path, clickhouse_url=url, services=("gateway",), scaled_replicas=1)
        asyncio.run(topo.start())
        try:
            assert set(topo.processes) == {"simulator", "sink", "query", "gateway-1"}

            async def publish_and_count() -> None:
                s = Settings(home=str(topo.home))
                app = Bus(topo.nats.url, Subjects(topo.prefix), auth=credentials.for_identity(s, "app"),
                          manage_topology=False)
                admin = Bus(topo.nats.url, Subjects(topo.prefix), auth=credentials.for_identity(s, "admin"),
                            manage_topology=False)
                reader = await viewer(topo)
                for bus in (app, admin):
                    await bus.connect()
                await app.publish(app.subjects.ingest("shop"), [InferenceEvent(app="shop") for _ in range(50)])
                info = await admin.js.stream_info(admin.subjects.streams["inference"].name)
                assert info.config.num_replicas == 3
                await drained(admin, "inference")
                assert await stored(reader, "inference_events", "id", "shop") == (50, 50)
                for bus in (app, admin, reader):
                    await bus.close()

            asyncio.run(publish_and_count())
        finally:
            topo.stop()
