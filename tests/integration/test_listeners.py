"""Each listener lockgate opens owns its port: a port another process serves is one ConfigError naming it and
the option that chooses it, never a traceback and never a port shared with the other process."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from lockgate.config import Settings
from lockgate.errors import ConfigError
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process listens on, with SO_REUSEPORT as gRPC servers set it by default (a stack already
    running): the kernel lets any later socket that sets SO_REUSEPORT too listen on it as well."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


@pytest.mark.parametrize(("service", "setting", "what", "flag"), [
    ("gateway", "grpc_port", "gRPC", "--grpc-port"),
    ("otlp", "otlp_grpc_port", "OTLP/gRPC", "--otlp-grpc-port"),
    ("otlp", "otlp_http_port", "OTLP/HTTP", "--otlp-http-port"),
    ("router", "router_port", "router", "--router-port"),
])
async def test_a_port_another_process_serves_is_refused_by_name(
        context: ServiceContext, taken: int, service: str, setting: str, what: str, flag: str) -> None:
    # Before: the gRPC API and the OTLP/gRPC receiver bound the port beside the other process (the kernel then
    # split connections between the two stacks), and the router raised OSError.
    context.settings = context.settings.replace(**{setting: taken})
    with pytest.raises(ConfigError) as refused:
        await _started(context, service)
    assert refused.value.message == (f"{what} port {taken} is in use (another lockgate stack?): choose another "
                                     f"with {flag}, or 0 for a free one")


async def test_a_grpc_server_never_binds_a_port_beside_another_process(taken: int) -> None:
    # The bind itself, past the check ahead of it (a port taken between the two): gRPC's default SO_REUSEPORT
    # let it listen beside the other process.
    from lockgate.server.tls import grpc_server

    server = grpc_server()
    try:
        with pytest.raises(RuntimeError, match="Failed to bind"):
            server.add_insecure_port(f"127.0.0.1:{taken}")
    finally:
        await server.stop(None)


async def _started(context: ServiceContext, *names: str) -> None:
    """Start the services, and stop them again (as `lockgate up` and `serve` do when one fails to start)."""
    services = ServiceSet(context, list(names))
    try:
        await services.start()
    finally:
        await services.stop()  # returns: else pytest's timeout ends the test


async def test_a_refused_listener_after_the_router_stops_the_stack(settings: Settings, taken: int) -> None:
    # `lockgate up` and `serve router gateway` start the router before the gateway, whose refusal stops the runtime.
    # Before: the router's clock probe lost its cancel (the NATS request's asyncio.wait_for, Python 3.11), and the
    # stop waited for it for good.
    from lockgate.server.runtime import Runtime

    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", grpc_port=taken), services=["router", "gateway"])
    with pytest.raises(ConfigError, match=f"gRPC port {taken} is in use"):
        await runtime.start()  # returns, stopped: else pytest's timeout ends the test


@pytest.mark.parametrize("port", [-1, 65536])
async def test_a_number_that_is_no_port_is_refused(context: ServiceContext, port: int) -> None:
    # Before: gRPC bound the port modulo 65536 (-1 as 65535), without a word.
    context.settings = context.settings.replace(grpc_port=port)
    with pytest.raises(ConfigError, match=f"gRPC port {port} is not a port: give --grpc-port a number from 1 to "
                                          "65535, or 0 for a free one"):
        await _started(context, "gateway")

