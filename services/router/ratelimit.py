"""Rate limits in requests and tokens per minute per API key: token buckets, pure, clock passed in.

A bucket of capacity `rpm` refills at `rpm / 60` per second, so a key may burst its whole minute and
then goes on at the steady rate; the tokens bucket is charged the request's reservation (prompt
estimate + max_tokens, as OpenAI's own limiter counts) at admission and corrected to the real usage
at settlement. Buckets live in each router replica: with R replicas behind a balancer a key gets at
most R times its limit (README), unless the limit is `shared`.

A `shared` limit is one bucket for every replica, kept in the budgets' KV bucket (the level and the
wall-clock second it was refilled at) and leased like a budget (budgets.py): a replica takes a share
of the level with one compare-and-set, admits requests from that share without touching the KV, and
gives an unused share back after `lease_s`. What a settlement corrects (a reservation's unused part, or a
debt) goes back to the KV too, never into a share: the KV refilled while the request ran, and only there is
the correction capped at the capacity as one bucket's would be. The KV level never goes below zero, so all
replicas together admit at most what one bucket would (`rpm` at once, then `rpm / 60` a second), give or take
the refill of the replicas' clock skew and of what a live share holds unused (within one lease); a share leased and unused waits at most `lease_s` to be
given back, so the others may admit slightly less meanwhile. While the KV is unreachable a shared
limit falls back to this replica's own bucket (at most R times the limit, as unshared).
"""

from __future__ import annotations

import math
from typing import Annotated, NamedTuple

import msgspec

PerMinute = Annotated[int, msgspec.Meta(gt=0)]


class RateLimitSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Limits for every key this selects (`tenant`, `app`, `key` id; empty matches any): each key its own."""

    tenant: str = ""
    app: str = ""
    key: str = ""
    rpm: PerMinute | None = None
    tpm: PerMinute | None = None
    shared: bool = False  # one bucket for all router replicas (KV-leased), not one per replica

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
    """Why a request was refused and when to retry: `math.inf` when no wait admits it (the request alone takes more
    than the limit's whole capacity)."""

    message: str
    retry_after_s: float


Slot = tuple[int, str, str]  # spec index, "requests" or "tokens", key id


class Level(msgspec.Struct, frozen=True, array_like=True):
    """A shared bucket as the KV holds it: its level and the wall-clock second it was refilled at."""

    level: float
    at: float


def refilled(state: Level | None, capacity: int, wall: float) -> float:
    """A shared bucket's level at `wall` (a new one is full)."""
    if state is None:
        return float(capacity)
    return min(float(capacity), state.level + max(0.0, wall - state.at) * capacity / 60.0)


def lease(state: Level | None, capacity: int, wall: float, ask: float, minimum: float,
          back: float = 0.0) -> tuple[Level | None, float | None, float]:
    """Give `back` what this replica owes the bucket (give_back), then take up to `ask` units (at least `minimum`)
    from it: its new state (None when there is nothing to write: refused, nothing given back), the units granted
    (None when not even `minimum` is there) and the seconds until `minimum` would be."""
    level = give_back(state, capacity, wall, back).level if back else refilled(state, capacity, wall)
    if level < minimum:
        return Level(level, wall) if back else None, None, (minimum - level) * 60.0 / capacity
    got = max(minimum, min(ask, level))
    return Level(level - got, wall), got, 0.0


def give_back(state: Level | None, capacity: int, wall: float, units: float) -> Level:
    """Return an unused share (or, negative, charge a debt) to a shared bucket, never above its capacity."""
    return Level(min(float(capacity), refilled(state, capacity, wall) + units), wall)


class Share:
    """What this replica holds of one shared bucket: units leased and not yet used, live until `expires`. Only a
    lease adds to it: a refund kept here, or a balance revived past its expiry, would be spent again on top of
    what the KV refilled meanwhile."""

    __slots__ = ("available", "expires")

    def __init__(self) -> None:
        self.available = 0.0
        self.expires = 0.0


class Lacking(NamedTuple):
    """A shared bucket this replica must lease from before the request can be admitted."""

    slot: Slot
    capacity: int
    units: float  # what the request takes from the bucket
    need: float  # what this replica's share lacks of it


def kv_key(slot: Slot) -> str:
    """A shared bucket's key in the budgets' KV bucket (a budget name cannot start with `_`)."""
    i, kind, key_id = slot
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else f"={ord(c):02X}" for c in key_id) or "="
    return f"_rl.{kind}.{i}.{safe}"


