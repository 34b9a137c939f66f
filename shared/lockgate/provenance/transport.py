"""OpenLineage's HTTP transport, off the caller's path: RunEvents are queued in a bounded batcher and POSTed
in order, each retried with the one retry policy; what cannot be queued or sent is dropped and counted.

A lineage endpoint (Marquez or any OpenLineage-compatible one) is outside lockgate: its being slow or down
must never fail or block the service that emits, so `post` never waits and never raises.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from lockgate import metrics
from lockgate.batcher import Batcher
from lockgate.redact import shown_url
from lockgate.retry import RetryPolicy

log = logging.getLogger("lockgate.openlineage")


class _Again(Exception):
    """The endpoint answered 429 or 5xx: worth another try."""


class HttpTransport:
    """POSTs RunEvents as JSON to `url` (e.g. http://marquez:5000/api/v1/lineage)."""

    def __init__(self, url: str, *, capacity: int = 10_000, timeout_s: float = 10.0,
                 policy: RetryPolicy | None = None, service: str = "lineage") -> None:
        self.url = url
        self.shown = shown_url(url)  # an endpoint may carry its credential: logs and errors name this
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.policy = policy or RetryPolicy(attempts=5, initial_s=0.2, max_s=5.0)
        self.service = service
        self.sent = 0
        self.dropped = 0
        self._session: aiohttp.ClientSession | None = None
        # One flush at a time, events in the order given: a run's START is sent before its COMPLETE.
        self._queue: Batcher[dict[str, Any]] = Batcher(self._send, max_items=50, max_age_s=0.05, capacity=capacity,
                                                       overflow="drop_newest", on_drop=self.lost,
                                                       name="openlineage", autostart=False)

    def post(self, event: dict[str, Any]) -> None:
        """Queue one RunEvent; never waits, never raises (a full queue drops it and counts the drop)."""
        self._queue.add(event)

    def start(self) -> None:
        """Begin sending (inside the running loop)."""
        self._queue.start()

    async def flush(self) -> None:
        """Return once everything queued so far was sent or dropped."""
        await self._queue.flush()

    async def close(self) -> None:
        """Send what is queued (each event still gets its retries), then close the HTTP pool."""
        await self._queue.close()
        if self._session is not None:
            await self._session.close()

    def lost(self, n: int, reason: str) -> None:
        """Count `n` events lost (a full queue, a failed send)."""
        self.dropped += n
        metrics.events_dropped(f"{self.service}.openlineage", n, reason)
        log.warning("dropped %d OpenLineage events for %s (%s)", n, self.shown, reason)

    async def _send(self, events: list[dict[str, Any]]) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        for event in events:
            try:
                await self.policy.call(lambda e=event: self._post(e), retry_on=(_Again, aiohttp.ClientError, TimeoutError),
                                       what=f"POST OpenLineage event to {self.shown}")
                self.sent += 1
            except (_Again, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("OpenLineage event %s not sent: %r", event.get("run", {}).get("runId"), exc)
                self.lost(1, "send_failed")

    async def _post(self, event: dict[str, Any]) -> None:
        assert self._session is not None
        async with self._session.post(self.url, json=event) as resp:
            if resp.status == 429 or resp.status >= 500:
                raise _Again(f"{resp.status}")
            if resp.status >= 400:  # the endpoint refuses this event: another try would be refused too
                raise ValueError(f"{self.shown} refused an OpenLineage event ({resp.status}): {await resp.text()}")
