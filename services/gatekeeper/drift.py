"""Pure drift gate: a policy's drift rules over a live DriftReport for a canary release (no I/O).

A drift report is evidence about one release (`driftgate.canary_release` says which): a canary_vs_stable
report about the canary it compares with stable over the same time; a now_vs_reference one only about a release
under post-promotion analysis, the deployment's one arm (while a canary has a stable arm, the deployment's
window is mostly stable's traffic and moves with what clients ask: it never judges the canary). A matching
feature whose PSI exceeds a rule's `max_psi`, or with `test: true` whose own drift test found drift, fails the
rule, and a failing rule that is not a dry run blocks the release. A rule limited to one `compare` kind ignores
the other kind of report. Drift that is no harm (`driftharm.harmless`: an improvement, the canary's own model, a
latency rise nobody notices) never fails a rule, as it never aborts a canary in the router.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from lockgate import driftharm
from lockgate.contracts import DriftReport, FeatureDrift, RuleResult, request_side
from lockgate.services.gatekeeper.domain import Outcome
from lockgate.services.gatekeeper.policy import DriftRule, Policy

__all__ = ["applies", "decide_drift", "drift_results", "unjudgeable"]


def _matches(rule: DriftRule, f: FeatureDrift) -> bool:
    # A categorical feature is named `feature:category`: the bare feature name matches it too. A rule naming no
    # feature judges the answers only: a request-side feature (input tokens, prompt text) is what clients send,
    # which any client moves as it likes, so it blocks a release only under a rule that names it.
    if not rule.features:
        return not request_side(f.feature)
    return any(fnmatchcase(f.feature, g) or fnmatchcase(f.feature.partition(":")[0], g) for g in rule.features)


def _judged(f: FeatureDrift) -> bool:
    # Drift in the answers' favour, or the rollout's own (the canary's model), is what the router's abort and
    # `drift` metric ignore (driftharm.harmless): a rule blocking on it would roll back a good canary for
    # answering better. A request-side feature a rule names is judged as the operator asked (`_matches`).
    return request_side(f.feature) or not driftharm.harmless(f)


def _describe(f: FeatureDrift) -> str:
    what = "share" if ":" in f.feature else "mean"
    test = ""
    if f.test:
        value = f"p {f.p_value:.3g} < {f.threshold:g}" if f.p_value is not None else f"{f.statistic:.3g} >= {f.threshold:g}"
        test = f"; {f.test} {value}" if f.test_drifted else f"; {f.test} no drift"
    return f"{f.feature} (PSI {f.psi:.3g}, {what} {f.reference_mean:.4g} -> {f.current_mean:.4g}{test})"


def _fails(rule: DriftRule, f: FeatureDrift) -> bool:
    return (rule.max_psi is not None and f.psi > rule.max_psi) or (rule.test and f.test_drifted)


def _windows(report: DriftReport) -> str:
    if report.comparison == "canary_vs_stable":
        return (f"canary {report.release or '?'}: {report.current_n} events against "
                f"{report.reference_n} of stable {report.reference_release or '?'}")
    return f"{report.current_n} events against {report.reference_n}"


def applies(rule: DriftRule, report: DriftReport) -> bool:
    """Whether the rule judges this kind of report."""
    return rule.compare in ("any", report.comparison)


def drift_result(rule: DriftRule, report: DriftReport) -> RuleResult:
    """One rule's verdict: FAIL naming the worst matching feature over max_psi (or whose test drifted, with
    `test: true`), NO_DATA when no feature matches, PASS when every matching one moved harmlessly."""
    threshold = rule.max_psi if rule.max_psi is not None else 0.0
    matching = [f for f in report.features if _matches(rule, f)]
    if not matching:
        return RuleResult(rule=rule.name, metric="drift_psi", op="<=", threshold=threshold, observed=None,
                          verdict="NO_DATA", dry_run=rule.dry_run,
                          hint=f"drift report {report.id} has no feature matching {', '.join(rule.features)}")
    harmless = [f for f in matching if not _judged(f)]
    matching = [f for f in matching if _judged(f)]
    if not matching:
        return RuleResult(rule=rule.name, metric="drift_psi", op="<=", threshold=threshold, observed=None,
                          verdict="PASS", dry_run=rule.dry_run,
                          hint=f"no harmful drift: {', '.join(_describe(f) for f in harmless)} moved only harmlessly "
                               f"(an improvement, the canary's own model, or latency up by less than "
                               f"{driftharm.MATERIAL_LATENCY_MS:g} ms)")
    over = sorted((f for f in matching if _fails(rule, f)), key=lambda f: f.psi, reverse=True)
    worst = over[0] if over else max(matching, key=lambda f: f.psi)
    limits = " or ".join(([f"max_psi {rule.max_psi:g}"] if rule.max_psi is not None else [])
                         + (["its drift test"] if rule.test else []))
    if over:
        hint = (f"DRIFT in {', '.join(_describe(f) for f in over)} over {limits} "
                f"(drift report {report.id}, {_windows(report)})")
        verdict = "FAIL"
    elif rule.max_psi is None:
        hint = f"no drift test found drift in {len(matching)} matching feature(s)"
        verdict = "PASS"
    else:
        hint = f"largest PSI {worst.psi:.3g} ({worst.feature}) within {limits}"
        verdict = "PASS"
    psi_failed = rule.max_psi is not None and worst.psi > rule.max_psi
    if rule.max_psi is None or (verdict == "FAIL" and not psi_failed):  # failed by its test alone
        return RuleResult(rule=rule.name, metric=f"drift_test:{worst.feature}", op="<=", threshold=worst.threshold,
                          observed=worst.p_value if worst.p_value is not None else worst.statistic,
                          verdict=verdict, hint=hint, dry_run=rule.dry_run)
    return RuleResult(rule=rule.name, metric=f"drift_psi:{worst.feature}", op="<=", threshold=threshold,
                      observed=worst.psi, verdict=verdict, hint=hint, dry_run=rule.dry_run)


def drift_results(policy: Policy, report: DriftReport) -> tuple[RuleResult, ...]:
    """The result of every drift rule that judges this kind of report."""
    return tuple(drift_result(r, report) for r in policy.drift if applies(r, report))


def decide_drift(policy: Policy, report: DriftReport) -> Outcome | None:
    """BLOCK when a live (not dry-run) drift rule fails; None otherwise (a report within the thresholds is no
    new decision: the release keeps the one its eval earned)."""
    results = drift_results(policy, report)
    failing = [r for r in results if r.verdict == "FAIL" and not r.dry_run]
    if not failing:
        return None
    why = "; ".join(f"{r.rule}: {r.hint}" for r in failing)
    where = f"deployment {report.deployment!r}" + (" (canary vs stable)" if report.comparison == "canary_vs_stable"
                                                   else " (now vs reference)")
    return Outcome("BLOCK", results, f"drift policy {policy.name!r} of {where}: {why}")


def unjudgeable(report: DriftReport, release: str, why: str) -> Outcome:
    """BLOCK for a live canary whose stored decision cannot be read: its policy (and so its drift rules) is
    unknown, and "no decision" would let it run on unjudged; the gate fails closed instead."""
    hint = f"{why}; drift report {report.id} cannot be judged by its policy: gate the release again"
    rule = RuleResult(rule="stored decision readable", metric="decision", op="==", threshold=1.0, observed=0.0,
                      verdict="FAIL", hint=hint)
    return Outcome("BLOCK", (rule,), f"drift on deployment {report.deployment!r} about {release!r}, unjudged: {hint}")