class RateLimiter:
    """Every key's buckets, for the limits declared in the gateway file."""

    def __init__(self, specs: list[RateLimitSpec]) -> None:
        self.specs = specs
        self._buckets: dict[tuple[int, str, str], Bucket] = {}
        self.shares: dict[Slot, Share] = {}
        # What this replica owes each shared bucket, to give back to the KV (before its next lease of it, or at once):
        # settlements' corrections and expired shares' balances.
        self.owed: dict[Slot, float] = {}
        self.local_until = -math.inf  # shared limits use this replica's buckets until then (KV unreachable)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def _bucket(self, i: int, kind: str, key_id: str, capacity: int, now: float) -> Bucket:
        b = self._buckets.get((i, kind, key_id))
        if b is None:
            b = self._buckets[(i, kind, key_id)] = Bucket(capacity, now)
        else:
            b.refill(now)
        return b

    def admit(self, tenant: str, app: str, key_id: str, tokens: int, now: float,
              requests: int = 1) -> Refusal | list[Lacking] | None:
        """Take `requests` (one request, or none for a further reservation of one already admitted) and `tokens`
        from every bucket of this key, or none of them and a Refusal, or, when a shared bucket's share here does
        not cover the request, none of them and what to lease."""
        taken: list[tuple[Bucket, float]] = []
        drawn: list[tuple[Share, float]] = []
        lacking: list[Lacking] = []
        shared_ok = now >= self.local_until
        for i, spec in enumerate(self.specs):
            if not spec.matches(tenant, app, key_id):
                continue
            for kind, capacity, n in (("requests", spec.rpm, requests), ("tokens", spec.tpm, tokens)):
                if capacity is None or (not n and kind == "requests"):
                    continue
                if n > capacity:
                    # Never a wait: a Retry-After of 60 s made the openai SDK sleep a minute before each retry of a
                    # request no bucket can ever hold (2 minutes, then the error).
                    return Refusal(f"this request alone may use up to {n} tokens, more than key {key_id}'s whole "
                                   f"limit of {capacity} tokens per minute", math.inf)
                if spec.shared and shared_ok:
                    share = self._live((i, kind, key_id), now)
                    if share is not None and share.available >= n:
                        drawn.append((share, n))
                    else:
                        lacking.append(Lacking((i, kind, key_id), capacity, n,
                                               n - share.available if share is not None else n))
                    continue
                b = self._bucket(i, kind, key_id, capacity, now)
                wait = b.wait_s(n)
                if wait > 0:
                    return refusal(key_id, capacity, kind, wait)
                taken.append((b, n))
        if lacking:
            return lacking
        for b, n in taken:
            b.level -= n
        for share, n in drawn:
            share.available -= n
        return None

    def _live(self, slot: Slot, now: float) -> Share | None:
        """This replica's share of a shared bucket while its lease runs. Once expired its balance is owed to the KV
        and the share dropped: a later lease starts a new one. (Before, probe p45 F1, a lease was added to the stale
        balance, a settlement's refund among it, and made it live again: a refund spent on top of a KV bucket that
        had refilled meanwhile, more each round.)"""
        share = self.shares.get(slot)
        if share is None or now < share.expires:
            return share
        self.owe(slot, share.available)
        del self.shares[slot]
        return None

    def add_share(self, slot: Slot, units: float, now: float, lease_s: float) -> None:
        """A lease arrived: add it to this replica's live share (a new one when none is), live for `lease_s`."""
        share = self._live(slot, now)
        if share is None:
            share = self.shares[slot] = Share()
        share.available += units
        share.expires = now + lease_s

    def covered(self, slot: Slot, need: float, now: float) -> bool:
        """Whether this replica's share of a shared bucket covers `need` now (another request leased)."""
        share = self._live(slot, now)
        return share is not None and share.available >= need

    def surrender(self, now: float) -> list[Slot]:
        """Drop the shares unused for their lease (every share once `now` is infinite), owing their balances: the
        slots this replica owes something, to give back."""
        for slot in list(self.shares):
            self._live(slot, now)
        return list(self.owed)

    def owe(self, slot: Slot, units: float) -> None:
        """Units (negative: a debt) to give back to a shared bucket's KV level."""
        if units:
            self.owed[slot] = self.owed.get(slot, 0.0) + units

    def take_owed(self, slot: Slot) -> float:
        """What this replica owes a shared bucket, handed over to be given back (once: not owed any more)."""
        return self.owed.pop(slot, 0.0)

    def capacity(self, slot: Slot) -> int:
        """The limit of a slot's bucket."""
        spec = self.specs[slot[0]]
        return (spec.rpm if slot[1] == "requests" else spec.tpm) or 0

    def headers(self, tenant: str, app: str, key_id: str, now: float) -> dict[str, str]:
        """The key's binding limits as OpenAI reports its own (`x-ratelimit-{limit,remaining,reset}-{requests,
        tokens}`, reset as `1m30s`/`250ms`: until the bucket is full again), for a client that paces itself on
        them: per kind, the bucket with the least left of those that apply. A shared limit's level lives in the
        KV, not here: it is left out (none of its kind is reported)."""
        best: dict[str, tuple[float, int, float]] = {}
        for i, spec in enumerate(self.specs):
            if not spec.matches(tenant, app, key_id):
                continue
            for kind, capacity in (("requests", spec.rpm), ("tokens", spec.tpm)):
                if capacity is None:
                    continue
                if spec.shared:
                    best[kind] = (-math.inf, 0, 0.0)  # its kind is not reported
                    continue
                b = self._bucket(i, kind, key_id, capacity, now)
                if kind not in best or b.level < best[kind][0]:
                    best[kind] = (b.level, capacity, (b.capacity - b.level) / b.rate)
        out: dict[str, str] = {}
        for kind, (level, capacity, full_in) in best.items():
            if capacity:
                out[f"x-ratelimit-limit-{kind}"] = str(capacity)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(level)))
                out[f"x-ratelimit-reset-{kind}"] = duration(full_in)
        return out

    def settle(self, tenant: str, app: str, key_id: str, reserved: int, used: int, now: float) -> None:
        """Correct the tokens buckets from the reservation to what the call used."""
        for i, spec in enumerate(self.specs):
            if spec.tpm is not None and spec.matches(tenant, app, key_id):
                if spec.shared and now >= self.local_until:
                    # Back to the KV, never to this replica's share: the KV refilled while the request ran, and
                    # only there is the refund capped at the capacity (a debt delays the next leases there).
                    self.owe((i, "tokens", key_id), reserved - used)
                    continue
                b = self._bucket(i, "tokens", key_id, spec.tpm, now)
                b.credit(reserved - used)


def refusal(key_id: str, capacity: int, kind: str, wait: float) -> Refusal:
    """The 429's words and Retry-After for a bucket that needs `wait` seconds more."""
    return Refusal(f"rate limit of key {key_id} reached: {capacity} {kind} per minute; retry in {wait:.1f}s", wait)


def duration(seconds: float) -> str:
    """A wait as OpenAI's rate-limit headers write it: `250ms`, `1.5s`, `1m30s`."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{text}" if minutes else text
