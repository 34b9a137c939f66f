"""Decision watches given up while they start, and the bus not answering, through the real gRPC gateway and SDK.

Before (probe p39 F1/F3/F4): a watch cancelled while it confirmed its subscription (`nc.flush()`) cancelled
nats-py's PONG future; the PONG that came next raised InvalidStateError inside nats-py's read loop, which stopped
reading while the connection still said it was connected. One tenant's app key opening and cancelling WatchDecisions
calls so cut the gateway off NATS for every tenant for 6 minutes (GetDecision: UNAVAILABLE after 5 s), and an SDK
client's own `decision()` failed alike with nats-py's TimeoutError; each such watch left its subscription on every
tenant's announcements. WatchDecisions while the bus was down answered UNKNOWN with nats-py's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.client import Client
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import GateDecided
from lockgate.errors import BusUnavailable
from lockgate.server.apikeys import KeyStore, bootstrap
from lockgate.server.natsserver import NatsServer
from lockgate.services.gateway.server import GrpcServer
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.subjects import Subjects, token
from lockgate.v1 import gates_pb2, gates_pb2_grpc

pytestmark = pytest.mark.timeout(90)

SIGNER = Signer.generate()
# Watches opened and given up at once: the probe's first broke the gateway's connection after 108.
ATTEMPTS = 400


@pytest.fixture(autouse=True)
def _trusted(settings: Settings) -> None:
    trust_key(trust_file_path(settings), SIGNER.public)


async def decided(bus: Bus, release: str, tenant: str, app: str) -> None:
    """A PASS for `release`, bound to `tenant`'s `app`, in the gates bucket."""
    await artifacts.bind_release(bus, artifacts.release_bundle(release, app, {}, tenant=tenant))
    kv = await bus.kv(bus.subjects.kv_gates)
    await kv.put(token(release), encode(SIGNER.sign(GateDecided(release=release, decision="PASS", rules=[], seq=1))))


def watch_subscriptions(nc: Any, subjects: Subjects) -> list[Any]:
    """The connection's subscriptions a decision watch makes (the gateway's own reader of them is a queue group)."""
    return [sub for sub in nc._subs.values()
            if sub.subject in (subjects.gate_decided_all, subjects.app_relist) and not sub.queue]


@pytest.fixture
async def grpc_server(bus: Bus, settings: Settings) -> AsyncIterator[GrpcServer]:
    server = GrpcServer(bus, port=0, settings=settings)
    await server.start()
    yield server
    await server.stop(0.5)


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def test_watches_cancelled_as_they_start_leave_the_gateway_serving_every_tenant(
        bus: Bus, settings: Settings, grpc_server: GrpcServer) -> None:
    await decided(bus, "bank-v1", "bank", "core")
    attacker = bootstrap(settings.home, tenant="acme", app="shop").app_key
    victim = KeyStore(settings.home).create("bank", "core")[0]
    async with grpc.aio.insecure_channel(grpc_server.address) as channel:
        stub = gates_pb2_grpc.GatesStub(channel)
        for n in range(ATTEMPTS):
            call = stub.WatchDecisions(gates_pb2.WatchRequest(), metadata=_bearer(attacker))
            # The attack's own timing: each cancel lands somewhere else in the watch's start, its flush among them.
            await asyncio.sleep(0.001 * (n % 4))
            call.cancel()
        # Another tenant is answered at once, by a connection still read (before: UNAVAILABLE after 5 s, 6 minutes).
        got = await stub.GetDecision(gates_pb2.GetDecisionRequest(release="bank-v1"), metadata=_bearer(victim),
                                     timeout=4)
        assert (got.release, got.decision) == ("bank-v1", "PASS")
    assert (bus.state, bus.reconnects) == ("connected", 0)
    await grpc_server.stop(5)  # returns once every call's handler has ended
    assert watch_subscriptions(bus.nc, bus.subjects) == []


