"""A steady load on the topology while a fault happens, and what the store holds afterwards.

SDK events (ids known, so each can be counted in ClickHouse) and OpenAI-style requests through the
routers, the client failing over to the other router as a load balancer would. The load paces itself
(that is what "steady" means); the tests synchronise on what the load and the services report.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats.errors
import nats.js.errors

from lockgate import credentials, queryclient
from lockgate.bus import Bus
from lockgate.client import Client
from lockgate.contracts import InferenceEvent
from lockgate.errors import LockgateError
from lockgate.retry import RetryPolicy
from lockgate.server.apikeys import KeyStore
from lockgate.subjects import Subjects
from lockgate_dev.cluster import Topology
from tests.cluster.conftest import settings_of

CHAT = {"model": "sim-stable", "messages": [{"role": "user", "content": "hi"}]}
# Between two readiness checks of a condition another process reaches (consumer info, a count).
POLL = RetryPolicy(attempts=10_000, initial_s=0.05, max_s=0.5)


class NotYet(LockgateError):
    """A readiness check that does not hold yet."""


async def until(check: Any, timeout_s: float, what: str) -> Any:
    """Re-run the readiness check `check()` (raising NotYet) until it returns, within `timeout_s`.

    A bus request the cluster could not answer yet (a JetStream API timeout or "unavailable" while a leader
    is elected after a fault) is "not yet" too: nats-py's TimeoutError is the builtin one, and taken for
    this wait's own timeout it ended the wait at once under a misleading message (CI, a node killed).
    """
    last: list[str] = [""]

    async def attempt() -> Any:
        try:
            return await check()
        except NotYet as exc:
            last[0] = str(exc)
            raise
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            last[0] = f"the bus did not answer: {exc!r}"
            raise NotYet(last[0]) from None

    try:
        return await asyncio.wait_for(POLL.call(attempt, retry_on=NotYet, what=what), timeout_s)
    except TimeoutError:
        raise TimeoutError(f"{what}: not reached within {timeout_s:.0f}s (last seen: {last[0] or 'nothing'})") from None


@dataclass
class Load:
    """SDK events and router requests at a steady pace until `stop`."""

    topo: Topology
    app: str
    events_per_tick: int = 20
    tick_s: float = 0.05
    concurrency: int = 2
    routers: list[str] | None = None  # router URLs to send to; None: every router replica running
    spans: bool = False  # also export one span per request to the OTLP receivers (OTLP/HTTP JSON)
    traces: set[str] = field(default_factory=set)  # trace ids an OTLP receiver accepted
    ids: list[str] = field(default_factory=list)
    ok: int = 0
    failed: int = 0  # requests no router answered
    failovers: int = 0  # requests a router failed and the other one served
    acked_at: list[float] = field(default_factory=list)  # when the SDK's acknowledged count grew
    served_at: list[float] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        """Connect the SDK as the application identity, make an API key for the app, start both loads."""
        settings = settings_of(self.topo)
        app_auth = credentials.for_identity(settings, "app")
        self.client = Client(self.topo.nats.url, prefix=self.topo.prefix, app=f"{self.app}-sdk",
                             user=app_auth.user, password=app_auth.password)
        await self.client.start()
        self.key, _ = KeyStore(self.topo.home).create("default", f"{self.app}-web", description="cluster test")
        self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.key}"},
                                          timeout=aiohttp.ClientTimeout(total=10))
        self._tasks = [asyncio.create_task(self._emit())]
        self._tasks += [asyncio.create_task(self._requests(i)) for i in range(self.concurrency)]
        if self.spans:
            self._tasks.append(asyncio.create_task(self._export()))

    async def _emit(self) -> None:
        sent = 0
        while not self._stop.is_set():
            for _ in range(self.events_per_tick):
                event = InferenceEvent(app=f"{self.app}-sdk", model="sim-stable", input_tokens=10, output_tokens=5)
                if self.client.emit(event):
                    self.ids.append(event.id)
            if self.client.sent > sent:
                sent = self.client.sent
                self.acked_at.append(time.monotonic())
            with contextlib.suppress(TimeoutError):  # pacing: one tick of events, then the next
                await asyncio.wait_for(self._stop.wait(), self.tick_s)

    async def _requests(self, worker: int) -> None:
        turn = worker
        while not self._stop.is_set():
            routers = self.routers or [p.endpoints["router"] for p in self.topo.replicas("router")
                                       if p.endpoints.get("router")]
            turn += 1
            order = routers[turn % len(routers):] + routers[:turn % len(routers)]
            for attempt, url in enumerate(order):
                try:
                    async with self.http.post(f"{url}/v1/chat/completions", json=CHAT) as resp:
                        await resp.read()
                        if resp.status != 200:
                            continue
                    self.ok += 1
                    self.failovers += attempt > 0
                    self.served_at.append(time.monotonic())
                    break
                except (aiohttp.ClientError, TimeoutError):
                    continue
            else:
                self.failed += 1

    async def _export(self) -> None:
        turn = 0
        while not self._stop.is_set():
            receivers = [p.endpoints["otlp-http"] for p in self.topo.replicas("otlp") if p.endpoints.get("otlp-http")]
            turn += 1
            trace_id = uuid.uuid4().hex
            for url in receivers[turn % len(receivers):] + receivers[:turn % len(receivers)]:
                try:
                    async with self.http.post(f"{url}/v1/traces", json=_span(trace_id, f"{self.app}-otlp")) as resp:
                        await resp.read()
                        if resp.status == 200:
                            self.traces.add(trace_id)
                            break
                except (aiohttp.ClientError, TimeoutError):
                    continue
            with contextlib.suppress(TimeoutError):  # pacing: one span per tick
                await asyncio.wait_for(self._stop.wait(), self.tick_s)

    async def served(self, n: int, timeout_s: float = 60.0) -> None:
        """Wait until `n` more requests have been served (and the SDK acknowledged more events)."""
        target, acked = self.ok + n, self.client.sent

        async def check() -> None:
            if self.ok < target or self.client.sent <= acked:
                raise NotYet("load")

        await until(check, timeout_s, f"{n} more requests served")

    async def stop(self) -> None:
        """Stop the load, then wait until the SDK has every emitted event acknowledged (or failed)."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self.client.flush()
        await self.client.close()
        await self.http.close()

    def recovery_s(self, since: float) -> float:
        """The longest wait for an SDK acknowledgement after `since` (a fault): how long publishing stalled."""
        after = [since, *(t for t in self.acked_at if t > since)]
        return max(b - a for a, b in zip(after, after[1:], strict=False)) if len(after) > 1 else float("nan")


