"""Canary analysis: live metrics per variant measured against an analysis spec. Pure, no I/O.

Semantics follow Argo Rollouts' AnalysisTemplate where they fit: each metric has a threshold, a
measurement is Successful, Failed or Inconclusive, and the rollout counts them against
`failure_limit` and `inconclusive_limit`. Two rules keep the loop honest:

- No step passes on three requests: below `min_sample` events for either variant a measurement
  is WAITING (never a success), and a metric with no values at all (e.g. time to first token
  without streaming) is INCONCLUSIVE: no data never passes (fail-closed).
- Looking every interval does not inflate false aborts: a metric FAILS only when its confidence
  bound is past the threshold, and look k of a rollout tests at alpha / (k (k + 1)) split over the
  metrics (`lockgate.gatestats.sequential.look_alpha`, shared with the gate's statistics). These levels sum to alpha over any number of looks (union bound), so a canary no worse
  than its threshold is aborted with probability at most alpha over the whole rollout.
  A metric SUCCEEDS on its point estimate once the sample is large enough; between the two it is
  INCONCLUSIVE.
- One caller cannot dilute the others' evidence: the canary's requests are judged all together and per API key
  (`groups`), each key with `min_sample` values of the metric alone and the keys under it pooled, so successful
  requests one key aims at the canary no longer outweigh the failures others see, nor hide those of callers under
  `min_sample`. A key with no value of a metric (never streamed, judged on TTFT) counts in all requests only.
- Like is compared with like: each group against the same callers' stable requests, stable re-weighted to the
  group's mix of callers (`_weights`; a key alone: its own), so a caller whose requests differ from the others'
  (long prompts) is not held to a baseline made of other callers' requests, nor are the others' limits set by
  its traffic. And in time (`_baseline`, `_in_time`): the canary's weight rises step by step, so its requests lean
  to later traffic and stable's to earlier; each canary request is held to stable's of the same callers served at
  the same time, and one stable has none of (a 100% step) is left out of relative limits, never compared with
  older stable requests.
  Online scores and drift are not per request key: they are judged on the whole canary as before. Scores are
  compared in time all the same (`_judge_score`), and a scorer's errors are judged like a rate before them: the
  answers a judge cannot score are no random part of the canary's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from statistics import NormalDist
from typing import Annotated, Literal

import msgspec
import numpy as np

from lockgate import driftharm
from lockgate.contracts import DriftReport
from lockgate.gatestats import sequential

Verdict = Literal["SUCCESSFUL", "FAILED", "INCONCLUSIVE", "WAITING"]
MetricName = Literal["error_rate", "client_error_rate", "hang_up_rate", "latency_p50", "latency_p95", "latency_p99",
                     "ttft_p50", "ttft_p95", "ttft_p99", "tokens_per_request", "cost_per_request", "score", "drift"]
METRICS: tuple[str, ...] = MetricName.__args__  # type: ignore[attr-defined]
_QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
_UNITS = {"error_rate": "", "client_error_rate": "", "hang_up_rate": "", "latency": " ms", "ttft": " ms",
          "tokens_per_request": " tokens", "cost_per_request": " USD"}
_NORMAL = NormalDist()
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]


class MetricSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One metric's condition on the canary: an absolute ceiling, and/or a limit relative to stable.

    `max`: canary value <= max. `max_increase`: canary - stable <= max_increase (rates and means).
    `error_rate` is the share of the requests in analysis (`VariantSample.n`) that failed; `client_error_rate` the
    share of all of a variant's requests its upstream refused with a 4xx taken for the client's fault
    (`VariantSample.refused`, left out of every other metric). Each arm refuses bad bodies alike, so a canary
    refusing more of the same callers' requests at the same time than stable does is the release's fault (a
    smaller context window, a parameter its model does not take); `AnalysisSpec.judged` adds it to every
    analysis that judges `error_rate`. `hang_up_rate` is likewise the share of all of a variant's requests whose
    clients hung up before the answer while its upstream kept them waiting (`VariantSample.hung_up`,
    `client_disconnected` with `KEPT_WAITING`: silent for `router_hang_up_s` up to `router_unanswered_s`, left out
    of every other metric; a hang-up while the answer flowed counts nowhere, probe p71). Each arm's
    clients give up alike, so a canary whose clients give up more often than the same callers' on stable at the
    same time is the release's fault (it stalls, or is slow past their timeouts); added alike.
    `max_ratio`: canary <= max_ratio * stable (latency, tokens, cost). At least one is required.
    `tokens_per_request` and `cost_per_request` are per answered request: what the variant's calls were billed in
    all (failed ones too: a retried or fallen-back call, a request that failed in the end) over the requests it
    answered (`_answers`); error_rate counts every call, each failed one a failure.

    `score` is the mean of an online evaluation score (`scorer`, e.g. pii_free, refusal, length) of
    sampled live traffic: lower is better with the limits above, higher is better with `min`
    (canary >= min) or `max_decrease` (stable - canary <= max_decrease). Fewer than `min_scores`
    scores per variant is WAITING: no step passes on a handful of scored answers; nor with fewer than
    `AnalysisSpec.min_step_sample` (at most `min_scores`) of the canary's answers served since the step began.

    `drift` is the number of features the drift monitor's latest report covering the canary found drifted
    in a way that can harm (an improvement never counts), held to `max` (e.g. 0): while the canary has a stable
    arm, the canary-versus-stable report of its release produced since the current step began, never the
    deployment's now-versus-reference one (mostly stable's traffic, moved by what clients ask); after a
    blue-green promotion, the deployment's now-versus-reference one (`progress.drift_evidence`).
    `features` restricts it to named features (`finish_reason` covers every `finish_reason:category`);
    a feature counts on the monitor's own alarm, or with `min_psi` on its test's verdict and a PSI at least
    that. No such report yet is WAITING: no data never passes, nor fails.
    """

    name: MetricName
    max: NonNeg | None = None
    max_increase: NonNeg | None = None
    max_ratio: Positive | None = None
    dry_run: bool = False  # measured and shown, never aborts, pauses or holds a step (Argo's dryRun)
    scorer: str = ""  # score metrics only
    min: float | None = None  # score metrics only (higher is better)
    max_decrease: NonNeg | None = None  # score metrics only (higher is better)
    min_scores: Annotated[int, msgspec.Meta(ge=1)] = 30
    features: list[str] = []  # drift metrics only
    min_psi: NonNeg | None = None  # drift metrics only

    def __post_init__(self) -> None:
        lower = self.max is not None or self.max_increase is not None or self.max_ratio is not None
        higher = self.min is not None or self.max_decrease is not None
        if self.name != "drift" and (self.features or self.min_psi is not None):
            raise ValueError(f"metric {self.label}: features and min_psi are for drift metrics")
        if self.name == "drift":
            if self.max is None or self.max_increase is not None or self.max_ratio is not None or higher \
                    or self.scorer:
                raise ValueError("metric drift: give max, the drifted features allowed (e.g. max: 0), and nothing "
                                 "relative: the drift report already compares the canary with its baseline")
            return
        if self.name != "score":
            if higher or self.scorer:
                raise ValueError(f"metric {self.name}: scorer, min and max_decrease are for score metrics")
            if not lower:
                raise ValueError(f"metric {self.name}: give max, max_increase or max_ratio")
            return
        if not self.scorer:
            raise ValueError("metric score: name its scorer (e.g. pii_free, refusal, length)")
        if lower == higher:
            raise ValueError(f"metric score:{self.scorer}: give min or max_decrease (higher is better) or "
                             "max, max_increase or max_ratio (lower is better), not both")

    @property
    def label(self) -> str:
        """The metric's name as shown: `score:pii_free` for scores."""
        return f"score:{self.scorer}" if self.name == "score" else self.name


class AnalysisSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a canary is judged between steps (Argo's interval, count, failureLimit, inconclusiveLimit,
    consecutiveErrorLimit)."""

    metrics: Annotated[list[MetricSpec], msgspec.Meta(min_length=1)]
    min_sample: Annotated[int, msgspec.Meta(ge=10)] = 100  # events per variant before any verdict
    count: Annotated[int, msgspec.Meta(ge=1)] = 1  # successful measurements a step needs to advance
    failure_limit: Annotated[int, msgspec.Meta(ge=0)] = 0  # failed measurements tolerated; one more aborts
    inconclusive_limit: Annotated[int, msgspec.Meta(ge=0)] = 3  # one more pauses for an operator
    # Argo's progressDeadlineSeconds: how long a step's looks may wait for evidence (WAITING) before each further
    # one counts as INCONCLUSIVE (`progress.overdue`), so a canary whose evidence never comes pauses for an operator
    # and a release under post-promotion analysis is rolled back. None: `progress.DEADLINE_INTERVALS` intervals.
    progress_deadline_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # Argo's initialDelay: no look before this long after the canary started (after a blue-green
    # promotion, after the promotion), e.g. to let caches and connection pools warm up
    initial_delay_s: NonNeg = 0.0
    # looks in a row that could not be measured at all (an exception, not missing data); one more aborts
    consecutive_error_limit: Annotated[int, msgspec.Meta(ge=0)] = 4
    alpha: Annotated[float, msgspec.Meta(gt=0, lt=0.5)] = 0.05  # false-abort budget of the whole rollout
    # Look at the last `window_s` seconds only, so a fault that starts late is not diluted by the healthy
    # traffic before it; stable falls back to the whole rollout when its window is too thin (at 100%).
    # None: everything since the canary started.
    window_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # Canary requests served since the current step began that a look needs before it may pass: a step (or the
    # promotion after the last) is never passed on the evidence of the step before it at a lower weight alone.
    # A `score` metric needs as many scores of canary answers served since then (at most its `min_scores`).
    # A failure needs no new evidence (a fault seen is a fault).
    min_step_sample: Annotated[int, msgspec.Meta(ge=1)] = 10

    @property
    def judged(self) -> list[MetricSpec]:
        """The metrics a look judges: `metrics`, and when they judge `error_rate`, each of `OF_ALL` they do not list
        with the first error_rate's `max_increase` (its `max` when it has none) as its `max_increase` (its
        `max_ratio` when it has neither), dry run if that is. Relative only: an application whose clients send many
        bad bodies, or give up early, has a high share on both arms. Left out, a canary refusing a part of its
        requests with a 4xx (probe p15 F2), or whose clients gave up on a part of them before
        `router_unanswered_s` (probe p63 A), was judged on the rest and promoted."""
        names = {m.name for m in self.metrics}
        first = next((m for m in self.metrics if m.name == "error_rate"), None)
        if first is None:
            return self.metrics
        limit = first.max_increase if first.max_increase is not None else first.max

        def alike(name: MetricName) -> MetricSpec:
            if limit is None:  # error_rate with max_ratio only: the same ratio
                return MetricSpec(name=name, max_ratio=first.max_ratio, dry_run=first.dry_run)
            return MetricSpec(name=name, max_increase=limit, dry_run=first.dry_run)
        return [*self.metrics, *(alike(name) for name in OF_ALL if name not in names)]


class MetricResult(msgspec.Struct, frozen=True, kw_only=True):
    """One metric in one measurement: values, the threshold they were held to, and the verdict."""

    name: str
    verdict: Verdict
    canary: float | None = None
    stable: float | None = None
    threshold: float | None = None
    bound: float | None = None  # the canary's confidence bound that was compared with the threshold
    canary_n: int = 0
    stable_n: int = 0
    why: str = ""
    dry_run: bool = False
    higher_is_better: bool = False  # a score held to a floor (min, max_decrease), not a ceiling
    features: list[str] = []  # drift metrics: the features found drifted (what the value counts)
    # Whose canary requests this result judged when they were judged per API key (`groups`), e.g.
    # `API key 3f9a0c12d4e5`; empty: all of them together.
    group: str = ""
    # What else the values count, for a reason (`unanswered`: the canary's calls still in flight counted as failed).
    note: str = ""


class Measurement(msgspec.Struct, frozen=True, kw_only=True):
    """One look at the evidence: overall verdict and every metric's result."""

    verdict: Verdict
    look: int
    metrics: list[MetricResult]
    canary_n: int
    stable_n: int

    def failing(self) -> MetricResult | None:
        """The first metric that failed (or was inconclusive, if none failed)."""
        for wanted in ("FAILED", "INCONCLUSIVE", "WAITING"):
            for m in self.metrics:
                if m.verdict == wanted and not m.dry_run:
                    return m
        return None


@dataclass(frozen=True)
class VariantSample:
    """What one variant served in the analysis window."""

    n: int = 0  # requests in analysis: all but those `refused` or `hung_up`
    errors: int = 0
    # Requests its upstream refused with a 4xx taken for the client's fault (InferenceEvent.client_failed): in no
    # metric but `client_error_rate`, of which they are the share of all requests (`requests`).
    refused: int = 0
    # Answers, and calls that timed out at their time to failure (`from_rows`)
    latency_ms: Sequence[float] = ()
    ttft_ms: Sequence[float] = ()  # streamed answers only, and calls that timed out
    # Per answered request (priced ones, for cost), with what the variant's failed calls were billed spread evenly
    # over them (`_answers`): the mean is what an answer cost in all.
    tokens: Sequence[float] = ()
    cost: Sequence[float] = ()
    scores: Mapping[str, Sequence[float]] = field(default_factory=dict)  # online evaluation, by scorer
    # When each of `scores` was served (unix seconds of the scored answer, in the same order), for comparing like
    # with like in time; a scorer without them: unknown, and its scores are compared with all of stable's.
    score_times: Mapping[str, Sequence[float]] = field(default_factory=dict)
    # The same requests split by the API key that sent them (InferenceEvent.key_id; "" for none), without
    # scores (one key: the whole sample); empty: not split (the key mix is unknown, stable is not weighted).
    by_key: Mapping[str, VariantSample] = field(default_factory=dict)
    # Each request as a column of `ROWS` (`from_rows`), for comparing like with like in time (`_in_time`);
    # None: when each request was served is unknown, and stable's are weighted to the canary's callers only.
    rows: np.ndarray | None = field(default=None, compare=False, repr=False)
    # Requests its clients hung up on while its upstream kept them waiting (`client_disconnected` with KEPT_WAITING,
    # client_failed): in no metric but `hang_up_rate`, of which they are the share of all requests (`requests`); a look waiting for its
    # sample names them (a canary with 0 requests and 163 hung up on is not idle).
    hung_up: int = 0

    @property
    def requests(self) -> int:
        """All of the variant's requests: those in analysis, refused and hung up on."""
        return self.n + self.refused + self.hung_up


# The columns of `VariantSample.rows`: unix seconds, failed (1.0), latency, ttft (0: not streamed), tokens, cost
# (-1: unpriced), refused (1.0: `VariantSample.refused`, failed and unpriced too), timed out (1.0: failed because a
# timeout gave up on the upstream, `evidence.TIMED_OUT`; latency is then the time to failure), hung up (1.0:
# `VariantSample.hung_up`, failed and unpriced too), unit (the sampling unit the request was split to an arm by, its
# user's or session's hash as an exact float, `evidence.unit`; -1.0: none, a unit of its own: `design_effect`).
ROWS = ("time", "failed", "latency_ms", "ttft_ms", "tokens", "cost", "refused", "timed_out", "hung_up", "unit")
# The metrics that are a share of all of a variant's requests (`VariantSample.requests`), those the client is blamed
# for one by one among them: each arm gets the same callers' requests, so a larger share of them on the canary is the
# release's doing. `AnalysisSpec.judged` adds them to an analysis judging error_rate; `measure` judges them before
# `min_sample` requests are in analysis.
OF_ALL: tuple[MetricName, ...] = ("client_error_rate", "hang_up_rate")


def from_rows(rows: np.ndarray) -> VariantSample:
    """The sample of the requests `rows` (`ROWS` by request). Tokens and cost are per answered request, what the
    variant's calls in analysis were billed in all over the requests it answered (`_answers`). Latency and TTFT
    describe answers and the calls that timed out, each at its time to failure (its TTFT too, when no first token came
    before it; the event does not say whether it was streamed): the slower a canary's tail, the more of it times
    out, and judged on its answers alone such a canary looked faster than stable and passed `latency_p95` (probe
    p22 F5), as Flagger's and Argo's latency queries count failed requests. A call that failed fast for another
    reason (a 5xx, a refused connection) says nothing of how fast the release answers: error_rate judges it.
    Refused and hung-up requests count in `refused` and `hung_up` only."""
    _, failed, latency, ttft, _, _, refused, _, hung_up, _ = rows
    kept = _kept(rows)
    ok = (failed == 0) & kept
    n = int(kept.sum())
    timed = _timed(rows)
    return VariantSample(n=n, errors=n - int(ok.sum()), refused=int((refused != 0).sum()),
                         hung_up=int((hung_up != 0).sum()), latency_ms=latency[ok | timed],
                         ttft_ms=np.where(ttft > 0, ttft, latency)[(ok & (ttft > 0)) | timed],
                         tokens=_answers(rows, _TOKENS)[_TOKENS], cost=_answers(rows, _COST)[_COST], rows=rows)


_TOKENS, _COST = ROWS.index("tokens"), ROWS.index("cost")


def _answers(rows: np.ndarray, column: int) -> np.ndarray:
    """The answered requests of `rows` (`ROWS`; in analysis, with a value in `column`: priced, for cost), with what
    the failed calls in analysis were billed (`column`: tokens or cost; often nothing, a call abandoned after it went
    out at its worst case) spread evenly over them: a request's calls a retry or fallback went past (each an event of
    its own, `lockgate.attempt: superseded`), and the requests that failed in the end, are what getting the answers
    cost. So the mean is the variant's bill over the requests it answered: a failed call, billed nothing, never
    counts as a cheap request, and a retried request counts once. Spread over them, not joined to its own request
    (its event says not which): the mean is exact, its spread that of the answers alone. Before, each failed call
    was a request of $0 and 0 tokens, and a stable failing 30% of its calls (retried) made an identical canary read
    1.47x dearer and be aborted, a canary 1.38x dearer failing 35% was promoted (probe p78 F1). O(rows)."""
    value, failed = rows[column], rows[ROWS.index("failed")]
    held = _kept(rows) & (value >= 0)  # cost -1: unpriced
    answered = rows[:, held & (failed == 0)]  # a copy: the sample's own rows stay as they are
    spent = float(value[held & (failed != 0)].sum())
    if spent and answered.shape[1]:
        answered[column] += spent / answered.shape[1]
    return answered


def _kept(rows: np.ndarray) -> np.ndarray:
    """Which of `rows` (`ROWS`) are in analysis: neither refused nor hung up on (`VariantSample.n`)."""
    return (rows[ROWS.index("refused")] == 0) & (rows[ROWS.index("hung_up")] == 0)


def _timed(rows: np.ndarray) -> np.ndarray:
    """Which of `rows` (`ROWS`) failed by a timeout (and count in latency and TTFT: `from_rows`)."""
    failed, timed_out = rows[ROWS.index("failed")], rows[ROWS.index("timed_out")]
    return (failed != 0) & _kept(rows) & (timed_out != 0)


def z_of(alpha_one_sided: float) -> float:
    """The normal quantile for a one-sided level."""
    return _NORMAL.inv_cdf(1.0 - alpha_one_sided)


