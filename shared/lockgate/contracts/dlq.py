"""Dead letters: what could not be processed, why, and the original bytes."""

from __future__ import annotations

from lockgate.contracts.envelope import Event


class DeadLetter(Event, frozen=True, kw_only=True, tag="lockgate.dlq"):
    """An unprocessable message, kept whole so nothing is lost."""

    origin: str
    subject: str
    reason: str
    error: str = ""
    payload: bytes = b""
    headers: dict[str, str] = {}
    deliveries: int = 1
    # Where the original is stored (JetStream stream and sequence), so the sink can delete an
    # unreadable original once this letter is stored; empty for letters made outside a consumer.
    stream: str = ""
    stream_seq: int = 0
    # Set when a payload too large for one NATS message was cut to its start: the original's size;
    # 0: `payload` is whole.
    cut_from: int = 0
    # With `cut_from`: the object (in the `<prefix>_dlq_originals` bucket) holding the whole original, scrubbed
    # like `payload`; its name ends with the sha256 of those bytes (`lockgate dlq --original NAME` reads it).
    # Empty with `cut_from` when the bucket refused it (full): the bytes past the cut are lost, as `error` says.
    original: str = ""
