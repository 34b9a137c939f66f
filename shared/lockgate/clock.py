"""How far this process's clock is from the stack's, read from an answer that says the stack's time. Pure, no I/O.

Events are stamped with their producer's clock and judged by the stack's (the window of `lockgate.limits`, against
the time the bus stored them): a producer whose clock is off has them dead-lettered without knowing. JetStream's
API answers carry the server's time (`ts`: the router reads it, services/router/clock.py); an application's user
may make no JetStream API request, so the gateway's relay stamps its own time on the acknowledgement it passes back
(`TIME_HEADER`), and the SDK reads it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# The header on the relay's acknowledgements that gives the gateway's time when JetStream acknowledged (RFC 3339).
TIME_HEADER = "Lockgate-Time"


@dataclass(frozen=True)
class Offset:
    """This process's clock minus the stack's, in seconds (positive: ahead), known within `error_s` (half the round
    trip of the request whose answer said the stack's time)."""

    seconds: float
    error_s: float

    def beyond(self, limit_s: float) -> bool:
        """True when the offset is surely past `limit_s`, whichever way."""
        return abs(self.seconds) - self.error_s > limit_s


def offset(sent: float, received: float, server_ts: str | None) -> Offset | None:
    """The offset from a request sent and answered at local times `sent` and `received` whose answer says the
    server's time `server_ts` (RFC 3339, as JetStream's `ts`); None when the answer has no readable time (a
    server older than 2.10, a gateway older than the SDK)."""
    try:
        server = datetime.fromisoformat(server_ts).timestamp()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return Offset(seconds=(sent + received) / 2 - server, error_s=max(0.0, received - sent) / 2)
