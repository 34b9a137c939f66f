"""Canary analysis counts users, not requests (probe p75 F1): traffic is split by user and a user's requests are
alike, so every bound is cluster-robust over users (`analysis.design_effect`) and `min_sample` reads in independent
values. Pure: the estimator on hand-computed data, then events into Evidence and `measure`."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import numpy as np
import pytest

from lockgate.contracts import InferenceEvent
from lockgate.services.router import analysis
from lockgate.services.router.analysis import AnalysisSpec, MetricSpec
from lockgate.services.router.evidence import Evidence

T0 = 1_000_000.0


def test_design_effect_is_the_sandwich_variance_over_the_independent_one() -> None:
    # Two units, each two values alike: C/(C-1) (2^2 + 2^2) = 16 over n/(n-1) (1+1+1+1) = 16/3.
    assert analysis.design_effect(np.array([1.0, 1.0, -1.0, -1.0]), np.array([0.0, 0.0, 1.0, 1.0])) == \
        pytest.approx(3.0)
    # Units of their own (-1) beside shared ones: sums 3 (unit 0), -0.5 (unit 5), -3 and 0.5 alone, C = 4:
    # 4/3 (9 + 0.25 + 9 + 0.25) = 24.667 over 5/4 (4 + 1 + 9 + 0.25 + 0.25) = 18.125.
    z = np.array([2.0, 1.0, -3.0, 0.5, -0.5])
    assert analysis.design_effect(z, np.array([0.0, 0.0, -1.0, -1.0, 5.0])) == \
        pytest.approx((4 / 3 * 18.5) / (5 / 4 * 14.5))
    # Each unit's values cancelling: never below the independent variance.
    assert analysis.design_effect(np.array([1.0, -1.0, 1.0, -1.0]), np.array([0.0, 0.0, 1.0, 1.0])) == 1.0
    # Every value its own unit, with or without a user: exactly 1.
    assert analysis.design_effect(z, np.full(5, -1.0)) == 1.0
    assert analysis.design_effect(z, np.arange(5, dtype=np.float64)) == 1.0
    # One unit: nothing known between units, it counts as one value.
    assert analysis.design_effect(z, np.zeros(5)) == 5.0
    # No spread (a rate of 0): nothing to widen.
    assert analysis.design_effect(np.zeros(4), np.array([0.0, 0.0, 1.0, 1.0])) == 1.0


def _event(release: str, tokens: int, user: str = "", at: float = 0.0, status: str = "ok",
           key: str = "k-app") -> InferenceEvent:
    return InferenceEvent(app="shop", deployment="d", release=release, key_id=key, output_tokens=tokens,
                          latency_ms=100.0 + tokens, status=status, error_type="" if status == "ok" else "500",
                          user_hash=user, time=datetime.fromtimestamp(T0 + at, UTC))


def test_a_mean_of_clustered_values_has_the_sandwich_variance() -> None:
    # Users a: 10, 10, 10; b: 20, 20; c: 30. Mean 100/6; per-user sums of residuals -20, 20/3, 40/3: the variance of
    # the mean is C/(C-1) sum S^2 / n^2 = 1.5 (400 + 400/9 + 1600/9) / 36 = 25.93.
    ev = Evidence(price=lambda e: None)
    for i, (user, tokens) in enumerate([("a", 10), ("a", 10), ("a", 10), ("b", 20), ("b", 20), ("c", 30)]):
        ev.add(_event("r2", tokens, user, at=i))
    sample = ev.sample("d", "r2", T0)
    deff = analysis._deff([(sample, 1.0)], "tokens_per_request")
    mean, lo, hi = analysis.mean_bounds(sample.tokens, 2.0, deff)
    assert mean == pytest.approx(100 / 6)
    assert (hi - lo) / 2 == pytest.approx(2.0 * math.sqrt(1.5 * (400 + 400 / 9 + 1600 / 9) / 36))


def _looks(users: bool, per_user: int = 1, seed: int = 3, worse: float = 1.0,
           spec: AnalysisSpec | None = None) -> analysis.Measurement:
    """Twenty users of one key, each with prompts of one length, split by user, `per_user` requests each
    (interleaved in time); the canary's tokens `worse` times stable's. `users` False: the events name no user."""
    rng = random.Random(seed)
    lengths = {f"u{i}": rng.choice([3, 10, 30, 100, 300]) for i in range(20)}
    arm = {u: "r2" if rng.random() < 0.5 else "r1" for u in lengths}
    ev = Evidence(price=lambda e: None)
    for k in range(per_user):
        for i, (u, n) in enumerate(lengths.items()):
            release = arm[u]
            tokens = round(n * rng.uniform(0.95, 1.05) * (worse if release == "r2" else 1.0))
            ev.add(_event(release, tokens, u if users else "", at=k * 20 + i))
    spec = spec or AnalysisSpec(metrics=[MetricSpec(name="tokens_per_request", max_ratio=1.5)], min_sample=100)
    return analysis.measure(spec, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1)


def test_one_request_a_user_is_judged_as_before() -> None:
    # 400 users, one request each: named or not, the same verdicts and bounds to the last bit.
    def served(named: bool) -> analysis.Measurement:
        rng = random.Random(5)
        ev = Evidence(price=lambda e: None)
        for i in range(400):
            release = "r2" if i % 2 else "r1"
            failed = rng.random() < (0.15 if release == "r2" else 0.01)
            ev.add(_event(release, rng.randint(10, 300), f"user-{i}" if named else "", at=i,
                          status="error" if failed else "ok"))
        spec = AnalysisSpec(metrics=[MetricSpec(name="tokens_per_request", max_ratio=1.2),
                                     MetricSpec(name="latency_p95", max_ratio=1.1),
                                     MetricSpec(name="error_rate", max_increase=0.01)], min_sample=100)
        return analysis.measure(spec, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1)

    named, anonymous = served(True), served(False)
    assert named == anonymous
    assert [m.verdict for m in named.metrics] == [m.verdict for m in anonymous.metrics]
    assert "FAILED" in {m.verdict for m in named.metrics}  # the check has teeth: the error rate rose fifteenfold


def test_a_few_heavy_users_on_an_identical_canary_do_not_abort_it() -> None:
    # Counted as independent requests, which users landed on the canary is "significant"...
    assert _looks(users=False, per_user=40, seed=5).verdict == "FAILED"
    # ...counted as users, it is not, and twenty users are not min_sample's hundred independent values.
    m = _looks(users=True, per_user=40, seed=5)
    tokens = m.metrics[0]
    assert (m.verdict, tokens.verdict) == ("WAITING", "WAITING"), analysis.describe(tokens)
    assert "design effect" in tokens.why and "min_sample 100" in tokens.why


def test_a_costlier_canary_is_not_promoted_on_which_users_landed_on_it() -> None:
    # 16% costlier, held to 5%: its users' shorter prompts would pass it on the point estimate.
    spec = AnalysisSpec(metrics=[MetricSpec(name="tokens_per_request", max_ratio=1.05)], min_sample=100)
    assert _looks(False, 40, 0, 1.16, spec).verdict == "SUCCESSFUL"
    assert _looks(True, 40, 0, 1.16, spec).verdict == "WAITING"


def test_many_users_alike_still_decide() -> None:
    # 400 users with prompts of the same length, 5 requests each: alike across users, the users change nothing.
    def served(named: bool, worse: float) -> analysis.Measurement:
        rng = random.Random(7)
        ev = Evidence(price=lambda e: None)
        for k in range(5):
            for i in range(400):
                release = "r2" if i % 2 else "r1"
                tokens = round(100 * rng.uniform(0.5, 1.5) * (worse if release == "r2" else 1.0))
                ev.add(_event(release, tokens, f"user-{i}" if named else "", at=k * 400 + i))
        spec = AnalysisSpec(metrics=[MetricSpec(name="tokens_per_request", max_ratio=1.1)], min_sample=100)
        return analysis.measure(spec, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1)

    assert served(True, 1.0).verdict == served(False, 1.0).verdict == "SUCCESSFUL"
    assert served(True, 1.5).verdict == served(False, 1.5).verdict == "FAILED"


def _two_keys(short: dict[str, tuple[str, int, int]], requests: int, fresh: int) -> analysis.Measurement:
    """A key `k-short` whose users (`short`: user -> (release, stable's tokens, canary's)) each send `requests`
    requests, beside a key `k-many` sending one request each from `fresh` new users an arm, answered alike on both
    (51 to 149 tokens): tokens_per_request held to 1.2 times stable's, min_sample 100."""
    rng = random.Random(11)
    ev = Evidence(price=lambda e: None)
    at = 0.0
    for k in range(max(requests, fresh)):
        if k < requests:
            for u, (release, tokens, worse) in short.items():
                ev.add(_event(release, worse if release == "r2" else tokens, u, at=at, key="k-short"))
                at += 1
        if k < fresh:
            for release in ("r1", "r2"):
                ev.add(_event(release, rng.randint(51, 149), f"fresh-{release}-{k}", at=at, key="k-many"))
                at += 1
    spec = AnalysisSpec(metrics=[MetricSpec(name="tokens_per_request", max_ratio=1.2)], min_sample=100)
    return analysis.measure(spec, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1)


