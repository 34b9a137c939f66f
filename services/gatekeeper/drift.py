"""Pure drift gate: a policy's drift rules over a live DriftReport for a canary release (no I/O).

A drift report is evidence about the release the deployment is canarying: a matching feature whose PSI
exceeds a rule's `max_psi` fails the rule, and a failing rule that is not a dry run blocks the release.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from lockgate.contracts import DriftReport, FeatureDrift, RuleResult
from lockgate.services.gatekeeper.domain import Outcome
from lockgate.services.gatekeeper.policy import DriftRule, Policy

__all__ = ["decide_drift", "drift_results"]


def _matches(rule: DriftRule, f: FeatureDrift) -> bool:
    # A categorical feature is named `feature:category`: the bare feature name matches it too.
    return not rule.features or any(fnmatchcase(f.feature, g) or fnmatchcase(f.feature.partition(":")[0], g)
                                    for g in rule.features)


def _describe(f: FeatureDrift) -> str:
    what = "share" if ":" in f.feature else "mean"
    return f"{f.feature} (PSI {f.psi:.3g}, {what} {f.reference_mean:.4g} -> {f.current_mean:.4g})"


def drift_result(rule: DriftRule, report: DriftReport) -> RuleResult:
    """One rule's verdict: FAIL naming the worst matching feature over max_psi, NO_DATA when no feature matches."""
    matching = [f for f in report.features if _matches(rule, f)]
    if not matching:
        return RuleResult(rule=rule.name, metric="drift_psi", op="<=", threshold=rule.max_psi, observed=None,
                          verdict="NO_DATA", dry_run=rule.dry_run,
                          hint=f"drift report {report.id} has no feature matching {', '.join(rule.features)}")
    over = sorted((f for f in matching if f.psi > rule.max_psi), key=lambda f: f.psi, reverse=True)
    worst = over[0] if over else max(matching, key=lambda f: f.psi)
    if over:
        hint = (f"DRIFT in {', '.join(_describe(f) for f in over)} over max_psi {rule.max_psi:g} "
                f"(drift report {report.id}, {report.current_n} events against {report.reference_n})")
        verdict = "FAIL"
    else:
        hint = f"largest PSI {worst.psi:.3g} ({worst.feature}) within max_psi {rule.max_psi:g}"
        verdict = "PASS"
    return RuleResult(rule=rule.name, metric=f"drift_psi:{worst.feature}", op="<=", threshold=rule.max_psi,
                      observed=worst.psi, verdict=verdict, hint=hint, dry_run=rule.dry_run)


def drift_results(policy: Policy, report: DriftReport) -> tuple[RuleResult, ...]:
    """Every drift rule's result for the report."""
    return tuple(drift_result(r, report) for r in policy.drift)


def decide_drift(policy: Policy, report: DriftReport) -> Outcome | None:
    """BLOCK when a live (not dry-run) drift rule fails; None otherwise (a report within the thresholds is no
    new decision: the release keeps the one its eval earned)."""
    results = drift_results(policy, report)
    failing = [r for r in results if r.verdict == "FAIL" and not r.dry_run]
    if not failing:
        return None
    why = "; ".join(f"{r.rule}: {r.hint}" for r in failing)
    return Outcome("BLOCK", results, f"drift policy {policy.name!r} of deployment {report.deployment!r}: {why}")
