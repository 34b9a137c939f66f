"""lockgate's own listeners: binding them, and their TLS.

TLS for the gRPC API and the OTLP receiver comes from one certificate and key in the settings
(`grpc_tls_cert`, `grpc_tls_key`): both or neither; plaintext when neither. Every listener binds through
`bind_grpc` or `listen_http`, so a port that cannot be had is one ConfigError naming the port and the
flag that chooses it, never a traceback, and never a port silently shared with another process.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
from pathlib import Path

import grpc
from aiohttp import web

from lockgate.config import Settings
from lockgate.errors import ConfigError, PortInUse
from lockgate.server.grpcdecode import Requests
from lockgate.server.httpguard import LIMITS, GuardedSite, listeners

log = logging.getLogger("lockgate.tls")


def _pair(settings: Settings) -> tuple[bytes, bytes] | None:
    if bool(settings.grpc_tls_cert) != bool(settings.grpc_tls_key):
        raise ConfigError("TLS needs both grpc_tls_cert and grpc_tls_key (PEM files)")
    if not settings.grpc_tls_cert:
        return None
    try:
        return Path(settings.grpc_tls_key).read_bytes(), Path(settings.grpc_tls_cert).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS certificate or key: {exc}") from None


def grpc_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """gRPC server credentials, or None for plaintext."""
    pair = _pair(settings)
    return None if pair is None else grpc.ssl_server_credentials([pair])


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """An HTTPS server context, or None for plaintext."""
    if _pair(settings) is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.grpc_tls_cert, settings.grpc_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate and key: {exc}") from None
    return context


def grpc_server(*, options: list[tuple[str, object]] | None = None, requests: Requests | None = None
                ) -> grpc.aio.Server:
    """A grpc.aio server that owns its port, taking requests through `requests` (grpcdecode.Requests: a refusal
    keeps nothing of the request; with `admit`, the key is looked at before the request is decoded). gRPC sets
    SO_REUSEPORT by default: a second stack told a port the first one serves bound it too, started "cleanly", and
    the kernel split connections between them."""
    return grpc.aio.server(options=[("grpc.so_reuseport", 0), *(options or [])],
                           interceptors=[requests or Requests()])


async def bind_grpc(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None, *,
                    what: str, flag: str) -> int:
    """Bind a gRPC server (from `grpc_server`) to host:port, with TLS when `credentials` are given; the port
    bound. If it cannot, the server is stopped and ConfigError names `what` (the listener) and `flag` (the option
    choosing its port).

    The one plaintext listener in lockgate: only without a certificate, on 127.0.0.1 unless the
    operator asks for another host (said in the log), and every call still needs an API key."""
    address = f"{host}:{port}"
    try:
        # gRPC says only "Failed to bind" (and logs its reason to stderr): a plain bind first names the reason.
        check_free(host, port, what=what, flag=flag)
        try:
            if credentials is not None:
                bound = server.add_secure_port(address, credentials)
            else:
                if not _loopback(host):
                    log.warning("gRPC on %s without TLS: set grpc_tls_cert and grpc_tls_key to encrypt it", address)
                bound = server.add_insecure_port(address)
        except RuntimeError:  # how grpc says it could not bind (older versions return 0)
            bound = 0
        if bound == 0:
            raise _refused(what, host, port, flag, None)
    except ConfigError:
        await server.stop(None)  # never started: else its shutdown is left to a garbage collection without a loop
        raise
    return bound


async def listen_http(runner: web.AppRunner, host: str, port: int, *, what: str, flag: str,
                      ssl_context: ssl.SSLContext | None = None, backlog: int = 128) -> None:
    """Serve an aiohttp runner on host:port; ConfigError naming `what` and `flag` if the port cannot be had. A runner
    made by `httpguard.app_runner` (every lockgate server's) listens on sockets that keep its connections within the
    process's cap (httpguard.Listener); another (the dev simulator's, an upstream) as aiohttp does."""
    _check_port(port, what, flag)
    limits = runner.app.get(LIMITS)
    try:
        if limits is None:
            await web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=backlog).start()
            return
        for sock in listeners(host, port):
            await GuardedSite(runner, sock, limits.connection_cap(), ssl_context=ssl_context, backlog=backlog).start()
    except OSError as exc:
        raise _refused(what, host, port, flag, exc) from None


def check_free(host: str, port: int, *, what: str, flag: str) -> None:
    """ConfigError, as a bind would raise it, if host:port cannot be bound now (port 0 always can). A check ahead
    of binding (`up` makes it before starting anything): the bind itself still fails as clearly if it loses a race."""
    _check_port(port, what, flag)
    if port and (refused := _probe(host, port)) is not None:
        raise _refused(what, host, port, flag, refused)


def _check_port(port: int, what: str, flag: str) -> None:
    # Out of range, grpc binds the port modulo 65536 (-1 is 65535) and asyncio raises OverflowError.
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} port {port} is not a port: give {flag} a number from 1 to 65535, or 0 for a "
                          "free one")


def _probe(host: str, port: int) -> OSError | None:
    """Why host:port cannot be bound (without SO_REUSEPORT, as the server will), or None if it can now."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no owner
                probe.bind(address)
    except OSError as exc:  # socket.gaierror too: a host that does not resolve
        return exc
    return None


def _refused(what: str, host: str, port: int, flag: str, exc: OSError | None) -> ConfigError:
    if exc is not None and exc.errno == errno.EADDRINUSE:
        return PortInUse(what, port, flag)
    reason = (exc.strerror or str(exc)) if exc is not None else "the port is in use or the host is not this machine's"
    return ConfigError(f"{what} cannot listen on {host}:{port}: {reason} (its port is chosen with {flag})")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
