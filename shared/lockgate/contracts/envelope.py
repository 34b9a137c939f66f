"""The CloudEvents-style envelope every lockgate event carries."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

import msgspec

from lockgate.contracts.bounds import Who
from lockgate.contracts.names import EventId, Name, SpanId, TraceId, check_ids, check_names, deferral
from lockgate.ids import uuid7

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    """Timezone-aware now in UTC."""
    return datetime.now(UTC)


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=False):
    """Envelope: `type` is the tag, `id` (UUIDv7) the idempotency key."""

    # Any client-chosen string within bounds (a UUIDv7 by default): the key every table stores an event once by.
    id: EventId = msgspec.field(default_factory=uuid7)
    # Who made it (a service's or client's name): bounded like every other envelope field, so no event carries a
    # megabyte here.
    source: Who = "lockgate"
    # `utcnow` as a partial, which msgspec calls without a Python frame: every event made is timed.
    time: datetime = msgspec.field(default_factory=functools.partial(datetime.now, UTC))
    tenant: Name = "default"
    trace_id: TraceId = ""
    span_id: SpanId = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not deferral.active:  # else checked per decoded batch (lockgate.codec, names.deferred)
            check_ids(self)
            check_names(self)