def wilson(successes: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound near 0 and 1, where errors live); `n` may be an effective
    sample size (a weighted baseline's, `_weighted_rate`) and `successes` then `n` times the weighted rate."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def diff_lower(x1: float, n1: float, x2: float, n2: float, z: float) -> float:
    """Newcombe's hybrid score lower bound of p1 - p2 (canary minus stable)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, _ = wilson(x1, n1, z)
    _, u2 = wilson(x2, n2, z)
    return (p1 - p2) - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile by the nearest-rank rule (a value that was observed)."""
    return _quantile_sorted(np.sort(np.asarray(values, dtype=np.float64)), q)


def quantile_bounds(values: Sequence[float], q: float, z: float) -> tuple[float, float]:
    """Distribution-free bounds of a quantile from order statistics (normal approximation of the binomial)."""
    return _bounds_sorted(np.sort(np.asarray(values, dtype=np.float64)), q, z)


def _quantile_sorted(s: np.ndarray, q: float) -> float:
    return float(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))])


def _bounds_sorted(s: np.ndarray, q: float, z: float, deff: float = 1.0) -> tuple[float, float]:
    """`quantile_bounds` of sorted values; `deff`: their design effect (`design_effect`), which widens the ranks'
    spread as n / deff independent values would."""
    n = len(s)
    spread = z * math.sqrt(n * q * (1 - q) * deff)
    lo = max(0, math.floor(n * q - spread) - 1)
    hi = min(n - 1, math.ceil(n * q + spread) - 1)
    return float(s[lo]), float(s[max(lo, hi)])


def mean_bounds(values: Sequence[float], z: float, deff: float = 1.0) -> tuple[float, float, float]:
    """Mean and its normal-approximation bounds; `deff`: the values' design effect (`design_effect`), the variance
    of their mean being deff times that of independent values."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = z * sd / math.sqrt(len(v)) * math.sqrt(deff)
    return mean, mean - half, mean + half


def design_effect(residuals: np.ndarray, units: np.ndarray) -> float:
    """How many times the variance of an estimate is what it would be if its values were independent, when the
    values of one sampling unit (`units`: a user, as `evidence.unit` records it; a negative one: a unit of its own)
    are not: the standard cluster-robust ("sandwich") variance over the units, C / (C - 1) sum over units of the
    square of the sum of their `residuals`, over the same estimator with every value a unit of its own,
    n / (n - 1) sum of the squared residuals. `residuals` are each value's share of the estimate's error: its
    deviation from the mean (of its stratum, times its weight, for a weighted estimate: `_deff`).

    Traffic is split by user (sticky), and a user's requests are alike (prompt lengths, habits): a canary's 880
    requests of a few users are a few draws, not 880, and counted as 880 an identical canary aborted on which users
    landed on its arm (probe p75 F1). Every unit of its own (a user sending one request, or requests naming none):
    exactly 1, the bounds as they were. Never below 1 (a few units' chance agreement never narrows a bound below the
    independent one) nor above n: one unit (C = 1, its variance between units unknown) counts as one value."""
    n = len(residuals)
    shared = units >= 0
    _, inverse = np.unique(units[shared], return_inverse=True)
    singles = n - int(shared.sum())
    c = int(inverse.max(initial=-1)) + 1 + singles
    if c == n:  # every value its own unit: exactly the independent variance
        return 1.0
    if c < 2:
        return float(n)
    alone = float((residuals * residuals).sum())
    if alone <= 0.0:  # no spread at all: nothing to widen (a rate of 0 keeps Wilson's bound)
        return 1.0
    sums = np.bincount(inverse, weights=residuals[shared])
    clustered = float((sums * sums).sum()) + float((residuals[~shared] ** 2).sum())
    return min(float(n), max(1.0, (c / (c - 1) * clustered) / (n / (n - 1) * alone)))


def _unit_values(rows: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The values of metric `name` in `rows` (`ROWS`), as `from_rows` makes them (rates: 1.0 for each failure, 0.0
    else), with the unit of each (`design_effect`)."""
    r = _value_rows(rows, name)
    column = {"error_rate": "failed", "client_error_rate": "refused", "hang_up_rate": "hung_up",
              "tokens_per_request": "tokens", "cost_per_request": "cost"}.get(name, "latency_ms")
    values = r[ROWS.index(column)]
    if name.startswith("ttft"):
        ttft = r[ROWS.index("ttft_ms")]
        values = np.where(ttft > 0, ttft, values)
    return (values != 0).astype(np.float64) if name in _RATES else values, r[ROWS.index("unit")]


def _deff(cells: Sequence[tuple[VariantSample, float]], name: str, at: float | None = None) -> float:
    """The design effect (`design_effect`) of metric `name` estimated from `cells` (a sample with the weight of each
    of its values; one sample: its own mean), each value's residual being its weight times its deviation from its
    cell's mean (a stratified estimate's variance is within its cells; a user's values in several cells add up).
    `at`: of a quantile at `at`, whose residuals are those of the share of values at or below it. 1.0 when a sample
    does not say which request is whose (`VariantSample.rows` None)."""
    residuals, units = [], []
    for sample, w in cells:
        if sample.rows is None:
            return 1.0
        values, unit = _unit_values(sample.rows, name)
        if not len(values):
            continue
        if at is not None:
            values = (values <= at).astype(np.float64)
        residuals.append(w * (values - values.mean()))
        units.append(unit)
    if not residuals:
        return 1.0
    return design_effect(np.concatenate(residuals), np.concatenate(units))


def _threshold(spec: MetricSpec, stable: float | None) -> float | None:
    """The tightest of the limits that apply (relative ones only with a stable value)."""
    limits = [spec.max] if spec.max is not None else []
    if stable is not None and spec.max_increase is not None:
        limits.append(stable + spec.max_increase)
    if stable is not None and spec.max_ratio is not None:
        limits.append(stable * spec.max_ratio)
    return min(limits) if limits else None


def _values(sample: VariantSample, name: str) -> Sequence[float]:
    if name.startswith("latency"):
        return sample.latency_ms
    if name.startswith("ttft"):
        return sample.ttft_ms
    return sample.tokens if name == "tokens_per_request" else sample.cost


# How much more of the canary's answers than of stable's (as a share, in the same time) a scorer may fail on before a
# score metric no longer passes: its errors are evidence about the answers it could not score (probe p22 F1).
SCORE_ERROR_MARGIN = 0.05


def _judge_score(spec: MetricSpec, canary: VariantSample, stable: VariantSample, z: float,
                 baseline_final: bool = False) -> MetricResult:
    """An online score's mean: lower-is-better limits as for tokens, or higher-is-better `min`/`max_decrease`,
    after the scorer's errors (`_judge_score_errors`). Like with like in time as requests are (`_in_time`): the
    canary's scores against stable's of the same time, those stable has none of left out of relative limits.
    `baseline_final`: stable's scores can grow no more (see `measure`), and are compared as they are."""
    # NaN marks a scorer error (InferenceScored.measured: e.g. the LLM judge was down or its reply held no score).
    (c_rows, c_timed), (s_rows, s_timed) = _score_rows(canary, spec.scorer), _score_rows(stable, spec.scorer)
    c_ok, s_ok = ~np.isnan(c_rows[1]), ~np.isnan(s_rows[1])
    scored, stable_scored = int(c_ok.sum()), int(s_ok.sum())
    errors, stable_errors = c_rows.shape[1] - scored, s_rows.shape[1] - stable_scored
    base = {"name": spec.label, "canary_n": scored, "stable_n": stable_scored}
    relative = spec.max_increase is not None or spec.max_ratio is not None or spec.max_decrease is not None
    short = scored < spec.min_scores or (relative and stable_scored < spec.min_scores)
    # Each of the two tests below may fail a look: each at half the metric's level, so that both together abort a
    # canary no worse than its limits no more often than one test alone would (the union bound of `measure`).
    z = z_of((1.0 - _NORMAL.cdf(z)) / 2)
    timed = not baseline_final and c_timed and s_timed
    note = (f"{scored} scored + {errors} scorer errors (stable {stable_scored} + {stable_errors})"
            if errors or stable_errors else "")
    if errors and c_rows.shape[1] >= spec.min_scores:
        erred = _judge_score_errors(spec, c_rows, s_rows, z, timed)
        if erred is not None:
            return MetricResult(**base, verdict=erred[0], why=f"{erred[1]}; {note}")  # type: ignore[arg-type]
    # Scores missing because the scorer fails on both arms alike (an outage): INCONCLUSIVE, never a pass, never
    # an abort.
    if (short and (errors or (relative and stable_errors))) or errors > scored or \
            (relative and stable_errors > stable_scored):
        return MetricResult(**base, verdict="INCONCLUSIVE",  # type: ignore[arg-type]
                            why=f"scorer errors ({errors} canary, {stable_errors} stable): no data is never a pass")
    if short and baseline_final and relative and scored >= spec.min_scores:
        # As for events (`measure`): a baseline that gets no more scores would hold the look WAITING for ever,
        # never counted against inconclusive_limit, and the unverified release would keep all the traffic.
        return MetricResult(**base, verdict="INCONCLUSIVE",  # type: ignore[arg-type]
                            why=f"baseline has {stable_scored} scores of the {spec.min_scores} needed and gets "
                                f"no more (canary {scored}): no data is never a pass")
    if short:
        return MetricResult(**base, verdict="WAITING",  # type: ignore[arg-type]
                            why=f"waiting for {spec.min_scores} scores per variant (is online evaluation on?)")
    values = c_rows[:, c_ok]
    compared, cells = _cells(values, s_rows[:, s_ok], timed)
    left_out = scored - compared.shape[1]
    if not left_out or not relative:
        result = _score_verdict(spec, values[1], cells, z)
    else:
        result = _score_in_time(spec, values[1], compared[1], cells, left_out, z)
    return msgspec.structs.replace(result, why="; ".join(w for w in (result.why, note) if w))


