"""The distributed topology for the fault tests: a three-node JetStream cluster on loopback (R3 streams
and buckets, NATS users on) and every service its own `lockgate serve` process, started once for the
module's tests; each test brings back what it killed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.subjects import Subjects
from lockgate_dev.cluster import Topology


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is a cluster test: `pytest -m cluster` selects them, `-m 'not cluster'` skips them."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """The whole topology; consumers redeliver after 5 s (not 30) so a killed replica's work moves on soon. The
    load's requests name no rolled-out deployment: the routers pass them through (faults, not governance)."""
    topo = Topology(tmp_path_factory.mktemp("cluster"), prefix="lg",
                    extra_env={"LOCKGATE_ACK_WAIT_S": "5", "LOCKGATE_ROLLOUT_STEP_INTERVAL_S": "3600",
                               "LOCKGATE_PASSTHROUGH": "true"})
    asyncio.run(topo.start())
    yield topo
    topo.stop()


def settings_of(topo: Topology) -> Settings:
    """Settings a client of the topology uses (its home's credentials and trust file)."""
    return Settings(nats_url=topo.nats.url, prefix=topo.prefix, home=str(topo.home))


@pytest.fixture
async def admin(topology: Topology) -> AsyncIterator[Bus]:
    """A connection as the admin identity (consumer info, registering releases, reading KV)."""
    s = settings_of(topology)
    bus = Bus(s.nats_url, Subjects(s.prefix), name="test-admin", auth=credentials.for_identity(s, "admin"),
              manage_topology=False)
    await bus.connect()
    yield bus
    await bus.close()
