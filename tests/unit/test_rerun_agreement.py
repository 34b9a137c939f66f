"""`lockgate eval rerun`'s verdict without a stack: intervals that overlap agree, disjoint ones do not, a
metric only one run has disagrees, timing metrics count only when asked, and environment changes show."""

from __future__ import annotations

import pytest

from lockgate.contracts import EvalReran, MetricInterval
from lockgate.provenance.rerun import agreement, environment_changes, report


def _i(low: float, high: float) -> MetricInterval:
    return MetricInterval(estimate=(low + high) / 2, low=low, high=high)


@pytest.mark.parametrize(("stored", "rerun", "agrees"), [
    ((0.80, 0.90), (0.85, 0.95), True),   # overlap
    ((0.80, 0.90), (0.90, 0.99), True),   # touching at one point
    ((0.80, 0.90), (0.91, 0.99), False),  # disjoint
    ((0.50, 0.60), (0.10, 0.20), False),
])
def test_intervals_agree_when_they_overlap(stored: tuple[float, float], rerun: tuple[float, float],
                                           agrees: bool) -> None:
    [row] = agreement({"acc": 0.85}, {"acc": _i(*stored)}, {"acc": 0.9}, {"acc": _i(*rerun)})
    assert row.agrees is agrees and row.compared


def test_points_without_intervals_and_missing_metrics() -> None:
    rows = {r.metric: r for r in agreement({"n": 20.0, "old": 1.0}, {}, {"n": 20.0, "new": 1.0}, {})}
    assert rows["n"].agrees and not rows["old"].agrees and not rows["new"].agrees


def test_timing_metrics_are_shown_but_compared_only_when_asked() -> None:
    args = ({"latency_p95_ms": 20.0}, {"latency_p95_ms": _i(18, 22)}, {"latency_p95_ms": 90.0},
            {"latency_p95_ms": _i(80, 99)})
    [row] = agreement(*args)
    assert not row.agrees and not row.compared
    [row] = agreement(*args, timing=True)
    assert not row.agrees and row.compared


def test_report_verdict_and_environment_changes() -> None:
    done = EvalReran(run_id="r2", rerun_of="r1", release="v1", suite="sha256:s", stored_cases=20, n_cases=20,
                     metrics={"acc": 0.5, "latency_p50_ms": 99.0}, intervals={"acc": _i(0.3, 0.7)},
                     stored_metrics={"acc": 0.9, "latency_p50_ms": 10.0}, stored_intervals={"acc": _i(0.8, 1.0)},
                     environment={"model": "m", "endpoint": "http://b", "python": "3.11", "executable": "/y"})
    out = report(done, {"model": "m", "endpoint": "http://a", "python": "3.11", "executable": "/x"})
    assert out["agrees"] is False
    assert out["environment_changes"] == {"endpoint": {"stored": "http://a", "rerun": "http://b"}}
    same = EvalReran(run_id="r2", rerun_of="r1", release="v1", suite="sha256:s", stored_cases=20,
                     metrics={"acc": 0.85}, intervals={"acc": _i(0.7, 0.95)}, stored_metrics={"acc": 0.9},
                     stored_intervals={"acc": _i(0.8, 1.0)})
    assert report(same, {})["agrees"] is True
    nothing_stored = EvalReran(run_id="r2", rerun_of="r1", release="v1", suite="sha256:s", metrics={"acc": 0.9})
    assert report(nothing_stored, {})["agrees"] is False
    assert environment_changes({"seed": "0"}, {"seed": "1"}) == {"seed": ("0", "1")}
