"""Distributed mode against a real ClickHouse server (testcontainers).

Needs a Docker engine; where none runs (these development machines) the test is skipped with
that reason. The same store code is covered on chDB by every other integration test.
"""

from __future__ import annotations

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
        columns = INFERENCE_EVENTS.data(events, {"msg_id": ["m1"] * len(events)})
        for _ in range(2):
            store.insert_columns("inference_events", INFERENCE_EVENTS.columns, columns, token="batch-1")
        assert store.scalar("SELECT count() FROM inference_events") == 100
