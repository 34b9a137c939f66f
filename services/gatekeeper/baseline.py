"""The baseline an eval is compared with: whether the gate takes it as the yardstick of a policy's relative
rules (no I/O).

Whoever requests an eval names its baseline, so without these checks an operator could name a release the
gate BLOCKed (or one awaiting review, or never gated) and have a regression against the real yardstick read
as none: a pinned "no regression vs baseline" policy then passes anything no worse than the worst release.
"""

from __future__ import annotations

from collections.abc import Mapping

from lockgate.contracts import GateDecided, RuleResult
from lockgate.services.gatekeeper.gatesfile import Required
from lockgate.services.gatekeeper.policy import Policy

__all__ = ["BASELINE_ALLOWED", "REQUIRED_BASELINE", "disallowed", "refusal", "refused_rule",
           "required_baseline_rules", "uses_baseline"]

BASELINE_ALLOWED = "baseline_allowed"
REQUIRED_BASELINE = "required_baseline"
_COMPARING = ("relative", "non_inferiority", "slices")


def uses_baseline(policy: Policy) -> bool:
    """Whether a live (not dry-run) rule or a review trigger of `policy` is judged on the comparison with the
    baseline (relative, non_inferiority, slices; metric_moved)."""
    if any(r.kind in _COMPARING and not r.dry_run for r in policy.rules):
        return True
    return policy.review is not None and any(t.kind == "metric_moved" for t in policy.review.require_when)


def refusal(baseline: str, decision: GateDecided | None, registered: Mapping[str, str] | None, *, app: str | None,
            baseline_app: str, compared_run: str | None) -> str:
    """Why the release `baseline` may not be the yardstick of an eval of a release of `app` ("" if it may;
    `app` None: the candidate is not registered, which release_rules blocks anyway).

    It may when it is a registered release of the same app whose current (verified) decision is a PASS about
    the content it is registered with, and the run the eval compared with (`compared_run`, None if it
    compared none) is the run that PASS judged: a PASS earned on one suite says nothing of another run, and
    an eval that compared none (that run not stored yet, or the PASS judged another suite) judged its relative
    rules on nothing, which `no_data: pass` let through.
    `decision` None means the baseline was never gated: no more a yardstick than a BLOCKed release.
    """
    if registered is None:
        return f"baseline {baseline!r} is not a registered release"
    if app is not None and baseline_app != app:
        return (f"baseline {baseline!r} is a release of app {baseline_app!r}, not of {app!r}: a release is "
                "compared with an earlier release of its own app, gated by the same gates")
    if decision is None or decision.decision != "PASS":
        return disallowed(baseline, decision)
    if decision.judged != dict(registered):
        return (f"baseline {baseline!r}'s PASS (decision {decision.id}) judged other artifacts than it is "
                "registered with")
    if compared_run is None or compared_run != decision.eval_run:
        compared = "no run" if compared_run is None else f"run {compared_run or 'none'}"
        return (f"this eval compared with {compared} of baseline {baseline!r}, but its PASS "
                f"(decision {decision.id}) judged run {decision.eval_run or 'none'}: run the eval again once that "
                f"run is stored, or gate {baseline!r} on this suite first")
    return ""


def disallowed(baseline: str, decision: GateDecided | None) -> str:
    """Why the release `baseline`, whose current (verified) decision is `decision` (None: it has none), is no
    yardstick whatever was compared with it ("" while it is a PASS): never gated, awaiting review, or BLOCKed (a
    person's reject, a drift BLOCK, an artifact's sunset, a later eval). What an eval naming it is refused for
    (refusal), and what a PASS measured against it is remade for once it stops being one (measured.Measured)."""
    if decision is None:
        return f"baseline {baseline!r} has no gate decision: the gate never allowed it"
    if decision.decision != "PASS":
        by = f", rejected by {decision.reviewed_by}" if decision.reviewed_by else ""
        return (f"baseline {baseline!r} is not allowed by the gate: its current decision is {decision.decision}"
                f"{by} ({_cut(decision.reason)})")
    return ""


def refused_rule(why: str) -> RuleResult:
    """The FAIL (it blocks) of an eval whose relative rules would be judged against a refused baseline."""
    return RuleResult(
        rule=BASELINE_ALLOWED, metric="baseline", op="allowed by the gate", threshold=1.0, observed=0.0,
        verdict="FAIL",
        hint=f"{why}; the policy's relative rules are judged against the baseline, which must be a release the "
             "gate allows (PASS): run the eval with `--baseline` naming one, such as the release the deployment "
             "serves",
        explanation="A comparison with a release the gate does not allow is no evidence: the relative rules "
                    "were not judged.")


def required_baseline_rules(release: str, app: str, required: Required | None, named: str, expected: str | None,
                            unreadable: str = "") -> tuple[RuleResult, ...]:
    """FAIL when the gates file pins the baseline of `app`'s evals (the newest known-good release of a
    deployment: `expected`, "" if it serves none yet, None if its route cannot be read, `unreadable` saying
    why) and the eval of `release` named another (`named`); () without a pin or when it is met."""
    if required is None or not required.baseline_deployment:
        return ()
    dep = required.baseline_deployment
    if expected is None:
        hint = (f"release {release!r} of app {app!r} must be compared with the known-good release of deployment "
                f"{dep!r} (gates file {required.source}), which cannot be read: {unreadable}")
    elif named == expected:
        return ()
    elif not expected:
        hint = (f"release {release!r} of app {app!r} must be compared with the known-good release of deployment "
                f"{dep!r} (gates file {required.source}), which serves none yet: this eval compared with "
                f"{named!r}; run it without `--baseline`")
    else:
        hint = (f"release {release!r} of app {app!r} must be compared with the known-good release of deployment "
                f"{dep!r} (gates file {required.source}), now {expected!r}: this eval compared with "
                f"{named or 'none'}; run it with `--baseline {expected}`")
    return (RuleResult(rule=REQUIRED_BASELINE, metric="baseline", op="is required", threshold=1.0, observed=0.0,
                       verdict="FAIL", hint=hint),)


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
