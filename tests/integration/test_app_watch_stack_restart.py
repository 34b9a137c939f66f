"""An SDK `decisions()` watch through the gateway outlives a restart. NATS comes back before the gateway does: the
read that follows the reconnection (or an announcement, for the shared `app` user) finds no responder. Before,
that ended the watch with BusUnavailable, and a decision made after the restart reached nobody; now the watch
waits for the gateway (its relist, or the backoff) and goes on."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lockgate import artifacts, credentials, decisionwatch
from lockgate.client import Client
from lockgate.contracts import GateDecided
from lockgate.retry import RetryPolicy
from lockgate.server.runtime import Runtime
from lockgate.signing import Signer, trust_file_path, trust_key
from tests.helpers import gate_decided, run_cli
from tests.integration import test_app_credentials

pytestmark = pytest.mark.timeout(120)

SIGNER = Signer.generate()
stack = test_app_credentials.stack  # the embedded runtime with the gateway, as `lockgate up` runs it


def _signed(release: str, decision: str = "PASS") -> GateDecided:
    return SIGNER.sign(GateDecided(release=release, decision=decision, rules=[]))


class _Warned(logging.Handler):
    """Set once the watch logs that a read failed and it goes on."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "It goes on" in record.getMessage():
            self.event.set()


@pytest.fixture
async def warned() -> AsyncIterator[asyncio.Event]:
    handler = _Warned()
    logger = logging.getLogger("lockgate.decisions")
    logger.addHandler(handler)
    yield handler.event
    logger.removeHandler(handler)


async def _still_watching(waiting: asyncio.Future[Any], warned: asyncio.Event) -> None:
    """Wait until the watch has failed a read with no gateway: it must say so and go on, not end."""
    said = asyncio.ensure_future(warned.wait())
    await asyncio.wait({waiting, said}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    said.cancel()
    if waiting.done():
        pytest.fail(f"the watch ended while the gateway was away: {waiting.exception()!r}")
    assert warned.is_set(), "the watch never read while the gateway was away"


async def _setup(stack: Runtime) -> GateDecided:
    await asyncio.to_thread(trust_key, trust_file_path(stack.settings), SIGNER.public)
    bus = stack.ctx.bus
    await artifacts.bind_release(bus, artifacts.release_bundle("shop-v1", "shop", {}, tenant="acme"))
    passed = _signed("shop-v1")
    await gate_decided(bus, passed, passed.id)
    return passed


async def test_an_app_users_watch_outlives_nats_coming_back_before_the_gateway(stack: Runtime,
                                                                               warned: asyncio.Event) -> None:
    created = await run_cli(stack, "app-credential", "create", "--tenant", "acme", "--app", "shop", "--json")
    assert created.exit_code == 0, created.output
    secret = json.loads(await asyncio.to_thread(Path(json.loads(created.output)["file"]).read_text))
    passed = await _setup(stack)
    bus, gateway, nats_server = stack.ctx.bus, stack.services["gateway"], stack.nats
    assert nats_server is not None
    async with Client(stack.settings.nats_url, prefix=bus.subjects.prefix, app="shop", tenant="acme",
                      user=secret["user"], password=secret["password"],
                      trust_file=str(trust_file_path(stack.settings))) as client:
        decisions = client.decisions()
        assert await asyncio.wait_for(anext(decisions), 10) == passed
        waiting = asyncio.ensure_future(anext(decisions))
        await gateway.stop()
        seen = bus.reconnects
        nats_server.kill()  # the supervisor brings nats-server back; the gateway is not back yet
        await asyncio.wait_for(bus.reconnected(seen), 30)
        # The client reconnects and reads every key again: no gateway answers.
        await _still_watching(waiting, warned)
        blocked = _signed("shop-v1", "BLOCK")
        await gate_decided(bus, blocked, blocked.id)  # decided while NATS is up and the gateway is not
        await gateway.start()  # its relist has the watch read again
        assert await asyncio.wait_for(waiting, 30) == blocked
        again = _signed("shop-v1")
        await gate_decided(bus, again, again.id)  # and one decided after the restart, passed on as usual
        assert await asyncio.wait_for(anext(decisions), 10) == again
        await decisions.aclose()


async def test_the_shared_app_users_watch_waits_for_the_gateway_it_reads_through(
        stack: Runtime, warned: asyncio.Event, monkeypatch: pytest.MonkeyPatch) -> None:
    # A backoff longer than the wait below: only the gateway's notice that it is back can have the watch read again
    # in time. Before, the shared user was not sent that notice and read again only when its backoff ended (15 s).
    monkeypatch.setattr(decisionwatch, "_BACK", RetryPolicy(attempts=None, initial_s=60.0, max_s=60.0, jitter=False))
    passed = await _setup(stack)
    bus, gateway = stack.ctx.bus, stack.services["gateway"]
    app = credentials.for_identity(stack.settings, "app")
    async with Client(stack.settings.nats_url, prefix=bus.subjects.prefix, app="shop", tenant="acme",
                      user=app.user, password=app.password,
                      trust_file=str(trust_file_path(stack.settings))) as client:
        decisions = client.decisions()
        assert await asyncio.wait_for(anext(decisions), 10) == passed
        waiting = asyncio.ensure_future(anext(decisions))
        await gateway.stop()
        blocked = _signed("shop-v1", "BLOCK")
        # The shared user hears the gatekeeper's announcement itself, and reads the decision through the gateway.
        await gate_decided(bus, blocked, blocked.id)
        await _still_watching(waiting, warned)
        await gateway.start()
        assert await asyncio.wait_for(waiting, 10) == blocked
        await decisions.aclose()
