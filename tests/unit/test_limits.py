"""Limits on inference messages (lockgate.limits), and the SDK refusing what a consumer would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lockgate.client import Client
from lockgate.contracts import InferenceEvent
from lockgate.errors import InvalidEvent
from lockgate.limits import EventLimits

NOW = datetime(2026, 12, 3, 12, tzinfo=UTC)


def _at(delta: timedelta) -> InferenceEvent:
    return InferenceEvent(app="shop", time=NOW + delta)


def test_events_outside_the_time_window_are_refused_by_index_the_rest_kept() -> None:
    limits = EventLimits(past_s=86400, future_s=60)
    events = [_at(timedelta(0)), _at(timedelta(days=-2)), _at(timedelta(seconds=30)), _at(timedelta(minutes=5))]
    kept, refused = limits.split(events, NOW)
    assert kept == [events[0], events[2]]
    assert [i for i, _ in refused] == [1, 3]
    assert "before now" in refused[0][1] and refused[0][1].endswith("at `$[1].time`")
    assert "after now" in refused[1][1] and refused[1][1].endswith("at `$[3].time`")
    assert limits.split(events[0], NOW) == ([events[0]], [])  # a message of one event


def test_events_of_another_tenant_or_app_than_the_subjects_are_refused_by_index() -> None:
    # The subject names the sender (a per-application NATS user publishes on its own only): an event claiming
    # another tenant or app there would be stored, priced and watched as theirs.
    events = [_at(timedelta(0)), InferenceEvent(app="shop", tenant="globex", time=NOW),
              InferenceEvent(app="other", time=NOW), _at(timedelta(days=-60))]
    kept, refused = EventLimits().split(events, NOW, sender=("default", "shop"))
    assert kept == [events[0]]
    assert [i for i, _ in refused] == [1, 2, 3]
    assert refused[0][1] == ("tenant 'globex' and app 'shop' are not those of the subject it came on "
                             "(tenant 'default', app 'shop') - at `$[1]`")
    assert "app 'other'" in refused[1][1] and refused[2][1].endswith("at `$[3].time`")
    assert EventLimits().split(events[:1], NOW, sender=("default", "shop")) == ([events[0]], [])


def test_a_message_over_the_event_limit_is_refused_whole() -> None:
    kept, refused = EventLimits(max_events=3).split([_at(timedelta(0))] * 4, NOW)
    assert kept == [] and refused == [(-1, "4 events in one message; at most 3 are accepted")]


def test_the_sdk_refuses_an_event_time_far_from_now_naming_the_field() -> None:
    c = Client("nats://127.0.0.1:1", app="shop")
    with pytest.raises(InvalidEvent, match=r"after now .*\$\.time"):
        c.emit(time=datetime.now(UTC) + timedelta(days=365))
    with pytest.raises(InvalidEvent, match=r"before now .*\$\.time"):
        c.emit(time=datetime(1900, 1, 1, tzinfo=UTC))
    assert c.emit(time=datetime.now(UTC) - timedelta(hours=1)) and c.pending == 1


def test_the_per_event_check_agrees_with_the_exact_window_at_its_edges() -> None:
    """The SDK's check reads the clock at most once a second; an event near an edge is judged exactly."""
    limits = EventLimits(past_s=100, future_s=10)
    now = datetime.now(UTC)
    assert limits.event_error(InferenceEvent(app="shop", time=now)) == ""
    assert limits.event_error(InferenceEvent(app="shop", time=now - timedelta(seconds=99.5))) == ""
    assert limits.event_error(InferenceEvent(app="shop", time=now + timedelta(seconds=9))) == ""
    assert "before now" in limits.event_error(InferenceEvent(app="shop", time=now - timedelta(seconds=101)))
    assert "after now" in limits.event_error(InferenceEvent(app="shop", time=now + timedelta(seconds=11)))


def test_a_time_without_a_utc_offset_is_refused_with_its_reason_not_raised() -> None:
    """JSON time without an offset decodes to a naive datetime; comparing it with now used to raise at the
    consumer's edge, leaving the whole message unsettled (redelivered without end)."""
    naive = InferenceEvent(app="shop", time=NOW.replace(tzinfo=None))
    good = _at(timedelta(0))
    kept, refused = EventLimits().split([good, naive], NOW)
    assert kept == [good]
    assert [i for i, _ in refused] == [1] and "no UTC offset" in refused[0][1]
    assert "no UTC offset" in EventLimits().event_error(naive)
    with pytest.raises(InvalidEvent, match=r"no UTC offset .*\$\.time"):
        Client("nats://127.0.0.1:1", app="shop").emit(time=datetime.now(UTC).replace(tzinfo=None))


def test_the_window_is_named_in_words_not_in_exponent_seconds() -> None:
    # Before: "is more than 2.592e+06s before now".
    c = Client("nats://127.0.0.1:1", app="shop")
    with pytest.raises(InvalidEvent, match=r"is more than 30 days before now \("):
        c.emit(time=datetime(2020, 1, 1, tzinfo=UTC))
    with pytest.raises(InvalidEvent, match=r"is more than 1 hour after now \("):
        c.emit(time=datetime.now(UTC) + timedelta(days=1))
    _, refused = EventLimits(past_s=90 * 60, future_s=100_001).split([_at(timedelta(days=-1)),
                                                                       _at(timedelta(days=2))], NOW)
    assert "more than 90 minutes before now" in refused[0][1]
    assert "more than 100,001 seconds after now" in refused[1][1]
