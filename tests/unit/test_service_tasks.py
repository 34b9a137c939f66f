"""A service's background work: what ended leaves its list (a sunset's timer spawns work each time it fires, a
retry every 10 s while a pass fails), and what runs is cancelled at its stop."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from lockgate.server.service import Service


async def _nothing() -> None:
    """Work that ends at once (a timer's pass that found nothing to do)."""


async def test_background_work_that_ended_leaves_the_service() -> None:
    service = Service(cast(Any, SimpleNamespace(telemetry=SimpleNamespace(tracer=lambda name: None))))
    done = [service.spawn(_nothing(), f"timer-{i}") for i in range(3)]
    running = service.spawn(asyncio.Event().wait(), "worker")
    await asyncio.gather(*done)  # each leaves in a callback that runs before gather's own
    assert service._tasks == {running}
    await service.stop()
    assert running.cancelled() and service._tasks == set()
