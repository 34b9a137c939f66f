"""SDK for applications: emit inference events without blocking, read and follow gate decisions.

Uses nats-py directly so an application needs neither FastStream nor the services. The
streams and buckets are created by the running stack (`Bus.ensure_topology`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Self

import nats
import nats.errors
import nats.js.errors

from lockgate.codec import Codec, encode
from lockgate.contracts import GateDecided, InferenceEvent
from lockgate.errors import BusUnavailable, InvalidEvent, NotFound, SignatureError
from lockgate.ids import batch_id
from lockgate.redact import scrub_event
from lockgate.signing import Keyring
from lockgate.subjects import Subjects, token

log = logging.getLogger("lockgate.client")

_decisions: Codec[GateDecided] = Codec(GateDecided)
_PUBLISH_ERRORS = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)


async def get_decision(kv: Any, release: str) -> GateDecided | None:
    """The latest decision for `release` in the gates KV bucket, or None."""
    try:
        entry = await kv.get(token(release))
    except nats.js.errors.KeyNotFoundError:  # also covers deleted/purged keys
        return None
    return _decisions.decode(entry.value) if entry.value else None


async def watch_decisions(kv: Any, release_prefix: str = "") -> AsyncIterator[GateDecided]:
    """Start a watch; returns an iterator of current decisions, then every new one.

    Once this returns the watch is subscribed, so any decision put afterwards is seen.
    """
    watcher = await kv.watchall(ignore_deletes=True)
    return _decisions_from(watcher, release_prefix)


async def _decisions_from(watcher: Any, release_prefix: str) -> AsyncIterator[GateDecided]:
    try:
        async for entry in watcher:
            if entry is None or not entry.value:  # None marks the end of the current values
                continue
            try:
                decision = _decisions.decode(entry.value)
            except InvalidEvent as exc:
                # One bad value in the bucket must not end every watcher.
                log.warning("skipping undecodable gate decision %s: %s", entry.key, exc.message)
                continue
            if decision.release.startswith(release_prefix):
                yield decision
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()


class Client:
    """Buffers events in memory and publishes them in pipelined JetStream batches.

    `emit` never blocks and never raises for a full buffer: it returns False and counts
    the event in `dropped`. Call it from the event loop's thread.
    """

    def __init__(
        self,
        nats_url: str,
        *,
        prefix: str = "lg",
        app: str,
        tenant: str = "default",
        max_buffer: int = 100_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.05,
        max_in_flight: int = 8,
        max_attempts: int = 10,
        verify: bool = True,
        trusted_keys: list[str] | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.subjects = Subjects(prefix)
        self.app = app
        self.tenant = tenant
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_attempts = max_attempts
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._buf: deque[InferenceEvent] = deque()
        self._accepted = 0  # events ever appended
        self._taken = 0  # events ever moved from the buffer into a publish
        self._taken_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._inflight: set[asyncio.Task[None]] = set()
        self._sender: asyncio.Task[None] | None = None
        self._nc: Any = None
        self._js: Any = None
        # Decisions are acted on only when signed by a trusted gatekeeper key: pinned PEM files if
        # given, else the keys the gatekeepers publish in KV (reloaded when a new key id shows up).
        self.verify = verify
        self._pinned = bool(trusted_keys)
        self._keyring = Keyring.from_pem_files(trusted_keys or [])
        self.rejected_decisions = 0

    @property
    def pending(self) -> int:
        """Events buffered and not yet handed to a publish."""
        return len(self._buf)

    async def start(self) -> None:
        """Connect to NATS and start the background sender."""
        try:
            self._nc = await nats.connect(
                self.nats_url, name=f"lockgate-sdk-{self.app}", max_reconnect_attempts=-1, connect_timeout=5
            )
        except (OSError, nats.errors.Error) as exc:
            raise BusUnavailable(f"cannot reach NATS at {self.nats_url}: {exc}") from None
        self._js = self._nc.jetstream()
        self._sender = asyncio.create_task(self._run(), name="lockgate-sdk-sender")

    async def close(self) -> None:
        """Publish everything buffered, wait for the acks, then disconnect."""
        if self._sender is not None:
            await self.flush()
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def emit(self, event: InferenceEvent | None = None, **fields: Any) -> bool:
        """Buffer one event (given, or built from fields with this client's app and tenant)."""
        if len(self._buf) >= self.max_buffer:
            self.dropped += 1
            return False
        if event is None:
            fields.setdefault("app", self.app)
            fields.setdefault("tenant", self.tenant)
            event = InferenceEvent(**fields)
        self._buf.append(event)
        self._accepted += 1
        if len(self._buf) >= self.batch_size:
            self._wake.set()
        return True

    async def flush(self) -> None:
        """Return once every event emitted before this call is acknowledged (or counted failed)."""
        if self._sender is None:
            raise BusUnavailable("the lockgate client is not started; call start() or use `async with`")
        target = self._accepted
        if self._taken < target:
            fut = asyncio.get_running_loop().create_future()
            self._taken_waiters.append((target, fut))
            self._wake.set()
            await fut
        # Every batch holding those events is now one of these tasks (retries happen inside).
        if self._inflight:
            await asyncio.wait(set(self._inflight))

    async def decision(self, release: str) -> GateDecided | None:
        """The latest gate decision for a release, or None; raises SignatureError if it does not verify."""
        decision = await get_decision(await self._gates(), release)
        if decision is not None:
            await self._check(decision)
        return decision

    async def decisions(self, release_prefix: str = "") -> AsyncIterator[GateDecided]:
        """Current decisions, then each new one, for releases starting with `release_prefix`.

        A decision whose signature does not verify is skipped, logged and counted in
        `rejected_decisions`, never yielded."""
        decisions = await watch_decisions(await self._gates(), release_prefix)
        try:
            async for decision in decisions:
                try:
                    await self._check(decision)
                except SignatureError as exc:
                    self.rejected_decisions += 1
                    log.warning("ignoring gate decision: %s", exc.message)
                    continue
                yield decision
        finally:
            await decisions.aclose()

    async def kv(self, bucket: str) -> Any:
        """A KV bucket handle (lets the Keyring load published keys through this client)."""
        return await self._js.key_value(bucket)

    async def _check(self, decision: GateDecided) -> None:
        if not self.verify:
            return
        if not self._pinned and decision.key_id not in self._keyring.keys:
            self._keyring = await Keyring.from_kv(self)
        self._keyring.verify(decision)

    async def _gates(self) -> Any:
        if self._js is None:
            raise BusUnavailable("the lockgate client is not started; call start() or use `async with`")
        try:
            return await self._js.key_value(self.subjects.kv_gates)
        except nats.js.errors.BucketNotFoundError:
            raise NotFound(
                f"gate bucket {self.subjects.kv_gates!r} does not exist: is the lockgate stack running "
                f"with prefix {self.subjects.prefix!r}?"
            ) from None

    async def _run(self) -> None:
        while True:
            if len(self._buf) < self.batch_size and not self._taken_waiters:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            while self._buf:
                # Take the slot before the events so the buffer, not memory, holds the backlog.
                await self._slots.acquire()
                n = min(self.batch_size, len(self._buf))
                batch = [self._buf.popleft() for _ in range(n)]
                self._taken += n
                task = asyncio.create_task(self._publish_batch(batch))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                self._release_taken_waiters()
            self._release_taken_waiters()

    def _release_taken_waiters(self) -> None:
        if not self._taken_waiters:
            return
        still = []
        for target, fut in self._taken_waiters:
            if self._taken >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._taken_waiters = still

    async def _publish_batch(self, batch: list[InferenceEvent]) -> None:
        try:
            by_app: dict[str, list[InferenceEvent]] = {}
            for e in batch:
                # scrubbed here, off the application's request path, before anything leaves the process
                by_app.setdefault(e.app, []).append(scrub_event(e))
            for app, events in by_app.items():
                await self._publish(self.subjects.inference(app), events)
        except Exception:  # e.g. an unencodable attribute: count it rather than lose it silently
            log.exception("publishing a batch of %d events failed", len(batch))
            self.failed += len(batch)
        finally:
            self._slots.release()

    async def _publish(self, subject: str, events: list[InferenceEvent]) -> None:
        data = encode(events)
        # The same events always give the same id, so a retry after a lost ack is deduplicated.
        headers = {"Nats-Msg-Id": batch_id(events)}
        for attempt in range(self.max_attempts):
            try:
                await self._js.publish(subject, data, headers=headers, timeout=5)
                self.sent += len(events)
                return
            except _PUBLISH_ERRORS as exc:
                if attempt + 1 == self.max_attempts:
                    log.warning("dropping %d events after %d attempts: %r", len(events), attempt + 1, exc)
                    break
                await asyncio.sleep(min(0.05 * 2**attempt, 2.0))  # backoff, not synchronisation
        self.failed += len(events)
