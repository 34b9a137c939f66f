"""Reading a request's body in lockgate's aiohttp servers (the router, its admin API, the OTLP receiver).

A body is held in memory while it arrives (up to the app's `client_max_size`: 32 MiB on the router), so how long it
may take and how many bytes of bodies a process reads at once are bounded, by the server's HttpLimits (httpguard.py).
Found by a probe (p37 F3): 12 bodies of 32 MB sent without their last byte held 366 MiB of the router for as long as
their clients liked. Now a body must be whole within `body_max_s`, and past its first `body_grace_s` it must arrive at
`body_min_rate` bytes a second on average (a trickle is cut soon; a big body over a slow link is not); else 408. And
the bytes of the bodies being read in the process are at most `body_bytes`: past them a request is answered 503
(retry) before its body is read, or as soon as its body outgrows what is left.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from lockgate.config import Settings
from lockgate.errors import BodyTooLarge, UnreadableBody
from lockgate.server.httpguard import LIMITS, HttpLimits

_DEFAULT = HttpLimits.from_settings(Settings())  # an app not made by httpguard.app_runner (a test's)


class BodyTooSlow(UnreadableBody):
    """A request's body did not arrive in time: past its total time, or slower than the minimum rate."""

    http_status = 408


class BodiesBusy(UnreadableBody):
    """The process is reading as many bytes of request bodies as it may hold: the client should retry shortly."""

    http_status = 503


class _Held:
    """The bytes of request bodies being read in this process (every server's: the memory is the process's)."""

    total = 0


class _Holding:
    """One body's share of `_Held`, grown as it arrives and given back when it is read or dropped."""

    def __init__(self, cap: int) -> None:
        self.cap, self.bytes = cap, 0

    def grow(self, size: int) -> None:
        more = size - self.bytes
        if more <= 0:
            return
        if _Held.total + more > self.cap:
            raise BodiesBusy(f"the server is receiving too many request bodies at once ({self.cap:,} bytes); "
                             "retry shortly")
        _Held.total += more
        self.bytes = size

    def release(self) -> None:
        _Held.total -= self.bytes
        self.bytes = 0


async def read_body(request: web.Request, limits: HttpLimits | None = None) -> bytes:
    """The body with its Content-Encoding undone (aiohttp undoes gzip and deflate), or UnreadableBody
    saying why not: aiohttp raises a bare exception for a corrupt stream, which handlers turned into a
    500 and a traceback in the log for what is the client's mistake, and answers a body over the app's
    `client_max_size` in plain text, not in the API's own error shape (BodyTooLarge, 413). BodyTooSlow (408)
    and BodiesBusy (503) as the module says; every caller answers an UnreadableBody `closing`. `limits`: the
    server's (its app's, from httpguard.app_runner) unless a handler's own are tighter (the OTLP receiver's)."""
    limits = limits or request.config_dict.get(LIMITS, _DEFAULT)
    most = request.client_max_size
    declared = request.content_length
    if declared is not None and declared > most and not request.headers.get("Content-Encoding"):
        raise _too_large(most, declared)  # said before a byte is read
    holding = _Holding(limits.body_bytes)
    try:
        holding.grow(min(declared or 0, most))  # its declared length now: a body that cannot fit is told at once
        return await _read(request, limits, holding, most)
    except RequestPayloadError:
        request.content.feed_eof()  # else aiohttp reads on after the answer, fails again and logs a traceback
        encoding = request.headers.get("Content-Encoding", "")
        raise UnreadableBody(f"the request body is not valid {encoding} data (Content-Encoding: {encoding})"
                             if encoding else "the request body ended before its declared length") from None
    finally:
        holding.release()


async def _read(request: web.Request, limits: HttpLimits, holding: _Holding, most: int) -> bytes:
    loop = asyncio.get_running_loop()
    start = loop.time()
    body = bytearray()

    def due() -> float:
        # Each byte in buys 1/min_rate s more (decompressed bytes, so a gzip body counts what it will hold).
        return start + min(limits.body_max_s, limits.body_grace_s + len(body) / limits.body_min_rate)

    try:
        async with asyncio.timeout_at(due()) as deadline:
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > most:
                    raise _too_large(most, len(body))
                holding.grow(len(body))
                deadline.reschedule(due())
    except TimeoutError:
        elapsed = loop.time() - start
        if elapsed >= limits.body_max_s:
            raise BodyTooSlow(f"the request body did not arrive within {limits.body_max_s:g} s") from None
        raise BodyTooSlow(f"the request body arrived too slowly: {len(body):,} bytes in {elapsed:.1f} s, and after "
                          f"the first {limits.body_grace_s:g} s a body must arrive at "
                          f"{limits.body_min_rate / 1024:g} KiB/s or more") from None
    return bytes(body)


def _too_large(most: int, size: int) -> BodyTooLarge:
    # aiohttp's own words for it, which clients and tests know
    return BodyTooLarge(f"the request body is too large: Maximum request body size {most} exceeded, actual body "
                        f"size {size}")


def closing(response: web.StreamResponse) -> web.StreamResponse:
    """The answer to an UnreadableBody, with the connection closed after it (`Connection: close`): the
    server stopped inside that body, so what follows on the connection cannot be read as a request."""
    response.force_close()
    return response
