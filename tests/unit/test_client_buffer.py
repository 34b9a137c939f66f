"""The SDK's buffer without a broker: emit is synchronous, bounded, never raises when full, and refuses
what the contract forbids at once."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockgate.client import Client
from lockgate.codec import Codec
from lockgate.contracts import InferenceEvent
from lockgate.errors import BusUnavailable, InvalidEvent
from lockgate.limits import EventLimits
from lockgate.outbox import encode_event, event_from_fields

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


def test_events_built_from_fields_are_checked_without_decoding_but_as_strictly() -> None:
    """`emit(**fields)` builds and checks the event in one step (msgspec.convert) instead of decoding its
    bytes; what convert cannot see is checked on its own: floats JSON cannot carry, unknown field names."""
    c = Client("nats://127.0.0.1:1", app="shop")
    for bad, path in [({"scores": {"q": float("nan")}}, "$.scores"), ({"scores": {"q": float("inf")}}, "$.scores"),
                      ({"latency_ms": float("nan")}, "$.latency_ms"), ({"input_tokens": True}, "$.input_tokens"),
                      ({"input_tokens": 2**32}, "$.input_tokens"), ({"model": b"m"}, "$.model"),
                      ({"release": "r 1"}, "$.release"), ({"type": "lockgate.inference"}, "type")]:
        with pytest.raises(InvalidEvent, match=re.escape(path)):
            c.emit(**bad)
    assert c.emit(latency_ms=12, scores={"q": 1}, time=datetime.now(UTC).isoformat()) and c.pending == 1


@pytest.mark.timeout(60)  # 300 examples: over the file's 10 s on a machine the rest of the suite loads
@settings(max_examples=300, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["input_tokens", "latency_ms", "model", "release", "attributes", "scores", "prompt", "time",
                     "schema_version"]),
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2**33), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=5), st.binary(max_size=3), st.datetimes(timezones=st.sampled_from([None, UTC])),
              st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.floats(), st.integers())))))
def test_whatever_emit_accepts_from_fields_the_sink_decodes(fields: dict) -> None:
    """The safety of the one-step check: no field values it accepts give bytes the sink's decoder refuses."""
    try:
        encoded = encode_event(event_from_fields({"app": "shop", **fields}), check="built",
                               clock_time="time" not in fields)  # as emit calls it
    except InvalidEvent:
        return
    value = Codec(list[InferenceEvent]).decode(b"[" + encoded.data + b"]")  # raises if the sink would refuse
    assert value[0].id == encoded.id
    assert EventLimits().split(value)[1] == []  # and its limits accept it, the time window included


@pytest.mark.parametrize("time", [datetime.now(UTC) - timedelta(days=31), datetime.now(UTC) + timedelta(hours=2),
                                  datetime.now(UTC).replace(tzinfo=None)])
def test_emit_checks_a_given_time_against_the_window_and_takes_its_own_as_inside(time: datetime) -> None:
    c = Client("nats://127.0.0.1:1", app="shop")
    with pytest.raises(InvalidEvent, match=re.escape("$.time")):
        c.emit(time=time)
    assert c.emit(model="m") and c.pending == 1  # timed by the SDK's clock: inside the window, not looked at
