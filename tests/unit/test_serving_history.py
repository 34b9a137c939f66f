"""What served at T, from rollout changes (pure): the last change at or before T, with its weights."""

from __future__ import annotations

from datetime import datetime

import pytest

from lockgate.services.query.history import served_at, weights

pytestmark = pytest.mark.timeout(10)


def _row(minute: int, stable: str, canary: str = "", weight: float = 0.0, phase: str = "idle",
         rid: str = "") -> dict:
    return {"id": rid or f"id-{minute:02d}", "time": datetime(2026, 12, 3, 9, minute), "stable_release": stable,
            "canary_release": canary, "canary_weight": weight, "phase": phase, "reason": "", "decision_id": ""}


ROWS = [_row(0, "v1"), _row(10, "v1", "v2", 25.0, "progressing"), _row(20, "v2", phase="promoted")]


@pytest.mark.parametrize(("row", "expected"), [
    (_row(0, "v1"), {"v1": 100.0}),
    (_row(0, "v1", "v2", 0.0), {"v1": 100.0}),  # a canary waiting for its decision takes no traffic
    (_row(0, "v1", "v2", 25.0), {"v1": 75.0, "v2": 25.0}),
    (_row(0, "v1", "v2", 100.0), {"v2": 100.0}),
])
def test_weights(row: dict, expected: dict) -> None:
    assert weights(row) == expected


@pytest.mark.parametrize(("minute", "expected"), [
    (5, {"v1": 100.0}), (10, {"v1": 75.0, "v2": 25.0}), (15, {"v1": 75.0, "v2": 25.0}), (25, {"v2": 100.0}),
])
def test_served_at_a_time_between_two_changes(minute: int, expected: dict) -> None:
    served = served_at(reversed(ROWS), datetime(2026, 12, 3, 9, minute))
    assert served is not None and served["weights"] == expected


def test_before_the_first_change_nothing_served_and_now_is_the_latest() -> None:
    assert served_at(ROWS, datetime(2026, 12, 3, 8, 59)) is None
    assert served_at(ROWS, None)["stable_release"] == "v2"  # type: ignore[index]


def test_a_tie_in_time_goes_to_the_later_id() -> None:
    rows = [_row(10, "v1", "v2", 10.0, rid="b"), _row(10, "v1", "v2", 50.0, rid="a")]
    assert served_at(rows, None)["weights"] == {"v1": 90.0, "v2": 10.0}  # type: ignore[index]
