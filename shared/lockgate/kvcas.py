"""Read-modify-write of a NATS KV key by compare-and-set: shared counters that several replicas change.

One mechanism for every counter lockgate keeps across replicas: the router's budget counters and shared
rate-limit buckets (services/router/admission.py) and the evaluator's judge budgets. A writer reads the
key and its revision, computes the new state, and writes it only if the revision is still the one it
read; another replica's write in between makes it read again. The store failing is KVUnavailable (never
a NATS or timeout error), and for `retry_s` after a failure every call fails at once, so callers queued
behind one do not each wait out the timeout again. A failure once the write was sent is KVOutcomeUnknown:
the server may have applied it with only its answer late, so a caller must not send it again as if not.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from lockgate.errors import LockgateError

KV_ERRORS = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)
RETRY_S = 1.0  # after the store failed, calls fail at once for this long
_enc = msgspec.json.Encoder()


class KVUnavailable(LockgateError):
    """A KV bucket of shared counters did not answer (or held a value that cannot be read: KVUnreadable)."""


class KVUnreadable(KVUnavailable):
    """The store answered, but a key holds a value its reader cannot decode (JetStream's answer to a publish or API
    request aimed at the key, say). No outage: a caller that lets traffic through while the store is down must
    refuse on this (it is a KVUnavailable for the callers that refuse on both)."""


class KVOutcomeUnknown(KVUnavailable):
    """The store did not answer a write already sent (timeout, connection lost): it may have been applied (a late
    or lost acknowledgement). A caller that credits or gives back must not send it again (it would land twice);
    a caller that takes keeps what it may have taken counted (it cannot tell)."""


class CasStore:
    """The keys of one KV bucket, each changed only by compare-and-set within `timeout_s`."""

    def __init__(self, bus: Any, bucket: str, *, timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 what: str = "the store") -> None:
        self.bus = bus
        self.bucket = bucket
        self.timeout_s = timeout_s
        self.clock = clock
        self.what = what  # how errors name the store, e.g. "the budget store"
        self._kv: Any = None
        self.failed_at, self.failure = -math.inf, ""

    async def kv(self) -> Any:
        """The bucket's handle, or KVUnavailable right after a failure or while the bus is down."""
        if self.clock() - self.failed_at < RETRY_S:
            raise KVUnavailable(self.failure)
        if self.bus is None or self.bus.state != "connected":
            raise KVUnavailable(f"{self.what} (NATS KV) is unreachable: bus "
                                f"{'absent' if self.bus is None else self.bus.state}")
        if self._kv is None:
            self._kv = await self.bus.kv(self.bucket)
        return self._kv

    async def update(self, key: str, decode: Callable[[bytes], Any], step: Callable[[Any], tuple[Any, Any]],
                     what: str, store: str | None = None, ttl_s: float | None = None) -> Any:
        """`step(state or None)` gives (the new state, or None to write nothing, and the result to return);
        the new state is written only over the revision read, else read again. `what` names the key and
        `store` the store in errors; `ttl_s`: the value written expires after that long (Nats-TTL), an update's as a
        create's (its life begins again). Store failures are KVUnavailable; KVOutcomeUnknown once the write was sent (it may have been applied)."""
        store = store or self.what
        sent = False  # a write is on its way: its answer alone tells whether it was applied
        try:
            async with asyncio.timeout(self.timeout_s):
                kv = await self.kv()
                while True:
                    try:
                        entry = await kv.get(key)
                        rev, state = entry.revision, decode(entry.value)
                    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                        rev, state = None, None
                    after, result = step(state)
                    if after is None:
                        return result
                    sent = True
                    try:
                        if rev is None:
                            await kv.create(key, _enc.encode(after), msg_ttl=ttl_s)
                        elif ttl_s is None:
                            await kv.update(key, _enc.encode(after), last=rev)
                        else:  # nats-py's update takes no msg_ttl; its _update, which its create calls, does
                            await kv._update(key, _enc.encode(after), last=rev, msg_ttl=ttl_s)
                    except nats.js.errors.KeyWrongLastSequenceError:
                        sent = False  # refused: another replica changed it in between; read again
                        continue
                    return result
        except KVUnavailable as exc:
            self._failed(exc.message)
            raise
        except msgspec.DecodeError as exc:
            raise KVUnreadable(f"{what} is unreadable: {exc}") from None
        except KV_ERRORS as exc:
            message = f"{store} (NATS KV bucket {self.bucket}) did not answer: {type(exc).__name__}"
            self._failed(message)
            if sent:
                raise KVOutcomeUnknown(f"{message} (to a write of {what} it may have applied)") from None
            raise KVUnavailable(message) from None

    def _failed(self, message: str) -> None:
        if self.clock() - self.failed_at >= RETRY_S:  # keep the first failure's time and words
            self.failed_at, self.failure = self.clock(), message
