"""Test helpers that synchronise on work done, never on the clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from lockgate.service import Progress


async def eventually(check: Callable[[], bool], progress: Sequence[Progress], timeout_s: float = 30.0,
                     what: str = "condition") -> None:
    """Re-check `check()` each time one of the services reports progress, until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await asyncio.to_thread(check):
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s")
        seen = [p.count for p in progress]
        waits = [asyncio.create_task(p.wait_for(c + 1, remaining)) for p, c in zip(progress, seen, strict=True)]
        done, pending = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            task.exception()  # consume TimeoutError from a waiter; the deadline check above decides