def _score_rows(sample: VariantSample, scorer: str) -> tuple[np.ndarray, bool]:
    """A sample's scores of `scorer` as rows (time, value), and whether it says when each was served (if not, the
    times are NaN and unused)."""
    values = np.asarray(sample.scores.get(scorer, ()), dtype=np.float64)
    times = sample.score_times.get(scorer)
    timed = times is not None and len(times) == len(values)
    at = np.asarray(times, dtype=np.float64) if timed else np.full(len(values), np.nan)
    return np.vstack([at, values]).reshape(2, len(values)), timed


def _cells(canary: np.ndarray, stable: np.ndarray, timed: bool) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:
    """Rows (time, value) of the canary and of stable as `_in_time` compares them: (the canary's compared, stable's
    cells with the weight of each of their values); `timed` False: every one of the canary's against all of
    stable's, evenly."""
    if not timed:
        return canary, [(stable, 1.0 / stable.shape[1])] if stable.shape[1] else []
    inside, found = _in_time(canary, stable)
    total = sum(n for _, n in found)
    return inside, [(c, n / total / c.shape[1]) for c, n in found if n]


def _judge_score_errors(spec: MetricSpec, canary: np.ndarray, stable: np.ndarray, z: float,
                        timed: bool) -> tuple[Verdict, str] | None:
    """The scorer's errors judged like a rate (as `client_error_rate` judges refusals): the share of the canary's
    scored answers (rows time, value; NaN an error) the scorer failed on against stable's share of the same time
    (`_cells`). A judge fails on the odd answers (ones quoting a score, very long, in a format it chokes on), so
    the survivors are no sample of the canary's answers: judged on them, a canary whose wrong answers the judge
    could not score was promoted on its good ones (probe p22 F1). FAILED when significantly above stable's share
    plus SCORE_ERROR_MARGIN, INCONCLUSIVE when above it; None: the scores decide. Only a comparison of the same
    time may fail: an outage of the scorer hits both arms then, while against older stable scores (after a
    promotion, at 100%) it is not told apart from the canary's fault."""
    compared, cells = _cells(canary, stable, timed)
    if timed and compared.shape[1] < spec.min_scores:  # too few of its time: every one, against all of stable's
        (compared, cells), timed = _cells(canary, stable, False), False
    x_c, n_c = int(np.isnan(compared[1]).sum()), compared.shape[1]
    x_s, n_s = _stratified_rate([(int(np.isnan(c[1]).sum()), c.shape[1], w) for c, w in cells]) if cells else \
        (0.0, 0.0)
    p_c, p_s = x_c / n_c, x_s / n_s if n_s else 0.0
    shares = (f"the scorer failed on {x_c} of {n_c} canary answers ({p_c:.0%}) against {p_s:.0%} of stable's"
              + (" of the same time" if timed else "") + f" (margin {SCORE_ERROR_MARGIN:g})")
    if timed and n_s and diff_lower(x_c, n_c, x_s, n_s, z) > SCORE_ERROR_MARGIN:
        return "FAILED", (f"{shares}: significantly more (the answers a scorer cannot score are evidence too, "
                          "never left out)")
    if p_c > p_s + SCORE_ERROR_MARGIN:
        return "INCONCLUSIVE", (f"{shares}: more, not significantly" if timed and n_s else
                                f"{shares}: more, with no stable score of the same time to tell an outage apart")
    return None


def _score_in_time(spec: MetricSpec, values: np.ndarray, compared: np.ndarray, cells: list[tuple[np.ndarray, float]],
                   left_out: int, z: float) -> MetricResult:
    """A score metric with a limit relative to stable when `left_out` of the canary's scores have none of stable's
    of their time (`_cells`), as `_judge_in_time` does for requests: the relative limits on the others
    (`compared`), an absolute `min` or `max` on every one; nothing to compare is INCONCLUSIVE."""
    note = (f"{left_out} canary scores of answers served before the first or after the last of stable's (e.g. at "
            "100%) are left out of the comparison with stable")
    parts = []
    if spec.min is not None or spec.max is not None:
        absolute = msgspec.structs.replace(spec, max_increase=None, max_ratio=None, max_decrease=None)
        parts.append(_score_verdict(absolute, values, cells, z))
    if len(compared) and cells:
        r = _score_verdict(msgspec.structs.replace(spec, min=None, max=None), compared, cells, z)
        parts.append(msgspec.structs.replace(r, why="; ".join(w for w in (r.why, note) if w)))
    else:
        parts.append(MetricResult(name=spec.label, verdict="INCONCLUSIVE", canary_n=len(values),
                                  stable_n=sum(c.shape[1] for c, _ in cells),
                                  why=f"no canary score to compare with stable's of the same time: {note}; "
                                      "older stable scores are never its baseline, and no data is never a pass"))
    return _deciding(parts)


def _score_verdict(spec: MetricSpec, values: np.ndarray, cells: list[tuple[np.ndarray, float]],
                   z: float) -> MetricResult:
    """The canary's scores `values` against stable's `cells` (rows time, value, and the weight of each value)."""
    base = {"name": spec.label, "canary_n": len(values), "stable_n": sum(c.shape[1] for c, _ in cells)}
    c, c_lo, c_hi = mean_bounds(values, z)
    s = s_lo = s_hi = None
    if cells:
        s, se = _stratified_mean([(cell[1], w) for cell, w in cells])
        s_lo, s_hi = s - z * se, s + z * se
    if spec.min is None and spec.max_decrease is None:  # lower is better
        threshold, lenient = _threshold(spec, s), _threshold(spec, s_hi)
        assert threshold is not None and lenient is not None
        return _verdict(base, c, s, threshold, c_lo, c_lo > lenient)
    floors = [spec.min] if spec.min is not None else []
    lenient_floors = list(floors)
    if s is not None and s_lo is not None and spec.max_decrease is not None:
        floors.append(s - spec.max_decrease)
        lenient_floors.append(s_lo - spec.max_decrease)
    threshold, lenient = max(floors), max(lenient_floors)
    # Failing needs the canary's upper bound below the floor that stable's lower bound sets.
    failed = c_hi < lenient
    verdict: Verdict = "FAILED" if failed else ("SUCCESSFUL" if c >= threshold else "INCONCLUSIVE")
    why = "" if verdict == "SUCCESSFUL" else (
        "significantly below threshold" if failed else "below threshold, not significantly yet")
    return MetricResult(**base, verdict=verdict, canary=c, stable=s, threshold=threshold, bound=c_hi,  # type: ignore[arg-type]
                        why=why, higher_is_better=True)


def _judge_drift(spec: MetricSpec, report: DriftReport | None) -> MetricResult:
    """The harmfully drifted features of the report covering the canary, counted against `max`."""
    if report is None:
        return MetricResult(name="drift", verdict="WAITING",
                            why="waiting for a drift report covering the canary since this step began (its window "
                                "against stable's; at 100% and after a promotion, the deployment's against its "
                                "reference): is the drift monitor running?")
    base = {"name": "drift", "canary_n": report.current_n, "stable_n": report.reference_n}
    which = (f"{report.comparison} report {report.id}" + (f" of {report.release} vs {report.reference_release}"
                                                         if report.comparison == "canary_vs_stable" else ""))
    measured = [f for f in report.features if driftharm.named(f, spec.features)]
    if not measured:
        return MetricResult(**base, verdict="WAITING",  # type: ignore[arg-type]
                            why=f"{which} measures none of {', '.join(spec.features)}")
    found = driftharm.harmful(report, spec.features, spec.min_psi)
    assert spec.max is not None  # MetricSpec requires it for drift
    verdict: Verdict = "FAILED" if len(found) > spec.max else "SUCCESSFUL"
    if found:
        why = f"DRIFT in {', '.join(driftharm.describe(f) for f in found)} ({which})"
    else:
        top = max(measured, key=lambda f: f.psi)
        why = f"no harmful drift in {len(measured)} features, largest PSI {top.psi:.3g} ({top.feature}; {which})"
    return MetricResult(**base, verdict=verdict, canary=float(len(found)), threshold=float(spec.max),  # type: ignore[arg-type]
                        why=why, features=[f.feature for f in found])


