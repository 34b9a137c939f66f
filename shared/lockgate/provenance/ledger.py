"""The provenance stream: append a record after the one the writer read, read a subject's records back.

Appends are conditional on the subject's last stream sequence (`Nats-Expected-Last-Subject-Sequence`),
so two writers racing on one alias cannot both chain onto the same record: the second is refused and
says so. The stream denies deletes and purges, and keeps every record for ever: a message nobody trusted
signed stays too, so reading skips it (`chain.read`) and says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors

from lockgate import metrics
from lockgate.bus import Bus
from lockgate.codec import encode
from lockgate.contracts.provenance import AliasChanged, ArtifactLifecycle
from lockgate.errors import BusUnavailable, ConfigError
from lockgate.provenance import chain

R = TypeVar("R", AliasChanged, ArtifactLifecycle)
log = logging.getLogger("lockgate.provenance")


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


async def messages(bus: Bus, subject: str) -> list[tuple[int, bytes]]:
    """Every message on `subject` (stream sequence, bytes), oldest first (one message-get each: histories
    are short)."""
    out: list[tuple[int, bytes]] = []
    seq = 1
    while True:
        try:
            msg = await bus.js.get_msg(_stream(bus), seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return out
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read the provenance stream ({subject}): {exc!r}") from None
        out.append((int(msg.seq), msg.data or b""))
        seq = int(msg.seq) + 1


async def read(bus: Bus, subject: str, kind: type[R], owner: str,
               verify: Callable[[R], str]) -> chain.History[R]:
    """The verified history of `owner` on `subject`, with what it skipped; ChainBroken if a signed record does
    not follow it."""
    return chain.read(subject, await messages(bus, subject), kind, owner, verify)


# (subject, stream sequence) of the skipped messages this process has logged: a service logs each once, not at
# every read (the gatekeeper reads a lifecycle per decision). Bounded: past it, a message may be logged again.
_reported: set[tuple[str, int]] = set()
_REPORTED_MAX = 10_000


def reported(skipped: Iterable[chain.Skipped]) -> None:
    """Log and count each skipped message the first time this process sees it (a service's reads; the CLI
    shows its own summary)."""
    for s in skipped:
        if (s.subject, s.stream_seq) in _reported:
            continue
        if len(_reported) >= _REPORTED_MAX:
            _reported.clear()
        _reported.add((s.subject, s.stream_seq))
        log.warning("provenance %s", s.message())
        metrics.provenance_skipped(s.kind)


async def subjects(bus: Bus, pattern: str) -> dict[str, int]:
    """The subjects under `pattern` that hold messages, and how many each holds: every page of them. nats-server
    answers a stream info with at most 100,000 subjects (and nats-py asks for the first page only), so 100,000 junk
    subjects sorting first hid every genuine one (probe p32: a sunset a gatekeeper's start missed)."""
    found: dict[str, int] = {}
    while True:
        try:
            reply = await bus.nc.request(f"$JS.API.STREAM.INFO.{_stream(bus)}",
                                         json.dumps({"subjects_filter": pattern, "offset": len(found)}).encode(),
                                         timeout=10)
            info = json.loads(reply.data)
        except (nats.errors.Error, TimeoutError, ValueError) as exc:
            raise BusUnavailable(f"cannot list the provenance stream: {exc!r}") from None
        if "error" in info:
            raise BusUnavailable(f"cannot list the provenance stream: {info['error'].get('description', info)}")
        page = info.get("state", {}).get("subjects") or {}
        found.update(page)
        if not page or len(found) >= info.get("total", 0):
            return dict(sorted(found.items()))
