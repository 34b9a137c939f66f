"""What one client may hold of lockgate's HTTP servers (the router with its admin API, the OTLP/HTTP receiver,
/livez and /readyz): connections, and time before its request head is in. One mechanism for every aiohttp server
of a process; request bodies are bounded by `lockgate.server.body.read_body`, with the same limits.

Found by a probe (p37 F4): a connection that never finished its request head was kept for ever (aiohttp's
keep-alive deadline, which also bounds a head, defaults to an hour), and 20,000 of them, with no key, took every
descriptor of the process: each failed accept was logged with its traceback (62 MB of log), the loop was held 35 s
and the router, cut off from the bus it could no longer answer, served every tenant stable only.

So a server made by `app_runner` closes a connection whose next request head is not whole within `head_s` of the
connection's start or its previous answer (aiohttp's `keepalive_timeout`, which is exactly that deadline: it runs
from the connection's start and from each answer, and closes a connection still waiting for a whole head); and
`listen_http` (tls.py) serves `GuardedSite`s: a connection past the process's cap is closed as soon as it is made,
so the process keeps descriptors for its bus, its upstreams and its files. Counted on aiohttp's servers (their
`connections`), as the loop hands connections over: uvloop (`lockgate up`, `serve`) accepts in libuv, never through
Python's socket. On asyncio's own loop a failed accept is logged once in a while (`Listener`); libuv sheds it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import time
import weakref
from typing import Any

import msgspec
from aiohttp import web

from lockgate.config import Settings
from lockgate.server.httplog import SERVER_LOG

log = logging.getLogger("lockgate.http")

# An accept that failed for want of descriptors or memory: asyncio logs each with a traceback, and Linux reports the
# listening socket ready again at once (probe p37: 121,855 of them).
_STARVED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
LOG_EVERY_S = 10.0


class HttpLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The bounds of every HTTP server of a process (Settings `http_*`)."""

    head_s: float
    body_grace_s: float
    body_min_rate: float
    body_max_s: float
    body_bytes: int
    max_connections: int

    @classmethod
    def from_settings(cls, s: Settings) -> HttpLimits:
        """The limits the settings give (their defaults: `HttpLimits.from_settings(Settings())`)."""
        return cls(head_s=s.http_head_s, body_grace_s=s.http_body_grace_s, body_min_rate=s.http_body_min_rate,
                   body_max_s=s.http_body_max_s, body_bytes=s.http_body_bytes, max_connections=s.http_max_connections)

    def connection_cap(self) -> int:
        """Client connections the process keeps open at once: `max_connections`, or half its descriptor limit, so
        that the other half is left to what a request needs besides (the router's upstream connection, the bus,
        files)."""
        if self.max_connections:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(64, (65536 if soft == resource.RLIM_INFINITY else soft) // 2)


LIMITS = web.AppKey("lockgate_http_limits", HttpLimits)


def app_runner(app: web.Application, limits: HttpLimits, **kwargs: Any) -> web.AppRunner:
    """The runner of one of lockgate's HTTP servers: `limits` for its request heads (and, through `read_body`, its
    bodies), served with `tls.listen_http`; `kwargs` as AppRunner's."""
    app[LIMITS] = limits
    return web.AppRunner(app, access_log=None, handle_signals=False, logger=SERVER_LOG,
                         keepalive_timeout=limits.head_s, **kwargs)


class Throttled:
    """One warning line per `every_s` for something that can happen thousands of times a second, with how many
    times it happened since the last line."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._next = 0.0
        self._since = 0

    def warn(self, message: str, *args: object) -> None:
        """Count one occurrence; log it if no line was written in the last `every_s`."""
        self._since += 1
        now = time.monotonic()
        if now < self._next:
            return
        log.warning(message + " (%d since the last such line)", *args, self._since)
        self._next, self._since = now + self.every_s, 0


# Every aiohttp server of the process a GuardedSite serves: their connections are the process's (the cap's).
_SERVERS: weakref.WeakSet[web.Server] = weakref.WeakSet()


def open_connections() -> int:
    """The client connections the process's lockgate HTTP servers hold now."""
    return sum(len(server.connections) for server in _SERVERS)


class _Refused(asyncio.Protocol):
    """A connection past the cap: closed as soon as it is made, unanswered (the client may try another replica)."""

    def __init__(self, cap: int, said: Throttled) -> None:
        self.cap, self.said = cap, said

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        transport.close()
        self.said.warn("HTTP connection from %s closed at once: the process already holds %d (the cap, "
                       "http_max_connections)", peer[0] if isinstance(peer, tuple) else peer, self.cap)


class GuardedSite(web.SockSite):
    """aiohttp's site on a bound socket, whose connections past `cap` (the process's, every server's) are closed as
    soon as they are made, whatever the event loop."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, cap: int, **kwargs: Any) -> None:
        super().__init__(runner, sock, **kwargs)
        self.cap = cap
        self.refused = Throttled()

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registered with its runner, as SockSite.start does before it serves
        server = self._runner.server
        assert server is not None
        _SERVERS.add(server)

        def protocol() -> asyncio.BaseProtocol:
            return _Refused(self.cap, self.refused) if open_connections() >= self.cap else server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog)


class Listener(socket.socket):
    """A listening socket that gets through a want of descriptors on asyncio's own loop without its per-error log
    and busy retries: one line per interval, and the waiting connection closed with a descriptor kept spare for
    that, so the backlog drains. (uvloop accepts in libuv, which does the same on its own.)"""

    def __init__(self, family: int, kind: int, proto: int) -> None:
        super().__init__(family, kind, proto)
        self.starved = Throttled()
        self._spare = _spare()

    def accept(self) -> tuple[socket.socket, Any]:  # type: ignore[override]
        """The next connection (BlockingIOError when none waits)."""
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in _STARVED:
                raise
            self._shed(exc)
            raise ConnectionAbortedError from None  # asyncio ends this round quietly; the next takes the next

    def close(self) -> None:
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1
        super().close()

    def _shed(self, exc: OSError) -> None:
        self.starved.warn("an HTTP connection could not be accepted (%s): it is closed at once; lower "
                          "http_max_connections or raise the process's descriptor limit (ulimit -n)", exc.strerror)
        if self._spare < 0:
            self._spare = _spare()
            return
        os.close(self._spare)
        try:
            with contextlib.suppress(OSError):  # gone meanwhile, or still starved: the next round tries again
                fd, _ = self._accept()  # type: ignore[attr-defined]
                os.close(fd)
        finally:
            self._spare = _spare()


def _spare() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def listeners(host: str, port: int) -> list[Listener]:
    """Bound Listener sockets for host:port, one per address it resolves to, as asyncio's create_server binds
    them (SO_REUSEADDR, IPv6 sockets IPv6 only); OSError as a bind raises it."""
    bound: list[Listener] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = Listener(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound
