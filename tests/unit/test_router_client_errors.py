"""client_error_rate: the share of each arm's requests its upstream refused with a 4xx taken for the client's fault
(probe p15 F2). Such a request is left out of every other metric, so a canary that refused a part of its requests
(a smaller context window) was judged on the rest and promoted. Pure: events into Evidence, then measure."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from lockgate.contracts import InferenceEvent
from lockgate.contracts.inference import KEPT_WAITING
from lockgate.services.router import analysis
from lockgate.services.router.analysis import AnalysisSpec, MetricSpec
from lockgate.services.router.evidence import Evidence

pytestmark = pytest.mark.timeout(60)

T0 = 1_000_000.0
# The probe's analysis: error_rate with an absolute ceiling too, which the refused requests never reached.
SPEC = AnalysisSpec(metrics=[MetricSpec(name="error_rate", max_increase=0.05, max=0.05),
                             MetricSpec(name="latency_p95", max_ratio=1.5)], min_sample=30)


def _served(refuse: dict[str, float], n: int = 600, keys: tuple[str, ...] = ("k-app",), error: str = "400",
            seed: int = 3) -> Evidence:
    """`n` requests over 60 s split evenly between stable r1 and canary r2, from `keys` in turn; `refuse`: the share
    of each release's requests its upstream refuses with `error` (a hang-up: after the upstream kept it waiting)."""
    rng = random.Random(seed)
    ev = Evidence(price=lambda e: None)
    for i in range(n):
        release = "r2" if rng.random() < 0.5 else "r1"
        refused = rng.random() < refuse.get(release, 0.0)
        ev.add(InferenceEvent(app="shop", deployment="d", release=release, key_id=keys[i % len(keys)],
                              status="error" if refused else "ok", error_type=error if refused else "",
                              output_tokens=0 if refused else 50, latency_ms=5.0 if refused else 100.0,
                              time=datetime.fromtimestamp(T0 + i * 60 / n, UTC), attributes=_kept_waiting(error)))
    return ev


def _kept_waiting(error: str) -> dict[str, str]:
    """A hang-up's attributes as the router records one after the upstream kept its client waiting 1.5 s."""
    return {KEPT_WAITING: "1.500"} if error == "client_disconnected" else {}


def _measure(ev: Evidence, spec: AnalysisSpec = SPEC) -> analysis.Measurement:
    return analysis.measure(spec, ev.sample("d", "r2", T0), ev.sample("d", "r1", T0), look=1)


def _result(m: analysis.Measurement, name: str = "client_error_rate") -> analysis.MetricResult:
    return next(r for r in m.metrics if r.name == name)


def test_an_analysis_judging_error_rate_judges_client_error_rate_with_its_max_increase() -> None:
    (implied,) = [m for m in SPEC.judged if m.name == "client_error_rate"]
    assert (implied.max_increase, implied.max, implied.max_ratio, implied.dry_run) == (0.05, None, None, False)
    # error_rate's max alone: the same figure as an increase over stable, never as a ceiling (an app whose clients
    # send many bad bodies has a high share on both arms).
    only_max = AnalysisSpec(metrics=[MetricSpec(name="error_rate", max=0.02, dry_run=True)])
    assert [(m.name, m.max, m.max_increase, m.dry_run) for m in only_max.judged] == [
        ("error_rate", 0.02, None, True), ("client_error_rate", None, 0.02, True), ("hang_up_rate", None, 0.02, True)]
    # Listed by the operator: as written, nothing added; nor to an analysis that does not judge error_rate.
    own = AnalysisSpec(metrics=[MetricSpec(name="error_rate", max_increase=0.01),
                                MetricSpec(name="client_error_rate", max_ratio=2.0),
                                MetricSpec(name="hang_up_rate", max_ratio=3.0)])
    assert own.judged == own.metrics
    latency = AnalysisSpec(metrics=[MetricSpec(name="latency_p95", max_ratio=1.5)])
    assert latency.judged == latency.metrics


def test_refused_requests_count_in_client_error_rate_only() -> None:
    ev = Evidence(price=lambda e: 1.0)
    at = datetime.fromtimestamp(T0, UTC)
    for error in ("400", "422", "client_disconnected", "429", ""):
        ev.add(InferenceEvent(app="shop", deployment="d", release="r2", status="error" if error else "ok",
                              error_type=error, latency_ms=100.0, time=at, attributes=_kept_waiting(error)))
    # A hang-up while the answer flowed (no KEPT_WAITING): the client's choice, in no metric (probe p71).
    ev.add(InferenceEvent(app="shop", deployment="d", release="r2", status="error", error_type="client_disconnected",
                          latency_ms=100.0, time=at))
    s = ev.sample("d", "r2", T0)
    # 400 and 422 refused; the hang-up that waited in hang_up_rate only; the 429 (the release's doing) an error; the
    # answer a success, which carries the 429's bill (cost per answered request, probe p78).
    assert (s.n, s.errors, s.refused, s.hung_up, len(s.latency_ms), list(s.cost)) == (2, 1, 2, 1, 1, [2.0])
    assert ev.count("d", "r2", T0) == 2  # a step's requests in analysis, as n


