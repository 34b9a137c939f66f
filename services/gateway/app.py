"""Gateway wiring: the gRPC API on the configured host and port (0 binds a free port), the relay of
applications' NATS users' events (relay.py) and their decision reads (reads.py)."""

from __future__ import annotations

import contextlib

import nats.errors

from lockgate.server.service import Service, ServiceContext
from lockgate.services.gateway.reads import Reads
from lockgate.services.gateway.relay import Relay
from lockgate.services.gateway.server import GrpcServer


class Gateway(Service):
    """Serves the gRPC API; its endpoint reports the port it actually bound."""

    name = "gateway"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        s = ctx.settings
        self.server = GrpcServer(ctx.bus, s.host, s.grpc_port, settings=s)
        self.relay = Relay(ctx.bus)
        self.reads = Reads(ctx.bus)
        self._serving = False

    @property
    def endpoints(self) -> dict[str, str]:
        """host:port of the gRPC API once bound."""
        return {"grpc": self.server.address} if self._serving else {}

    def problems(self) -> list[str]:
        """Not ready while the key store holds no key: every call would be refused (UNAUTHENTICATED)."""
        return self.server.keys.problems()

    async def start(self) -> None:
        """Bind and serve."""
        self.server.keys.say_problem(self.log)
        await self.server.start()
        await self.relay.start()
        await self.reads.start()
        # The server has their subscriptions before this reports started: a publish on `ingest` sent in between
        # would find no responder (NoStreamResponseError; a test publishing once right after start saw it).
        await self.ctx.bus.nc.flush()
        self._serving = True

    async def stop(self) -> None:
        """Stop taking calls; running ones get two seconds (open watches are then cancelled)."""
        self._serving = False
        for part in (self.relay, self.reads):
            # A connection nats-py closed for good took their subscriptions with it (the runtime stops for that):
            # the gRPC API is stopped all the same.
            with contextlib.suppress(nats.errors.ConnectionClosedError):
                await part.stop()
        await self.server.stop(2.0)
        await super().stop()


def create(ctx: ServiceContext) -> Gateway:
    """Build the gateway."""
    return Gateway(ctx)
