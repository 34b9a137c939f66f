"""How far a router replica's clock is from the NATS server's. Pure, no I/O.

Rollout times (a rollout's start, its next step or look, a promotion) are written with the clock of the replica
that wrote the route and compared with the clocks of the others, and served events are stamped by whichever replica
served them: replicas must agree on the time (docs/scale.md). Nothing in the route can tell a
skewed writer, so each replica measures its own offset against the server's time (JetStream's answers carry it)
and reports itself degraded past `MAX_SKEW_S`, for an operator to fix its clock (NTP) before it acts on rollouts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lockgate.clock import Offset as Measured
from lockgate.clock import offset as measure

MAX_SKEW_S = 2.0  # beyond this a replica's rollout times are wrong enough to skip a short step or delay
PROBE_EVERY_S = 30.0  # a clock that jumps (a VM resumed from suspend) is seen within this

now = time.time  # the replica's own clock (a test skews it)


@dataclass(frozen=True)
class Offset(Measured):
    """This replica's clock minus the server's (lockgate.clock.Offset), with the router's bound."""

    @property
    def skewed(self) -> bool:
        """True when the offset is surely past MAX_SKEW_S, whichever way."""
        return self.beyond(MAX_SKEW_S)


def offset(sent: float, received: float, server_ts: str) -> Offset | None:
    """`lockgate.clock.offset`, as this replica's Offset."""
    measured = measure(sent, received, server_ts)
    return None if measured is None else Offset(measured.seconds, measured.error_s)
