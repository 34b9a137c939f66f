"""Intervals for every run metric and the paired comparison with a baseline run (pure)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import msgspec

from lockgate.contracts import BaselineComparison, MetricInterval
from lockgate.services.evaluator import calibrated, calibration, stats
from lockgate.services.evaluator.domain import (
    JUDGE_AGREEMENT,
    CaseResult,
    Suite,
    aggregate,
    is_count,
    measured,
    passed,
)

# 2,000 resamples keep a 95% interval's Monte Carlo error well under its width and cost ~10 ms at n=1,000.
RESAMPLES = 2000


def _finite(value: float | None) -> float | None:
    """JSON carries no inf/NaN: a bound that cannot be estimated is None."""
    return None if value is None or not math.isfinite(value) else float(value)


def _from(interval: stats.Interval) -> MetricInterval:
    return MetricInterval(estimate=float(interval.estimate), low=_finite(interval.low), high=_finite(interval.high),
                          confidence=interval.confidence, method=interval.method, n=interval.n)


def _groups(results: Sequence[CaseResult], values: Sequence[float]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r, v in zip(results, values, strict=True):
        groups[r.case_id].append(v)
    return groups


def _by_case(results: Sequence[CaseResult], values: Sequence[float]) -> list[float]:
    """Mean per case id: repeats of one case are not independent, so the bootstrap resamples cases."""
    return [sum(g) / len(g) for g in _groups(results, values).values()]


def _mean(results: Sequence[CaseResult], values: Sequence[float],
          bounds: tuple[float, float] | None = stats.UNIT) -> MetricInterval:
    """Bootstrap by case; `bounds` is the metric's range (scores, pass/fail, error and calibration terms lie in
    [0, 1]; cost has none), which keeps a small or spreadless sample from looking certain."""
    interval = _from(stats.bootstrap_mean(_by_case(results, values), n_resamples=RESAMPLES, bounds=bounds))
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
    clustered = repeated(results)
    for spec in suite.scorers:
        rows, ok = passed(suite, results, spec.name)
        if ok:
            # Wilson counts rows as independent trials; with repeats the case is the unit, so bootstrap cases.
            out[f"{spec.name}_pass_rate"] = _mean(rows, [float(x) for x in ok]) if clustered else \
                _from(stats.proportion_interval(sum(ok), len(ok)))
    judged = [r for r in results if JUDGE_AGREEMENT in r.scores]
    if judged:
        out[JUDGE_AGREEMENT] = _mean(judged, [r.scores[JUDGE_AGREEMENT] for r in judged])
    errored = [float(bool(r.error)) for r in results]
    out["error_rate"] = _mean(results, errored) if clustered else _from(stats.proportion_interval(int(sum(errored)), n))
    answered = [r for r in results if not r.error]
    if answered:
        latencies = [r.latency_ms for r in answered]
        if clustered:
            groups = list(_groups(answered, latencies).values())
            for q in (50, 95):
                out[f"latency_p{q}_ms"] = _from(stats.cluster_percentile_interval(groups, q, n_resamples=RESAMPLES))
        else:
            for key, iv in stats.latency_percentiles(latencies, (50, 95)).items():
                out[f"latency_{key}_ms"] = _from(iv)
    if costs is not None:
        per_case = _mean(results, list(costs), bounds=None)
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


def _case_means(rows: Sequence[CaseResult], values: Sequence[float]) -> dict[str, float]:
    """Mean per case id over its repeats (insertion order kept)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r, v in zip(rows, values, strict=True):
        groups[r.case_id].append(v)
    return {k: sum(g) / len(g) for k, g in groups.items()}


def repeated(results: Sequence[CaseResult]) -> bool:
    """True when some case has more than one row: then statistics cluster by case."""
    return len({r.case_id for r in results}) < len(results)


Cost = Callable[[CaseResult], float]


