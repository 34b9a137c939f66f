"""Bench environment: a real nats-server and chDB in temp dirs, shared by every bench in one run."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.server.natsserver import NatsServer
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext
from lockgate.store import open_store
from lockgate.subjects import Subjects
from lockgate.telemetry import Telemetry


@dataclass
class BenchEnv:
    """URLs of the bench's servers; each stack gets its own prefix and database."""

    nats_url: str
    chdb_url: str
    home: str

    def settings(self, **overrides: Any) -> Settings:
        name = "b" + uuid.uuid4().hex[:8]
        base = Settings(nats_url=self.nats_url, clickhouse_url=self.chdb_url, database=name, prefix=name,
                        home=self.home, router_port=0, grpc_port=0, otlp_grpc_port=0, otlp_http_port=0)
        return base.replace(**overrides)


@dataclass
class Stack:
    """A running set of services and its context."""

    ctx: ServiceContext
    services: ServiceSet
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def bench_env() -> AsyncIterator[BenchEnv]:
    """Start nats-server (temp JetStream dir) and pick a temp chDB path."""
    # chDB may still be finishing a background merge in this process when the directory is removed.
    with tempfile.TemporaryDirectory(prefix="lockgate-bench-", ignore_cleanup_errors=True) as home:
        # Each stack's prefix reserves its streams' max_bytes (about 5 GiB) from JetStream's storage, by default 75% of
        # the free disk: a dozen stacks of one run exhausted it (as in tests/conftest.py, the limit is only accounting).
        server = NatsServer(f"{home}/nats", config="jetstream { max_file_store: 1TB }\n")
        await server.start()
        try:
            yield BenchEnv(nats_url=server.url, chdb_url=f"chdb://{home}/clickhouse", home=home)
        finally:
            server.stop()


@contextlib.asynccontextmanager
async def stack(env: BenchEnv, *names: str, **overrides: Any) -> AsyncIterator[Stack]:
    """Run the named services on a fresh prefix and database."""
    settings = env.settings(**overrides)
    bus = Bus(settings.nats_url, Subjects(settings.prefix), name="bench")
    await bus.connect()
    store = open_store(settings.clickhouse_url, settings.database)
    ctx = ServiceContext(bus=bus, store=store, telemetry=Telemetry(sample_ratio=settings.trace_sample_ratio),
                         settings=settings)
    services = ServiceSet(ctx, list(names))
    await services.start()
    try:
        yield Stack(ctx=ctx, services=services)
    finally:
        await services.stop()
        await bus.close()


SIM_PIDS: dict[str, int] = {}  # the simulator process serving each URL, for benches that count its CPU


@contextlib.asynccontextmanager
async def sim_process(env: BenchEnv, config_yaml: str) -> AsyncIterator[str]:
    """The simulator in a child process (its CPU is not charged to what is measured); yields its
    base URL once it says it is serving."""
    import asyncio
    import sys
    from pathlib import Path

    cfg = Path(env.home) / f"sim-{uuid.uuid4().hex[:6]}.yaml"
    cfg.write_text(config_yaml)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lockgate_dev.sim", "--config", str(cfg), "--port", "0",
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if "serving" not in line:
            raise RuntimeError(f"simulator did not start: {line!r}")
        url = line.rsplit(" at ", 1)[1].strip()  # the URL with the port it bound
        SIM_PIDS[url] = proc.pid
        yield url
    finally:
        proc.terminate()
        await proc.wait()


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of a list of milliseconds."""
    if not samples_ms:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "n": 0}
    s = sorted(samples_ms)
    q = statistics.quantiles(s, n=100, method="inclusive") if len(s) > 1 else [s[0]] * 99
    return {"p50_ms": round(q[49], 3), "p90_ms": round(q[89], 3), "p99_ms": round(q[98], 3),
            "max_ms": round(s[-1], 3), "n": len(s)}
