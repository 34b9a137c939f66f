"""How far a router replica's clock is from the NATS server's. Pure, no I/O.

Rollout times (a rollout's start, its next step or look, a promotion) are written with the clock of the replica
that wrote the route and compared with the clocks of the others, and served events are stamped by whichever replica
served them: replicas must agree on the time (the README's "Running at scale"). Nothing in the route can tell a
skewed writer, so each replica measures its own offset against the server's time (JetStream's answers carry it)
and reports itself degraded past `MAX_SKEW_S`, for an operator to fix its clock (NTP) before it acts on rollouts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

MAX_SKEW_S = 2.0  # beyond this a replica's rollout times are wrong enough to skip a short step or delay
PROBE_EVERY_S = 30.0  # a clock that jumps (a VM resumed from suspend) is seen within this

now = time.time  # the replica's own clock (a test skews it)


@dataclass(frozen=True)
class Offset:
    """This replica's clock minus the server's, in seconds (positive: ahead), known within `error_s` (half the
    round trip of the request that read the server's time)."""

    seconds: float
    error_s: float

    @property
    def skewed(self) -> bool:
        """True when the offset is surely past MAX_SKEW_S, whichever way."""
        return abs(self.seconds) - self.error_s > MAX_SKEW_S


def offset(sent: float, received: float, server_ts: str) -> Offset | None:
    """The offset from a request sent and answered at local times `sent` and `received` whose answer says the
    server's time `server_ts` (RFC 3339, as JetStream's `ts`); None when the answer has no readable time (a
    server older than 2.10)."""
    try:
        server = datetime.fromisoformat(server_ts).timestamp()
    except (TypeError, ValueError):
        return None
    return Offset(seconds=(sent + received) / 2 - server, error_s=max(0.0, received - sent) / 2)