def _judge(spec: MetricSpec, canary: VariantSample, stable: VariantSample, z: float,
           drift: DriftReport | None = None, baseline_final: bool = False,
           weights: list[tuple[VariantSample, float]] | None = None, min_sample: int = 0) -> MetricResult:
    """One metric of `canary` against `stable`; `weights` (`_weights`): stable's keys and the weight of each of their
    requests or values, stable's statistics then being weighted ones (None: every stable request weighs the same).
    Every bound counts a user's requests as one unit's (`design_effect`), and with `min_sample` a look that would
    not fail WAITS until each arm's values count as that many independent ones (`_enough`)."""
    if spec.name == "score":
        return _judge_score(spec, canary, stable, z, baseline_final)
    if spec.name == "drift":
        return _judge_drift(spec, drift)
    name = spec.name
    base = {"name": name, "canary_n": canary.n, "stable_n": stable.n}
    relative = spec.max_increase is not None or spec.max_ratio is not None
    if name in _RATES:
        x_c, n_c = _rate(canary, name)
        base = {"name": name, "canary_n": n_c, "stable_n": _rate(stable, name)[1]}
        if not n_c or (relative and not (weights or _rate(stable, name)[1])):
            return MetricResult(**base, verdict="INCONCLUSIVE", why="no data: never a pass")  # type: ignore[arg-type]
        # A weighted baseline enters the intervals as its weighted rate over its effective size (see `_weighted_rate`).
        x_s, n_s = _weighted_rate(weights, name) if weights is not None else (float(_rate(stable, name)[0]),
                                                                             float(_rate(stable, name)[1]))
        p_c, p_s = x_c / n_c, x_s / n_s if n_s else None
        # Each arm as its effective number of independent requests (`design_effect`); its rate stays.
        d_c, d_s = _deff([(canary, 1.0)], name), _deff(weights or [(stable, 1.0)], name)
        sized = (n_c, d_c), (_rate(stable, name)[1] if weights is None else sum(_rate(s, name)[1] for s, _ in weights),
                             d_s)
        x_c, n_c, x_s, n_s = x_c / d_c, n_c / d_c, x_s / d_s, n_s / d_s
        threshold = _threshold(spec, p_s)
        assert threshold is not None  # stable has a rate here, or an absolute max applies
        lo_c, _ = wilson(x_c, n_c, z)
        _, hi_s = wilson(x_s, n_s, z)
        # Relative limits are held against stable's bound too, so stable's own noise never aborts.
        failed = ((spec.max is not None and lo_c > spec.max)
                  or (spec.max_increase is not None and n_s
                      and diff_lower(x_c, n_c, x_s, n_s, z) > spec.max_increase)
                  or (spec.max_ratio is not None and n_s and lo_c > spec.max_ratio * hi_s))
        return _enough(_verdict(base, p_c, p_s, threshold, lo_c, bool(failed)), min_sample, sized, relative,
                       baseline_final)
    values, stable_values = _values(canary, name), _values(stable, name)
    if not len(values) or (relative and not len(stable_values)):
        return MetricResult(**base, verdict="INCONCLUSIVE", why="no data: never a pass")
    d_s = 1.0
    if name in ("tokens_per_request", "cost_per_request"):
        d_c = _deff([(canary, 1.0)], name)
        c, c_lo, _ = mean_bounds(values, z, d_c)
        if weights is not None:
            s, s_hi, d_s = _weighted_mean(weights, name, z)
        elif len(stable_values):
            d_s = _deff([(stable, 1.0)], name)
            s, _, s_hi = mean_bounds(stable_values, z, d_s)
        else:
            s = s_hi = None
    else:
        q = _QUANTILES[name.rsplit("_", 1)[1]]
        # `measure` sorted the latency and ttft values once, so each quantile is an index.
        c = _quantile_sorted(values, q)  # type: ignore[arg-type]
        d_c = _deff([(canary, 1.0)], name, c)
        c_lo, _ = _bounds_sorted(values, q, z, d_c)  # type: ignore[arg-type]
        if weights is not None:
            s, s_hi, d_s = _weighted_quantile(weights, name, q, z)
        elif len(stable_values):
            s = _quantile_sorted(stable_values, q)  # type: ignore[arg-type]
            d_s = _deff([(stable, 1.0)], name, s)
            s_hi = _bounds_sorted(stable_values, q, z, d_s)[1]  # type: ignore[arg-type]
        else:
            s = s_hi = None
    threshold = _threshold(spec, s)
    lenient = _threshold(spec, s_hi)
    assert threshold is not None and lenient is not None
    # Failing needs the canary's lower bound past the threshold that stable's upper bound sets.
    failed = c_lo > lenient
    stable_n = len(stable_values) if weights is None else sum(len(_values(w, name)) for w, _ in weights)
    return _enough(_verdict(base, c, s, threshold, c_lo, failed), min_sample, ((len(values), d_c), (stable_n, d_s)),
                   relative, baseline_final)


# How `_enough`'s verdicts begin (the baseline still growing, or final), and what they add when the point estimate
# is past the threshold: `_judge_groups` tells them by these.
_SHORT = ("not yet judged: ", "no longer judged: ")
_PAST = "the canary's point estimate is past its threshold"


def _enough(result: MetricResult, min_sample: int, sized: tuple[tuple[int, float], tuple[int, float]],
            relative: bool, baseline_final: bool) -> MetricResult:
    """`result` WAITING (INCONCLUSIVE when only the baseline is short and `baseline_final`: it grows no more) while
    an arm's values, (count, design effect) in `sized` (canary's, stable's; stable's only with a `relative` limit),
    count as fewer than `min_sample` independent ones: a pass on the point estimate needs `min_sample` users' worth
    of evidence, not `min_sample` requests of a few users (a canary 16% costlier than stable was promoted on which
    users landed on it, probe p75 F1). A failure stands: its bound already counts users (`design_effect`). A design
    effect of 1 (every user's requests as unalike as anyone's, or one request a user) leaves `result` as it was.
    The reason says when the point estimate is past the threshold (`_PAST`): no verdict, but evidence pointing to a
    failure, which an API key's group too short to judge alone holds the look on (`_judge_groups`)."""
    if result.verdict == "FAILED" or not min_sample:
        return result
    arms = (("canary", *sized[0]), ("stable", *sized[1])) if relative else (("canary", *sized[0]),)
    short = [(arm, n, d) for arm, n, d in arms if d > 1.0 and n / d < min_sample]
    if not short:
        return result
    counted = "; ".join(f"{arm}'s {n} count as {n / d:.0f} independent {'one' if round(n / d) == 1 else 'ones'} "
                        f"(design effect {d:.3g})" for arm, n, d in short)
    final = baseline_final and all(arm == "stable" for arm, _, _ in short)
    past = _beyond(result) > 0
    why = (f"{_SHORT[final]}{counted}, short of min_sample "
           f"{min_sample}: each user's requests are alike and all on one arm, so a comparison of a few users is "
           "of which users landed on which arm" + (f"; {_PAST}" if past else "")
           + ("; the baseline gets no more: no data is never a pass" if final else ""))
    return msgspec.structs.replace(result, verdict="INCONCLUSIVE" if final else "WAITING", why=why, canary=None)


# Metrics that are a share of requests, not of values: (failures, requests) of a sample (`_rate`).
_RATES = ("error_rate", *OF_ALL)


def _rate(s: VariantSample, name: str) -> tuple[int, int]:
    """A sample's (failures, requests) for rate metric `name`: failed of those in analysis (error_rate), refused
    of all (client_error_rate), or hung up on of all (hang_up_rate)."""
    if name == "error_rate":
        return s.errors, s.n
    return (s.refused if name == "client_error_rate" else s.hung_up), s.requests


def _count(s: VariantSample, name: str) -> int:
    """How many requests (rates) or values (the others) of metric `name` a sample holds."""
    return _rate(s, name)[1] if name in _RATES else len(_values(s, name))


# A key's own stable requests stand for its canary requests in the baseline once it has this many values of the
# metric (the fewest any sample is judged on: AnalysisSpec.min_sample's floor); with fewer (none: each of its users
# hashes to the canary) a handful of requests would set the baseline of all its canary requests, so the whole stable
# sample stands for them, as it did for every key before baselines were weighted.
MIN_STRATUM = 10


def _weights(group: Group, name: str) -> list[tuple[VariantSample, float]] | None:
    """The baseline of `group` for metric `name`: stable's requests re-weighted to the group's mix of callers, as
    each stable key with the weight of each of its requests (error_rate) or values (the others), summing to 1. Each
    of the group's keys' share of its canary requests (values) goes to the key's own stable ones if it has
    MIN_STRATUM of them; the share of the keys that have fewer is spread evenly over all stable requests. One
    sample weighted evenly: that sample as it is (a key's own stable requests; all of them with one key, or
    with no key's own). None: the samples are not split by key, stable is compared as it is."""
    if not group.canary_keys or not group.stable_keys:
        return None

    count = partial(_count, name=name)
    canary = {k: count(s) for k, s in group.canary_keys.items()}
    stable = {k: count(s) for k, s in group.stable_keys.items()}
    c_total, s_total = sum(canary.values()), sum(stable.values())
    if not c_total or not s_total:
        return None
    own = {k: c / c_total for k, c in canary.items() if c and stable.get(k, 0) >= MIN_STRATUM}
    rest = sum(c for k, c in canary.items() if k not in own) / c_total
    found = [(group.stable_keys[k], w) for k, n in stable.items() if n and (w := own.get(k, 0.0) / n + rest / s_total)]
    if not rest and len(found) == 1 or rest and not own:
        return [(found[0][0] if not rest else group.stable, 1.0)]
    return found


# The most cells in time (`_in_time`) one stratum's stable values are cut into: a cell a hundredth of the window
# still lies within one rollout step but the one a step begins in, and a look's cost stays that of a few hundred
# strata (50,000 requests an arm in cells of 10 took seconds a look).
MAX_CELLS = 100


