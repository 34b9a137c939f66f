"""Shared fixtures: one real nats-server and one chDB path per session; a unique subject
prefix and ClickHouse database per test so tests never see each other's data."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from lockgate import metrics
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.server.natsserver import NatsServer
from lockgate.server.service import ServiceContext
from lockgate.store import Store, open_store
from lockgate.subjects import Subjects
from lockgate.telemetry import Telemetry
from tests.helpers import delete_topology

# No per-example deadline: it is a timing assertion, which a loaded 2-core machine fails at random (a full run failed
# a 200 ms deadline on a two-letter example); pytest-timeout still ends a test that hangs.
hypothesis_settings.register_profile("lockgate", deadline=None)
hypothesis_settings.load_profile("lockgate")

# The session server's warnings and errors: some failures reach a client only as a fixed sentence ("error creating
# store for stream") and their cause only in the server's log, so a failing test's report shows the latest.
_server_warnings: collections.deque[str] = collections.deque(maxlen=20)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report: pytest.TestReport = yield
    if report.failed and _server_warnings:
        report.sections.append(("nats-server's latest warnings", "".join(_server_warnings)))
    return report


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A real nats-server with JetStream on a port it picks itself (port 0) and a temp store dir."""
    # Every test's prefix reserves its streams' max_bytes (about 5 GiB) from JetStream's storage, which by
    # default is 75% of the free disk of a machine shared with others: a dozen prefixes alive at once can
    # exhaust it. An explicit limit is only accounting; the tests write megabytes.
    server = NatsServer(tmp_path_factory.mktemp("jetstream"), config="jetstream { max_file_store: 1TB }\n",
                        on_line=lambda line: _server_warnings.append(line) if "[WRN]" in line or "[ERR]" in line
                        else None)
    asyncio.run(server.start())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chdb_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One chDB data path per test session (chDB allows one per process)."""
    return f"chdb://{tmp_path_factory.mktemp('clickhouse')}"


@pytest.fixture
def unique() -> str:
    """A short unique token for names in this test."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def metric_reader() -> Iterator[InMemoryMetricReader]:
    """This test's own MeterProvider (as a runtime installs one), read in memory and at /metrics."""
    reader = InMemoryMetricReader()
    provider = metrics.install("lockgate-test", readers=[reader])
    yield reader
    metrics.shutdown(provider)


@pytest.fixture
def store(chdb_url: str, unique: str) -> Iterator[Store]:
    """A migrated ClickHouse database of this test's own."""
    s = open_store(chdb_url, unique)
    yield s
    s.command(f"DROP DATABASE IF EXISTS {unique}")


@pytest.fixture
def settings(nats_server: NatsServer, chdb_url: str, unique: str, tmp_path: Path) -> Settings:
    """Settings pointing at the session's servers, with this test's prefix and database."""
    return Settings(
        nats_url=nats_server.url,
        clickhouse_url=chdb_url,
        database=unique,
        prefix=unique,
        home=str(tmp_path),
        router_port=0,
        grpc_port=0,
        otlp_grpc_port=0,
        otlp_http_port=0,
        rollout_step_interval_s=0.05,
        drift_reference_size=50,
        drift_window_size=50,
        ack_wait_s=2.0,
    )


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    """A connected bus with this test's streams and buckets."""
    b = Bus(settings.nats_url, Subjects(settings.prefix), name="test")
    await b.connect()
    yield b
    await b.close()
    await delete_topology(settings)


@pytest.fixture
def context(bus: Bus, store: Store, settings: Settings) -> ServiceContext:
    """A ServiceContext on the real bus and store."""
    return ServiceContext(bus=bus, store=store, telemetry=Telemetry(), settings=settings)


@pytest.fixture
async def run_services(context: ServiceContext) -> AsyncIterator:
    """Factory: `svcs = await run_services("router", "drift")` starts them on the test's bus."""
    from lockgate.server.registry import ServiceSet

    started: list[ServiceSet] = []

    async def start(*names: str) -> ServiceSet:
        svcs = ServiceSet(context, list(names))
        await svcs.start()
        started.append(svcs)
        return svcs

    yield start
    for svcs in started:
        await svcs.stop()
