"""`lockgate serve` when NATS closes its connection for good: it stops and exits non-zero, for its supervisor
(compose's restart policy, k8s) to start it again."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from lockgate import credentials
from lockgate.server.natsserver import NatsServer, auth_config
from lockgate.subjects import Subjects
from tests.helpers import Process

pytestmark = pytest.mark.timeout(120)


def test_serve_exits_when_nats_closes_its_connection_for_good(tmp_path: Path, unique: str) -> None:
    # Before, a connection nats-py closed for good (after an -ERR: a message over max_payload, credentials the
    # server no longer takes) left the process running without it, silently: no relay, no reads, no consumers.
    # Here the server closes it for real: the gateway's password is rotated on the running server.
    subjects, passwords = Subjects(unique), credentials.ensure(tmp_path)
    server = NatsServer(tmp_path / "nats", config=auth_config(subjects, passwords))
    asyncio.run(server.start())
    env = {**os.environ, "LOCKGATE_NATS_URL": server.url, "LOCKGATE_PREFIX": unique, "LOCKGATE_HOME": str(tmp_path)}
    served = Process([sys.executable, "-m", "lockgate.cli", "serve", "gateway", "--grpc-port", "0"], env, "serving")
    try:
        assert served.started(60), served.output
        asyncio.run(server.reload(auth_config(subjects, {**passwords, "gateway": "rotated-" + unique})))
        assert served.proc.wait(60) == 1, served.output
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
        server.stop()
    assert "closed the connection of lockgate-gateway for good" in served.output, served.output
    assert "error: NATS closed" in served.output, served.output
