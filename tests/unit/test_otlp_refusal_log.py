"""The OTLP receiver's refusals log: one WARNING per API key and minute, carrying the counts since its last."""

from __future__ import annotations

import logging

import pytest

from lockgate.services.otlp.domain import Decoded
from lockgate.services.otlp.ingest import RefusalLog


def _refused(spans: int, no_event: int) -> Decoded:
    decoded = Decoded(rejected=spans, no_event=no_event)
    for n in range(spans + no_event):
        decoded.problem(f"problem {n}")
    return decoded


def test_each_key_is_logged_at_most_once_a_minute_with_the_counts_since(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    refusals = RefusalLog(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="lockgate.otlp"):
        refusals.note("apikey:a", _refused(1, 0))  # logged at once
        refusals.note("apikey:b", _refused(0, 1))  # another key: its own line
        for _ in range(1000):
            refusals.note("apikey:a", _refused(2, 1))  # within the minute: counted, not logged
        now[0] += 60.0
        refusals.note("apikey:a", _refused(1, 1))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "apikey:a: 1 span(s) refused and 0 model call(s) stored with no inference event, in 1 export(s)" in lines[0]
    assert "apikey:b: 0 span(s) refused and 1 model call(s)" in lines[1]
    assert "apikey:a: 2001 span(s) refused and 1001 model call(s) stored with no inference event, in 1001 export(s)" \
        in lines[2]
