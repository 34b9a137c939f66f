"""OTLP/HTTP request bodies being received: how many at once, whose, and how slowly they may arrive.

A body is held in memory while it arrives (16 MiB at most), so the bodies being received are bounded: before, 40
connections trickling 16 MB bodies a byte at a time held 600 MB for as long as they liked. Found by a later
probe (p37 F2): one app key trickling bodies, and re-sending each as soon as it was dropped, held all 8 slots, and
another tenant's exports were answered 503 for as long as it went on. So each tenant may hold a share of the slots,
and a body must keep up a minimum rate, as well as arrive within its total time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

from lockgate.errors import UnreadableBody
from lockgate.server.body import read_body

MAX_BODIES = 8  # 8 x 16 MiB held at most
# One tenant's share: with the receiver to itself it still sends several exports at once (a Collector's
# exporter runs a few in parallel), and the other half stays free for the other tenants.
TENANT_BODIES = 4
BODY_READ_S = 30.0  # the longest any body may take
# After the first BODY_GRACE_S, a body must have arrived at MIN_BODY_RATE on average: each 16 KiB buys
# a second more. A real exporter's body arrives in milliseconds; a trickle of bytes is cut at about 5 s
# (before, it held its slot the whole 30 s, and was re-sent at once).
BODY_GRACE_S = 5.0
MIN_BODY_RATE = 16 * 1024  # bytes a second (128 kbit/s)


class BodyTooSlow(UnreadableBody):
    """A request's body did not arrive in time: past its total time, or slower than the minimum rate."""

    http_status = 408


class BodySlots:
    """`slots` bodies received at once, at most `per_tenant` of them one tenant's.

    Counted by the authenticated key's tenant, not by key: keys are minted per app (and two live through a
    rotation), so a share per key would give a tenant with a few keys the whole receiver again; the tenant is
    the boundary the threat model keeps. A request past either limit is refused at once (503, retry), never
    queued: a queued one would hold its connection, and the exporter's 10 s, for nothing."""

    def __init__(self, slots: int = MAX_BODIES, per_tenant: int = TENANT_BODIES) -> None:
        self.slots = max(1, slots)
        self.per_tenant = max(1, min(per_tenant, self.slots))
        self.held: Counter[str] = Counter()

    def refusal(self, tenant: str) -> str | None:
        """Why `tenant` may not take a slot now (a retryable answer's message), or None when it may."""
        if sum(self.held.values()) >= self.slots:
            return "too many OTLP exports being received; retry shortly"
        if self.held[tenant] >= self.per_tenant:
            return (f"tenant {tenant} already has {self.per_tenant} OTLP exports being received, its share of the "
                    f"receiver's {self.slots}; retry shortly")
        return None

    @contextmanager
    def holding(self, tenant: str) -> Iterator[None]:
        """A slot of `tenant`'s while the block runs (`refusal(tenant)` said None just before)."""
        self.held[tenant] += 1
        try:
            yield
        finally:
            self.held[tenant] -= 1
            if self.held[tenant] <= 0:
                del self.held[tenant]


class BodyPace:
    """How long a body may take: `total_s` at most, and past `grace_s`, `min_rate` bytes a second on average."""

    def __init__(self, total_s: float = BODY_READ_S, grace_s: float = BODY_GRACE_S,
                 min_rate: float = MIN_BODY_RATE) -> None:
        self.total_s, self.grace_s, self.min_rate = total_s, grace_s, min_rate

    def due(self, arrived: int) -> float:
        """Seconds from the body's start by which it must be whole, given the bytes `arrived` so far."""
        return min(self.total_s, self.grace_s + arrived / self.min_rate)

    async def read(self, request: web.Request) -> bytes:
        """The body (as `read_body`), or BodyTooSlow once it falls behind this pace."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        reading = asyncio.ensure_future(read_body(request))
        try:
            while True:
                # Bytes as they arrive (decompressed, so a gzip body counts what it will hold); a wake-up at
                # the time they allow, moved later by what arrived meanwhile.
                await asyncio.wait({reading}, timeout=max(0.0, start + self.due(request.content.total_bytes)
                                                          - loop.time()))
                if reading.done():
                    return reading.result()
                arrived, elapsed = request.content.total_bytes, loop.time() - start
                if elapsed >= self.due(arrived):
                    raise self._too_slow(arrived, elapsed)
        finally:
            if not reading.done():
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)

    def _too_slow(self, arrived: int, elapsed_s: float) -> BodyTooSlow:
        if elapsed_s >= self.total_s:
            return BodyTooSlow(f"the request body did not arrive within {self.total_s:g} s")
        return BodyTooSlow(f"the request body arrived too slowly: {arrived:,} bytes in {elapsed_s:.1f} s, and after "
                           f"the first {self.grace_s:g} s a body must arrive at {self.min_rate / 1024:g} KiB/s or more")
