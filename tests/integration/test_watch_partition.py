"""A decisions watch behind a silent partition (the socket open, nothing coming back) says so within the router's
bound (`router_cut_off_s`) instead of leaving its subscriber on the last PASS; a watch made again once the bus
answers reads the decision made meanwhile. Before (probe p80 F2), the SDK's watch heard nothing for 425 s, with no
error and no warning, while a direct watcher got the BLOCK; a gRPC WatchDecisions was silent until its timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from lockgate import artifacts, credentials
from lockgate.bus import Bus
from lockgate.client import Client
from lockgate.contracts import GateDecided
from lockgate.errors import CutOff
from lockgate.server.apikeys import Bootstrap
from lockgate.server.runtime import Runtime
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.v1 import gates_pb2, gates_pb2_grpc
from tests.helpers import Relay, gate_decided
from tests.integration import test_app_credentials, test_grpc

pytestmark = pytest.mark.timeout(90)

SIGNER = Signer.generate()
stack = test_app_credentials.stack  # the embedded runtime with the gateway, as `lockgate up` runs it
gateway, keys, _trusted = (
    test_grpc.gateway,
    test_grpc.keys,
    test_grpc._trusted,
)  # the gateway alone, its app key
BOUND_S = 2.0  # router_cut_off_s for this test: a partition is said within it (and the probe's cadence)


def _signed(release: str, decision: str = "PASS") -> GateDecided:
    return SIGNER.sign(GateDecided(release=release, decision=decision, rules=[]))


async def test_the_shared_app_users_watch_ends_with_cut_off_behind_a_silent_partition_and_a_new_one_reads_the_block(
    stack: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCKGATE_ROUTER_CUT_OFF_S", str(BOUND_S))
    await asyncio.to_thread(trust_key, trust_file_path(stack.settings), SIGNER.public)
    bus = stack.ctx.bus
    await artifacts.bind_release(bus, artifacts.release_bundle("shop-v1", "shop", {}, tenant="acme"))
    passed = _signed("shop-v1")
    await gate_decided(bus, passed, passed.id)
    relay = Relay(int(stack.settings.nats_url.rpartition(":")[2]))
    port = await relay.start()
    app = credentials.for_identity(stack.settings, "app")
    try:
        async with Client(
            f"nats://127.0.0.1:{port}",
            prefix=bus.subjects.prefix,
            app="shop",
            tenant="acme",
            user=app.user,
            password=app.password,
            trust_file=str(trust_file_path(stack.settings)),
        ) as client:
            decisions = client.decisions()
            assert await asyncio.wait_for(anext(decisions), 10) == passed
            waiting = asyncio.ensure_future(anext(decisions))
            relay.hang()  # the server's side of the partition: nothing reaches the client, its socket stays open
            blocked = _signed("shop-v1", "BLOCK")
            await gate_decided(bus, blocked, blocked.id)  # a direct watcher hears this at once
            # Said within the bound (and a probe's cadence), not when nats-py's pings call it stale minutes later.
            with pytest.raises(CutOff, match="router_cut_off_s"):
                await asyncio.wait_for(waiting, BOUND_S + 5)
            relay.release()
            again = client.decisions()
            assert await asyncio.wait_for(anext(again), 10) == blocked
            await again.aclose()
    finally:
        await relay.close()


# What the README tells a gRPC client of WatchDecisions to set (its gRPC part), faster here: a ping each
# second on a quiet stream, the stream ended UNAVAILABLE when one goes unanswered for a second.
CLIENT_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 1000),
]


async def test_a_grpc_watch_with_the_documented_keepalive_stays_open_while_quiet_and_ends_behind_a_partition(
    bus: Bus, context: ServiceContext, gateway: Any, keys: Bootstrap
) -> None:
    relay = Relay(int(gateway.endpoints["grpc"].rpartition(":")[2]))
    port = await relay.start()
    await test_grpc.put_decision(bus, test_grpc.decision("shop-v1"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_KEEPALIVE) as channel:
            call = gates_pb2_grpc.GatesStub(channel).WatchDecisions(
                gates_pb2.WatchRequest(release_prefix="shop-"), metadata=test_grpc._auth(keys)
            )
            assert (await asyncio.wait_for(call.read(), 10)).decision == "PASS"
            waiting = asyncio.ensure_future(call.read())
            # Quiet for several of the client's pings: the gateway takes them (before, it answered the third with a
            # GOAWAY `too_many_pings`, and the watch ended UNAVAILABLE with nothing wrong).
            done, _ = await asyncio.wait({waiting}, timeout=5)
            assert not done, (
                f"the gateway ended a quiet watch whose client pings as documented: {waiting.exception()!r}"
            )
            await gate_decided(context.bus, test_grpc.decision("shop-v1", verdict="FAIL"), "k-block")
            assert (await asyncio.wait_for(waiting, 10)).decision == "BLOCK"
            relay.hang()  # the gateway's side of the partition: its socket open, nothing reaching the client
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(call.read(), 15)  # a ping unanswered: said within seconds, not never
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await relay.close()
