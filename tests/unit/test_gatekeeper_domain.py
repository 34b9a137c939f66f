"""Threshold policies: parsing, every operator, fail-closed no-data, failed runs, bad policies."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from lockgate.contracts import EvalCompleted
from lockgate.errors import PolicyError
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.domain import Rule

pytestmark = pytest.mark.timeout(10)
FIXTURES = Path(__file__).parent.parent / "fixtures"


def policy_doc(**changes: object) -> dict:
    doc = {"name": "p", "rules": [{"name": "acc", "metric": "exact_match", "op": ">=", "threshold": 0.8}]}
    doc.update(changes)
    return doc


def test_fixture_policy_parses() -> None:
    policy = domain.parse_policy(yaml.safe_load((FIXTURES / "policies" / "default.yaml").read_text()))
    assert policy.no_data == "fail"
    assert [(r.name, r.metric, r.op, r.threshold) for r in policy.rules] == [
        ("accuracy", "exact_match", ">=", 0.8), ("latency", "latency_p95_ms", "<=", 2000.0),
        ("reliability", "error_rate", "<=", 0.05),
    ]


def test_rule_name_defaults_to_the_expression() -> None:
    policy = domain.parse_policy(policy_doc(rules=[{"metric": "score", "op": ">", "threshold": 0.5}]))
    assert policy.rules[0].name == "score > 0.5"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("just text", "policy: Expected `object`, got `str`"),
        (policy_doc(name=""), "Expected `str` of length >= 1 - at `$.name`"),
        (policy_doc(no_data="maybe"), "Invalid enum value 'maybe' - at `$.no_data`"),
        (policy_doc(rules=[]), "Expected `array` of length >= 1 - at `$.rules`"),
        (policy_doc(rules="x >= 1"), "Expected `array`, got `str` - at `$.rules`"),
        (policy_doc(rules=["x >= 1"]), "Expected `object`, got `str` - at `$.rules[0]`"),
        (policy_doc(rules=[{"op": ">=", "threshold": 1}]), "missing required field `metric` - at `$.rules[0]`"),
        (policy_doc(rules=[{"metric": "m", "op": "=>", "threshold": 1}]), "Invalid enum value '=>' - at `$.rules[0].op`"),
        (policy_doc(rules=[{"metric": "m", "op": ">=", "threshold": "high"}]), "got `str` - at `$.rules[0].threshold`"),
        (policy_doc(rules=[{"metric": "m", "op": ">=", "threshold": True}]), "got `bool` - at `$.rules[0].threshold`"),
        (policy_doc(rules=[{"metric": "m", "op": ">=", "threshold": float("nan")}]),
         "threshold must be a finite number, got nan - at `$.rules[0].threshold`"),
        (policy_doc(rules=[{"name": "a", "metric": "m", "op": ">=", "threshold": 1},
                           {"name": "a", "metric": "n", "op": ">=", "threshold": 1}]), "repeated: a"),
    ],
)
def test_bad_policies_name_the_problem(doc: object, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        domain.parse_policy(doc)
    assert message in err.value.message


@pytest.mark.parametrize(
    ("op", "observed", "verdict"),
    [
        (">=", 0.8, "PASS"), (">=", 0.79, "FAIL"),
        (">", 0.81, "PASS"), (">", 0.8, "FAIL"),
        ("<=", 0.8, "PASS"), ("<=", 0.81, "FAIL"),
        ("<", 0.79, "PASS"), ("<", 0.8, "FAIL"),
        ("==", 0.8, "PASS"), ("==", 0.7, "FAIL"),
    ],
)
def test_every_operator(op: str, observed: float, verdict: str) -> None:
    result = domain.evaluate_rule(Rule(name="r", metric="m", op=op, threshold=0.8), {"m": observed})
    assert (result.verdict, result.observed, result.op, result.threshold) == (verdict, observed, op, 0.8)
    assert "m = " in result.hint


@pytest.mark.parametrize("metrics", [{}, {"m": float("nan")}, {"other": 1.0}])
def test_missing_metric_is_no_data(metrics: dict[str, float]) -> None:
    result = domain.evaluate_rule(Rule(name="r", metric="m", op=">=", threshold=1), metrics)
    assert result.verdict == "NO_DATA" and result.observed is None and "m was not measured" in result.hint


def test_decision_passes_only_when_every_rule_passes() -> None:
    policy = domain.parse_policy(yaml.safe_load((FIXTURES / "policies" / "default.yaml").read_text()))
    good = domain.decide(policy, {"exact_match": 0.9, "latency_p95_ms": 150, "error_rate": 0.0})
    assert good.decision == "PASS" and [r.verdict for r in good.rules] == ["PASS"] * 3
    bad = domain.decide(policy, {"exact_match": 0.5, "latency_p95_ms": 150, "error_rate": 0.0})
    assert bad.decision == "BLOCK" and [r.verdict for r in bad.rules] == ["FAIL", "PASS", "PASS"]
    assert "1 of 3 rules failed: accuracy: exact_match = 0.5, needs >= 0.8" in bad.reason


def test_no_data_fails_closed_by_default_and_can_be_allowed() -> None:
    metrics = {"score": 0.9}
    closed = domain.decide(domain.parse_policy(policy_doc()), metrics)
    assert closed.decision == "BLOCK" and closed.rules[0].verdict == "NO_DATA"
    lenient = domain.decide(domain.parse_policy(policy_doc(no_data="pass")), metrics)
    assert lenient.decision == "PASS" and lenient.rules[0].verdict == "NO_DATA"


def completed(**changes: object) -> EvalCompleted:
    fields = {"run_id": "r1", "release": "v2", "suite": "sha256:s", "policy": "sha256:p",
              "metrics": {"exact_match": 0.9}}
    fields.update(changes)
    return EvalCompleted(**fields)  # type: ignore[arg-type]


def test_failed_eval_blocks_with_its_error_and_still_shows_rules() -> None:
    policy = domain.parse_policy(policy_doc())
    out = domain.decide_eval(policy, "", completed(status="failed", error="suite sha256:s not found", metrics={}))
    assert out.decision == "BLOCK" and "eval run r1 failed: suite sha256:s not found" in out.reason
    assert [r.verdict for r in out.rules] == ["NO_DATA"]


def test_unusable_policy_blocks_with_the_reason() -> None:
    out = domain.decide_eval(None, "policy sha256:p is unusable: policy.rules: required", completed())
    assert out == domain.Outcome("BLOCK", (), "policy sha256:p is unusable: policy.rules: required")
    assert domain.decide_eval(domain.parse_policy(policy_doc()), "", completed()).decision == "PASS"


def test_decision_id_is_deterministic_uuid7_and_time_ordered_like_its_eval() -> None:
    a = EvalCompleted(run_id="r", release="v", suite="s")
    b = EvalCompleted(run_id="r", release="v", suite="s")
    ida, idb = domain.decision_id(a.id, "s"), domain.decision_id(b.id, "s")
    assert ida == domain.decision_id(a.id, "s") and ida != idb and ida != domain.decision_id(a.id, "t")
    assert uuid.UUID(ida).version == 7 and uuid.UUID(ida).int >> 80 == uuid.UUID(a.id).int >> 80
    assert uuid.UUID(domain.decision_id("not-a-uuid", "s")).version == 7


def test_evaluator_warnings_are_grouped_not_repeated_per_metric() -> None:
    from lockgate.services.gatekeeper.domain import summarise_warnings

    text = "sample too small: 20 cases detect a change of 0.32"
    out = summarise_warnings([f"exact_match: {text}", f"score: {text}", "no baseline run found"])
    assert out.count(text) == 1
    assert "(exact_match, score)" in out and "no baseline run found" in out


def test_lifecycle_rules_block_past_sunset_and_only_warn_while_deprecated() -> None:
    from lockgate.contracts import RuleResult
    from lockgate.services.gatekeeper.domain import Outcome, with_rules

    passed = Outcome("PASS", (), "all rules passed")
    warn = RuleResult(rule="lifecycle tool/t", metric="sunset", op="not past", threshold=0.0, observed=0.0,
                      verdict="PASS", hint="tool/t is deprecated")
    sunset = RuleResult(rule="lifecycle prompt/p", metric="sunset", op="not past", threshold=0.0, observed=1.0,
                        verdict="FAIL", hint="prompt/p was sunset; use its successor sha256:b")
    assert with_rules(passed, []) is passed
    warned = with_rules(passed, [warn])
    assert warned.decision == "PASS" and warned.reason == "all rules passed; tool/t is deprecated"
    blocked = with_rules(passed, [warn, sunset])
    assert blocked.decision == "BLOCK" and blocked.reason.startswith("prompt/p was sunset; use its successor")
    assert "tool/t is deprecated" in blocked.reason and len(blocked.rules) == 2


@pytest.mark.parametrize("was", ["PASS", "NEEDS_REVIEW"])
def test_a_decision_binding_an_artifact_past_its_sunset_is_remade_a_block_naming_the_successor(was: str) -> None:
    # Probe p29 F4: a PASS decided before the sunset kept admitting after it.
    from lockgate.contracts import GateDecided, RuleResult

    def rule(verdict: str, hint: str, key: str = "model_config/m") -> RuleResult:
        return RuleResult(rule=f"lifecycle {key}", metric="sunset", op="not past", threshold=0.0,
                          observed=1.0 if verdict == "FAIL" else 0.0, verdict=verdict, hint=hint)

    acc = RuleResult(rule="acc", metric="exact_match", op=">=", threshold=0.8, observed=1.0, verdict="PASS")
    current = GateDecided(release="r1", decision=was, reason="all rules passed", review_required="",
                          rules=[acc, rule("PASS", "model_config/m is deprecated (sunset 2026-12-06T22:30:00Z)")])
    past = [rule("FAIL", "model_config/m was sunset on 2026-12-06T22:30:00Z; use its successor sha256:b")]
    out = domain.past_sunset(current, past)
    assert out is not None and out.decision == "BLOCK"
    # The deprecation's warning gives way to the sunset's rule; the eval's rules stay.
    assert [(r.rule, r.verdict) for r in out.rules] == [("acc", "PASS"), ("lifecycle model_config/m", "FAIL")]
    assert out.reason == ("model_config/m was sunset on 2026-12-06T22:30:00Z; use its successor sha256:b; "
                          "all rules passed")
    # Nothing past its sunset (a deprecation only warns), or a BLOCK already: it stays as it is.
    assert domain.past_sunset(current, [rule("PASS", "deprecated")]) is None
    assert domain.past_sunset(current, []) is None
    assert domain.past_sunset(GateDecided(release="r1", decision="BLOCK", rules=[]), past) is None


def test_a_release_that_is_not_registered_is_blocked_whatever_its_eval_says() -> None:
    # Before: a PASS for a name nobody had registered covered whatever was registered under it later.
    from lockgate.services.gatekeeper.domain import Outcome, release_rules, with_rules

    passed = Outcome("PASS", (), "all 1 rules of policy 'p' passed")
    [rule] = release_rules("shop-v9", None, {"prompt/p": "sha256:a"})
    assert (rule.rule, rule.verdict) == ("release_registered", "FAIL")
    blocked = with_rules(passed, [rule])
    assert blocked.decision == "BLOCK"
    assert blocked.reason.startswith("release 'shop-v9' is not registered: register it with `lockgate release "
                                     "create` (or apply) before gating it")
    assert release_rules("shop-v9", None, None) == (rule,)  # an eval naming no artifacts is no excuse


@pytest.mark.parametrize(
    ("judged", "said"),
    [
        (None, ""),  # the eval named none: the decision covers the registered bundle
        ({"prompt/p": "sha256:a", "model_config/m": "sha256:m"}, ""),
        ({"prompt/p": "sha256:b", "model_config/m": "sha256:m"}, "prompt/p judged sha256:b, registered sha256:a"),
        ({"prompt/p": "sha256:a"}, "model_config/m not judged"),
        ({"prompt/p": "sha256:a", "model_config/m": "sha256:m", "tool/t": "sha256:t"},
         "tool/t=sha256:t is not in the release"),
        ({}, "prompt/p not judged"),  # a decision naming none (the review path) judged nothing registered
    ],
)
def test_an_eval_of_other_artifacts_than_the_release_holds_is_blocked(judged: dict | None, said: str) -> None:
    from lockgate.services.gatekeeper.domain import release_rules

    rules = release_rules("r", {"prompt/p": "sha256:a", "model_config/m": "sha256:m"}, judged)
    if not said:
        assert rules == ()
        return
    [rule] = rules
    assert (rule.rule, rule.verdict) == ("release_artifacts", "FAIL")
    assert said in rule.hint and "other artifacts than release 'r' is registered with" in rule.hint


BOUND = {"release": "r", "app": "shop", "tenant": "default", "parent": "", "artifacts": {"model_config/m": "sha256:m"}}


def test_a_release_registered_or_rebound_during_its_eval_is_blocked_naming_the_change() -> None:
    # Before: the gate compared the release's binding with the artifacts the evaluator read when the run
    # finished, so a name registered while the run called what its request named got a PASS.
    from lockgate.evalruns import binding_of
    from lockgate.services.gatekeeper.domain import binding_rules

    now = binding_of(BOUND)
    assert binding_rules("r", "run-1", now, now) == ()  # bound before the run, unchanged
    assert binding_rules("r", "run-1", None, binding_of(None)) == ()  # not registered now: release_rules says so
    assert binding_of({**BOUND, "author": {"name": "ann"}}) == now  # the author is not the release's content
    [late] = binding_rules("r", "run-1", binding_of(None), now)
    assert (late.rule, late.verdict) == ("release_registered", "FAIL")
    assert late.hint.startswith(f"release 'r' was not registered when eval run run-1 started and was registered "
                                f"during it (bundle {now.bundle}): the run called what its request named")
    other = binding_of({**BOUND, "artifacts": {"model_config/m": "sha256:n"}})
    [rebound] = binding_rules("r", "run-1", other, now)
    assert (rebound.rule, rebound.verdict) == ("release_binding", "FAIL")
    assert f"(bundle {other.bundle} then, {now.bundle} now: model_config/m sha256:n then, sha256:m now)" in rebound.hint
    [moved] = binding_rules("r", "run-1", binding_of({**BOUND, "app": "other"}), now)  # same artifacts, other app
    assert moved.rule == "release_binding" and moved.hint.endswith(f"{now.bundle} now): run the eval for the release "
                                                                   "as it is bound now")
    [unsaid] = binding_rules("r", "run-1", None, now)  # an evaluator that does not say: fail closed
    assert (unsaid.rule, unsaid.verdict) == ("release_binding", "FAIL") and "does not say" in unsaid.hint


@pytest.mark.parametrize(
    ("environment", "said"),
    [
        ({"task": "call", "model": "m1", "endpoint": "default"}, ""),
        ({"task": "call", "model": "m2", "endpoint": "default"}, "called model 'm2', the release ships 'm1'"),
        ({"task": "call", "model": "m1", "endpoint": "http://evil/v1"},
         "called endpoint 'http://evil/v1', the release ships 'default'"),
        ({"task": "recorded", "model": "", "endpoint": ""}, ""),  # scored served events: nothing called
        ({"model": "m2", "endpoint": "x"}, ""),  # an evaluator that does not say (binding_rules blocks it)
    ],
)
def test_a_run_that_called_another_model_or_endpoint_than_the_release_ships_is_blocked(
        environment: dict[str, str], said: str) -> None:
    from lockgate.services.gatekeeper.domain import called_rules

    rules = called_rules("r", "m1", "default", "sha256:c", environment)
    if not said:
        assert rules == ()
        return
    [rule] = rules
    assert (rule.rule, rule.verdict) == ("release_model", "FAIL") and said in rule.hint


def test_a_decision_judged_the_release_artifacts_it_names_not_its_suite_or_policy() -> None:
    from lockgate.services.gatekeeper.domain import judged_artifacts

    assert judged_artifacts({"prompt/p": "sha256:a", "eval_suite": "sha256:s", "policy": "sha256:q"}) == {
        "prompt/p": "sha256:a"}
