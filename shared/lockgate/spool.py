"""A local, append-only spool of the events an Outbox accepted, so that they outlive its process.

An Outbox answers its producer at once and publishes later: events wait in memory until JetStream
acknowledges them, and a process killed meanwhile (kill -9, the OOM killer) would lose them. With a
Spool, each event is appended to the spool's current segment as it enters the buffer; when a batch
is acknowledged, its records' numbers are appended to the segment's ack file; a segment whose records
are all acknowledged is deleted. The next process that opens the directory re-enqueues every record
of the earlier segments that no ack file lists, before anything new.

What it protects against is the death of the process: a record is one `writev` into the kernel's page
cache, which a killed process cannot take back, with no `fsync` (one per event would cost milliseconds
on the request path). A machine that crashes or loses power may lose what the kernel had not written
back yet; a torn or garbled last record (length + CRC-32 framing) is detected and skipped at the next
start, never read as an event.

A re-published event is harmless: the event was spooled under its id, JetStream drops a message
whose Nats-Msg-Id it saw within its duplicate window, and the sink stores one row per (tenant, app, id)
whatever messages carry it. Only an acknowledgement the process did not live to record is published
again; a record is never published twice by one process.

One directory is one process's: a lock (`flock` on `LOCK`, released by the kernel when the process
dies however it dies) refuses a second. `claim()` takes the first free directory of a numbered
series, so replicas on one machine never share one, and a restarted replica takes over the spool a
dead one left. Segments and ack files are in the machine's byte order: a spool is read where it was
written. The files hold event bytes (scrubbed prompts and responses): the directory is 0700.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from array import array
from collections.abc import Iterable
from pathlib import Path

import msgspec

from lockgate.encoded import Encoded
from lockgate.errors import LockgateError

log = logging.getLogger("lockgate.spool")

MiB = 1024 * 1024
_HEAD = struct.Struct("<II")  # payload length, CRC-32 of the payload
_SEGMENT = 1 << 32  # a ticket is segment * _SEGMENT + record: one int per event, split by a shift
_ACK = "I"  # ack files: record numbers as unsigned 32-bit ints
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(tuple[str, str, str, str, bytes]).decode


class SpoolBusy(LockgateError):
    """A spool directory is held by another live process (each process needs a directory of its own)."""


class Spooled(Encoded, frozen=True, gc=False):
    """An Encoded event with its place in the spool (`segment * 2**32 + record`), -1 if not spooled."""

    ticket: int = -1


class _Segment:
    __slots__ = ("seq", "records", "acked", "size", "ack_fd")

    def __init__(self, seq: int, records: int = 0, acked: int = 0, size: int = 0) -> None:
        self.seq = seq
        self.records = records  # records written (or read back whole)
        self.acked = acked  # records settled
        self.size = size  # bytes of the segment file
        self.ack_fd = -1


class Spool:
    """An append-only spool in `directory` (created 0700, locked for this process until `close()`).

    `append` is the hot path: one `writev`, no open, no fsync. It refuses (counted in `refused`; the
    event then lives in memory only, as without a spool) once the live segments hold `max_bytes`, or
    when the disk refuses the write. `settle` records events as done (acknowledged, or given up by
    the buffer on purpose). `take_recovered()` hands over, once, what earlier processes left unsettled.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = 512 * MiB,
                 segment_bytes: int = 8 * MiB) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.refused = 0  # events not spooled: the spool was full or the disk refused the write
        self.torn = 0  # records found torn or garbled at start (and skipped)
        self._bytes = 0  # bytes of every live segment
        self._segments: dict[int, _Segment] = {}
        self._fd = -1
        self._current: _Segment | None = None
        self._last_seq = 0
        self._lock_fd = -1
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = _lock(self.directory)
        try:
            self._recovered = self._recover()
            self._open(self._last_seq + 1)
        except BaseException:
            self.close()
            raise

    # -- the hot path ---------------------------------------------------------------------------------

    def append(self, event: Encoded) -> Spooled:
        """Write one event's record; returns it with its ticket (-1 if refused: then it is not durable)."""
        payload = _encode((event.app, event.id, event.tenant, event.traceparent, event.data))
        size = _HEAD.size + len(payload)
        seg = self._current
        if seg is None or self._fd < 0:
            return self._refuse(event, "closed")
        if self._bytes + size > self.max_bytes:
            return self._refuse(event, "full")
        if seg.size >= self.segment_bytes and seg.records:
            seg = self._rotate()
            if seg is None:
                return self._refuse(event, "closed")
        try:
            written = os.writev(self._fd, (_HEAD.pack(len(payload), zlib.crc32(payload)), payload))
        except OSError as exc:
            written = -1
            log.warning("spool %s: append failed: %r", self.directory, exc)
        if written != size:  # a short write (disk full) must not leave half a record before the next one
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.size)
            return self._refuse(event, "write_failed")
        index = seg.records
        seg.records += 1
        seg.size += size
        self._bytes += size
        return Spooled(event.app, event.id, event.tenant, event.traceparent, event.data,
                       ticket=seg.seq * _SEGMENT + index)

    def settle(self, events: Iterable[Encoded]) -> None:
        """Record events as done: an earlier process's ack file lists them, so they are not re-enqueued.
        Never raises (a failed ack write only means the event is published again by the next start)."""
        by_segment: dict[int, array[int]] = {}
        for event in events:
            ticket = getattr(event, "ticket", -1)  # an event the spool refused has none
            if ticket >= 0:
                seq = ticket >> 32
                if (numbers := by_segment.get(seq)) is None:
                    numbers = by_segment[seq] = array(_ACK)
                numbers.append(ticket & 0xFFFFFFFF)
        for seq, numbers in by_segment.items():
            seg = self._segments.get(seq)
            if seg is None:
                continue  # closed meanwhile
            try:
                if seg.ack_fd < 0:
                    seg.ack_fd = os.open(self._path(seq, "ack"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                         0o600)
                os.write(seg.ack_fd, numbers.tobytes())
            except OSError as exc:
                log.warning("spool %s: could not record %d acknowledgements: %r", self.directory, len(numbers), exc)
                continue
            seg.acked += len(numbers)
            if seg.acked >= seg.records and seg is not self._current:
                self._delete(seg)

    # -- the rest -------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records written (by this process or earlier ones) and not settled yet."""
        return sum(s.records - s.acked for s in self._segments.values())

    @property
    def size(self) -> int:
        """Bytes of the live segments (what `max_bytes` bounds)."""
        return self._bytes

    def take_recovered(self) -> list[Spooled]:
        """What earlier processes left unsettled, oldest first; empty after the first call."""
        events, self._recovered = self._recovered, []
        return events

    def close(self) -> None:
        """Close the files and release the directory; unsettled records stay for the next process."""
        current = self._current
        self._current = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if current is not None and current.acked >= current.records:
            self._delete(current)
        left = self.pending
        for seg in self._segments.values():
            if seg.ack_fd >= 0:
                os.close(seg.ack_fd)
                seg.ack_fd = -1
        self._segments.clear()
        if left:
            log.warning("spool %s: %d events not published yet are kept for the next start", self.directory, left)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1

    def _refuse(self, event: Encoded, reason: str) -> Spooled:
        self.refused += 1
        if self.refused == 1 or self.refused % 10_000 == 0:
            log.warning("spool %s: %s, %d events kept in memory only so far", self.directory, reason, self.refused)
        return Spooled(event.app, event.id, event.tenant, event.traceparent, event.data)

    def _path(self, seq: int, kind: str) -> Path:
        return self.directory / f"{seq:016d}.{kind}"

    def _open(self, seq: int) -> None:
        self._fd = os.open(self._path(seq, "seg"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._current = self._segments[seq] = _Segment(seq)

    def _rotate(self) -> _Segment | None:
        done = self._current
        assert done is not None
        os.close(self._fd)
        self._fd = -1
        self._current = None
        if done.acked >= done.records:
            self._delete(done)
        try:
            self._open(done.seq + 1)
        except OSError as exc:
            log.warning("spool %s: cannot open a new segment: %r", self.directory, exc)
        return self._current

    def _delete(self, seg: _Segment) -> None:
        if seg.ack_fd >= 0:
            os.close(seg.ack_fd)
            seg.ack_fd = -1
        for kind in ("seg", "ack"):
            with contextlib.suppress(FileNotFoundError):
                self._path(seg.seq, kind).unlink()
        self._bytes -= seg.size
        self._segments.pop(seg.seq, None)

    def _recover(self) -> list[Spooled]:
        seqs = sorted({int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit()})
        self._last_seq = max([0, *seqs, *(int(p.stem) for p in self.directory.glob("*.ack") if p.stem.isdigit())])
        for ack in self.directory.glob("*.ack"):  # of a segment deleted before its ack file
            if ack.stem.isdigit() and int(ack.stem) not in seqs:
                ack.unlink()
        events: list[Spooled] = []
        for seq in seqs:
            data = self._path(seq, "seg").read_bytes()
            records, end = _records(data)
            if end < len(data):
                self.torn += 1
                log.warning("spool %s: segment %d is torn or garbled at byte %d of %d (a process died mid-write); "
                            "the %d records before it are kept", self.directory, seq, end, len(data), len(records))
            acked = _acked(self._path(seq, "ack"), len(records))
            seg = self._segments[seq] = _Segment(seq, records=len(records), acked=len(acked), size=len(data))
            self._bytes += len(data)
            if seg.acked >= seg.records:
                self._delete(seg)
                continue
            events.extend(Spooled(*fields, ticket=seq * _SEGMENT + i)
                          for i, fields in enumerate(records) if i not in acked)
        if events:
            log.info("spool %s: %d events left by an earlier process are published first", self.directory, len(events))
        return events


def _records(data: bytes) -> tuple[list[tuple[str, str, str, str, bytes]], int]:
    """The whole records at the start of a segment, and where they end (before a torn or garbled one)."""
    view = memoryview(data)
    records = []
    at = 0
    while at + _HEAD.size <= len(data):
        length, crc = _HEAD.unpack_from(data, at)
        start = at + _HEAD.size
        payload = view[start:start + length]
        if length == 0 or len(payload) < length or zlib.crc32(payload) != crc:
            break
        try:
            records.append(_decode(payload))
        except msgspec.DecodeError:
            break
        at = start + length
    return records, at


def _acked(path: Path, records: int) -> set[int]:
    """Record numbers an ack file lists (a torn last entry is ignored: that record is published again)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return set()
    numbers = array(_ACK)
    numbers.frombytes(raw[:len(raw) - len(raw) % numbers.itemsize])
    return {n for n in numbers if n < records}


def _lock(directory: Path) -> int:
    """Hold `directory/LOCK` for this process (the kernel releases it when the process dies)."""
    import fcntl  # POSIX only, as the servers that spool are

    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SpoolBusy(f"spool directory {directory} is in use by process {holder}: each process needs its own "
                        "(give this one another directory)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def claim(base: str | os.PathLike[str], *, slots: int = 64, **options: int) -> Spool:
    """The spool in the first of `base`, `base-2`, `base-3`, ... that no live process holds: replicas on
    one machine get one each, and a restarted one takes over a spool a dead one left."""
    for n in range(1, slots + 1):
        try:
            return Spool(base if n == 1 else f"{base}-{n}", **options)
        except SpoolBusy:
            continue
    raise SpoolBusy(f"all {slots} spool directories {base}[-N] are in use by live processes")
