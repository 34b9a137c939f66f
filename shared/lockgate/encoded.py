"""The unit every producer of inference events hands on: one event scrubbed and encoded once (see
`lockgate.outbox.encode_event`), which the outbox publishes and the spool keeps. The SDK imports it."""

from __future__ import annotations

import msgspec


class Encoded(msgspec.Struct, frozen=True, gc=False):
    """One inference event ready to leave the process: scrubbed and encoded once.

    Not tracked by the garbage collector (it holds only strings and bytes): a buffer of thousands of
    them waiting to be published made the collector run every 700 emits otherwise."""

    app: str
    id: str
    tenant: str  # with `id`, what makes the event one (and its batch's message id)
    traceparent: str  # the event's request, continued by the message that carries it ("" if none)
    data: bytes