def _span(trace_id: str, service: str) -> dict[str, Any]:
    """An OTLP/HTTP JSON export of one plain (not GenAI) span."""
    start = time.time_ns()
    span = {"traceId": trace_id, "spanId": trace_id[:16], "name": "cluster-test", "kind": 2,
            "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + 1_000_000)}
    attrs = [{"key": "service.name", "value": {"stringValue": service}}]
    return {"resourceSpans": [{"resource": {"attributes": attrs}, "scopeSpans": [{"spans": [span]}]}]}


async def viewer(topo: Topology) -> Bus:
    """A connection as the viewer role, which asks the query service."""
    s = settings_of(topo)
    bus = Bus(s.nats_url, Subjects(s.prefix), name="test-viewer", auth=credentials.for_identity(s, "viewer"),
              manage_topology=False)
    await bus.connect()
    return bus


async def stored(bus: Bus, table: str, column: str, app: str, app_column: str = "app") -> tuple[int, int]:
    """(rows, distinct ids) of `app` in `table`, asked of the query service."""
    rows = await queryclient.ask(bus, "sql", {"query": f"SELECT count() AS n, uniqExact({column}) AS u "
                                                       f"FROM {table} WHERE {app_column} = '{app}'"})
    return int(rows[0]["n"]), int(rows[0]["u"])


async def drained(admin: Bus, *durables: str, timeout_s: float = 90.0) -> None:
    """Wait until the sink's consumers have nothing pending or unacknowledged (all stored)."""
    streams = {"inference": "inference", "cost_ledger": "ledger", "spans": "telemetry"}

    async def check() -> None:
        for purpose in durables:
            stream = admin.subjects.streams[streams[purpose]].name
            info = await admin.js.consumer_info(stream, admin.subjects.durable("sink", purpose))
            if info.num_pending or info.num_ack_pending:
                raise NotYet(f"{purpose}: {info.num_pending} pending, {info.num_ack_pending} unacknowledged, "
                             f"{info.num_redelivered} redelivered, {info.num_waiting} fetches waiting")

    await until(check, timeout_s, f"sink consumers {', '.join(durables)} drained")


def report(name: str, **figures: Any) -> None:
    """Print a figure line (shown with -s, and in the test's captured output on failure)."""
    print(f"[cluster] {name}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in figures.items()))
