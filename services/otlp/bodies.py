"""OTLP/HTTP request bodies being received: how many at once, whose, and how slowly they may arrive.

A body is held in memory while it arrives (16 MiB at most), so the bodies being received are bounded: before, 40
connections trickling 16 MB bodies a byte at a time held 600 MB for as long as they liked. Found by a later
probe (p37 F2): one app key trickling bodies, and re-sending each as soon as it was dropped, held all 8 slots, and
another tenant's exports were answered 503 for as long as it went on. So each tenant may hold a share of the slots,
and a body must keep up a minimum rate, as well as arrive within its total time.
"""

from __future__ import annotations

import msgspec

from lockgate.server.httpguard import HttpLimits
from lockgate.server.offloop import Shares

MAX_BODIES = 8  # 8 x 16 MiB held at most
# One tenant's share: with the receiver to itself it still sends several exports at once (a Collector's
# exporter runs a few in parallel), and the other half stays free for the other tenants.
TENANT_BODIES = 4
BODY_READ_S = 30.0  # the longest any body may take
# After the first BODY_GRACE_S, a body must have arrived at the servers' minimum rate (`http_body_min_rate`,
# 16 KiB/s) on average. A real exporter's body arrives in milliseconds; a trickle of bytes is cut at about 5 s
# (before, it held its slot the whole 30 s, and was re-sent at once).
BODY_GRACE_S = 5.0


def otlp_limits(limits: HttpLimits) -> HttpLimits:
    """The server's body limits (`read_body`'s), with OTLP's shorter times: an exporter's body arrives in
    milliseconds, and each slot it holds is one of a few."""
    return msgspec.structs.replace(limits, body_max_s=min(limits.body_max_s, BODY_READ_S),
                                   body_grace_s=min(limits.body_grace_s, BODY_GRACE_S))


class BodySlots(Shares):
    """`slots` bodies received at once, at most `per_tenant` of them one tenant's.

    Counted by the authenticated key's tenant, not by key: keys are minted per app (and two live through a
    rotation), so a share per key would give a tenant with a few keys the whole receiver again; the tenant is
    the boundary the threat model keeps. A request past either limit is refused at once (503, retry), never
    queued: a queued one would hold its connection, and the exporter's 10 s, for nothing."""

    def __init__(self, slots: int = MAX_BODIES, per_tenant: int = TENANT_BODIES) -> None:
        super().__init__(slots, per_tenant)  # counted as the receiver's decode slots are (`holding` takes one)

    @property
    def slots(self) -> int:
        """Bodies received at once, at most."""
        return self.total

    @property
    def per_tenant(self) -> int:
        """Of them, one tenant's at most."""
        return self.per_owner

    def refusal(self, tenant: str) -> str | None:
        """Why `tenant` may not take a slot now (a retryable answer's message), or None when it may."""
        if self.full():
            return "too many OTLP exports being received; retry shortly"
        if self.owner_full(tenant):
            return (f"tenant {tenant} already has {self.per_tenant} OTLP exports being received, its share of the "
                    f"receiver's {self.slots}; retry shortly")
        return None
