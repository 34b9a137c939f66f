"""Identifiers: UUIDv7 event ids and canonical content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import msgspec

_last = 0
_prefix = ""  # the id's first 15 characters, for the millisecond `_last`
# Random bytes are read from the OS in blocks, kept as hex: one getrandom() call per id cost a quarter
# of making an event, and the bytes are as unpredictable either way. Each id takes 20 hex digits (10
# bytes) of the pool; the RFC 9562 variant (binary 10xx) is set in the whole pool at once, in C, on the
# byte of each 10 that holds it, so an id is only sliced out of the pool, never patched digit by digit.
_POOL = 4000  # hex digits: 200 ids
_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))  # a byte with its top two bits set to 10
_pool = ""
_pos = _POOL


def _new_pool() -> None:
    # A forked child must not reuse its parent's unread random bytes (two processes, same ids).
    global _pool, _pos
    _pool, _pos = "", _POOL


os.register_at_fork(after_in_child=_new_pool)


def _fill() -> str:
    raw = bytearray(os.urandom(_POOL // 2))
    raw[2::10] = raw[2::10].translate(_VARIANT)  # hex digits 4-5 of each id: the variant's
    return raw.hex()


# Set while a consumer decodes one bus message (`derived_ids`): [seed, milliseconds, ids made so far].
_derivation: ContextVar[list[Any] | None] = ContextVar("lockgate_id_derivation", default=None)


@contextlib.contextmanager
def derived_ids(seed: str, ms: int) -> Iterator[None]:
    """Within it (on this thread), the ids uuid7() makes are derived from `seed` (a bus message's own name: its
    Nats-Msg-Id, else its stream and sequence), `ms` (its stored time) and their order. An event an application
    published without an id is then given the same one by every consumer that decodes the message, and on every
    redelivery: stored once, and billed under the id it is stored under. (A random id per decode stored such an
    event twice after a crash, and its ledger entry never named it: probe p4.)"""
    token = _derivation.set([seed, ms, 0])
    try:
        yield
    finally:
        _derivation.reset(token)


def _derived(state: list[Any]) -> str:
    seed, ms, n = state
    state[2] = n + 1
    h = hashlib.sha256(f"{seed}\x00{n}".encode()).hexdigest()
    return f"{uuid7_prefix(ms)}-7{h[:3]}-{'89ab'[int(h[3], 16) & 3]}{h[4:7]}-{h[7:19]}"


def uuid7() -> str:
    """A time-ordered UUIDv7 string (RFC 9562); monotonic within this process (derived within `derived_ids`)."""
    global _last, _prefix, _pool, _pos
    if (derivation := _derivation.get()) is not None:
        return _derived(derivation)
    ms = time.time_ns() // 1_000_000
    if ms > _last or not _prefix:  # the millisecond part is formatted once per millisecond
        _last = ms = max(ms, _last)
        _prefix = f"{uuid7_prefix(ms)}-7"
    p = _pos
    if p >= _POOL:
        _pool, p = _fill(), 0
    _pos = p + 20
    r = _pool  # 80 random bits, of which the version (digit 0, not used) and variant take 6
    return f"{_prefix}{r[p + 1 : p + 4]}-{r[p + 4 : p + 8]}-{r[p + 8 : p + 20]}"


def uuid7_prefix(ms: int) -> str:
    """The first 13 characters of a UUIDv7 made at `ms` (milliseconds since the epoch): its 48 bits of time in hex,
    so that such prefixes sort as their times do."""
    t = (ms & 0xFFFFFFFFFFFF).to_bytes(6, "big").hex()
    return f"{t[:8]}-{t[8:12]}"


_UUID7 = re.compile(r"^([0-9a-f]{8})-([0-9a-f]{4})-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def uuid7_time(value: str) -> datetime | None:
    """The millisecond a UUIDv7 was made (its first 48 bits), or None when `value` is not one."""
    m = _UUID7.match(value.lower())
    return datetime.fromtimestamp(int(m.group(1) + m.group(2), 16) / 1000, UTC) if m else None


def derived_id(namespace: str, *parts: str) -> str:
    """A UUIDv8 that is a pure function of its inputs: a fact derived from other events gets the same id
    (and so the same Nats-Msg-Id) however often it is recomputed."""
    h = bytearray(hashlib.sha256("\x00".join((namespace, *parts)).encode()).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x80  # version 8: custom
    h[8] = (h[8] & 0x3F) | 0x80  # RFC 9562 variant
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


_canon = msgspec.json.Encoder(order="sorted")


def canonical_json(value: object) -> bytes:
    """Canonical JSON: sorted keys, no whitespace; the same content always gives the same bytes."""
    return _canon.encode(value)


def content_hash(data: bytes | object) -> str:
    """sha256 of raw bytes, or of the canonical JSON of a value: 'sha256:<hex>'."""
    raw = data if isinstance(data, bytes | bytearray) else canonical_json(data)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def trace_id() -> str:
    """A random 128-bit W3C trace id (32 hex)."""
    return os.urandom(16).hex()


def span_id() -> str:
    """A random 64-bit W3C span id (16 hex)."""
    return os.urandom(8).hex()


def batch_id(events: Sequence[Any]) -> str:
    """Deterministic id for a batch: the same events give the same Nats-Msg-Id. An event is its tenant, app
    and id (producers choose ids, so another tenant's or app's batch under the same ids must not be taken for
    this one and dropped by JetStream as its duplicate)."""
    # One hash of the (tenant, app, id) triples joined: the same bytes, so the same digest, as one by one.
    return "b-" + hashlib.sha256("".join([f"{e.tenant}\x00{getattr(e, 'app', '')}\x00{e.id}\x00"
                                          for e in events]).encode()).hexdigest()[:40]
