"""Canary step kinds (pause, header route) and blue-green transitions, pure, on an injected clock."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from lockgate.contracts import GateDecided
from lockgate.services.router import bluegreen, domain, progress
from lockgate.services.router.analysis import AnalysisSpec, Measurement, MetricResult, MetricSpec
from lockgate.services.router.domain import CanaryRequest, InvalidRollout, Route, Target
from lockgate.services.router.strategy import Strategy

pytestmark = pytest.mark.timeout(30)


def _ok(route: Route) -> dict[str, GateDecided | None]:
    """A PASS now for every known-good release of `route`: where a rollback may go (domain.last_good)."""
    return {t.release: GateDecided(release=t.release, decision="PASS", rules=[]) for t in route.good}

DEFAULT = (10.0, 100.0)
TESTER = {"x-lockgate-canary": "always"}
ADMIN = {"key_id": "a1", "role": "admin"}  # a header route honours an admin key (and the keys it names)
SPEC = AnalysisSpec(metrics=[MetricSpec(name="error_rate", max_increase=0.01)], min_sample=100)


def _route(strategy: dict[str, Any]) -> Route:
    s = msgspec.convert(strategy, Strategy)
    r = domain.start_canary(domain.default_route("d"), CanaryRequest(stable_release="r1", canary_release="r2"),
                            stable=Target(release="r1"), canary=Target(release="r2"), first_step=10.0)
    return msgspec.structs.replace(r, strategy=s, started_at=100.0)


def _pass(route: Route, now: float = 100.0) -> Route:
    new = progress.on_decision(route, GateDecided(release="r2", decision="PASS", rules=[]), DEFAULT, 10.0, now)
    assert new is not None
    return new


def _tick(route: Route, now: float) -> Route:
    new = progress.on_time(route, DEFAULT, 10.0, now)
    assert new is not None, f"nothing due at {now}: {route.reason}"
    return new


def _m(verdict: str) -> Measurement:
    r = MetricResult(name="error_rate", verdict=verdict, canary=0.05, stable=0.005, threshold=0.015,  # type: ignore[arg-type]
                     canary_n=400, stable_n=400)
    return Measurement(verdict=verdict, look=1, metrics=[r], canary_n=400, stable_n=400)  # type: ignore[arg-type]


def test_steps_take_numbers_and_step_kinds_exactly_one_each() -> None:
    s = msgspec.convert({"steps": [10, {"pause": {"duration_s": 5}}, {"set_weight": 50}]}, Strategy)
    assert s.kinds() and s.weights() == [10.0, 50.0]
    assert not msgspec.convert({"steps": [10, {"set_weight": 50}]}, Strategy).kinds()
    with pytest.raises(msgspec.ValidationError, match="exactly one of"):
        msgspec.convert({"steps": [{"set_weight": 10, "pause": {}}]}, Strategy)
    with pytest.raises(msgspec.ValidationError, match="exactly one of"):
        msgspec.convert({"steps": [{}]}, Strategy)
    with pytest.raises(msgspec.ValidationError, match="replaces canary steps"):
        msgspec.convert({"steps": [10], "blue_green": {}}, Strategy)


def test_timed_pause_holds_the_weight_then_continues_on_its_own() -> None:
    r = _pass(_route({"steps": [20, {"pause": {"duration_s": 60}}, 50], "interval_s": 10}))
    assert (r.weight, r.step, r.paused) == (20.0, 1, False)
    r = _tick(r, 110.0)  # one interval at 20%: the pause step begins
    assert (r.weight, r.paused, r.step_pause, r.resume_at) == (20.0, True, True, 170.0)
    assert "step 2/3: paused 60 s at 20%" in r.reason
    assert progress.due_at(r) == 170.0 and progress.on_time(r, DEFAULT, 10.0, 169.9) is None
    r = _tick(r, 170.0)
    assert (r.weight, r.paused, r.step) == (50.0, False, 3) and "timed pause at step 2 (20%) over" in r.reason
    done = _tick(r, 180.0)
    assert done.phase == "promoted" and "all 3 steps done at 50%" in done.reason


ANALYSED = msgspec.to_builtins(msgspec.structs.replace(SPEC, inconclusive_limit=1, progress_deadline_s=30.0))


@pytest.mark.parametrize("steps", [
    [{"pause": {"duration_s": 20}}],
    [{"set_header_route": {"header": "x-lockgate-canary", "value": "always"}}, {"pause": {"duration_s": 20}}],
    [20, {"pause": {"duration_s": 20}}],
])
def test_an_analysed_timed_pause_ends_only_on_a_passing_look(steps: list[Any]) -> None:
    # Probe p75 F2: the clock ended the pause (and, past the last step, promoted the canary) before the look due then.
    r = _pass(_route({"steps": steps, "interval_s": 10, "analysis": ANALYSED}))
    if not r.paused:  # the weight step first, passed on its look
        r = progress.on_measurement(r, _m("SUCCESSFUL"), DEFAULT, 10.0, now=110.0)
        assert r is not None
    began = r.step_paused_at
    assert r.step_pause and r.resume_at == began + 20.0 and progress.step_began(r) == began
    assert progress.due_at(r) == began + 10.0  # its looks, not the pause's end, wake it
    assert progress.on_time(r, DEFAULT, 10.0, 1e12) is None  # the clock alone never ends it
    early = progress.on_measurement(r, _m("SUCCESSFUL"), DEFAULT, 10.0, now=began + 10.0)
    assert early is not None and early.paused and early.phase == "progressing"  # a pass during the pause holds
    waiting = progress.on_measurement(early, _m("WAITING"), DEFAULT, 10.0, now=began + 20.0)
    assert waiting is not None and waiting.paused and waiting.phase == "progressing"  # no data never passes
    assert waiting.analysis is not None and waiting.analysis.waiting_since == began + 20.0  # toward the deadline
    overdue = progress.on_measurement(waiting, _m("WAITING"), DEFAULT, 10.0, now=began + 50.0)
    overdue = progress.on_measurement(overdue, _m("WAITING"), DEFAULT, 10.0, now=began + 60.0)  # type: ignore[arg-type]
    assert overdue is not None and overdue.paused and not overdue.step_pause and overdue.resume_at == 0.0
    assert "analysis inconclusive 2 times" in overdue.reason  # an operator's hold now: the next pass moves nothing
    assert progress.on_measurement(overdue, _m("SUCCESSFUL"), DEFAULT, 10.0, now=began + 70.0).paused  # type: ignore[union-attr]
    failed = progress.on_measurement(waiting, _m("FAILED"), DEFAULT, 10.0, now=began + 30.0)
    assert failed is not None and failed.phase == "aborted"
    done = progress.on_measurement(waiting, _m("SUCCESSFUL"), DEFAULT, 10.0, now=began + 30.0)
    assert done is not None and done.phase == "promoted" and not done.paused
    assert f"timed pause at step {len(steps)} ({r.weight:g}%) over; analysis passed" in done.reason


def test_a_timed_pause_without_analysis_still_ends_on_the_clock() -> None:
    r = _tick(_pass(_route({"steps": [20, {"pause": {"duration_s": 20}}], "interval_s": 10})), 110.0)
    assert progress.due_at(r) == 130.0
    assert _tick(r, 130.0).phase == "promoted"


def test_pause_without_duration_holds_until_approved() -> None:
    r = _pass(_route({"steps": [20, {"pause": {}}, 100], "interval_s": 10}))
    r = _tick(r, 110.0)
    assert r.paused and r.step_pause and r.resume_at == 0.0 and "until approved" in r.reason
    assert progress.due_at(r) is None  # only an approval moves it
    assert progress.on_time(r, DEFAULT, 10.0, 1e12) is None
    approved = progress.resume(r, "apikey:k1(operator@acme/shop)", 10.0, now=500.0)
    assert (approved.weight, approved.paused, approved.step) == (100.0, False, 3)
    assert "approved at step 2 (20%) by apikey:k1(operator@acme/shop)" in approved.reason


def test_an_approval_ends_only_the_pause_step_it_names() -> None:
    # Found by a probe (p9): an approval was a resume, so a second one (a retry, another operator) ended the next
    # pause too, and four at once took [pause, pause, pause, pause, 100] from 0% to 100%.
    r = _pass(_route({"steps": [{"pause": {}}, {"pause": {}}, 100], "interval_s": 10}))
    assert (r.step, r.weight, progress.waits_for_approval(r)) == (1, 0.0, True)
    approved = progress.approve(r, 1, "r2", None, "ops", 10.0, now=200.0)
    assert (approved.step, approved.weight, approved.paused) == (2, 0.0, True)
    assert "approved at step 1 (0%) by ops" in approved.reason
    with pytest.raises(progress.NotAtStep, match=r"approval of step 1 of 'd' not applied \(already approved, or the "
                                                  r"rollout moved on\): it is now at step 2 \(0%\), waiting for approval"):
        progress.approve(approved, 1, "r2", None, "ops", 10.0, now=201.0)
    with pytest.raises(progress.NotAtStep, match=r"step 3 .*\(not reached yet\)"):
        progress.approve(approved, 3, "r2", None, "ops", 10.0, now=201.0)
    last = progress.approve(approved, 2, "r2", None, "ops", 10.0, now=202.0)
    assert (last.step, last.weight, last.paused) == (3, 100.0, False)
    with pytest.raises(progress.NotAtStep, match=r"\(no pause waits there\): it is now at step 3 \(100%\), progressing"):
        progress.approve(last, 3, "r2", None, "ops", 10.0, now=203.0)
    done = _tick(last, 212.0)
    with pytest.raises(progress.NotAtStep, match="already approved, or the rollout moved on.*its rollout is promoted"):
        progress.approve(done, 3, "r2", None, "ops", 10.0, now=213.0)


def test_an_approval_does_not_end_an_operators_pause() -> None:
    # Only `resume`, the operator's override, ends a pause an operator (or an inconclusive analysis) made.
    r = _pass(_route({"steps": [20, {"pause": {}}, 100], "interval_s": 10}))
    held = progress.pause(r, "ops")
    with pytest.raises(progress.NotAtStep, match=r"\(no pause waits there\): it is now at step 1 \(20%\), paused"):
        progress.approve(held, 1, "r2", None, "ops", 10.0, now=200.0)
    assert not progress.resume(held, "ops", 10.0, now=200.0).paused


def test_operator_pause_during_a_program_resumes_after_an_interval() -> None:
    r = _pass(_route({"steps": [20, {"pause": {}}, 100], "interval_s": 10}))
    held = progress.pause(r, "ops")
    assert not held.step_pause and progress.due_at(held) is None
    resumed = progress.resume(held, "ops", 10.0, now=200.0)
    assert resumed.weight == 20.0 and resumed.next_step_at == 210.0  # the program goes on at its own pace


def _choose(route: Route, user: str, headers: dict[str, str] | None = None, **key: str) -> tuple[str, Any]:
    # The unsalted split: these tests are of header routes, not of the buckets' key.
    return domain.choose(route, user, headers, salt="", **key)


def test_header_route_sends_tagged_requests_to_the_canary_at_any_weight() -> None:
    r = _pass(_route({"steps": [{"set_header_route": {"header": "X-Lockgate-Canary", "value": "always"}},
                                {"pause": {}}, 50], "interval_s": 10}))
    assert r.weight == 0.0 and r.paused and r.header_route is not None
    assert "x-lockgate-canary: always go to the canary" in r.reason
    assert _choose(r, "u1", TESTER, **ADMIN) == ("canary", r.canary)
    assert _choose(r, "u1", {"x-lockgate-canary": "sometimes"}, **ADMIN)[0] == "stable"
    assert all(_choose(r, f"u{i}", {})[0] == "stable" for i in range(200))
    aborted = domain.abort(r, "by operator")
    assert aborted.header_route is None and _choose(aborted, "u1", TESTER, **ADMIN)[0] == "stable"


def test_header_route_is_honoured_for_tester_keys_only() -> None:
    # Found by a probe (s3): any app key's header sent its requests to the canary, as canary evidence of its choosing.
    r = _pass(_route({"steps": [{"set_header_route": {"keys": ["k-tester"]}}, {"pause": {}}, 50], "interval_s": 10}))
    assert _choose(r, "u1", TESTER, key_id="k-tester", role="app") == ("canary", r.canary)
    assert _choose(r, "u1", TESTER, key_id="a1", role="admin")[0] == "canary"
    # Any other key, or none: as if the header were absent (here weight 0, so stable), never an error.
    assert all(_choose(r, f"u{i}", TESTER, key_id="k-other", role="app")[0] == "stable" for i in range(200))
    assert _choose(r, "u1", TESTER)[0] == "stable"
    assert not domain.by_header(r, TESTER, "k-other", "app") and domain.by_header(r, TESTER, "k-tester", "app")
    at_50 = msgspec.structs.replace(r, weight=50.0, paused=False, step_pause=False)
    by_weight = [_choose(at_50, f"u{i}")[0] for i in range(200)]
    assert [_choose(at_50, f"u{i}", TESTER, key_id="k-other", role="app")[0] for i in range(200)] == by_weight
    assert "canary" in by_weight and "stable" in by_weight


def test_a_header_route_names_its_tester_keys_by_id() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"keys\[0\]"):
        msgspec.convert({"steps": [{"set_header_route": {"keys": ["lg-not an id"]}}]}, Strategy)
    bg = msgspec.convert({"blue_green": {"preview": {"keys": ["k1", "k2"]}}}, Strategy).blue_green
    assert bg is not None and bg.preview.keys == ("k1", "k2") and bg.preview.header == "x-lockgate-preview"
    assert "from admin keys and keys k1, k2" in bluegreen.live(_route({"blue_green": {"preview": {"keys": ["k1", "k2"]}}}),
                                                                 0.0, 10.0, "passed").reason


def test_header_route_needs_an_admitted_live_canary() -> None:
    r = _route({"steps": [{"set_header_route": {}}, 50]})
    assert _choose(msgspec.structs.replace(r, header_route=r.strategy.program()[0].set_header_route),  # type: ignore[union-attr]
                         "u", TESTER, **ADMIN)[0] == "stable"  # idle: no decision allows it yet


def test_analysis_success_runs_the_program_and_failure_aborts_during_a_pause() -> None:
    r = _pass(_route({"steps": [20, {"pause": {}}, 100], "interval_s": 10, "analysis": msgspec.to_builtins(SPEC)}))
    r = progress.on_measurement(r, _m("SUCCESSFUL"), DEFAULT, 10.0, now=110.0)
    assert r is not None and r.paused and r.step_pause and "analysis passed at step 1 (20%)" in r.reason
    held = progress.on_measurement(r, _m("SUCCESSFUL"), DEFAULT, 10.0, now=120.0)
    assert held is not None and held.weight == 20.0 and held.paused  # success never skips an approval
    failed = progress.on_measurement(held, _m("FAILED"), DEFAULT, 10.0, now=130.0)
    assert failed is not None and failed.phase == "aborted" and failed.weight == 0.0
    assert "error_rate 0.05 > threshold 0.015" in failed.reason


# blue-green


def _bg(**bg: Any) -> Route:
    return _pass(_route({"interval_s": 10, "blue_green": bg}))


def test_blue_green_preview_is_reachable_only_by_its_header() -> None:
    r = _bg()
    assert (r.phase, r.weight) == ("progressing", 0.0)
    assert all(_choose(r, f"u{i}", {})[0] == "stable" for i in range(500))
    assert _choose(r, "u", {"x-lockgate-preview": "always"}, **ADMIN)[0] == "canary"
    assert _choose(r, "u", TESTER, **ADMIN)[0] == "stable"
    assert progress.due_at(r) is None  # manual promotion only
    with pytest.raises(InvalidRollout, match="blue-green"):
        progress.set_weight(r, 10.0, "ops")


def test_blue_green_auto_promotes_after_its_delay_and_keeps_the_old_release_for_undo() -> None:
    r = _bg(auto_promotion_s=30, scale_down_delay_s=60)
    assert progress.due_at(r) == 130.0 and progress.on_time(r, DEFAULT, 10.0, 129.0) is None
    p = _tick(r, 130.0)
    assert (p.phase, p.stable.release, p.previous.release, p.scale_down_at) == ("promoted", "r2", "r1", 190.0)  # type: ignore[union-attr]
    assert all(_choose(p, f"u{i}", {})[1].release == "r2" for i in range(100))
    allowed = GateDecided(release="r1", decision="PASS", rules=[])
    undone = bluegreen.undo(p, allowed, "ops")
    assert (undone.stable.release, undone.phase) == ("r1", "aborted") and "undone by ops" in undone.reason
    assert [t.release for t in undone.good] == ["r1", "r2"]  # undone, not failed: still known-good
    aborted = bluegreen.abort_promotion(p, "ops", decisions=_ok(p))  # the operator stopped it: no longer known-good
    assert aborted.stable.release == "r1" and "aborted by ops" in aborted.reason
    assert [t.release for t in aborted.good] == ["r1"]
    down = _tick(p, 190.0)
    assert down.scale_down_at == 0.0 and "r1 scaled down" in down.reason
    with pytest.raises(InvalidRollout, match="scaled down"):
        bluegreen.undo(down, allowed, "ops")
    with pytest.raises(InvalidRollout, match="scaled down"):
        bluegreen.abort_promotion(down, "ops")


def test_blue_green_pre_promotion_analysis_must_pass_before_auto_promotion() -> None:
    r = _bg(auto_promotion_s=30, pre_promotion_analysis=msgspec.to_builtins(SPEC))
    early = progress.on_measurement(r, _m("SUCCESSFUL"), DEFAULT, 10.0, now=110.0)
    assert early is not None and early.phase == "progressing" and "promotes itself once" in early.reason
    waiting = progress.on_measurement(r, _m("WAITING"), DEFAULT, 10.0, now=140.0)
    assert waiting is not None and waiting.phase == "progressing"  # no data never promotes
    assert progress.on_time(r, DEFAULT, 10.0, 1e9) is None  # the clock alone does not promote it
    late = progress.on_measurement(r, _m("SUCCESSFUL"), DEFAULT, 10.0, now=140.0)
    assert late is not None and late.phase == "promoted" and "pre-promotion analysis passed" in late.reason
    failed = progress.on_measurement(r, _m("FAILED"), DEFAULT, 10.0, now=140.0)
    assert failed is not None and failed.phase == "aborted" and failed.stable.release == "r1"


def test_blue_green_failed_post_promotion_analysis_rolls_back_naming_the_metric() -> None:
    r = _bg(post_promotion_analysis=msgspec.to_builtins(SPEC), scale_down_delay_s=300)
    p = bluegreen.promote(r, "by operator", now=200.0, interval_s=10.0)
    assert p.verifying and progress.spec_of(p) == SPEC
    assert progress.due_at(p) == 210.0
    assert not bluegreen.scale_down_due(p, 1e9)  # never while verifying
    back = progress.on_measurement(p, _m("FAILED"), DEFAULT, 10.0, now=210.0, decisions=_ok(p))
    assert back is not None and (back.phase, back.stable.release) == ("aborted", "r1")
    assert back.reason.startswith("rolled back r2: post-promotion analysis failed: error_rate 0.05 > threshold")
    ok = progress.on_measurement(p, _m("SUCCESSFUL"), DEFAULT, 10.0, now=210.0)
    assert ok is not None and not ok.verifying and ok.phase == "promoted"
    # Probe p2: the reason read "...; post-promotion analysis running; post-promotion analysis passed".
    assert ok.reason.endswith("kept for instant rollback for 300 s; post-promotion analysis passed"), ok.reason
    assert "running" not in ok.reason
    assert progress.due_at(ok) == 500.0  # then only the scale-down is left


def test_shadow_only_rollout_serves_no_user_from_the_candidate() -> None:
    r = _pass(_route({"shadow": {"sample": 0.5}}))
    assert (r.phase, r.weight) == ("progressing", 0.0) and "mirrored requests only" in r.reason
    assert progress.due_at(r) is None and all(_choose(r, f"u{i}", TESTER, **ADMIN)[0] == "stable" for i in range(100))


def test_scale_down_waits_for_the_post_promotion_analysis_without_a_busy_timer() -> None:
    r = _bg(post_promotion_analysis=msgspec.to_builtins(SPEC), scale_down_delay_s=5)
    p = bluegreen.promote(r, "by operator", now=200.0, interval_s=10.0)
    assert progress.due_at(p) == 210.0  # not the (earlier) scale-down: nothing would change then
    assert progress.on_time(p, DEFAULT, 10.0, 206.0) is None


def test_shadow_only_analysis_never_gives_the_candidate_weight() -> None:
    r = _pass(_route({"shadow": {}, "analysis": msgspec.to_builtins(SPEC), "interval_s": 10}))
    new = progress.on_measurement(r, _m("SUCCESSFUL"), DEFAULT, 10.0, now=110.0)
    assert new is not None and new.weight == 0.0 and new.phase == "progressing" and "shadow only" in new.reason


def test_a_post_promotion_analysis_inconclusive_past_its_limit_rolls_back() -> None:
    # After a promotion there is no step to hold the release at, and the old release gets no traffic: a
    # verification that stays inconclusive (e.g. no baseline left to compare with) must not keep it for ever.
    r = _bg(post_promotion_analysis=msgspec.to_builtins(msgspec.structs.replace(SPEC, inconclusive_limit=1)))
    p = bluegreen.promote(r, "by operator", now=200.0, interval_s=10.0)
    once = progress.on_measurement(p, _m("INCONCLUSIVE"), DEFAULT, 10.0, now=210.0)
    assert once is not None and once.verifying and once.phase == "promoted"
    back = progress.on_measurement(once, _m("INCONCLUSIVE"), DEFAULT, 10.0, now=220.0, decisions=_ok(once))
    assert back is not None and (back.phase, back.stable.release) == ("aborted", "r1")
    assert back.reason.startswith("rolled back r2: post-promotion analysis inconclusive 2 times: error_rate")


def test_rollout_get_says_whose_requests_a_header_route_sends() -> None:
    # Probe s5: `rollout get` showed `x-lockgate-canary: always -> canary`, as if anyone's header were honoured.
    from lockgate.cli.rollout import summary

    def shown(header_route: dict[str, Any]) -> str:
        rows = summary({"deployment": "chat", "phase": "progressing", "header_route": header_route})
        return next(r["value"] for r in rows if r["field"] == "header route")

    assert shown({"header": "x-lockgate-canary", "value": "always"}) == "x-lockgate-canary: always -> canary (admin keys)"
    assert shown({"header": "x-lockgate-preview", "value": "always", "keys": ["k1", "k2"]}) == (
        "x-lockgate-preview: always -> canary (admin keys and keys k1, k2)")


def test_an_approval_names_the_canary_and_attempt_whose_pause_it_ends() -> None:
    # Found by a probe (p13): bound to the step alone, an approval ended the same step's pause of another canary
    # swapped in meanwhile, or of a new or retried attempt.
    r = _pass(_route({"steps": [{"pause": {}}, 100], "interval_s": 10}))
    with pytest.raises(progress.NotAtStep, match="now canaries release 'r2'"):
        progress.approve(r, 1, "r3", None, "ops", 10.0, now=200.0)
    with pytest.raises(progress.NotAtStep, match="in another rollout attempt"):
        progress.approve(r, 1, "r2", 99.0, "ops", 10.0, now=200.0)
    assert progress.approve(r, 1, "r2", 100.0, "ops", 10.0, now=200.0).weight == 100.0
    # An operator's pause over the pause step is the operator's: no approval ends it, `resume` does.
    held = progress.pause(r, "ops")
    assert (held.paused, held.step_pause) == (True, False)
    with pytest.raises(progress.NotAtStep, match="no pause waits there"):
        progress.approve(held, 1, "r2", 100.0, "ops", 10.0, now=200.0)
