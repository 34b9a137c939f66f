"""Times lockgate shows say they are UTC: a table's cell, and a query's time argument as its query sees it."""

from __future__ import annotations

import datetime as dt

import pytest

from lockgate.cli.render import _cell
from lockgate.services.query.registry import arguments

AT = dt.datetime(2026, 12, 6, 19, 14, 50, 352549, tzinfo=dt.UTC)


@pytest.mark.parametrize("value", [AT, AT.replace(tzinfo=None), AT.astimezone(dt.timezone(dt.timedelta(hours=5)))])
def test_a_time_in_a_table_is_shown_in_utc_and_says_so(value: dt.datetime) -> None:
    assert _cell(value) == "2026-12-06 19:14:50.352Z"


@pytest.mark.parametrize("given", ["2026-12-06T19:14:50.352549", "2026-12-06T19:14:50.352549Z",
                                   "2026-12-07T00:14:50.352549+05:00"])
def test_a_query_sees_every_time_argument_as_aware_utc(given: str) -> None:
    # A naive one compared with the aware times it reads raised TypeError, and one it echoed had no zone.
    at = arguments("serving_history", {"deployment": "web", "at": given})["at"]
    assert at == AT and at.utcoffset() == dt.timedelta(0) and at.tzinfo is dt.UTC
