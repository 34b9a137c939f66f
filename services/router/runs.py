"""Analysis records: one AnalysisRun per measurement, with what the rollout did with it. Pure, no I/O
(the router signs and publishes them with its route change)."""

from __future__ import annotations

from typing import Literal

from lockgate.contracts import AnalysisMetric, AnalysisRun
from lockgate.contracts.drift import Comparison
from lockgate.services.router import progress
from lockgate.services.router.analysis import AnalysisSpec, Measurement, MetricResult, MetricSpec
from lockgate.services.router.domain import Route

_PHASES = {"SUCCESSFUL": "Successful", "FAILED": "Failed", "INCONCLUSIVE": "Inconclusive"}


def template(route: Route) -> Literal["canary", "pre-promotion", "post-promotion"]:
    """Which of the strategy's analyses judges the route now."""
    if route.strategy is None or route.strategy.blue_green is None:
        return "canary"
    return "post-promotion" if route.phase == "promoted" else "pre-promotion"


def condition(spec: MetricSpec, kind: Comparison = "canary_vs_stable") -> str:
    """A metric's limits as text: `<= stable + 0.01 and <= 0.05`; a drift metric's names the kind of report it
    judges (`progress.drift_evidence`): the canary's window against stable's, or at 100% and after a promotion
    the deployment's against its reference."""
    if spec.name == "drift":
        among = f" among {', '.join(spec.features)}" if spec.features else ""
        by = f" (test significant and PSI >= {spec.min_psi:g})" if spec.min_psi is not None else ""
        return f"<= {spec.max:g} drifted features{among}{by} in the {kind} report"
    parts = []
    if spec.max is not None:
        parts.append(f"<= {spec.max:g}")
    if spec.max_increase is not None:
        parts.append(f"<= stable + {spec.max_increase:g}")
    if spec.max_ratio is not None:
        parts.append(f"<= stable x {spec.max_ratio:g}")
    if spec.min is not None:
        parts.append(f">= {spec.min:g}")
    if spec.max_decrease is not None:
        parts.append(f">= stable - {spec.max_decrease:g}")
    return " and ".join(parts)


def outcome(before: Route, after: Route | None) -> str:
    """What the rollout did after the measurement."""
    if after is None:
        return "held"
    if after.phase == "aborted" and before.phase != "aborted":
        return "rolled back" if before.phase == "promoted" else "aborted"
    if after.phase == "promoted" and before.phase != "promoted":
        return "promoted"
    if before.verifying and not after.verifying:
        return "verified"
    if after.paused and not before.paused:
        return "paused"
    if (after.weight, after.cursor, after.step) != (before.weight, before.cursor, before.step):
        return "advanced"
    return "held"


def _why(result: MetricResult) -> str:
    """The result's why, naming whose requests it judged when they were judged per API key (in the text: the
    record's metrics are a v1 contract, so a field appended to them would change its payloads)."""
    return "; ".join(w for w in (result.why, f"judged on {result.group}" if result.group else "", result.note) if w)


def record(before: Route, after: Route | None, m: Measurement, spec: AnalysisSpec) -> AnalysisRun | None:
    """The record of a measurement (None while it only waits for its minimum sample: no look was taken)."""
    if m.verdict == "WAITING" or before.canary is None:
        return None
    verifying = before.phase == "promoted"
    kind = progress.drift_evidence(before, 0.0)[0]
    judged = before.stable.release if verifying else before.canary.release
    baseline = (before.previous.release if before.previous else "") if verifying else before.stable.release
    status = (after or before).analysis
    metrics = [AnalysisMetric(name=r.name, verdict=r.verdict, condition=condition(s, kind), canary=r.canary,
                              stable=r.stable, threshold=r.threshold, bound=r.bound, canary_n=r.canary_n,
                              stable_n=r.stable_n, dry_run=r.dry_run, why=_why(r))
               for r, s in zip(m.metrics, spec.judged, strict=True)]
    return AnalysisRun(
        deployment=before.deployment, release=judged, baseline=baseline, template=template(before),
        step=before.step, look=m.look, phase=_PHASES[m.verdict],  # type: ignore[arg-type]
        outcome=outcome(before, after),
        successes=status.successes if status else 0, failures=status.failures if status else 0,
        inconclusives=status.inconclusives if status else 0, successes_needed=spec.count, failure_limit=spec.failure_limit,
        inconclusive_limit=spec.inconclusive_limit, canary_n=m.canary_n, stable_n=m.stable_n,
        dry_run=any(x.dry_run for x in spec.metrics), metrics=metrics,
        drifted_features=list(dict.fromkeys(f for r in m.metrics for f in r.features)))


def error(route: Route, after: Route | None, spec: AnalysisSpec, why: str) -> AnalysisRun | None:
    """The record of a measurement that could not be taken (phase Error), and what it did (`after`)."""
    if route.canary is None:
        return None
    verifying = route.phase == "promoted"
    return AnalysisRun(deployment=route.deployment,
                       release=route.stable.release if verifying else route.canary.release,
                       baseline=route.stable.release if not verifying else
                       (route.previous.release if route.previous else ""),
                       template=template(route), step=route.step, phase="Error", error=why[:500],
                       outcome=outcome(route, after),
                       successes_needed=spec.count, failure_limit=spec.failure_limit,
                       inconclusive_limit=spec.inconclusive_limit,
                       metrics=[AnalysisMetric(name=s.label, verdict="ERROR",
                                               condition=condition(s, progress.drift_evidence(route, 0.0)[0]),
                                               dry_run=s.dry_run) for s in spec.judged])
