"""Distributed mode as an operator runs it: `lockgate serve sink` against an external NATS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockgate import credentials
from lockgate.bus import Bus
from lockgate.contracts import InferenceEvent
from lockgate.redact import shown_url
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


@pytest.fixture
def hung_nats() -> Iterator[str]:
    """A NATS URL whose port accepts connections and never says a word, as a hung nats-server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"nats://lockgate:s3cret@127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("nats", ["refused", "hung"])
def test_serve_waiting_for_nats_says_so_and_stops_on_a_signal(tmp_path: Path, request: pytest.FixtureRequest,
                                                              sig: signal.Signals, nats: str) -> None:
    # Before (probe p11), `serve` whose NATS never answered printed nothing and ignored SIGINT and SIGTERM for ever:
    # only SIGKILL ended it (a `docker stop` waited its whole grace period).
    url = "nats://lockgate:s3cret@127.0.0.1:1" if nats == "refused" else request.getfixturevalue("hung_nats")
    credentials.ensure(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")}
    stdout = tmp_path / "stdout"
    with stdout.open("w") as out:
        proc = subprocess.Popen([*LOCKGATE, "--home", str(tmp_path), "--nats", url, "serve", "gatekeeper"],
                                stdout=out, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # its own group, as a shell's job: Ctrl-C goes to the group
    said: list[str] = []
    waiting = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            said.append(line)
            if line.startswith("waiting for NATS"):
                waiting.set()
        waiting.set()  # EOF: the process ended

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        # The loop's handlers are installed once it says what it waits for (2 s into the start).
        assert waiting.wait(60) and proc.poll() is None, said
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C, as a terminal sends it
        else:
            proc.send_signal(sig)  # a service manager's stop
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    reader.join(10)  # the pipe's end: every line the process wrote is in `said`
    shown = shown_url(url)
    assert "s3cret" not in shown
    assert said == [f"waiting for NATS at {shown} (retrying; SIGTERM or Ctrl-C stops it)\n",
                    f"error: stopped by {sig.name} before gatekeeper started: NATS at {shown} had not answered\n"]
    assert (proc.returncode, stdout.read_text()) == (128 + sig, "")
