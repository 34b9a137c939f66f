"""Rate limits in requests and tokens per minute per API key: token buckets, pure, clock passed in.

A bucket of capacity `rpm` refills at `rpm / 60` per second, so a key may burst its whole minute and
then goes on at the steady rate; the tokens bucket is charged the request's reservation (prompt
estimate + max_tokens, as OpenAI's own limiter counts) at admission and corrected to the real usage
at settlement. Buckets live in each router replica: with R replicas behind a balancer a key gets at
most R times its limit (README).
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

PerMinute = Annotated[int, msgspec.Meta(gt=0)]


class RateLimitSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Limits for every key this selects (`tenant`, `app`, `key` id; empty matches any): each key its own."""

    tenant: str = ""
    app: str = ""
    key: str = ""
    rpm: PerMinute | None = None
    tpm: PerMinute | None = None

    def matches(self, tenant: str, app: str, key_id: str) -> bool:
        """True when these limits apply to this key."""
        return (not self.tenant or self.tenant == tenant) and (not self.app or self.app == app) and \
            (not self.key or self.key == key_id)


class Bucket:
    """A token bucket: `level` units now, refilled at `rate` per second up to `capacity`."""

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / 60.0
        self.level = float(capacity)
        self.updated = now

    def refill(self, now: float) -> None:
        """Add what accrued since the last look."""
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_s(self, n: float) -> float:
        """Seconds until `n` units are there (0 when they are); infinite when `n` exceeds the capacity."""
        if n <= self.level:
            return 0.0
        return math.inf if n > self.capacity else (n - self.level) / self.rate

    def credit(self, n: float) -> None:
        """Give back (or, negative, charge) units after the fact; a debt delays the next requests."""
        self.level = min(self.capacity, self.level + n)


class Refusal(msgspec.Struct, frozen=True):
    """Why a request was refused and when to retry."""

    message: str
    retry_after_s: float


class RateLimiter:
    """Every key's buckets, for the limits declared in the gateway file."""

    def __init__(self, specs: list[RateLimitSpec]) -> None:
        self.specs = specs
        self._buckets: dict[tuple[int, str, str], Bucket] = {}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def _bucket(self, i: int, kind: str, key_id: str, capacity: int, now: float) -> Bucket:
        b = self._buckets.get((i, kind, key_id))
        if b is None:
            b = self._buckets[(i, kind, key_id)] = Bucket(capacity, now)
        else:
            b.refill(now)
        return b

    def admit(self, tenant: str, app: str, key_id: str, tokens: int, now: float) -> Refusal | None:
        """Take one request and `tokens` from every bucket of this key, or none of them and a Refusal."""
        taken: list[tuple[Bucket, float]] = []
        for i, spec in enumerate(self.specs):
            if not spec.matches(tenant, app, key_id):
                continue
            for kind, capacity, n in (("requests", spec.rpm, 1), ("tokens", spec.tpm, tokens)):
                if capacity is None:
                    continue
                b = self._bucket(i, kind, key_id, capacity, now)
                wait = b.wait_s(n)
                if wait > 0:
                    if math.isinf(wait):
                        return Refusal(f"this request may use up to {n} tokens, more than key {key_id}'s "
                                       f"limit of {capacity} tokens per minute; lower max_tokens", 60.0)
                    return Refusal(f"rate limit of key {key_id} reached: {capacity} {kind} per minute; "
                                   f"retry in {wait:.1f}s", wait)
                taken.append((b, n))
        for b, n in taken:
            b.level -= n
        return None

    def settle(self, tenant: str, app: str, key_id: str, reserved: int, used: int, now: float) -> None:
        """Correct the tokens buckets from the reservation to what the call used."""
        for i, spec in enumerate(self.specs):
            if spec.tpm is not None and spec.matches(tenant, app, key_id):
                b = self._bucket(i, "tokens", key_id, spec.tpm, now)
                b.credit(reserved - used)
