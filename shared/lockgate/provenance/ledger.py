"""The provenance stream: append a record after the one the writer read, read a subject's records back.

Appends are conditional on the subject's last stream sequence (`Nats-Expected-Last-Subject-Sequence`),
so two writers racing on one alias cannot both chain onto the same record: the second is refused and
says so. The stream denies deletes and purges, and keeps every record for ever.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors

from lockgate.bus import Bus
from lockgate.codec import encode
from lockgate.contracts.provenance import AliasChanged, ArtifactLifecycle
from lockgate.errors import BusUnavailable, ConfigError, InvalidEvent

R = TypeVar("R", AliasChanged, ArtifactLifecycle)


class ConcurrentChange(ConfigError):
    """Someone else appended to the same history between our read and our write."""

    exit_code = 1


def _stream(bus: Bus) -> str:
    return bus.subjects.streams["provenance"].name


async def append(bus: Bus, subject: str, record: Any, after_seq: int) -> int:
    """Append `record` if the subject's last stream sequence is still `after_seq` (0: none yet); its sequence."""
    headers = {"Nats-Msg-Id": record.id, "Nats-Expected-Last-Subject-Sequence": str(after_seq)}
    try:
        ack = await bus.js.publish(subject, encode(record), headers=headers, timeout=5)
    except nats.js.errors.APIError as exc:
        if getattr(exc, "err_code", None) == 10071 or "wrong last sequence" in str(exc):
            raise ConcurrentChange(f"{subject} changed while this change was being made; run it again") from None
        raise BusUnavailable(f"the provenance stream refused the record on {subject}: {exc}") from None
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot append to the provenance stream ({subject}): {exc!r}") from None
    return int(ack.seq)


def _decode(data: bytes, kind: type[R], subject: str, seq: int) -> R:
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError as exc:
        raise InvalidEvent(f"provenance record {seq} on {subject} is not a {kind.__name__}: {exc}") from None


async def last(bus: Bus, subject: str, kind: type[R]) -> tuple[int, R] | None:
    """The stream sequence and record last appended on `subject`, or None if it has none."""
    try:
        msg = await bus.js.get_last_msg(_stream(bus), subject)
    except nats.js.errors.NotFoundError:
        return None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot read the provenance stream ({subject}): {exc!r}") from None
    return int(msg.seq), _decode(msg.data or b"", kind, subject, int(msg.seq))


async def history(bus: Bus, subject: str, kind: type[R]) -> list[R]:
    """Every record appended on `subject`, oldest first (one message-get per record: histories are short)."""
    out: list[R] = []
    seq = 1
    while True:
        try:
            msg = await bus.js.get_msg(_stream(bus), seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return out
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read the provenance stream ({subject}): {exc!r}") from None
        out.append(_decode(msg.data or b"", kind, subject, int(msg.seq)))
        seq = int(msg.seq) + 1


async def subjects(bus: Bus, pattern: str) -> list[str]:
    """The subjects under `pattern` that hold records."""
    try:
        info = await bus.js.stream_info(_stream(bus), subjects_filter=pattern)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot list the provenance stream: {exc!r}") from None
    return sorted((info.state.subjects or {}).keys())
