"""Gate policies: the document's Structs, decoded by msgspec so errors name the path (no I/O)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec

from lockgate.documents import Count, NonEmpty, NonNegative, at, convert
from lockgate.errors import PolicyError

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
}
Op = Literal[">=", ">", "<=", "<", "=="]
NoData = Literal["fail", "pass"]
Kind = Literal["absolute", "relative", "non_inferiority", "count", "rate", "slices"]
Rate = Annotated[float, msgspec.Meta(gt=0, lt=1)]
Confidence = Annotated[float, msgspec.Meta(ge=0.5, lt=1)]
Better = Literal["higher", "lower"]


class Relative(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The candidate must improve by >= min_change, or regress by <= max_regression, against the baseline."""

    min_change: float | None = None
    max_regression: NonNegative | None = None
    mode: Literal["absolute", "relative"] = "absolute"
    better: Better = "higher"

    def __post_init__(self) -> None:
        if (self.min_change is None) == (self.max_regression is None):
            raise ValueError("expected exactly one of min_change or max_regression")


class NonInferiority(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The candidate may be worse than the baseline by less than `margin`, shown by the whole interval."""

    margin: NonNegative
    better: Better = "higher"


class Slices(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """No slice of at least `min_cases` cases may regress by more than `max_regression` against the baseline,
    shown at `alpha` after Holm (family-wise) or Benjamini-Hochberg (false discovery rate) correction."""

    max_regression: NonNegative
    min_cases: Count = 20
    better: Better = "higher"
    correction: Literal["holm", "bh", "none"] = "holm"
    alpha: Annotated[float, msgspec.Meta(gt=0, lt=0.5)] = 0.05


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One check on one metric: absolute (`op` + `threshold`), `relative`, `non_inferiority`, `slices` (per-slice
    regressions against the baseline), or on the cases that failed the metric's scorer: `max_count` (0: any
    occurrence fails) or `max_rate` (exact upper bound at `confidence`)."""

    metric: NonEmpty
    name: str = ""  # "": the expression ("score >= 0.8") or "<metric> <kind>"
    op: Op | None = None  # absolute rules only; relative ones derive theirs from the baseline
    threshold: float | None = None
    use_interval: bool | None = None  # None: the policy's use_interval (true by default)
    relative: Relative | None = None
    non_inferiority: NonInferiority | None = None
    max_count: Count | None = None
    max_rate: Rate | None = None
    confidence: Confidence = 0.95  # of max_rate's exact bound
    slices: Slices | None = None
    hard: bool = False
    dry_run: bool = False
    no_data: NoData | None = None  # None: the policy's setting

    def __post_init__(self) -> None:
        kinds = [k for k, v in (("relative", self.relative), ("non_inferiority", self.non_inferiority),
                                ("max_count", self.max_count), ("max_rate", self.max_rate),
                                ("slices", self.slices)) if v is not None]
        if len(kinds) > 1:
            raise ValueError(f"a rule is one kind: {kinds[0]} or {kinds[1]}, not both")
        if self.kind == "absolute":
            if self.op is None or self.threshold is None:
                raise ValueError("an absolute rule needs `op` and `threshold` (or use relative, non_inferiority, "
                                 "max_count, max_rate or slices)")
        if not self.name:
            if self.kind == "absolute":
                name = f"{self.metric} {self.op} {self.threshold:g}"
            elif self.kind == "count":
                name = f"{self.metric} failures <= {self.max_count}"
            elif self.kind == "rate":
                name = f"{self.metric} failure rate <= {self.max_rate:g}"
            elif self.kind == "slices":
                name = f"{self.metric} per slice"
            else:
                name = f"{self.metric} {self.kind}"
            msgspec.structs.force_setattr(self, "name", name)

    @property
    def kind(self) -> Kind:
        """Which comparison the rule makes."""
        if self.relative is not None:
            return "relative"
        if self.max_count is not None:
            return "count"
        if self.max_rate is not None:
            return "rate"
        if self.slices is not None:
            return "slices"
        return "non_inferiority" if self.non_inferiority is not None else "absolute"

    @property
    def change_kind(self) -> Literal["min_change", "max_regression"]:
        """For a relative rule: a required improvement or a tolerated regression."""
        return "min_change" if self.relative is not None and self.relative.min_change is not None \
            else "max_regression"

    @property
    def change(self) -> float:
        """For a relative rule: the size of the improvement or regression."""
        rel = self.relative
        if rel is None:
            return 0.0
        return rel.min_change if rel.min_change is not None else rel.max_regression or 0.0

    @property
    def mode(self) -> Literal["absolute", "relative"]:
        """Whether a change is measured as a difference or as a fraction of the baseline."""
        return self.relative.mode if self.relative is not None else "absolute"

    @property
    def better(self) -> Better:
        """Which direction of the metric is an improvement."""
        cmp = self.relative or self.non_inferiority
        return cmp.better if cmp is not None else "higher"

    @property
    def margin(self) -> float:
        """For a non-inferiority rule: how much worse the candidate may be."""
        return self.non_inferiority.margin if self.non_inferiority is not None else 0.0


class Measurement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When a metric's measurement is too broken to judge: its rules are ERROR (needs review), never PASS or FAIL."""

    max_missing: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05  # share of answered cases a scorer left unscored
    # Mean share of a case's judge replies that agree with its majority vote: with 3 replies a case scores 2/3
    # or 1, so 0.75 asks that at least a quarter of the cases be unanimous.
    min_judge_agreement: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.75


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How many non-passing rules a decision tolerates before it stops being PASS."""

    max_failures: Count = 0
    max_inconclusive: Count = 0
    max_consecutive_errors: Count = 3


class ReviewTrigger(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`metric_moved: GLOB, by: X` or `artifact_changed: GLOB`: a human must approve when it fires."""

    metric_moved: NonEmpty | None = None
    by: NonNegative | None = None
    artifact_changed: NonEmpty | None = None

    def __post_init__(self) -> None:
        if (self.metric_moved is None) == (self.artifact_changed is None):
            raise ValueError("expected one of metric_moved (with by) or artifact_changed")
        if self.metric_moved is not None and self.by is None:
            raise ValueError("metric_moved needs `by`, the smallest move that requires review")
        if self.artifact_changed is not None and self.by is not None:
            raise ValueError("`by` applies to metric_moved, not artifact_changed")

    @property
    def kind(self) -> Literal["metric_moved", "artifact_changed"]:
        """Which trigger this is."""
        return "metric_moved" if self.metric_moved is not None else "artifact_changed"

    @property
    def pattern(self) -> str:
        """The glob over metric names or artifact keys."""
        return self.metric_moved if self.metric_moved is not None else self.artifact_changed or ""


class Review(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """When a human must approve a release the rules alone would pass, and what an approval takes.

    `approvals`: distinct people who must approve a NEEDS_REVIEW (any one reject blocks);
    `forbid_self_approval`: the release's author may not be one of them.
    """

    require_when: tuple[ReviewTrigger, ...] = ()
    approvals: Annotated[int, msgspec.Meta(ge=1, le=20)] = 1
    forbid_self_approval: bool = False


class DriftRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`drift: [{max_psi: 0.2, features: [output_tokens, "finish_reason:*"]}]`: a live drift report in which a
    matching feature's PSI exceeds `max_psi` blocks the release it is about (the router then rolls it back),
    naming the feature: a canary by a canary-versus-stable report, a release under post-promotion analysis by the
    deployment's now-versus-reference one (never a canary that has a stable arm: `driftgate.canary_release`).
    `features` are globs over the report's feature names (categorical ones are `feature:category`); empty
    matches every feature of the answer (request-side ones, input_tokens and prompt_text, which any client moves
    with what it sends, only when named); harmless drift (`driftharm.harmless`: an improvement, the canary's own
    model) never fails a rule. `test: true` also fails a feature whose own drift test (KS,
    chi-squared, Z, Wasserstein, Jensen-Shannon, or the text embedding test) found drift; a rule needs `max_psi`,
    `test` or both. `compare` limits the rule to one kind of report: "now_vs_reference" (the deployment's latest
    window against its reference) or "canary_vs_stable" (a rollout's canary window against the stable
    variant's); "any" (the default) judges both, each where it applies."""

    max_psi: Annotated[float, msgspec.Meta(gt=0)] | None = None
    test: bool = False
    compare: Literal["any", "now_vs_reference", "canary_vs_stable"] = "any"
    kind: Literal["drift"] = "drift"  # optional, for readers: the section already says what the rule is
    features: tuple[NonEmpty, ...] = ()
    name: str = ""  # "": "drift psi <= X" (with the features)
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.max_psi is None and not self.test:
            raise ValueError("a drift rule needs max_psi, test: true, or both")
        if not self.name:
            what = " or ".join(([f"psi <= {self.max_psi:g}"] if self.max_psi is not None else [])
                               + (["no test drift"] if self.test else []))
            on = f" on {', '.join(self.features)}" if self.features else ""
            cmp = f" ({self.compare})" if self.compare != "any" else ""
            msgspec.structs.force_setattr(self, "name", f"drift {what}{on}{cmp}")


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A gate policy. Missing metrics fail the gate unless `no_data` is "pass"."""

    name: NonEmpty
    rules: Annotated[tuple[Rule, ...], msgspec.Meta(min_length=1)]
    no_data: NoData = "fail"
    version: str | int | float = ""  # a number is kept as its text
    use_interval: bool = True  # the default for absolute rules: judge the confidence interval, not the point
    power: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.8  # sizes every "how many cases" hint and sensitivity
    limits: Limits = Limits()
    measurement: Measurement = Measurement()
    review: Review | None = None
    drift: tuple[DriftRule, ...] = ()  # live drift reports that block the release while it is a canary

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "version", str(self.version))
        for rule in self.rules:
            if rule.use_interval is None:
                msgspec.structs.force_setattr(rule, "use_interval", self.use_interval)
        if (where := _not_finite(self, "$")) is not None:
            raise at(*where)
        names = [r.name for r in self.rules] + [r.name for r in self.drift]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise at("$.rules", f"rule names must be unique; repeated: {', '.join(dupes)}")


def _not_finite(value: Any, path: str, field: str = "") -> tuple[str, str] | None:
    """(path, why) of the first number under `value` (the document's `field`, at `path`) that is no finite float, None
    if every one is.

    Every number of a policy, whatever its field: msgspec has no "finite" constraint and takes `inf` for `ge=0`, a NaN
    threshold makes every comparison False, and a rule derived from an infinite margin (a slice's `-max_regression`)
    has a threshold JSON cannot carry: the gatekeeper signed a BLOCK no reader could decode, and every reader kept
    the PASS before it (probe p68 F1). An integer past a float's range is refused alike: the rules compare it as one."""
    if isinstance(value, bool | str) or value is None:
        return None
    if isinstance(value, int | float):
        try:
            finite = math.isfinite(value)
        except OverflowError:
            finite = False
        shown = str(value) if isinstance(value, float) else f"an integer of {len(str(value))} digits"
        return None if finite else (path, f"{field or 'a number'} must be a finite number, got {shown}")
    if isinstance(value, tuple | list):
        items: Any = ((f"{path}[{i}]", field, v) for i, v in enumerate(value))
    elif isinstance(value, msgspec.Struct):
        items = ((f"{path}.{f}", f, getattr(value, f)) for f in value.__struct_fields__)
    else:
        return None
    return next((found for p, f, v in items if (found := _not_finite(v, p, f)) is not None), None)


def parse_policy(raw: Any, *, name: str = "policy") -> Policy:
    """Decode a policy document (parsed YAML/JSON) or raise PolicyError naming the path."""
    return convert(raw, Policy, name=name, error=PolicyError)