def _baseline(group: Group, name: str) -> tuple[VariantSample, list[tuple[VariantSample, float]] | None, int]:
    """The baseline of `group` for metric `name` like with like in time as well as in callers, when the samples
    say when each request was served: (the canary's values compared, stable's weighted as `_weights` does it, how
    many canary values were left out). Each key's canary values that `_weights` holds to its own stable ones are
    compared with those of the same time (`_in_time`), the other keys' with all of stable's of the same time. The
    canary's weight rises step by step, so its sample leans to later requests and stable's to earlier ones: against
    the whole window, a caller that sent short prompts first and long ones later aborted a healthy canary (and the
    other way round would hide a costly one). Without times (or `in_time` False): `_weights`, nothing left out."""
    samples = [*group.canary_keys.values(), *group.stable_keys.values(), group.stable]
    if not group.in_time or not group.canary_keys or any(s.rows is None for s in samples):
        return group.canary, _weights(group, name), 0

    count = partial(_count, name=name)
    stable_keys = group.stable_keys
    own = {k for k, s in group.canary_keys.items()
           if count(s) and k in stable_keys and count(stable_keys[k]) >= MIN_STRATUM}
    pairs = [(s.rows, stable_keys[k].rows) for k, s in group.canary_keys.items() if k in own]
    rest = [s.rows for k, s in group.canary_keys.items() if k not in own]
    if rest:
        pairs.append((np.concatenate(rest, axis=1), group.stable.rows))
    compared, cells = [], []
    for canary_rows, stable_rows in pairs:
        assert canary_rows is not None and stable_rows is not None
        inside, found = _in_time(_value_rows(canary_rows, name), _value_rows(stable_rows, name))
        compared.append(inside)
        cells += found
    total = sum(n for _, n in cells)
    canary = _sorted(from_rows(np.concatenate(compared, axis=1)))
    weights = [(from_rows(c), n / total / c.shape[1]) for c, n in cells if n] if total else None
    return canary, weights, count(group.canary) - total


def _value_rows(rows: np.ndarray, name: str) -> np.ndarray:
    """The requests of `rows` that have a value of metric `name` (`from_rows`: answers, and for latency and TTFT
    calls that timed out; streamed; for tokens and cost, answers priced, with the failed calls' bill spread over
    them)."""
    _, failed, _, ttft, _, _, _, _, _, _ = rows
    if name in OF_ALL:
        return rows
    if name == "error_rate":
        return rows[:, _kept(rows)]
    if name.startswith("ttft"):
        return rows[:, ((failed == 0) & (ttft > 0)) | _timed(rows)]
    if name.startswith("latency"):
        return rows[:, (failed == 0) | _timed(rows)]
    return _answers(rows, _COST if name == "cost_per_request" else _TOKENS)


