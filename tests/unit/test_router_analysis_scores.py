"""Online `score` metrics in canary analysis (probe p22): a scorer's errors are evidence about the arm whose answers
it could not score (F1), scores are compared like with like in time as requests are (F2), and a step passes only
with scores of its own (F3). Pure: events and their scores into Evidence, then measure."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import UTC, datetime

from lockgate.contracts import InferenceEvent
from lockgate.services.router import analysis
from lockgate.services.router.analysis import AnalysisSpec, MetricSpec
from lockgate.services.router.evidence import Evidence

T0 = 1_000_000.0  # the rollout's start
JUDGE = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="llm_judge", max_decrease=0.05, min_scores=30)],
                     min_sample=30)


def _served(steps: list[tuple[float, float]], score: Callable[[float, bool, random.Random], float], per_s: int = 24,
            seed: int = 1, scorer: str = "llm_judge", scored_until: float = math.inf) -> Evidence:
    """One app key's requests from T0 on, `per_s` a second, each answer scored by `scorer`; `steps`: (seconds from
    T0 a step begins, canary weight); `score(t, canary, rng)`: the score of the answer at t (NaN: a scorer error);
    answers from `scored_until` seconds on are never scored (the evaluator stopped)."""
    rng = random.Random(seed)
    ev = Evidence(price=lambda e: None)
    end = steps[-1][0] + 10
    for i in range(int(end * per_s)):
        t = i / per_s
        weight = next(w for start, w in reversed(steps) if t >= start)
        canary = rng.random() < weight
        release = "r2" if canary else "r1"
        ev.add(InferenceEvent(id=f"e{i}", app="shop", deployment="d", release=release, key_id="k-app",
                              output_tokens=20, latency_ms=100.0, time=datetime.fromtimestamp(T0 + t, UTC)))
        if t < scored_until:
            ev.add_scores("d", release, f"e{i}", T0 + t, {scorer: score(t, canary, rng)})
    return ev


def _score(m: analysis.Measurement) -> analysis.MetricResult:
    return next(r for r in m.metrics if r.name.startswith("score:"))


def _errors(ev: Evidence, release: str, since: float = T0) -> int:
    return sum(1 for v in ev.sample("d", release, since).scores["llm_judge"] if math.isnan(v))


def test_a_canary_whose_wrong_answers_the_judge_cannot_score_is_not_judged_on_its_good_answers_only() -> None:
    # p22 F1: 47% of the canary's answers were wrong and quoted a score, so the judge's replies held two and were
    # errors; the 53% it could score were good, and the canary was promoted on them.
    ev = _served([(0, 0.5)], lambda t, canary, rng: math.nan if canary and round(t * 24) % 15 < 7 else 0.9)
    canary, stable = ev.sample("d", "r2", T0), ev.sample("d", "r1", T0)
    errors, scored = _errors(ev, "r2"), len(canary.scores["llm_judge"]) - _errors(ev, "r2")
    assert 0 < errors <= scored  # errors not the majority: before, the survivors decided
    m = analysis.measure(JUDGE, canary, stable, look=1)
    r = _score(m)
    assert m.verdict == "FAILED" and r.verdict == "FAILED", analysis.describe(r)
    # The errors are in the result, whatever the verdict: the AnalysisRun row and `rollout get` show its why.
    assert f"{scored} scored + {errors} scorer errors" in r.why, r.why
    assert "significantly" in analysis.describe(r), analysis.describe(r)


def test_a_canary_with_a_few_more_scorer_errors_than_stable_is_inconclusive_not_passed() -> None:
    # Above stable's share by more than the margin, but not significantly yet: the look does not pass.
    ev = _served([(0, 0.5)], lambda t, canary, rng: math.nan if canary and int(t * 24) % 9 == 0 else 0.9, per_s=24)
    m = analysis.measure(JUDGE, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1)
    r = _score(m)
    assert r.verdict == "INCONCLUSIVE" and m.verdict == "INCONCLUSIVE", analysis.describe(r)


def test_a_judge_outage_that_hits_both_arms_alike_is_not_the_canarys_fault() -> None:
    # The judge is down from 3 s to 6 s: each arm's answers of that time are errors, its others are scored.
    ev = _served([(0, 0.5)], lambda t, canary, rng: math.nan if 3 <= t < 6 else 0.9)
    m = analysis.measure(JUDGE, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1)
    r = _score(m)
    assert r.verdict == "SUCCESSFUL", analysis.describe(r)
    assert "scorer errors" in r.why  # shown all the same


def test_after_a_promotion_scorer_errors_never_abort_since_the_baseline_is_of_another_time() -> None:
    # baseline_final: the old release's scores are from before the promotion, so an outage now is not told apart
    # from the new release's fault: not a pass, not an abort either.
    ev = _served([(0, 0.0), (10, 1.0)], lambda t, canary, rng: math.nan if canary and rng.random() < 0.4 else 0.9)
    m = analysis.measure(JUDGE, ev.sample("d", "r2", T0 + 10), ev.sample("d", "r1", T0), look=1, baseline_final=True)
    r = _score(m)
    assert r.verdict == "INCONCLUSIVE", analysis.describe(r)


def test_a_caller_asking_for_longer_answers_later_does_not_abort_a_healthy_canary_on_a_score() -> None:
    # p22 F2: both arms the same model; the client asked for 2-token answers while the canary was at 10% and for
    # whole ones from the move to 50% on. Against the whole window the canary's `length` looked twice stable's.
    length = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="length", max_ratio=1.3, min_scores=30)],
                          min_sample=30)
    ev = _served([(0, 0.1), (10, 0.5), (20, 1.0)], lambda t, canary, rng: rng.uniform(5, 7) if t < 10 else
                 rng.uniform(38, 44), per_s=30, scorer="length")
    canary, stable = ev.sample("d", "r2", T0), ev.sample("d", "r1", T0)
    c, s = canary.scores["length"], stable.scores["length"]
    assert sum(c) / len(c) > 1.3 * sum(s) / len(s)  # what aborted it
    m = analysis.measure(length, canary, stable, look=1)
    r = _score(m)
    assert r.verdict == "SUCCESSFUL", analysis.describe(r)
    # The 100% step's scores have no stable ones of their time: left out of the relative limit, never compared
    # with older ones.
    assert "left out of the comparison with stable" in r.why, r.why


def test_a_canary_scoring_worse_is_caught_though_the_callers_questions_get_easier_later() -> None:
    # The mirror: hard questions first, easy ones later, and a canary 0.2 below stable on every one. Against the
    # whole window its scores lean to the easy ones and looked better than stable's.
    ev = _served([(0, 0.2), (10, 0.8)], lambda t, canary, rng: (0.3 if t < 10 else 0.95) - (0.2 if canary else 0.0)
                 + rng.uniform(-0.05, 0.05), per_s=30)
    canary, stable = ev.sample("d", "r2", T0), ev.sample("d", "r1", T0)
    c, s = canary.scores["llm_judge"], stable.scores["llm_judge"]
    assert sum(c) / len(c) > sum(s) / len(s)  # what hid it
    spec = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="llm_judge", max_decrease=0.1, min_scores=30)],
                        min_sample=30)
    m = analysis.measure(spec, canary, stable, look=1)
    r = _score(m)
    assert r.verdict == "FAILED", analysis.describe(r)


def test_at_100_percent_scores_are_never_compared_with_older_stable_ones() -> None:
    # A look whose window holds the 100% step only: no canary score has a stable one of its time.
    ev = _served([(0, 0.5), (10, 1.0)], lambda t, canary, rng: 0.5 if t < 12 else 0.9)
    m = analysis.measure(JUDGE, ev.sample("d", "r2", T0 + 12), ev.sample("d", "r1", T0), look=1)
    r = _score(m)
    assert r.verdict == "INCONCLUSIVE", analysis.describe(r)
    assert "older stable" in r.why, r.why
    # An absolute floor still holds every canary score to it.
    floor = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="llm_judge", min=0.95, max_decrease=0.05)],
                         min_sample=30)
    m = analysis.measure(floor, ev.sample("d", "r2", T0 + 12), ev.sample("d", "r1", T0), look=1)
    assert _score(m).verdict == "FAILED" and _score(m).threshold == 0.95, analysis.describe(_score(m))


def test_a_step_is_not_passed_on_the_scores_of_the_step_before_it() -> None:
    # p22 F3: the evaluator stopped during the 50% step; the 100% step (from 10 s) and the promotion passed on the
    # 50% step's scores, not one score of the 100% step among them.
    steps = [(0, 0.5), (10, 1.0)]
    ev = _served(steps, lambda t, canary, rng: 0.9, scored_until=8)
    canary, stable = ev.sample("d", "r2", T0), ev.sample("d", "r1", T0)
    step_n = ev.count("d", "r2", T0 + 10)
    assert step_n >= JUDGE.min_step_sample  # requests of the step: enough, as before
    assert analysis.measure(JUDGE, canary, stable, look=1, step_n=step_n).verdict == "SUCCESSFUL"  # what promoted
    m = analysis.measure(JUDGE, canary, stable, look=1, step_n=step_n, step_at=T0 + 10)
    r = _score(m)
    assert m.verdict == "WAITING" and r.verdict == "WAITING", analysis.describe(r)
    assert "waiting for 10 scores of canary answers served at this step (min_step_sample; 0 since it began" in r.why
    # The evaluator back (or caught up): the step's own scores pass it.
    ev = _served(steps, lambda t, canary, rng: 0.9)
    m = analysis.measure(JUDGE, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1, step_n=step_n,
                         step_at=T0 + 10)
    assert m.verdict == "SUCCESSFUL", analysis.describe(_score(m))
    # A failure needs no scores of the step: a fault seen is a fault.
    ev = _served(steps, lambda t, canary, rng: 0.5 if canary else 0.9, scored_until=8)
    m = analysis.measure(JUDGE, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1, step_n=step_n,
                         step_at=T0 + 10)
    assert m.verdict == "FAILED", analysis.describe(_score(m))


def test_a_scorer_whose_errors_are_all_a_step_has_gives_it_no_scores() -> None:
    # The evaluator runs but the judge is down from the step on: errors are no scores of the step.
    ev = _served([(0, 0.5), (10, 0.8)], lambda t, canary, rng: math.nan if t >= 10 else 0.9)
    canary = ev.sample("d", "r2", T0)
    m = analysis.measure(JUDGE, canary, ev.sample("d", "r1", T0), look=1, step_at=T0 + 10)
    assert m.verdict != "SUCCESSFUL", analysis.describe(_score(m))
