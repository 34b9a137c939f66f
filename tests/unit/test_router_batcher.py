"""Router event batcher: bounded queue, per-app batches, one flush per tick, nothing lost on stop."""

from __future__ import annotations

import asyncio

import pytest

from lockgate.contracts import InferenceEvent
from lockgate.services.router.batcher import EventBatcher

pytestmark = pytest.mark.timeout(30)


class _Subjects:
    def inference(self, app: str) -> str:
        return f"lg.inference.{app}"


class _Bus:
    """Records published batches; each publish waits until released, like an awaited JetStream ack."""

    subjects = _Subjects()

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[InferenceEvent], dict[str, str]]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.publishing = asyncio.Event()
        self._appended = asyncio.Event()

    async def publish(self, subject: str, events: list[InferenceEvent], *, headers: dict[str, str]) -> None:
        self.publishing.set()
        await self.release.wait()
        self.batches.append((subject, list(events), headers))
        self._appended.set()

    async def wait_for_events(self, n: int) -> None:
        """Until at least n events were published (bounded by the test timeout)."""
        while sum(len(ev) for _, ev, _ in self.batches) < n:
            self._appended.clear()
            await self._appended.wait()


def _event(app: str = "a", n: int = 0) -> InferenceEvent:
    return InferenceEvent(app=app, trace_id=f"{n:032x}", span_id=f"{n:016x}", model="m")


async def test_flush_groups_by_app_and_caps_batch_size() -> None:
    bus = _Bus()
    b = EventBatcher(bus, batch_size=3)  # type: ignore[arg-type]
    for i in range(7):
        b.add(_event("a" if i % 2 == 0 else "b", i))
    await b.flush()
    sizes = sorted((s, len(ev)) for s, ev, _ in bus.batches)
    assert sizes == [("lg.inference.a", 1), ("lg.inference.a", 3), ("lg.inference.b", 3)]
    assert b.published == 7 and len(b) == 0
    assert all(h["traceparent"] == f"00-{ev[0].trace_id}-{ev[0].span_id}-01" for _, ev, h in bus.batches)


async def test_bounded_queue_drops_oldest_and_counts() -> None:
    b = EventBatcher(_Bus(), max_events=2)  # type: ignore[arg-type]
    for i in range(5):
        b.add(_event(n=i))
    assert len(b) == 2 and b.dropped == 3


class _WatchedEvent(asyncio.Event):
    """An asyncio.Event that tells the test each time the batcher goes back to waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0
        self.waiting = asyncio.Event()

    async def wait(self) -> bool:
        self.waits += 1
        self.waiting.set()
        return await super().wait()


async def test_tick_publishes_only_what_was_queued_when_it_started() -> None:
    bus = _Bus()
    bus.release.clear()
    b = EventBatcher(bus, batch_size=2, interval_s=60)  # type: ignore[arg-type]
    b._full = watched = _WatchedEvent()
    runner = asyncio.create_task(b.run())
    try:
        b.add(_event(n=1))
        b.add(_event(n=2))  # a full batch wakes the batcher at once
        await asyncio.wait_for(bus.publishing.wait(), 5)
        b.add(_event(n=3))  # arrives while the first batch awaits its ack
        watched.waiting.clear()
        bus.release.set()
        await asyncio.wait_for(watched.waiting.wait(), 5)  # the tick is over
        # The late event waits for the next tick instead of going out alone straight away.
        assert watched.waits == 2 and len(b) == 1
        assert [len(ev) for _, ev, _ in bus.batches] == [2]
        b.add(_event(n=4))  # completes the next batch
        await bus.wait_for_events(4)
        assert [len(ev) for _, ev, _ in bus.batches] == [2, 2]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_flush_on_stop_drains_everything() -> None:
    bus = _Bus()
    b = EventBatcher(bus, batch_size=10)  # type: ignore[arg-type]
    for i in range(95):
        b.add(_event(n=i))
    await b.flush()
    assert b.published == 95 and len(b) == 0 and len(bus.batches) == 10


async def test_publish_failure_counts_drops_and_never_raises() -> None:
    class _Failing(_Bus):
        async def publish(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("bus down")

    b = EventBatcher(_Failing(), batch_size=10)  # type: ignore[arg-type]
    for i in range(4):
        b.add(_event(n=i))
    await b.flush()
    assert b.dropped == 4 and b.published == 0