LENGTHS = (20, 60, 150, 250, 40, 100)


def test_a_key_too_short_to_judge_alone_whose_estimate_is_past_its_threshold_holds_the_look() -> None:
    # Probe p87 F1: six users an arm whose canary answers are ~1.55 times as long. Alone, the look waits...
    regressed = {f"{arm}{i}": (arm, n, n + 60) for arm in ("r1", "r2") for i, n in enumerate(LENGTHS)}
    alone = _two_keys(regressed, 20, 0)
    assert alone.verdict == "WAITING" and "design effect" in alone.metrics[0].why
    # ...and another key's fresh users, many enough for all requests together to pass min_sample, and passing them
    # (the regression diluted), do not pass it: the short key's point estimate is past its threshold.
    m = _two_keys(regressed, 20, 1000)
    tokens = m.metrics[0]
    assert (m.verdict, tokens.verdict, tokens.group) == ("WAITING", "WAITING", "API key k-short"), \
        analysis.describe(tokens)
    assert "not yet judged" in tokens.why and "past its threshold" in tokens.why
    # The same traffic without the regression passes: the fresh users are enough for all requests together.
    same = {u: (arm, n, n) for u, (arm, n, _) in regressed.items()}
    assert _two_keys(same, 20, 1000).verdict == "SUCCESSFUL"


