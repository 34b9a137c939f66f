"""Which drift can harm a release: the one definition the router's direct abort on a DRIFT report
(progress.on_drift), its analysis' `drift` metric (analysis.py) and the gatekeeper's drift rules (gatekeeper/drift.py)
share, so a report never aborts where it passes or blocks where it is harmless. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

from lockgate.contracts import DriftReport, FeatureDrift, request_side

# Features where less is better: their drift downwards is an improvement, not a reason to abort.
_LOWER_IS_BETTER = frozenset({"latency_ms", "ttft_ms", "cost_usd"})
_HIGHER_IS_BETTER = frozenset({"score.pii_free", "score.non_toxic", "score.json_valid"})  # the share that passed
# The least rise in a latency's mean that is worth a rollback. A distribution test sees milliseconds: two arms on
# one busy machine differ by a millisecond or two (scheduling, a cold connection), which no user notices and
# which aborted healthy canaries (PSI 0.6 for a mean of 1.3 -> 2.5 ms). Latency that matters is judged by a
# `latency_p95` analysis metric, with the ratio and bound the operator chose.
MATERIAL_LATENCY_MS = 25.0


def harmless(f: FeatureDrift) -> bool:
    """Drift that is no reason to roll back: an improvement, a change the rollout makes by design, a change in
    what clients send (input tokens, prompt text: `request_side`), which a client makes as it likes and no release
    causes, or a latency that rose by less than MATERIAL_LATENCY_MS.

    Categorical features are named `feature:category` after the category whose share moved.
    """
    if request_side(f.feature):
        return True
    if f.feature in ("latency_ms", "ttft_ms") and f.current_mean - f.reference_mean < MATERIAL_LATENCY_MS:
        return True  # a faster answer, or one slower by less than anyone notices
    name, _, category = f.feature.partition(":")
    rose = f.current_mean > f.reference_mean
    if name == "model":
        return True  # a canary serves its own model: that the mix of models moved is the rollout itself
    if name == "error_type":
        return rose == (category == "(none)")  # more answers without an error, or fewer with one
    if name == "finish_reason":
        return category == "stop" and rose  # more answers that ended normally
    if name == "status":
        return rose == (category == "ok")  # more answers, or fewer errors
    if name == "refusal":
        return rose == (category == "no")  # fewer refusals
    if name in _HIGHER_IS_BETTER:
        return rose
    return f.feature in _LOWER_IS_BETTER and not rose


def named(f: FeatureDrift, features: Sequence[str]) -> bool:
    """True if `features` is empty or names the feature (a categorical one by its name or `name:category`)."""
    return not features or f.feature in features or f.feature.partition(":")[0] in features


def harmful(report: DriftReport, features: Sequence[str] = (), min_psi: float | None = None) -> list[FeatureDrift]:
    """The report's features (of `features`, if named) whose drift can harm: the monitor's alarm (`drifted`), or
    with `min_psi` its test's verdict and a PSI at least `min_psi`; improvements never count."""
    return [f for f in report.features if named(f, features) and not harmless(f)
            and (f.drifted if min_psi is None else f.test_drifted and f.psi >= min_psi)]


def describe(f: FeatureDrift) -> str:
    """`output_tokens (PSI 2.31, mean 48 -> 151)` for reasons and analysis records."""
    what = "share" if ":" in f.feature else "mean"
    return f"{f.feature} (PSI {f.psi:.3g}, {what} {f.reference_mean:.4g} -> {f.current_mean:.4g})"
