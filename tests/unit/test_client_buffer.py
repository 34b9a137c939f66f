"""The SDK's buffer without a broker: emit is synchronous, bounded, never raises when full, and refuses
what the contract forbids at once."""

from __future__ import annotations

import re

import pytest

from lockgate.client import Client
from lockgate.contracts import InferenceEvent
from lockgate.errors import BusUnavailable, InvalidEvent

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"input_tokens": -1}, "$.input_tokens"),
        ({"output_tokens": -5}, "$.output_tokens"),
        ({"latency_ms": -0.5}, "$.latency_ms"),
        ({"app": ""}, "$.app"),
        ({"input_tokens": "3"}, "$.input_tokens"),  # constructing a Struct checks no types either
    ],
)
def test_emit_refuses_an_event_the_sink_would_refuse_naming_the_field(fields: dict, path: str) -> None:
    c = Client("nats://127.0.0.1:1", app="shop")
    with pytest.raises(InvalidEvent, match=re.escape(path)):
        c.emit(**fields)
    try:  # names are checked as the Struct is made, everything else by the sink's decoder at emit
        event = InferenceEvent(**{"app": "shop", **fields})
    except ValueError as exc:
        assert path in str(exc)
    else:
        with pytest.raises(InvalidEvent, match=re.escape(path)):
            c.emit(event)
    assert (c.pending, c.dropped) == (0, 0)  # refused, not buffered and not counted as a drop


def test_emit_refuses_unknown_fields_and_unencodable_values() -> None:
    c = Client("nats://127.0.0.1:1", app="shop")
    with pytest.raises(InvalidEvent, match="input_tokenz"):
        c.emit(input_tokenz=3)
    with pytest.raises(InvalidEvent, match="invalid inference event"):
        c.emit(attributes={"k": object()})
    with pytest.raises(InvalidEvent, match="surrogates"):  # text that has no UTF-8 form
        c.emit(prompt="\ud800")
    with pytest.raises(InvalidEvent, match=re.escape("$.schema_version")):  # the sink's decoder refuses it too
        c.emit(schema_version=99)
    assert c.emit(model="m", input_tokens=3) and c.pending == 1


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
