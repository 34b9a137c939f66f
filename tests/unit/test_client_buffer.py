"""The SDK's buffer without a broker: emit is synchronous, bounded, and never raises when full."""

from __future__ import annotations

import pytest

from lockgate.client import Client
from lockgate.contracts import InferenceEvent
from lockgate.errors import BusUnavailable

pytestmark = pytest.mark.timeout(10)


def test_emit_fills_defaults_from_the_client() -> None:
    c = Client("nats://127.0.0.1:1", prefix="p", app="shop", tenant="acme")
    assert c.emit(model="m", input_tokens=3)
    event = c._buf[0]
    assert (event.app, event.tenant, event.model, event.input_tokens) == ("shop", "acme", "m", 3)


def test_emit_keeps_a_given_event_as_is() -> None:
    c = Client("nats://127.0.0.1:1", app="shop")
    given = InferenceEvent(app="other", tenant="t2")
    assert c.emit(given)
    assert c._buf[0] is given


@pytest.mark.parametrize("max_buffer", [1, 5, 100])
def test_full_buffer_drops_and_counts(max_buffer: int) -> None:
    c = Client("nats://127.0.0.1:1", app="shop", max_buffer=max_buffer)
    results = [c.emit(model="m") for _ in range(max_buffer + 3)]
    assert results == [True] * max_buffer + [False] * 3
    assert (c.pending, c.dropped) == (max_buffer, 3)


async def test_flush_before_start_says_how_to_fix_it() -> None:
    c = Client("nats://127.0.0.1:1", app="shop")
    with pytest.raises(BusUnavailable, match="start"):
        await c.flush()
