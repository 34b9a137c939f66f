"""A release's binding as the releases bucket holds it, with the time the bucket stored it (adapter, translates
errors).

The bucket is write-once (one message per key, bus.WRITE_ONCE), so the message a key holds is the one that bound
the name, and its stream timestamp is when the name was bound: a time the bus stamped, not one a sender claims.
Read by message get (STREAM.MSG.GET returns the timestamp; a KV get does not), which the recorder's grant holds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors

from lockgate.artifacts import bound_bundle
from lockgate.bus import Bus
from lockgate.errors import BusUnavailable
from lockgate.subjects import token


async def bound(bus: Bus, release: str) -> tuple[dict[str, Any], datetime] | None:
    """(bundle, time it was bound) of `release`, or None when the name is not bound (or its key holds no bundle of
    this name, or a line's version name bound to other content: for every reader alike, artifacts.bound_bundle,
    no binding of it)."""
    bucket = bus.subjects.kv_releases
    try:
        msg = await bus.js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{token(release)}")
    except nats.js.errors.NotFoundError:
        return None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot read the binding of release {release!r}: {exc!r}") from None
    if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or msg.time is None:
        return None
    bundle, _ = bound_bundle(release, msg.data)
    return None if bundle is None else (bundle, msg.time)