def test_a_canary_refusing_part_of_its_requests_that_stable_answers_fails() -> None:
    m = _measure(_served({"r2": 0.39}))
    assert m.verdict == "FAILED"
    assert _result(m, "error_rate").verdict == "SUCCESSFUL"  # what the probe saw: judged on the rest, it passed
    r = _result(m)
    assert r.verdict == "FAILED" and r.canary == pytest.approx(0.39, abs=0.08) and r.stable == 0.0
    assert analysis.describe(r).startswith(f"client_error_rate {r.canary:.4g} > threshold 0.05 (stable 0; ")


def test_bad_bodies_refused_on_both_arms_alike_do_not_fail_the_canary() -> None:
    # An app sending bodies every upstream refuses: both arms refuse the same share, the canary is not at fault.
    m = _measure(_served({"r1": 0.3, "r2": 0.3}))
    assert m.verdict == "SUCCESSFUL", [analysis.describe(r) for r in m.metrics]


def test_like_with_like_by_caller() -> None:
    # Key k-bad sends only bodies every upstream refuses; the others are answered. Its users hash to the canary more
    # (by chance), which is no evidence against it: each key's canary requests are held to its own stable ones.
    rng = random.Random(5)
    ev = Evidence(price=lambda e: None)
    for i in range(900):
        key = "k-bad" if i % 3 == 0 else "k-good"
        release = "r2" if rng.random() < (0.8 if key == "k-bad" else 0.3) else "r1"
        bad = key == "k-bad"
        ev.add(InferenceEvent(app="shop", deployment="d", release=release, key_id=key,
                              status="error" if bad else "ok", error_type="400" if bad else "", latency_ms=100.0,
                              time=datetime.fromtimestamp(T0 + i / 15, UTC)))
    canary, stable = ev.sample("d", "r2", T0), ev.sample("d", "r1", T0)
    assert canary.refused / (canary.n + canary.refused) > 2 * stable.refused / (stable.n + stable.refused)
    m = analysis.measure(SPEC, canary, stable, look=1)
    assert m.verdict == "SUCCESSFUL", [analysis.describe(r) for r in m.metrics]


def test_a_canary_refusing_every_request_fails_without_waiting_for_answers() -> None:
    # No request answered: no other metric has its sample, but the refused ones are requests enough to judge.
    m = _measure(_served({"r2": 1.0}))
    assert m.verdict == "FAILED" and _result(m).verdict == "FAILED"
    assert _result(m, "error_rate").verdict == "WAITING"
    # A share refused alike on both arms does not end the wait.
    assert _measure(_served({"r1": 0.95, "r2": 0.95})).verdict == "WAITING"


def test_the_release_own_4xx_stay_errors() -> None:
    # 429 (throttled) is the release's doing: an error_rate failure, not a refused request.
    m = _measure(_served({"r2": 0.4}, error="429"))
    assert m.verdict == "FAILED" and _result(m, "error_rate").verdict == "FAILED"
    assert _result(m).canary == 0.0


# hang_up_rate (probe p63 A): a client's hang-up while its upstream kept it waiting (`client_disconnected` with
# KEPT_WAITING, before `router_unanswered_s`) is the client's one by one, but each arm's share of them is judged as refusals are.

def test_a_canary_whose_clients_give_up_on_part_of_its_requests_fails() -> None:
    m = _measure(_served({"r2": 0.3}, error="client_disconnected"))
    assert m.verdict == "FAILED"
    assert _result(m, "error_rate").verdict == "SUCCESSFUL"  # what the probe saw: judged on its answers, it passed
    r = _result(m, "hang_up_rate")
    assert r.verdict == "FAILED" and r.canary == pytest.approx(0.3, abs=0.08) and r.stable == 0.0
    assert analysis.describe(r).startswith(f"hang_up_rate {r.canary:.4g} > threshold 0.05 (stable 0; ")
    assert _result(m).canary == 0.0  # no refusal among them


def test_hang_ups_alike_on_both_arms_do_not_fail_the_canary() -> None:
    # Clients with a short timeout give up on both arms alike: the canary is not at fault.
    m = _measure(_served({"r1": 0.3, "r2": 0.3}, error="client_disconnected"))
    assert m.verdict == "SUCCESSFUL", [analysis.describe(r) for r in m.metrics]


def test_a_canary_whose_clients_give_up_on_every_request_fails_without_waiting_for_answers() -> None:
    ev = _served({"r2": 1.0}, error="client_disconnected")
    m = _measure(ev)
    assert m.verdict == "FAILED" and _result(m, "hang_up_rate").verdict == "FAILED"
    assert _result(m, "error_rate").verdict == "WAITING" and "hung up by the client" in _result(m, "error_rate").why
    assert ev.count("d", "r2", T0) == 0  # none of its requests is in analysis (a step's count, as n)
