"""An application's own NATS user follows its decisions through the gateway's copies of the announcements
(`Subjects.app_decided`). Before, an announcement made while the gateway was down was never passed on, and a
watcher whose own connection never dropped never read the bucket again: a BLOCK decided meanwhile was not seen
until another announcement came for that release. A gateway that (re)starts passing announcements on now tells
those watchers to read every key again (`Subjects.app_relist`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lockgate import artifacts
from lockgate.client import Client
from lockgate.contracts import GateDecided
from lockgate.server.runtime import Runtime
from lockgate.signing import Signer, trust_file_path, trust_key
from tests.helpers import gate_decided, run_cli
from tests.integration import test_app_credentials

pytestmark = pytest.mark.timeout(90)

SIGNER = Signer.generate()
stack = test_app_credentials.stack  # the embedded runtime with the gateway, as `lockgate up` runs it


def _signed(release: str, decision: str = "PASS") -> GateDecided:
    return SIGNER.sign(GateDecided(release=release, decision=decision, rules=[]))


async def test_a_decision_made_while_the_gateway_was_down_reaches_an_app_users_watch(stack: Runtime) -> None:
    created = await run_cli(stack, "app-credential", "create", "--tenant", "acme", "--app", "shop", "--json")
    assert created.exit_code == 0, created.output
    secret = json.loads(await asyncio.to_thread(Path(json.loads(created.output)["file"]).read_text))
    bus, s = stack.ctx.bus, stack.ctx.bus.subjects
    await asyncio.to_thread(trust_key, trust_file_path(stack.settings), SIGNER.public)
    await artifacts.bind_release(bus, artifacts.release_bundle("shop-v1", "shop", {}, tenant="acme"))
    passed = _signed("shop-v1")
    await gate_decided(bus, passed, passed.id)
    gateway = stack.services["gateway"]
    async with Client(stack.settings.nats_url, prefix=s.prefix, app="shop", tenant="acme", user=secret["user"],
                      password=secret["password"], trust_file=str(trust_file_path(stack.settings))) as client:
        decisions = client.decisions()
        assert await asyncio.wait_for(anext(decisions), 10) == passed
        await gateway.stop()
        blocked = _signed("shop-v1", "BLOCK")
        await gate_decided(bus, blocked, blocked.id)  # announced with no gateway to pass it on
        await gateway.start()
        # The client's connection never dropped: only the gateway's notice has it read its releases again.
        assert await asyncio.wait_for(anext(decisions), 10) == blocked
        await decisions.aclose()
