"""A watch's items with a look between them: for a stream that must check, while it waits for its next item, what
nothing announces (the trust file, the keys file), every few seconds and before each item."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final, TypeVar

T = TypeVar("T")


class Idle:
    """No item came within the interval: a look is due all the same."""


IDLE: Final = Idle()


async def ticking(items: AsyncIterator[T], every_s: float) -> AsyncIterator[T | Idle]:
    """Each item of `items` as it comes, and IDLE whenever `every_s` seconds pass without one, so the caller looks
    (at whatever it checks) before each item and at least that often. Closed, it cancels the read under way: the
    stream is not running once this is closed."""
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            # A timeout, not a sleep: nothing announces what the caller looks at.
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield IDLE
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
