"""Distributed mode as an operator runs it: `lockgate serve sink` against an external NATS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lockgate.bus import Bus
from lockgate.contracts import InferenceEvent
from lockgate.server.natsserver import NatsServer
from lockgate.subjects import Subjects
from tests.helpers import Process

pytestmark = pytest.mark.timeout(180)

LOCKGATE = [sys.executable, "-m", "lockgate.cli"]


def _stored_count(env: dict[str, str], expected: int) -> int:
    """Rows in inference_events, asked with `lockgate sql` until `expected` show up or 60 s pass.

    Each call is a round trip to the served query service, which answers from the chDB it shares with
    the sink (one process per chDB path)."""
    deadline = time.monotonic() + 60
    count = 0
    while count < expected and time.monotonic() < deadline:
        out = subprocess.run([*LOCKGATE, "sql", "SELECT count() AS n FROM inference_events", "--json"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        count = json.loads(out.stdout)[0]["n"]
    return count


def test_serve_one_service_against_external_nats(nats_server: NatsServer, tmp_path: Path, unique: str) -> None:
    env = {**os.environ, "LOCKGATE_NATS_URL": nats_server.url, "LOCKGATE_PREFIX": unique,
           "LOCKGATE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'ch'}"}
    served = Process([*LOCKGATE, "serve", "sink", "query"], env, "serving")
    try:
        assert served.started(60), served.output

        async def publish() -> None:
            bus = Bus(nats_server.url, Subjects(unique))
            await bus.connect()
            await bus.publish(bus.subjects.inference("shop"), [InferenceEvent(app="shop") for _ in range(25)])
            await bus.close()

        asyncio.run(publish())
        assert _stored_count(env, 25) == 25
    finally:
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(60) == 0, served.output


def test_served_services_use_the_homes_store_unless_one_is_configured(nats_server: NatsServer, tmp_path: Path,
                                                                      unique: str) -> None:
    # `lockgate --home H serve sink query` opened ./.lockgate/clickhouse (wherever it ran), not H's, where `up` and
    # the CLI's queries look: a probe's `lockgate sql` answered 0 rows from it about half the time.
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LOCKGATE_CLICKHOUSE_URL"}
    env |= {"LOCKGATE_NATS_URL": nats_server.url, "LOCKGATE_PREFIX": unique}
    served = Process([*LOCKGATE, "--home", str(home), "serve", "sink", "query"], env, "serving", cwd=elsewhere)
    try:
        assert served.started(60), served.output
        assert (home / "clickhouse").is_dir() and not (elsewhere / ".lockgate").exists(), served.output
    finally:
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(60) == 0, served.output


def test_served_services_connect_as_themselves(tmp_path: Path, unique: str) -> None:
    # A nats-server with users, as deploy/nats runs one; the served sink and query service find
    # their own credentials under LOCKGATE_HOME, and the sink (allowed to) declares the streams.
    from lockgate import credentials
    from lockgate.config import Settings
    from lockgate.server.natsserver import auth_config

    server = NatsServer(tmp_path / "nats", config=auth_config(Subjects(unique), credentials.ensure(tmp_path)))
    asyncio.run(server.start())
    env = {**os.environ, "LOCKGATE_NATS_URL": server.url, "LOCKGATE_PREFIX": unique, "LOCKGATE_HOME": str(tmp_path),
           "LOCKGATE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'ch'}"}
    # The gateway relays the application's events: the `app` user publishes on `ingest`, no stream's subject.
    served = Process([*LOCKGATE, "serve", "sink", "query", "gateway", "--grpc-port", "0"], env, "serving")
    try:
        assert served.started(60), served.output

        async def publish_as_app() -> None:
            app = credentials.for_identity(Settings(home=str(tmp_path)), "app")
            bus = Bus(server.url, Subjects(unique), auth=app, manage_topology=False)
            await bus.connect()
            await bus.publish(bus.subjects.ingest("shop"), [InferenceEvent(app="shop") for _ in range(5)])
            await bus.close()

        asyncio.run(publish_as_app())
        assert _stored_count(env, 5) == 5  # asked as the viewer role
    finally:
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(60) == 0, served.output
        server.stop()
    assert "violation" not in served.output.lower(), served.output