def _in_time(canary: np.ndarray, stable: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
    """Strata in time: stable's values in the order they were served, cut into cells of MIN_STRATUM, or into
    MAX_CELLS cells when it has more (the last one up to twice as large), each canary value in the cell of its time: (the canary's values compared, each cell's stable
    values with how many canary ones it holds). Within a rollout step the weight is constant, so both arms sample
    the same period and a cell's canary and stable values are of the same traffic (only the cell a step begins in
    mixes two steps). A canary value before stable's first or after its last (a step at 100%: stable served
    nothing) is left out: none of stable's is of its time. Cells follow stable's traffic, so they are narrow
    where it is busy and never too thin to weigh (a fixed bin of a quiet deployment might hold no stable value)."""
    if not stable.shape[1]:
        return canary[:, :0], []
    s = stable[:, np.argsort(stable[0], kind="stable")]
    size = max(MIN_STRATUM, -(-s.shape[1] // MAX_CELLS))
    cuts = [size * j for j in range(1, max(1, s.shape[1] // size))]
    t = canary[0]
    inside = (t >= s[0, 0]) & (t <= s[0, -1])
    held = np.bincount(np.searchsorted(s[0, cuts], t[inside], side="right"), minlength=len(cuts) + 1)
    return canary[:, inside], list(zip(np.split(s, cuts, axis=1), (int(n) for n in held), strict=True))


def _weighted_rate(weights: list[tuple[VariantSample, float]], name: str = "error_rate") -> tuple[float, float]:
    """A weighted baseline's error rate as (effective errors, effective size) (`_stratified_rate`; `_judge` divides
    both by the design effect of its users, `_deff`)."""
    return _stratified_rate([(*_rate(s, name), w) for s, w in weights])


def _stratified_rate(cells: list[tuple[float, int, float]]) -> tuple[float, float]:
    """Strata (failures, size, the weight of each of its members) as one rate's (effective failures, effective
    size): the rate is sum(w * failures), the size Kish's effective sample size 1 / sum(w^2) over members.
    Approximation: the Wilson and Newcombe bounds then treat the baseline as that many equally weighted requests,
    exact when the weights are equal and wider the more uneven they are (on the side of no abort); an exact
    stratified variance sum(w^2 n p (1-p)) would be 0 for strata without errors and lose Wilson's soundness near 0,
    where error rates live."""
    rate = sum(w * x for x, _, w in cells)
    n_eff = 1.0 / sum(n * w * w for _, n, w in cells)
    return rate * n_eff, n_eff


def _weighted_mean(weights: list[tuple[VariantSample, float]], name: str,
                   z: float) -> tuple[float, float, float]:
    """A weighted baseline's mean of `name`, its upper bound (`_stratified_mean`, its variance times its design
    effect: `_deff`) and that design effect."""
    mean, se = _stratified_mean([(np.asarray(_values(s, name), dtype=np.float64), w) for s, w in weights])
    deff = _deff(weights, name)
    return mean, mean + z * se * math.sqrt(deff), deff


def _stratified_mean(cells: list[tuple[np.ndarray, float]]) -> tuple[float, float]:
    """Strata (values, the weight of each) as one mean and its standard error: the variance is the stratified one,
    sum over strata of w^2 n s^2 with s the stratum's own standard deviation (its values are independent of the
    others'), so the difference between callers' (or times') values does not widen it."""
    mean = var = 0.0
    for v, w in cells:
        mean += w * float(v.sum())
        var += w * w * len(v) * (float(v.var(ddof=1)) if len(v) > 1 else 0.0)
    return mean, math.sqrt(var)


def _weighted_quantile(weights: list[tuple[VariantSample, float]], name: str, q: float,
                       z: float) -> tuple[float, float, float]:
    """A weighted baseline's q-quantile (the first value whose cumulative weight reaches q: nearest rank, an
    observed value) and its upper bound, the quantile at q + z sqrt(q (1 - q) / n_eff) with Kish's effective size
    n_eff = 1 / sum(w^2). Approximation: the order-statistic bound of `_bounds_sorted` (which is this with equal
    weights) applied to the weighted distribution as if it were n_eff equally weighted values; n_eff over the
    design effect of the share of values at or below the quantile (`_deff`), which is returned third."""
    values = np.concatenate([np.asarray(_values(s, name), dtype=np.float64) for s, _ in weights])
    each = np.concatenate([np.full(len(_values(s, name)), w) for s, w in weights])
    order = np.argsort(values, kind="stable")
    values, cum = values[order], np.cumsum(each[order])
    n_eff = 1.0 / float((each * each).sum())

    def at(p: float) -> float:
        return float(values[min(len(values) - 1, int(np.searchsorted(cum, p - 1e-12 * cum[-1])))])

    point = at(q)
    deff = _deff(weights, name, point)
    return point, at(min(1.0, q + z * math.sqrt(q * (1 - q) / (n_eff / deff)))), deff


def _verdict(base: dict[str, object], canary: float, stable: float | None, threshold: float, bound: float,
             failed: bool) -> MetricResult:
    verdict: Verdict = "FAILED" if failed else ("SUCCESSFUL" if canary <= threshold else "INCONCLUSIVE")
    why = "" if verdict == "SUCCESSFUL" else (
        "significantly above threshold" if failed else "above threshold, not significantly yet")
    return MetricResult(**base, verdict=verdict, canary=canary, stable=stable,  # type: ignore[arg-type]
                        threshold=threshold, bound=bound, why=why)


@dataclass(frozen=True)
class Group:
    """Canary requests judged together (`groups`), and stable's requests as `_weights` weights them for it."""

    label: str  # whose requests: "" for all of the canary's, else e.g. `API key 3f9a0c12d4e5`
    canary: VariantSample
    stable: VariantSample  # all of stable's
    canary_keys: Mapping[str, VariantSample] = field(default_factory=dict)  # the group's requests by key
    stable_keys: Mapping[str, VariantSample] = field(default_factory=dict)  # all of stable's by key
    # Stable's requests are compared with the canary's of the same time (`_in_time`); False: stable cannot grow
    # (after a blue-green promotion its baseline is the old release's traffic before it, by design).
    in_time: bool = True


def groups(canary: VariantSample, stable: VariantSample, min_sample: int, name: str) -> list[Group]:
    """The canary's requests as metric `name` judges them: all of them together (named ""), then each API key with
    at least `min_sample` values of the metric (`_count`: requests for rates, streamed answers for TTFT, answers
    for latency, answered requests for tokens, answered priced ones for cost) alone (most values first), then the
    keys under it that have values pooled (if the pool has `min_sample`), each against the same callers' stable
    requests (`_weights`).
    Judged only all together, one key's successful requests aimed at the canary would dilute every other caller's
    failures; judged only per key, the same key's `min_sample` good requests would leave the failures of callers
    under `min_sample` unjudged. With one key with values, or none with `min_sample` alone: all together, as before.

    A key without values of the metric is in no group of its own: sized on its requests, a key whose calls are
    never streamed was judged alone on TTFT, INCONCLUSIVE (no data), and so every look was, and a healthy canary
    paused (probe p36 F2); so was one whose calls all fail fast on both arms, on latency and tokens. All requests
    together with no value of the metric stays INCONCLUSIVE: no data never passes.

    Against every caller's stable requests, a caller whose requests differ from the others' (long prompts: a
    summariser) was held to a baseline of the others' requests, and a healthy canary aborted (or a caller's limit
    set by another's traffic). A key alone with fewer than `min_sample` stable requests of its own is still judged
    alone (against its own if it has MIN_STRATUM, else against all of stable's) and never pooled: pooled, a key
    with none (every user of it hashed to the canary) would dilute the small callers' failures again."""
    # A key's refused and hung-up requests are requests too (`OF_ALL`'s): a key whose every request was refused, or
    # hung up on, is kept.
    c_keys = {k: s for k, s in canary.by_key.items() if s.requests}
    s_keys = {k: s for k, s in stable.by_key.items() if s.requests}
    everything = Group("", canary, stable, c_keys, s_keys)
    count = partial(_count, name=name)
    valued = {k: (s, n) for k, s in c_keys.items() if (n := count(s))}
    alone = sorted(((k, s, n) for k, (s, n) in valued.items() if n >= min_sample), key=lambda ksn: (-ksn[2], ksn[0]))
    if len(valued) < 2 or not alone:
        return [everything]
    found = [everything] + [Group(f"API key {k}" if k else "requests naming no API key", s, stable, {k: s}, s_keys)
                            for k, s, _ in alone]
    rest = {k: s for k, (s, n) in valued.items() if n < min_sample}
    pooled = _pool(list(rest.values()))
    if count(pooled) >= min_sample:  # two keys at least: each is under min_sample
        found.append(Group(f"{len(rest)} other API keys, pooled", pooled, stable, rest, s_keys))
    return found


def _pool(samples: Sequence[VariantSample]) -> VariantSample:
    """Several keys' requests as one sample (no scores: they are judged on the whole canary)."""
    def cat(values: list[Sequence[float]]) -> np.ndarray:
        return np.concatenate([np.asarray(v, dtype=np.float64) for v in values]) if values else np.empty(0)
    rows = [s.rows for s in samples]
    return VariantSample(n=sum(s.n for s in samples), errors=sum(s.errors for s in samples),
                         refused=sum(s.refused for s in samples), hung_up=sum(s.hung_up for s in samples),
                         latency_ms=cat([s.latency_ms for s in samples]), ttft_ms=cat([s.ttft_ms for s in samples]),
                         tokens=cat([s.tokens for s in samples]), cost=cat([s.cost for s in samples]),
                         rows=np.concatenate(rows, axis=1) if rows and all(r is not None for r in rows) else None)


_RANK = {"FAILED": 0, "WAITING": 1, "INCONCLUSIVE": 2, "SUCCESSFUL": 3}


def _deciding(results: list[MetricResult]) -> MetricResult:
    """Of one metric's results per group, the one that decides: failed before waiting before inconclusive
    before successful; among equals one of a named group (an operator reads which key failed) before all requests
    together, then one whose short sample's point estimate is past its threshold (`_enough`: it holds a key's group
    that `_judge_groups` would otherwise leave out), then the one furthest past (or nearest to) its threshold."""
    return min(results, key=lambda r: (_RANK[r.verdict], not r.group, _PAST not in r.why, -_beyond(r)))


def _beyond(r: MetricResult) -> float:
    """How far the canary's point estimate is past its threshold, on the failing side (above a ceiling, below a
    score's floor); negative within it, 0.0 without either."""
    if r.canary is None or r.threshold is None:
        return 0.0
    return r.threshold - r.canary if r.higher_is_better else r.canary - r.threshold


def _judge_groups(spec: MetricSpec, canary: VariantSample, stable: VariantSample,
                  judged: Callable[[str], list[Group]], z: float, drift: DriftReport | None,
                  baseline_final: bool, min_sample: int = 0) -> MetricResult:
    """A metric judged once per group of requests, `judged(name)` (scores and drift, not per request key: on the
    whole canary); each group's arms in `min_sample` independent values (`_enough`)."""
    if spec.name in ("score", "drift"):
        return _judge(spec, canary, stable, z, drift, baseline_final)
    def against(spec: MetricSpec, canary: VariantSample,
                weights: list[tuple[VariantSample, float]] | None) -> MetricResult:
        if weights is not None and len(weights) == 1:  # one sample weighted evenly: compared as it is
            base = weights[0][0]
            return _judge(spec, canary, base if base is stable else _sorted(base), z, baseline_final=baseline_final,
                          min_sample=min_sample)
        result = _judge(spec, canary, stable, z, baseline_final=baseline_final, weights=weights,
                        min_sample=min_sample)
        if weights is not None:  # the stable requests the baseline is made of
            result = msgspec.structs.replace(result, stable_n=sum(s.n for s, _ in weights))
        return result

    relative = spec.max_increase is not None or spec.max_ratio is not None
    found, alone = [], []
    for g in judged(spec.name):
        compared, weights, left_out = _baseline(g, spec.name)
        if not left_out or not relative:
            result = against(spec, g.canary, weights)  # every canary value was compared, or none needs stable
        else:
            result = _judge_in_time(spec, g.canary, compared, weights, left_out, against, stable.n)
        result = msgspec.structs.replace(result, group=g.label)
        # A key's group `_enough` holds (its requests count as fewer than min_sample users' values) decides only when
        # its point estimate is past its threshold (`_PAST`). Else it never decides: a key sending one user id per
        # arm (a batch job's `user: "system"`) held every look WAITING, and so every rollout of the deployment at its
        # step until its progress deadline paused it (probe p84 F2); its requests are judged with everyone's (the
        # group of all requests, "", which `_enough` holds as before). Past its threshold it holds the look as any
        # short sample does: left out, other keys' users outvoted its regression in the group of all requests and
        # the canary was promoted (probe p87 F1). A key that holds so gains no power to stop a rollout: with enough
        # fresh user ids its own requests could fail its group anyway. Its FAILED stands, its bounds count its users.
        if g.label and result.verdict in ("WAITING", "INCONCLUSIVE") and result.why.startswith(_SHORT) \
                and _PAST not in result.why:
            alone.append(g.label)
        else:
            found.append(result)
    decided = _deciding(found)  # never empty: the group of all requests is always judged (`groups`)
    if not alone:
        return decided
    note = (f"{', '.join(alone)} not judged alone: too few users to tell the arms apart (fewer than min_sample "
            "independent values), judged with all requests")
    return msgspec.structs.replace(decided, why="; ".join(w for w in (decided.why, note) if w))


def _judge_in_time(spec: MetricSpec, canary: VariantSample, compared: VariantSample,
                   weights: list[tuple[VariantSample, float]] | None, left_out: int,
                   against: Callable[[MetricSpec, VariantSample, list[tuple[VariantSample, float]] | None],
                                     MetricResult], stable_n: int) -> MetricResult:
    """A metric with a limit relative to stable when `left_out` of the canary's values have none of stable's of
    their time (`_baseline`): the relative limits on the others (`compared`), an absolute
    `max` on every one; nothing to compare is INCONCLUSIVE (no data never passes, and older stable requests are
    never the baseline: what callers sent then is not what they send now)."""
    what = "values" if spec.name not in _RATES else "requests"
    note = (f"{left_out} canary {what} served before the first or after the last of stable's of the same callers "
            "(e.g. at 100%) are left out of the comparison with stable")
    parts = []
    if spec.max is not None:
        parts.append(against(msgspec.structs.replace(spec, max_increase=None, max_ratio=None), canary, weights))
    if weights is not None and _count(compared, spec.name):
        r = against(msgspec.structs.replace(spec, max=None), compared, weights)
        parts.append(msgspec.structs.replace(r, why="; ".join(w for w in (r.why, note) if w)))
    else:
        parts.append(MetricResult(name=spec.name, verdict="INCONCLUSIVE", canary_n=canary.n, stable_n=stable_n,
                                  why=f"no canary request to compare with stable's of the same time: {note}; "
                                      "older stable requests are never its baseline, and no data is never a pass"))
    return _deciding(parts)


def _sorted(sample: VariantSample) -> VariantSample:
    """The sample with latency and ttft as sorted arrays: one sort per variant serves every quantile."""
    return replace(sample, latency_ms=np.sort(np.asarray(sample.latency_ms, dtype=np.float64)),
                   ttft_ms=np.sort(np.asarray(sample.ttft_ms, dtype=np.float64)))


def measure(spec: AnalysisSpec, canary: VariantSample, stable: VariantSample, look: int,
            drift: DriftReport | None = None, *, baseline_final: bool = False, step_n: int | None = None,
            step_at: float | None = None) -> Measurement:
    """Judge the canary against stable at look `look` (1 for the first look with enough data); `drift` is the
    latest drift report covering the canary (None: none yet), for `drift` metrics. `baseline_final`: `stable` can
    grow no more (after a blue-green promotion the old release gets no traffic), so once the canary has its
    sample a baseline short of `min_sample` is INCONCLUSIVE, not WAITING: no data never passes, and never waits
    for ever either; and so is a score metric's baseline short of `min_scores` once the canary has them.
    `step_n`: the canary's requests since the current step began (None: every one is, as after a promotion); a
    look that would pass on fewer than `min_step_sample` of them WAITS for more. `step_at`: when the current step
    began (unix seconds; None: as for `step_n`), for the same rule on online scores (`_step_scores`). The metrics
    judged are `spec.judged`: with error_rate, client_error_rate and hang_up_rate too."""
    metrics = spec.judged
    if canary.n < spec.min_sample or stable.n < spec.min_sample:
        final = baseline_final and canary.n >= spec.min_sample
        verdict: Verdict = "INCONCLUSIVE" if final else "WAITING"
        why = (f"baseline has {stable.n} events of the {spec.min_sample} needed and gets no more (canary "
               f"{canary.n}): no data is never a pass") if final else \
            f"waiting for {spec.min_sample} events per variant (canary {_requests(canary)}, stable {_requests(stable)})"
        results = [MetricResult(name=m.label, verdict=verdict, canary_n=canary.n, stable_n=stable.n, why=why)
                   for m in metrics]
        waiting = Measurement(verdict=verdict, look=look, metrics=results, canary_n=canary.n, stable_n=stable.n)
        if min(canary.requests, stable.requests) < spec.min_sample:
            return waiting
        # The `OF_ALL` rates count every request: a canary that refuses most of its requests, or whose clients give
        # up on most of them, is judged on them, not left waiting for min_sample answered ones (never, if it refuses
        # them all). Only their failure counts: the other metrics have no sample yet, so the look passes nothing.
        found = _judged(spec, metrics, canary, stable, look, drift, baseline_final, only=OF_ALL)
        if not any(r.verdict == "FAILED" and not r.dry_run for r in found):
            return waiting
        results = [f if m.name in OF_ALL else r for r, f, m in zip(results, found, metrics, strict=True)]
        return msgspec.structs.replace(waiting, verdict="FAILED", metrics=results)
    results = _judged(spec, metrics, canary, stable, look, drift, baseline_final)
    if step_at is not None:
        results = [_step_scores(spec, m, r, canary, step_at) for m, r in zip(metrics, results, strict=True)]
    verdicts = {r.verdict for r in results if not r.dry_run}
    # A metric still waiting for its data (online scores) holds the step: never a pass, not yet a look.
    overall: Verdict = ("FAILED" if "FAILED" in verdicts else "WAITING" if "WAITING" in verdicts
                        else "INCONCLUSIVE" if "INCONCLUSIVE" in verdicts else "SUCCESSFUL")
    m = Measurement(verdict=overall, look=look, metrics=results, canary_n=canary.n, stable_n=stable.n)
    if overall == "SUCCESSFUL" and step_n is not None and step_n < spec.min_step_sample:
        # The window still holds the previous step's requests: without new ones at this weight, the look would
        # pass the step again on the numbers that passed the last one (and promote a canary never tried above it).
        return _held(m, f"waiting for {spec.min_step_sample} canary requests at this step (min_step_sample; "
                        f"{step_n} since it began): a step is not passed on the evidence of the step before it")
    return m


def _step_scores(spec: AnalysisSpec, metric: MetricSpec, result: MetricResult, canary: VariantSample,
                 step_at: float) -> MetricResult:
    """A score metric's pass held (WAITING) until the canary has `min_step_sample` scores (at most the metric's
    `min_scores`) of answers served since the step began (`step_at`), as a look waits for the step's requests:
    `min_scores` counts the whole window, so with the evaluator down or behind (an LLM judge held to its calls per
    minute, a backlog after a restart) a step, and the promotion, passed on the scores that passed the step before
    it (probe p22 F3). A scorer error is no score; a failure needs none of the step. Scores without times are of
    no known step."""
    if metric.name != "score" or result.verdict != "SUCCESSFUL":
        return result
    need = min(spec.min_step_sample, metric.min_scores)
    values = canary.scores.get(metric.scorer, ())
    times = canary.score_times.get(metric.scorer, ())
    have = sum(1 for t, v in zip(times, values, strict=True) if t >= step_at and v == v) \
        if len(times) == len(values) else 0
    if have >= need:
        return result
    return msgspec.structs.replace(
        result, verdict="WAITING",
        why=f"waiting for {need} scores of canary answers served at this step (min_step_sample; {have} since it "
            "began; is the evaluator running, or behind?): a step is not passed on the scores of the step before it")


def _requests(sample: VariantSample) -> str:
    """A variant's requests in the window, with those left out as their clients' hang-ups (`163 hung up by the
    client`): before, a canary all of whose requests clients gave up on read as one with no traffic."""
    return f"{sample.n} ({sample.hung_up} hung up by the client)" if sample.hung_up else str(sample.n)


def _judged(spec: AnalysisSpec, metrics: list[MetricSpec], canary: VariantSample, stable: VariantSample, look: int,
            drift: DriftReport | None, baseline_final: bool, only: tuple[str, ...] = ()) -> list[MetricResult]:
    """Each of `metrics` judged (`only`: those of these names; the others' results are placeholders, WAITING)."""
    z = z_of(sequential.look_alpha(spec.alpha, look, len(metrics)))
    canary, stable = _sorted(canary), _sorted(stable)

    def judged(name: str) -> list[Group]:  # each metric's own groups: a key is sized on its values of it
        return [replace(g, canary=g.canary if g.canary is canary else _sorted(g.canary), stable=stable,
                        in_time=not baseline_final) for g in groups(canary, stable, spec.min_sample, name)]
    results = [_judge_groups(m, canary, stable, judged, z, drift, baseline_final, spec.min_sample)
               if not only or m.name in only
               else MetricResult(name=m.label, verdict="WAITING") for m in metrics]
    return [msgspec.structs.replace(r, dry_run=True) if m.dry_run else r for r, m in zip(results, metrics, strict=True)]


# The metrics a call in flight past `router_unanswered_s` counts in (`evidence.Evidence.sample`): as a failure, and
# at its silence in latency and TTFT, as a call a timeout gave up on.
_UNANSWERED_IN = ("error_rate", "latency_", "ttft_")


def unanswered(m: Measurement, n: int, bound_s: float) -> Measurement:
    """The look with each metric that counted the canary's `n` calls in flight unanswered for longer than `bound_s`
    saying so (`MetricResult.note`): an error rate or a latency shown is not all of finished calls."""
    if not n:
        return m
    what = "call" if n == 1 else "calls"
    note = f"{n} canary {what} unanswered for longer than {bound_s:g} s, still in flight, counted as failed"
    results = [msgspec.structs.replace(r, note=note) if r.name.startswith(_UNANSWERED_IN) else r for r in m.metrics]
    return msgspec.structs.replace(m, metrics=results)


def incomplete(m: Measurement, why: str) -> Measurement:
    """A look taken while evidence it should judge is known missing (`why`; a restarted router that has not yet
    read back the served events from before its start): it judged a part of the evidence only. A FAILED look
    stands: the failures seen are real whatever the missing events hold, and a failing canary must not be kept
    live by the wait (aborting is the safe side). Any other becomes WAITING, each metric saying why: it holds the
    step, never a pass and not counted as a look, since the missing events may hold the failures."""
    return m if m.verdict == "FAILED" else _held(m, why)


def uncopied(m: Measurement, canary: VariantSample, stable: VariantSample, keys: Sequence[str],
             min_sample: int) -> Measurement:
    """A blue-green preview's look, judged on shadow copies, when the shadow left requests of `keys` uncopied for a
    reason other than its sample (SHADOW_SKIPPED; `evidence.Evidence.uncopied`): such a key with `min_sample` requests stable served, which would
    be judged alone, needs `min_sample` copies of its own, and those keys with fewer, pooled as `groups` pools them,
    as many together. Short of them the look is INCONCLUSIVE, never a pass: after the promotion the candidate
    serves those requests, and one key's copies spending the budget first must not leave the preview judged on
    that key's traffic alone (probe p46 F3). A FAILED look stands."""
    if m.verdict != "SUCCESSFUL" or not keys:
        return m
    none = VariantSample()

    def served(k: str) -> int:
        return stable.by_key.get(k, none).n

    def copies(k: str) -> int:
        return canary.by_key.get(k, none).n

    short = [f"API key {k} ({copies(k)} of {served(k)} requests)" for k in sorted(keys)
             if served(k) >= min_sample > copies(k)]
    small = [k for k in keys if served(k) < min_sample]
    pooled, pooled_copies = sum(map(served, small)), sum(map(copies, small))
    if pooled >= min_sample > pooled_copies:
        short.append(f"{len(small)} other API keys, pooled ({pooled_copies} of {pooled} requests)")
    if not short:
        return m
    why = (f"the shadow left requests of {', '.join(short)} uncopied (a budget, or an action at the provider a copy "
           f"would repeat), short of the {min_sample} copies needed to judge them: not judged on the other keys' "
           f"copies, never a pass (raise the budget, or promote by hand)")
    results = [r if r.dry_run else msgspec.structs.replace(r, verdict="INCONCLUSIVE", why=why, canary=None)
               for r in m.metrics]
    return msgspec.structs.replace(m, verdict="INCONCLUSIVE", metrics=results)


def _held(m: Measurement, why: str) -> Measurement:
    """The look WAITING, each metric that decides saying `why`: it holds the step, and is not counted as a look."""
    results = [r if r.dry_run else msgspec.structs.replace(r, verdict="WAITING", why=why) for r in m.metrics]
    return msgspec.structs.replace(m, verdict="WAITING", metrics=results)


def describe(result: MetricResult) -> str:
    """`error_rate 0.052 > threshold 0.015 (stable 0.005; 400 canary vs 400 stable requests compared)` for reasons and tables; a result
    judged per API key names its group: `error_rate 0.2 > threshold 0.015 on API key 3f9a0c12d4e5 (...)`."""
    on = f" on {result.group}" if result.group else ""
    if result.canary is None:
        return f"{result.name}{on}: {result.why}" + (f"; {result.note}" if result.note else "")
    if result.name == "drift":
        op = ">" if result.verdict == "FAILED" else "<="
        return f"drift {result.canary:g} drifted features {op} max {result.threshold:g}: {result.why}"
    unit = next((u for k, u in _UNITS.items() if result.name.startswith(k)), "")
    stable = f"stable {result.stable:.4g}{unit}; " if result.stable is not None else ""
    what = "scores" if result.name.startswith("score:") else "requests"
    op = (">" if result.verdict != "SUCCESSFUL" else "<=") if not result.higher_is_better else \
        ("<" if result.verdict != "SUCCESSFUL" else ">=")
    # "compared": the requests judged like with like (same caller, same time), which may be fewer than the look's
    # totals its record shows (probe p2 read 57 vs 339 in a reason beside 58 vs 489 in the record).
    note = f"; {result.note}" if result.note else ""
    return (f"{result.name} {result.canary:.4g}{unit} {op} threshold {result.threshold:.4g}{unit}{on} "
            f"({stable}{result.canary_n} canary vs {result.stable_n} stable {what} compared{note})")