async def test_an_sdk_watch_given_up_as_it_starts_leaves_the_client_reading(bus: Bus, settings: Settings) -> None:
    await decided(bus, "shop-v1", "acme", "shop")
    async with Client(settings.nats_url, prefix=settings.prefix, app="shop", tenant="acme",
                      trust_file=str(trust_file_path(settings))) as client:
        for n in range(ATTEMPTS):
            decisions = client.decisions("shop")
            # A caller that gives up on the first decision (a wait_for, a component stopped as it started).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(anext(decisions), 0.0005 * (n % 7))
            await decisions.aclose()  # one that came in time: the caller is done with it
        got = await asyncio.wait_for(client.decision("shop-v1"), 4)
        assert got is not None and got.decision == "PASS"
        assert watch_subscriptions(client._nc, client.subjects) == []


async def test_a_flush_given_up_while_it_waits_leaves_the_connection_reading(bus: Bus) -> None:
    # nats-py's own flaw, as the watches met it: the PONG of a flush cancelled while it waited ended nats-py's read
    # loop (InvalidStateError), the connection still "connected". Our client passes over such a PONG.
    pong = asyncio.get_running_loop().create_future()
    await bus.nc._send_ping(pong)  # what `flush()` does: its PING sent, its PONG awaited on this future ...
    pong.cancel()  # ... which its caller's cancel cancels
    await asyncio.wait_for(bus.nc.flush(), 5)  # the next PONG is read: the loop reads on
    assert bus.reconnects == 0 and (await bus.health())[0] == "connected"


async def test_a_connection_nats_py_stopped_reading_is_reported_and_reconnected(bus: Bus) -> None:
    # Any other way nats-py's read loop ends while "connected" (an error inside it: it logs and stops reading) is
    # met by the bus: it says so and reconnects at once, not nats-py's ping check minutes later.
    bus.nc._reading_task.cancel()  # the loop ended, as an error inside it ends it
    await asyncio.wait_for(bus.lost(0), 10)
    assert await asyncio.wait_for(bus.reconnected(0), 10) == 1
    assert (await bus.health())[0] == "connected"
    await asyncio.wait_for(bus.nc.flush(), 5)  # read again: its PONG is seen


async def test_the_bus_not_answering_is_unavailable_to_watches_and_reads(tmp_path: Path, settings: Settings) -> None:
    server = NatsServer(tmp_path / "js")
    await server.start()
    own = settings.replace(nats_url=server.url)
    bus = Bus(own.nats_url, Subjects(own.prefix), name="gateway")
    await bus.connect()
    grpc_server = GrpcServer(bus, port=0, settings=own)
    await grpc_server.start()
    key = bootstrap(own.home, tenant="acme", app="shop").app_key
    try:
        await decided(bus, "shop-v1", "acme", "shop")
        async with Client(own.nats_url, prefix=own.prefix, app="shop", tenant="acme",
                          trust_file=str(trust_file_path(own))) as client, \
                grpc.aio.insecure_channel(grpc_server.address) as channel:
            stub = gates_pb2_grpc.GatesStub(channel)
            server.stop()
            await bus.wait_state("reconnecting")
            for what, answer in (
                    ("GetDecision", stub.GetDecision(gates_pb2.GetDecisionRequest(release="shop-v1"),
                                                     metadata=_bearer(key), timeout=30)),
                    ("WatchDecisions", anext(aiter(stub.WatchDecisions(gates_pb2.WatchRequest(),
                                                                       metadata=_bearer(key), timeout=30))))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await answer
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (what, err.value)
                assert "Unexpected" not in err.value.details(), (what, err.value.details())
            with pytest.raises(BusUnavailable):  # before: nats-py's TimeoutError
                await client.decision("shop-v1")
    finally:
        await grpc_server.stop(0.5)
        with contextlib.suppress(OSError):  # nats-py's close writes to the socket its server closed
            await bus.close()
        server.stop()
