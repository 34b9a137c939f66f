"""Repeats cluster by case: intervals and paired tests resample cases, never (case, repeat) rows."""

from __future__ import annotations

import numpy as np
import pytest

from lockgate.services.evaluator import domain, stats, summary
from lockgate.services.evaluator.domain import CaseResult

pytestmark = pytest.mark.timeout(30)
SUITE = domain.parse_suite({"name": "s", "prompt": {"template": "{input}"}, "dataset": [{"input": "q", "expected": "a"}],
                            "scorers": ["exact_match"], "repeats": 2})


def run(scores: list[float], repeats: int = 2, latency: list[float] | None = None) -> list[CaseResult]:
    """Each case's repeats score alike (they share the case's difficulty): the pseudo-replication trap."""
    return [CaseResult(case_id=f"c{i}", repeat=r, input="q", expected="a", scores={"exact_match": s},
                       latency_ms=(latency or [10.0] * len(scores))[i] + r)
            for i, s in enumerate(scores) for r in range(repeats)]


def test_twenty_cases_with_two_repeats_are_twenty_pairs_not_forty() -> None:
    # Why: with repeats: 2 the (case, repeat) rows were bootstrapped as 40 independent pairs: a too-narrow interval.
    rng = np.random.default_rng(1)
    base = [float(x) for x in rng.random(20) < 0.8]
    cand = [float(x) for x in rng.random(20) < 0.7]
    comps, _ = summary.compare(SUITE, run(cand), run(base))
    once, _ = summary.compare(SUITE, run(cand, repeats=1), run(base, repeats=1))
    for key in ("exact_match", "exact_match_pass_rate", "score"):
        c = comps[key]
        assert c.n_pairs == 20 and c.test == "paired-bootstrap-by-case", key
        # Identical repeats carry no more information than one run of each case: the same interval.
        assert (c.diff_low, c.diff_high) == pytest.approx((once["exact_match"].diff_low, once["exact_match"].diff_high))
    assert once["exact_match_pass_rate"].test.startswith("mcnemar")  # one row per case: McNemar still applies


def test_interval_widths_cluster_by_case() -> None:
    rng = np.random.default_rng(2)
    scores = [float(x) for x in rng.random(20) < 0.7]
    twice = summary.intervals(SUITE, run(scores))
    once = summary.intervals(SUITE, run(scores, repeats=1))
    for key in ("exact_match", "exact_match_pass_rate"):
        assert twice[key].n == 20, key
        assert twice[key].high - twice[key].low == pytest.approx(once["exact_match"].high - once["exact_match"].low,
                                                                 rel=0.05), key
    assert twice["exact_match_pass_rate"].method != "wilson"


def test_power_warning_counts_cases_not_rows() -> None:
    comps, warnings = summary.compare(SUITE, run([1.0] * 20), run([1.0] * 20))
    assert any("20 cases detect" in w for w in warnings), warnings


def test_clustered_latency_percentile_resamples_cases() -> None:
    latency = list(np.random.default_rng(3).lognormal(4, 0.5, 200))
    ivs = summary.intervals(SUITE, run([1.0] * 200, latency=latency))
    p50 = ivs["latency_p50_ms"]
    assert p50.method == "cluster-bootstrap" and p50.n == 200 and p50.low < p50.estimate < p50.high
    # A tail the rows cannot bound (p95 of 20 rows... of 10 cases) stays unbounded for clusters too.
    small = summary.intervals(SUITE, run([1.0] * 10, latency=latency[:10]))
    assert small["latency_p95_ms"].high is None


def test_cluster_percentile_matches_the_row_interval_for_singleton_clusters() -> None:
    x = np.random.default_rng(4).normal(100, 10, 400)
    clustered = stats.cluster_percentile_interval([[v] for v in x], 50)
    rows = stats.percentile_interval(x, 50)
    assert clustered.estimate == rows.estimate
    assert clustered.low == pytest.approx(rows.low, rel=0.02) and clustered.high == pytest.approx(rows.high, rel=0.02)
