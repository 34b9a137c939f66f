"""A router replica's clock offset from the server's time in a JetStream answer (services/router/clock.py)."""

from __future__ import annotations

import pytest

from lockgate.services.router import clock


def test_the_offset_is_the_local_midpoint_minus_the_servers_time_known_within_half_the_round_trip() -> None:
    server = "2026-01-01T00:00:00.500000000Z"  # JetStream's `ts`: nanoseconds, UTC
    at = 1767225600.0  # 2026-01-01T00:00:00Z
    o = clock.offset(at - 120.0, at - 119.0, server)
    assert o is not None and o.seconds == pytest.approx(-120.0) and o.error_s == pytest.approx(0.5)
    assert o.skewed
    assert not clock.offset(at + 0.4, at + 0.6, server).skewed  # type: ignore[union-attr]
    # A slow answer widens the error: a skew it cannot rule out is not reported.
    assert not clock.offset(at - 1.0, at + 4.0, server).skewed  # type: ignore[union-attr]
    assert clock.offset(at + 3.0, at + 3.2, server).skewed  # type: ignore[union-attr]  # ahead counts too


@pytest.mark.parametrize("ts", [None, "", "yesterday"])
def test_an_answer_without_a_readable_time_gives_no_offset(ts: str | None) -> None:
    assert clock.offset(1.0, 2.0, ts) is None  # type: ignore[arg-type]