def compare(suite: Suite, candidate: Sequence[CaseResult], baseline: Sequence[CaseResult], cost: Cost | None = None,
            operational: dict[str, stats.ClusteredDifference] | None = None
            ) -> tuple[dict[str, BaselineComparison], list[str]]:
    """Paired comparisons for every metric and their warnings: scorers (bootstrap of means, McNemar of
    pass/fail), error rate, latency percentiles and cost per case (bootstrap of the difference and the ratio);
    any other metric both runs report is compared by its point values (no interval).

    The unit is the case: repeats of a case are averaged first, so 20 cases x 2 repeats are 20 pairs, not 40
    (repeats share the case's difficulty and are not independent samples).
    """
    c_ids = list(dict.fromkeys(r.case_id for r in candidate))
    b_ids = {r.case_id for r in baseline}
    shared = [k for k in c_ids if k in b_ids]
    warnings: list[str] = []
    if len(shared) < len(c_ids):
        warnings.append(f"baseline shares {len(shared)} of the candidate's {len(c_ids)} cases; "
                        "only shared cases are compared")
    if not shared:
        return {}, warnings
    clustered = repeated(candidate) or repeated(baseline)
    out: dict[str, BaselineComparison] = {}
    for name in [s.name for s in suite.scorers] + ["score"]:
        # Only cases both runs measured: a missing score is no evidence either way.
        c, b = _shared_means(shared, measured(suite, candidate, name), measured(suite, baseline, name))
        if c:
            out[name] = _paired_means(name, c, b, suite.margin, clustered, suite.power)
    for spec in suite.scorers:
        key = f"{spec.name}_pass_rate"
        c_rows, c_ok = passed(suite, candidate, spec.name)
        b_rows, b_ok = passed(suite, baseline, spec.name)
        c, b = _shared_means(shared, (c_rows, [float(x) for x in c_ok]), (b_rows, [float(x) for x in b_ok]))
        if not c:
            continue
        # McNemar needs one pass/fail per case; with repeats the per-case pass share is bootstrapped instead.
        out[key] = _paired_means(key, c, b, suite.margin, True, suite.power) if clustered else \
            _paired_passes(key, [x == 1.0 for x in c], [x == 1.0 for x in b], suite.margin, suite.power)
    c, b = _shared_means(shared, (list(candidate), [float(bool(r.error)) for r in candidate]),
                         (list(baseline), [float(bool(r.error)) for r in baseline]))
    # The suite margin is about quality scores; a power warning on the error rate would only be noise.
    out["error_rate"] = msgspec.structs.replace(_paired_means("error_rate", c, b, suite.margin, clustered), warning="")
    diffs = _operational(candidate, baseline, cost) if operational is None else operational
    out.update({name: _clustered(name, d) for name, d in diffs.items()})
    out.update(_by_points(suite, candidate, baseline, cost, out))
    warnings.extend(f"{k}: {v.warning}" for k, v in out.items() if v.warning and v.test != "point-values")
    return out, warnings


def _operational(candidate: Sequence[CaseResult], baseline: Sequence[CaseResult], cost: Cost | None
                 ) -> dict[str, stats.ClusteredDifference]:
    """Latency p50/p95 (answered rows) and cost per case over shared cases, each case's rows resampled together
    in both runs."""
    shared = [k for k in dict.fromkeys(r.case_id for r in candidate) if k in {r.case_id for r in baseline}]
    todo: list[tuple[str, list[list[float]], list[list[float]], float | None]] = []
    c_lat = _groups([r for r in candidate if not r.error], [r.latency_ms for r in candidate if not r.error])
    b_lat = _groups([r for r in baseline if not r.error], [r.latency_ms for r in baseline if not r.error])
    keys = [k for k in shared if k in c_lat and k in b_lat]
    if keys:
        todo += [(f"latency_p{q}_ms", [c_lat[k] for k in keys], [b_lat[k] for k in keys], q) for q in (50, 95)]
    if cost is not None and shared:
        c_cost = _groups(candidate, [cost(r) for r in candidate])
        b_cost = _groups(baseline, [cost(r) for r in baseline])
        todo.append(("cost_usd_per_case", [c_cost[k] for k in shared], [b_cost[k] for k in shared], None))
    return {name: stats.paired_cluster_difference(c, b, q, n_resamples=RESAMPLES) for name, c, b, q in todo}


