"""OTLP receiver wiring: OTLP/gRPC and OTLP/HTTP on the configured host and ports (0 binds a free port)."""

from __future__ import annotations

import grpc
from aiohttp import web

from lockgate.limits import EventLimits
from lockgate.server.apikeys import KeyStore
from lockgate.server.httpguard import HttpLimits, app_runner
from lockgate.server.service import Service, ServiceContext
from lockgate.server.tls import grpc_credentials, listen_http, ssl_context
from lockgate.services.otlp.bodies import otlp_limits
from lockgate.services.otlp.genai import Routers
from lockgate.services.otlp.ingest import Receiver
from lockgate.services.otlp.transports import HttpApp, serve_grpc


class OtlpService(Service):
    """Receives spans from OpenTelemetry SDKs and Collectors; its endpoints report the ports bound."""

    name = "otlp"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.receiver = Receiver(ctx.bus, KeyStore.of(ctx.settings), limits=EventLimits.from_settings(ctx.settings))
        self.http = HttpApp(self.receiver, otlp_limits(HttpLimits.from_settings(ctx.settings)))
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._endpoints: dict[str, str] = {}

    @property
    def endpoints(self) -> dict[str, str]:
        """The OTLP/gRPC address and the OTLP/HTTP base URL once bound."""
        return dict(self._endpoints)

    def problems(self) -> list[str]:
        """Not ready while the key store holds no key: every export would be refused (401, UNAUTHENTICATED)."""
        return self.receiver.keys.problems()

    async def start(self) -> None:
        """Bind both ports and serve."""
        self.receiver.keys.say_problem(self.log)
        s = self.ctx.settings
        tls = ssl_context(s)  # a bad certificate fails the start, before anything binds
        # A router of this process has bound by now (it starts first: registry.ORDER), on the port it chose.
        bound = [url for name, url in self.ctx.process_endpoints().items() if name == "router"]
        self.receiver.routers = Routers.of(s.router_addresses, bound)
        self._grpc, port = await serve_grpc(self.receiver, s.host, s.otlp_grpc_port, grpc_credentials(s))
        self._http = app_runner(self.http.app(), HttpLimits.from_settings(s), shutdown_timeout=2.0)
        await self._http.setup()
        await listen_http(self._http, s.host, s.otlp_http_port, what="OTLP/HTTP", flag="--otlp-http-port",
                          ssl_context=tls)
        host, http_port = self._http.addresses[0][:2]
        scheme = "https" if tls is not None else "http"
        self._endpoints = {"otlp-grpc": f"{s.host}:{port}", "otlp-http": f"{scheme}://{host}:{http_port}"}
        self.log.info("OTLP receiver on %s (gRPC) and %s (HTTP)", *self._endpoints.values())
        if self.receiver.routers.endpoints:
            self.log.info("spans of model calls made through a router at %s are kept out of the cost ledger: the "
                          "router's events bill them (router_addresses)",
                          ", ".join(sorted(f"{h}:{p or '*'}" for h, p in self.receiver.routers.endpoints)))

    async def stop(self) -> None:
        """Stop taking exports; running ones get two seconds to be acknowledged."""
        self._endpoints = {}
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._grpc is not None:
            await self._grpc.stop(2.0)
            self._grpc = None
        self.receiver.close()
        await super().stop()


def create(ctx: ServiceContext) -> OtlpService:
    """Build the OTLP receiver."""
    return OtlpService(ctx)
