"""Under which names each artifact version was registered, read from the `artifact.registered` events
(adapter, translates errors).

An eval names its policy and suite by content hash only; a gates-file requirement by name needs the names.
The events stream is the authority, and race-free here: a registration is published before the eval
request that uses it, so before its result. The stream is read once from the start, then only what is new.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
import nats.js.errors

from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.contracts import ArtifactRegistered
from lockgate.errors import BusUnavailable, InvalidEvent

__all__ = ["Registrations"]
log = logging.getLogger("lockgate.gatekeeper")
_registered: Codec[ArtifactRegistered] = Codec(ArtifactRegistered)


class Registrations:
    """(kind, name) pairs per artifact hash, caught up with the stream on each lookup."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._names: dict[str, set[tuple[str, str]]] = {}
        self._next = 1  # the stream sequence to read from
        self._lock = asyncio.Lock()  # one catch-up at a time: decisions and reviews may ask at once

    async def names(self, kind: str, digest: str) -> frozenset[str]:
        """The names `digest` was registered under as `kind` (empty: none the stream still holds)."""
        if not digest:
            return frozenset()
        async with self._lock:
            await self._catch_up()
        return frozenset(name for k, name in self._names.get(digest, ()) if k == kind)

    async def known(self, digest: str) -> bool:
        """Whether `digest` was registered under any kind and name the stream still holds."""
        if not digest:
            return False
        async with self._lock:
            await self._catch_up()
        return bool(self._names.get(digest))

    async def _catch_up(self) -> None:
        stream = self.bus.subjects.streams["events"].name
        subject = self.bus.subjects.artifact_registered
        while True:
            try:
                msg = await self.bus.js.get_msg(stream, self._next, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                raise BusUnavailable(f"cannot read artifact registrations from stream {stream}: {exc!r}") from None
            self._next = int(msg.seq) + 1
            try:
                event = _registered.decode(msg.data or b"")
            except InvalidEvent as exc:  # the sink dead-letters it; it registered nothing
                log.warning("artifact registration %s on %s is unreadable: %s", msg.seq, subject, exc.message)
                continue
            self._names.setdefault(event.hash, set()).add((event.kind, event.name))