def _clustered(metric: str, d: stats.ClusteredDifference) -> BaselineComparison:
    return BaselineComparison(
        metric=metric, candidate=d.candidate, baseline=d.baseline, diff=d.difference.estimate,
        diff_low=_finite(d.difference.low), diff_high=_finite(d.difference.high), p_value=_finite(d.p_value),
        test="paired-cluster-bootstrap", n_pairs=d.difference.n)


def ratios(candidate: Sequence[CaseResult], baseline: Sequence[CaseResult], cost: Cost | None = None
           ) -> dict[str, MetricInterval]:
    """candidate/baseline - 1 with its paired, clustered bootstrap CI for latency p50/p95 and cost per case."""
    return _ratios(_operational(candidate, baseline, cost))


def _ratios(diffs: dict[str, stats.ClusteredDifference]) -> dict[str, MetricInterval]:
    return {name: _from(d.relative) for name, d in diffs.items() if d.relative is not None}


def compare_all(suite: Suite, candidate: Sequence[CaseResult], baseline: Sequence[CaseResult],
                cost: Cost | None = None
                ) -> tuple[dict[str, BaselineComparison], list[str], dict[str, MetricInterval]]:
    """`compare` and `ratios` from one set of bootstraps (what the evaluator publishes)."""
    diffs = _operational(candidate, baseline, cost)
    comparisons, warnings = compare(suite, candidate, baseline, cost, diffs)
    return comparisons, warnings, _ratios(diffs)


def _by_points(suite: Suite, candidate: Sequence[CaseResult], baseline: Sequence[CaseResult], cost: Cost | None,
               done: dict[str, BaselineComparison]) -> dict[str, BaselineComparison]:
    """Metrics no paired test covers (e.g. ece): the two runs' values, no interval, so a relative rule has a
    number to judge (by its point) instead of NO_DATA."""
    c_costs = [cost(r) for r in candidate] if cost is not None else None
    b_costs = [cost(r) for r in baseline] if cost is not None else None
    cm = {**aggregate(suite, candidate, c_costs), **calibrated.metrics(suite, candidate)[0]}
    bm = {**aggregate(suite, baseline, b_costs), **calibrated.metrics(suite, baseline)[0]}
    out = {}
    for name, value in cm.items():
        if name in done or is_count(name) or name not in bm or not (math.isfinite(value) and math.isfinite(bm[name])):
            continue
        out[name] = BaselineComparison(metric=name, candidate=value, baseline=bm[name], diff=value - bm[name],
                                       test="point-values", n_pairs=0,
                                       warning="no paired interval: compared by the two runs' values only")
    return out


def _shared_means(shared: Sequence[str], cand: tuple[list[CaseResult], list[float]],
                  base: tuple[list[CaseResult], list[float]]) -> tuple[list[float], list[float]]:
    cm, bm = _case_means(*cand), _case_means(*base)
    keys = [k for k in shared if k in cm and k in bm]
    return [cm[k] for k in keys], [bm[k] for k in keys]


def _paired_means(metric: str, c: list[float], b: list[float], margin: float, clustered: bool = False,
                  power: float = 0.8) -> BaselineComparison:
    result = stats.paired_bootstrap(c, b, n_resamples=RESAMPLES, bounds=stats.UNIT)  # scores and 0/1 indicators
    warning = stats.paired_power_warning(c, b, margin, power=power) or ""
    return BaselineComparison(
        metric=metric, candidate=sum(c) / len(c), baseline=sum(b) / len(b), diff=result.difference.estimate,
        diff_low=_finite(result.difference.low), diff_high=_finite(result.difference.high),
        p_value=_finite(result.p_value), effect_size=_finite(result.effect_size),
        test="paired-bootstrap-by-case" if clustered else "paired-bootstrap",
        n_pairs=result.n, warning=warning)


