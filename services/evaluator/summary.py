"""Intervals for every run metric and the paired comparison with a baseline run (pure)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from lockgate.contracts import BaselineComparison, MetricInterval
from lockgate.services.evaluator import calibrated, calibration, stats
from lockgate.services.evaluator.domain import JUDGE_AGREEMENT, CaseResult, Suite, case_scores, measured, passed, passes

# 2,000 resamples keep a 95% interval's Monte Carlo error well under its width and cost ~10 ms at n=1,000.
RESAMPLES = 2000


def _finite(value: float | None) -> float | None:
    """JSON carries no inf/NaN: a bound that cannot be estimated is None."""
    return None if value is None or not math.isfinite(value) else float(value)


def _from(interval: stats.Interval) -> MetricInterval:
    return MetricInterval(estimate=float(interval.estimate), low=_finite(interval.low), high=_finite(interval.high),
                          confidence=interval.confidence, method=interval.method, n=interval.n)


def _by_case(results: Sequence[CaseResult], values: Sequence[float]) -> list[float]:
    """Mean per case id: repeats of one case are not independent, so the bootstrap resamples cases."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r, v in zip(results, values, strict=True):
        groups[r.case_id].append(v)
    return [sum(g) / len(g) for g in groups.values()]


def _mean(results: Sequence[CaseResult], values: Sequence[float]) -> MetricInterval:
    interval = _from(stats.bootstrap_mean(_by_case(results, values), n_resamples=RESAMPLES))
    # The point estimate stays the plain row mean, equal to the metric in EvalCompleted.metrics.
    return MetricInterval(estimate=sum(values) / len(values), low=interval.low, high=interval.high,
                          confidence=interval.confidence, method=interval.method, n=interval.n)


def intervals(suite: Suite, results: Sequence[CaseResult], costs: Sequence[float] | None = None
              ) -> dict[str, MetricInterval]:
    """A MetricInterval for every aggregate `domain.aggregate` reports (except `n`)."""
    if not results:
        return {}
    out: dict[str, MetricInterval] = {}
    n = len(results)
    for name in [s.name for s in suite.scorers] + ["score"]:
        rows, values = measured(suite, results, name)
        if values:  # a scorer that failed everywhere has no estimate (and a `_missing` share of 1)
            out[name] = _mean(rows, values)
    for spec in suite.scorers:
        rows, ok = passed(suite, results, spec.name)
        if ok:
            out[f"{spec.name}_pass_rate"] = _from(stats.proportion_interval(sum(ok), len(ok)))
    judged = [r for r in results if JUDGE_AGREEMENT in r.scores]
    if judged:
        out[JUDGE_AGREEMENT] = _mean(judged, [r.scores[JUDGE_AGREEMENT] for r in judged])
    out["error_rate"] = _from(stats.proportion_interval(sum(1 for r in results if r.error), n))
    latencies = [r.latency_ms for r in results if not r.error]
    if latencies:
        for key, iv in stats.latency_percentiles(latencies, (50, 95)).items():
            out[f"latency_{key}_ms"] = _from(iv)
    if costs is not None:
        per_case = _mean(results, list(costs))
        out["cost_usd_per_case"] = per_case
        out["cost_usd_total"] = MetricInterval(
            estimate=per_case.estimate * n, low=None if per_case.low is None else per_case.low * n,
            high=None if per_case.high is None else per_case.high * n, confidence=per_case.confidence,
            method=per_case.method, n=n)
    out.update(_calibration(suite, results))
    return out


def _calibration(suite: Suite, results: Sequence[CaseResult]) -> dict[str, MetricInterval]:
    """ece (percentile bootstrap over cases) and brier (bootstrap of the mean) where rows have a confidence."""
    p = calibrated.pairs(suite, results)
    if suite.calibration is None or not p.confidences:
        return {}
    squared = [(c - float(y)) ** 2 for c, y in zip(p.confidences, p.correct, strict=True)]
    ece = calibration.ece_interval(p.confidences, p.correct, [r.case_id for r in p.rows], suite.calibration.bins,
                                   n_resamples=RESAMPLES)
    return {"ece": _from(ece), "brier": _mean(p.rows, squared)}


def _pairs(candidate: Sequence[CaseResult], baseline: Sequence[CaseResult]
           ) -> list[tuple[CaseResult, CaseResult]]:
    base = {(b.case_id, b.repeat): b for b in baseline}
    return [(c, base[(c.case_id, c.repeat)]) for c in candidate if (c.case_id, c.repeat) in base]


def compare(suite: Suite, candidate: Sequence[CaseResult], baseline: Sequence[CaseResult]
            ) -> tuple[dict[str, BaselineComparison], list[str]]:
    """Paired comparisons per scorer (bootstrap of means, McNemar of pass/fail) and their warnings."""
    pairs = _pairs(candidate, baseline)
    warnings: list[str] = []
    if len(pairs) < len(candidate):
        warnings.append(f"baseline shares {len(pairs)} of the candidate's {len(candidate)} (case, repeat) pairs; "
                        "only shared pairs are compared")
    if not pairs:
        return {}, warnings
    c_rows = [case_scores(suite, c) for c, _ in pairs]
    b_rows = [case_scores(suite, b) for _, b in pairs]
    out: dict[str, BaselineComparison] = {}
    for name in [s.name for s in suite.scorers] + ["score"]:
        # Only pairs both runs measured: a missing score is no evidence either way.
        both = [(c[name], b[name]) for c, b in zip(c_rows, b_rows, strict=True)
                if c[name] is not None and b[name] is not None]
        if both:
            out[name] = _paired_means(name, [c for c, _ in both], [b for _, b in both], suite.margin)
    for spec in suite.scorers:
        key = f"{spec.name}_pass_rate"
        outcomes = [(passes(suite, c)[spec.name], passes(suite, b)[spec.name]) for c, b in pairs]
        both_pass = [(c, b) for c, b in outcomes if c is not None and b is not None]
        if both_pass:
            out[key] = _paired_passes(key, [c for c, _ in both_pass], [b for _, b in both_pass], suite.margin)
    warnings.extend(f"{k}: {v.warning}" for k, v in out.items() if v.warning)
    return out, warnings


def _paired_means(metric: str, c: list[float], b: list[float], margin: float) -> BaselineComparison:
    result = stats.paired_bootstrap(c, b, n_resamples=RESAMPLES)
    warning = stats.paired_power_warning(c, b, margin) or ""
    return BaselineComparison(
        metric=metric, candidate=sum(c) / len(c), baseline=sum(b) / len(b), diff=result.difference.estimate,
        diff_low=_finite(result.difference.low), diff_high=_finite(result.difference.high),
        p_value=_finite(result.p_value), effect_size=_finite(result.effect_size), test="paired-bootstrap",
        n_pairs=result.n, warning=warning)


def _paired_passes(metric: str, c: list[bool], b: list[bool], margin: float) -> BaselineComparison:
    cf, bf = [float(x) for x in c], [float(x) for x in b]
    test = stats.mcnemar(c, b)
    diff = stats.paired_bootstrap(cf, bf, n_resamples=RESAMPLES).difference  # CI of the pass-rate change
    pc, pb = sum(cf) / len(cf), sum(bf) / len(bf)
    warning = stats.paired_power_warning(cf, bf, margin) or ""
    return BaselineComparison(
        metric=metric, candidate=pc, baseline=pb, diff=pc - pb, diff_low=_finite(diff.low),
        diff_high=_finite(diff.high), p_value=_finite(test.p_value), effect_size=_finite(stats.cohens_h(pc, pb)),
        test=f"mcnemar-{test.method}", n_pairs=len(c), warning=warning)