def test_a_key_too_short_to_judge_alone_whose_estimate_passes_is_judged_with_all_requests() -> None:
    # Probe p84 F2: a batch job naming one user id per arm, answered alike, is judged with everyone's requests and
    # never holds the look: the application's fresh users pass the canary.
    batch = {"system-a": ("r1", 100, 100), "system-b": ("r2", 100, 100)}
    m = _two_keys(batch, 150, 1000)
    tokens = m.metrics[0]
    assert (m.verdict, tokens.verdict) == ("SUCCESSFUL", "SUCCESSFUL"), analysis.describe(tokens)
    assert "API key k-short not judged alone" in tokens.why


@pytest.mark.parametrize(("canary", "past"), [(0.3, True), (0.9, False)])
def test_a_score_floors_short_sample_is_past_its_threshold_below_the_floor(canary: float, past: bool) -> None:
    # A score held to a floor (higher is better) is past it below, not above: above, a short key's group would hold
    # every look of a healthy canary (p84 F2 again), and below, one failing would be left out (p87 F1 again).
    scored = analysis.MetricResult(name="score", verdict="SUCCESSFUL" if canary >= 0.5 else "INCONCLUSIVE",
                                   canary=canary, threshold=0.5, higher_is_better=True)
    held = analysis._enough(scored, 100, ((120, 30.0), (120, 30.0)), relative=False, baseline_final=False)
    assert held.verdict == "WAITING" and held.why.startswith("not yet judged")
    assert ("past its threshold" in held.why) is past
