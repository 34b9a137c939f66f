"""A connection asked to be TLS is TLS or nothing (probe p10): nats-py upgrades only when the server's INFO says
`tls_required`, so whoever answered on the path with an INFO that did not was sent the password in clear. The
server here is that man in the middle: it sends a plain INFO and records every byte it is sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.client import Client
from lockgate.errors import BusUnavailable
from tests.integration.test_nats_auth import _tls_files

pytestmark = pytest.mark.timeout(60)
PASSWORD = "S3cret-on-the-wire"


class PlainInfo:
    """Answers every connection with a NATS INFO that offers no TLS and asks for credentials; keeps what it got."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        info = {"server_id": "mitm", "version": "2.15.1", "proto": 1, "max_payload": 1048576,
                "auth_required": True, "headers": True}
        writer.write(f"INFO {json.dumps(info)}\r\n".encode())
        await writer.drain()
        while chunk := await reader.read(65536):
            self.received += chunk
        writer.close()


@pytest.fixture
async def mitm() -> AsyncIterator[tuple[PlainInfo, int]]:
    fake = PlainInfo()
    server = await asyncio.start_server(fake._serve, "127.0.0.1", 0)
    yield fake, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_the_sdk_sends_no_credentials_to_a_server_that_does_not_offer_tls(
        mitm: tuple[PlainInfo, int], tmp_path: Path) -> None:
    fake, port = mitm
    ca, _, _ = _tls_files(tmp_path)
    for url, ca_file in ((f"tls://127.0.0.1:{port}", ""), (f"nats://127.0.0.1:{port}", ca)):
        client = Client(url, user="u", password=PASSWORD, tls_ca=ca_file, app="shop")
        with pytest.raises(BusUnavailable, match="did not offer TLS"):
            await client.start()
    assert fake.connections >= 2 and PASSWORD.encode() not in fake.received and b"CONNECT" not in fake.received


async def test_the_cli_sends_no_credentials_to_a_server_that_does_not_offer_tls(
        mitm: tuple[PlainInfo, int], tmp_path: Path) -> None:
    fake, port = mitm
    ca, _, _ = _tls_files(tmp_path)
    env = {"LOCKGATE_TLS_CA": ca, "LOCKGATE_NATS_USER": "viewer", "LOCKGATE_NATS_PASSWORD": PASSWORD}
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["--home", str(tmp_path), "--nats",
                                                               f"tls://127.0.0.1:{port}", "status"], env=env)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert fake.connections >= 1 and PASSWORD.encode() not in fake.received and b"CONNECT" not in fake.received
