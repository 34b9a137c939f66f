"""A release's binding as the releases bucket holds it, with the time the bucket stored it.

The bucket is write-once (one message per key, bus.WRITE_ONCE), so the message a key holds is the one that bound
the name, and its stream timestamp is when the name was bound: a time the bus stamped, not one a sender claims.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.errors import NotFound


async def bound(bus: Bus, release: str) -> tuple[dict[str, Any], datetime] | None:
    """(bundle, time it was bound) of `release`, or None when the name binds nothing (not bound, or its key holds
    what binds nothing for every reader alike: artifacts.binding)."""
    try:
        bundle, when = await artifacts.binding(bus, release)
    except NotFound:  # TakenUnbound too
        return None
    return None if when is None else (bundle, when)