def _paired_passes(metric: str, c: list[bool], b: list[bool], margin: float, power: float = 0.8
                   ) -> BaselineComparison:
    cf, bf = [float(x) for x in c], [float(x) for x in b]
    test = stats.mcnemar(c, b)
    diff = stats.paired_bootstrap(cf, bf, n_resamples=RESAMPLES, bounds=stats.UNIT).difference  # pass-rate change
    pc, pb = sum(cf) / len(cf), sum(bf) / len(bf)
    warning = stats.paired_power_warning(cf, bf, margin, power=power) or ""
    return BaselineComparison(
        metric=metric, candidate=pc, baseline=pb, diff=pc - pb, diff_low=_finite(diff.low),
        diff_high=_finite(diff.high), p_value=_finite(test.p_value), effect_size=_finite(stats.cohens_h(pc, pb)),
        test=f"mcnemar-{test.method}", n_pairs=len(c), warning=warning)


Labels = Mapping[str, Sequence[str]]  # case id -> the slices it belongs to


def slice_key(metric: str, label: str) -> str:
    """How a per-slice metric is named: `exact_match[lang=de]`."""
    return f"{metric}[{label}]"


def _sliced(results: Sequence[CaseResult], labels: Labels) -> dict[str, list[CaseResult]]:
    out: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        for label in labels.get(r.case_id, ()):
            out[label].append(r)
    return dict(sorted(out.items()))


def slice_metrics(suite: Suite, results: Sequence[CaseResult], labels: Labels
                  ) -> tuple[dict[str, float], dict[str, MetricInterval]]:
    """Every scorer's mean, pass rate and `score` per slice with its interval (by case), and `n_cases[slice]`."""
    metrics: dict[str, float] = {}
    ivs: dict[str, MetricInterval] = {}
    for label, rows in _sliced(results, labels).items():
        metrics[slice_key("n_cases", label)] = float(len({r.case_id for r in rows}))
        for name in [s.name for s in suite.scorers] + ["score"]:
            kept, values = measured(suite, rows, name)
            if values:
                ivs[slice_key(name, label)] = _mean(kept, values)
        for spec in suite.scorers:
            kept, ok = passed(suite, rows, spec.name)
            if ok:
                ivs[slice_key(f"{spec.name}_pass_rate", label)] = _mean(kept, [float(x) for x in ok])
    metrics.update({k: iv.estimate for k, iv in ivs.items()})
    return metrics, ivs


def slice_compare(suite: Suite, candidate: Sequence[CaseResult], baseline: Sequence[CaseResult], labels: Labels
                  ) -> dict[str, BaselineComparison]:
    """Paired comparisons (bootstrap by case) of every scorer, its pass rate and `score`, per slice.

    No power warnings: slices are small by design, and the gate's slice rule controls for their number.
    """
    base = _sliced(baseline, labels)
    out: dict[str, BaselineComparison] = {}
    for label, rows in _sliced(candidate, labels).items():
        if label not in base:
            continue
        shared = [k for k in dict.fromkeys(r.case_id for r in rows) if k in {b.case_id for b in base[label]}]
        for name in [s.name for s in suite.scorers] + ["score"]:
            c, b = _shared_means(shared, measured(suite, rows, name), measured(suite, base[label], name))
            if c:
                out[slice_key(name, label)] = msgspec.structs.replace(
                    _paired_means(slice_key(name, label), c, b, suite.margin, True), warning="")
        for spec in suite.scorers:
            c_rows, c_ok = passed(suite, rows, spec.name)
            b_rows, b_ok = passed(suite, base[label], spec.name)
            c, b = _shared_means(shared, (c_rows, [float(x) for x in c_ok]), (b_rows, [float(x) for x in b_ok]))
            if c:
                key = slice_key(f"{spec.name}_pass_rate", label)
                out[key] = msgspec.structs.replace(_paired_means(key, c, b, suite.margin, True), warning="")
    return out
