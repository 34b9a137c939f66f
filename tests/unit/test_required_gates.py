"""The gates file: which policy, suite and baseline gate an app's releases (decoding, and the pure rules)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from lockgate.contracts import BaselineComparison, EvalCompleted, GateDecided, RuleResult
from lockgate.errors import ConfigError
from lockgate.services.gatekeeper.baseline import disallowed, refusal, required_baseline_rules, uses_baseline
from lockgate.services.gatekeeper.domain import (
    Outcome,
    Used,
    baseline_withdrawn,
    decide_eval,
    parse_policy,
    required_rules,
    under_requirement,
    with_rules,
)
from lockgate.services.gatekeeper.gatesfile import Gates, Pin, Required, load_gates_file

pytestmark = pytest.mark.timeout(10)
H1, H2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
SOURCE = "/etc/lockgate/gates.yaml"


def required(policy: Pin, suite: Pin | None = None) -> Required:
    return Required(policy=policy, suite=suite, source=SOURCE)


@pytest.mark.parametrize(
    ("pin", "used", "meets"),
    [
        (Pin("policy", "strict"), Used(H1, frozenset({"strict"})), True),  # any version of the name
        (Pin("policy", "strict"), Used(H2, frozenset({"lenient", "strict"})), True),  # one of its names
        (Pin("policy", "strict"), Used(H1, frozenset({"lenient"})), False),
        (Pin("policy", "strict"), Used(H1), False),  # registered under no name the gatekeeper can see
        (Pin("policy", "strict"), Used(""), False),  # the eval named no policy
        (Pin("policy", "strict", H1), Used(H1, frozenset({"copy"})), True),  # exact content, whatever its name
        (Pin("policy", "strict", H1), Used(H2, frozenset({"strict"})), False),  # another version of the name
    ],
)
def test_a_policy_meets_a_pin_by_name_or_by_exact_content(pin: Pin, used: Used, meets: bool) -> None:
    rules = required_rules("r2", "support-bot", required(pin), used)
    if meets:
        assert rules == ()
        return
    [rule] = rules
    assert (rule.rule, rule.metric, rule.verdict) == ("required_policy", "policy", "FAIL")
    assert rule.hint.startswith(f"release 'r2' of app 'support-bot' must be gated by policy {pin} "
                                f"(gates file {SOURCE}): this eval used policy ")


def test_the_hint_says_what_was_required_what_was_used_and_what_to_do() -> None:
    [by_name] = required_rules("r2", "support-bot", required(Pin("policy", "strict")),
                               Used(H1, frozenset({"lenient"})))
    assert by_name.hint == (f"release 'r2' of app 'support-bot' must be gated by policy strict (gates file {SOURCE}): "
                            f"this eval used policy lenient={H1}; run it with `--policy strict.yaml` (a policy file "
                            "registers under its file name), or any policy registered as strict")
    [exact] = required_rules("r2", "support-bot", required(Pin("policy", "strict", H2)), Used(""))
    assert f"must be gated by policy strict={H2} (gates file" in exact.hint
    assert exact.hint.endswith("this eval used policy none; run it with `--policy FILE`, FILE holding exactly that "
                               "content")
    [nameless] = required_rules("r2", "a", required(Pin("policy", "strict")), Used(H1, frozenset({"b", "c"})))
    assert f"this eval used policy b={H1} (also registered as c);" in nameless.hint


def test_a_required_suite_is_checked_too_and_only_when_required() -> None:
    strict = Used(H1, frozenset({"strict"}))
    assert required_rules("r", "a", required(Pin("policy", "strict")), strict, Used(H2, frozenset({"tiny"}))) == ()
    [rule] = required_rules("r", "a", required(Pin("policy", "strict"), Pin("eval_suite", "full")), strict,
                            Used(H2, frozenset({"tiny"})))
    assert (rule.rule, rule.metric) == ("required_suite", "suite")
    assert f"must be gated by suite full (gates file {SOURCE}): this eval used suite tiny={H2}; run it on suite " \
           "full" in rule.hint
    both = required_rules("r", "a", required(Pin("policy", "p", H2), Pin("eval_suite", "full", H1)),
                          Used(H1, frozenset({"p"})), Used(H1, frozenset({"x"})))
    assert [r.rule for r in both] == ["required_policy"]  # the suite is exactly the required content


def test_no_gates_file_requires_nothing() -> None:
    assert load_gates_file("") is None
    assert required_rules("r", "a", None, Used(H1, frozenset({"lenient"}))) == ()


def test_a_named_app_has_its_own_entry_and_any_other_app_the_star_entry() -> None:
    strict, baseline = required(Pin("policy", "strict")), required(Pin("policy", "baseline"))
    gates = Gates(SOURCE, {"support-bot": strict, "*": baseline})
    assert (gates.for_app("support-bot"), gates.for_app("shop")) == (strict, baseline)
    assert Gates(SOURCE, {"support-bot": strict}).for_app("shop") is None  # not covered: nothing required


def test_a_policy_that_passes_but_is_not_the_required_one_blocks_with_the_hint_first() -> None:
    passed = Outcome("PASS", (), "all 0 rules of policy 'lenient' passed")
    rules = required_rules("r2", "support-bot", required(Pin("policy", "strict")), Used(H1, frozenset({"lenient"})))
    blocked = with_rules(passed, rules)
    assert blocked.decision == "BLOCK" and [r.rule for r in blocked.rules] == ["required_policy"]
    assert blocked.reason.startswith("release 'r2' of app 'support-bot' must be gated by policy strict")
    held = with_rules(Outcome("NEEDS_REVIEW", (), "review required: x", "x"), rules)
    assert held.decision == "BLOCK"


def test_a_gates_file_decodes_into_pins_with_the_kind_implied(tmp_path: Path) -> None:
    path = tmp_path / "gates.yaml"
    path.write_text(f'apps:\n  support-bot: {{policy: strict={H1}, suite: support-quality}}\n'
                    '  "*": {policy: baseline}\n')
    gates = load_gates_file(str(path))
    assert gates is not None and gates.source == str(path)
    assert gates.apps == {"support-bot": Required(Pin("policy", "strict", H1), Pin("eval_suite", "support-quality"),
                                                  str(path)),
                          "*": Required(Pin("policy", "baseline"), None, str(path))}


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("apps:\n  bot: {policy: strict=sha256:abc}\n",
         "policy 'strict=sha256:abc': after '=' comes the exact version, sha256: and 64 lowercase hex digits, "
         "not 'sha256:abc' - at `$.apps.bot.policy`"),
        (f"apps:\n  bot: {{policy: strict, suite: 'full={H1.upper()}'}}\n", "- at `$.apps.bot.suite`"),
        ("apps:\n  bot: {policy: policy/strict}\n",
         "policy 'policy/strict': write the name alone ('strict'); the kind (policy) is implied by the key "
         "- at `$.apps.bot.policy`"),
        ("apps:\n  bot: {policy: strict, suite: eval_suite/full}\n", "write the name alone ('full')"),
        ("apps:\n  bot: {policy: 'has space'}\n", "'has space' is not an artifact name"),
        ("apps:\n  bot: {polcy: strict}\n", "Object contains unknown field `polcy` - at `$.apps.bot`"),
        ("apps:\n  bot: {suite: full}\n", "Object missing required field `policy` - at `$.apps.bot`"),
        ("apps:\n  bot: {policy: ''}\n", "- at `$.apps.bot.policy`"),
        ("apps:\n  bot: strict\n", "Expected `object`, got `str` - at `$.apps.bot`"),
        ("apps:\n  'bad app': {policy: strict}\n", "app 'bad app' is not an app name"),
        ("app:\n  bot: {policy: strict}\n", "Object contains unknown field `app`"),
        ("", "Expected `object`, got `null`"),
        ("apps: [1\n", "is not valid YAML"),
    ],
)
def test_an_invalid_gates_file_is_refused_naming_the_file_and_the_field(tmp_path: Path, text: str,
                                                                         said: str) -> None:
    path = tmp_path / "gates.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_gates_file(str(path))
    assert err.value.message.startswith(f"gates file {path} ") and said in err.value.message, err.value.message


def test_a_missing_gates_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read gates file {tmp_path}/none.yaml"):
        load_gates_file(str(tmp_path / "none.yaml"))


# Probe p20 F6: a PASS decided under a lax policy while the gates file did not cover its app (or under a pin changed
# since) kept admitting after the file required another policy. The gatekeeper judges each standing PASS at start.
LAX_PASS = GateDecided(id="d-lax", release="r2", decision="PASS", rules=[], eval_run="run-2", policy=H1,
                       artifacts={"model_config/m": H2, "policy": H1, "eval_suite": H2},
                       reason="all 1 rules of policy 'lenient' passed")


@pytest.mark.parametrize(
    ("current", "used", "blocks"),
    [
        (LAX_PASS, Used(H1, frozenset({"lenient"})), True),
        # An approval's PASS admits as an eval's does.
        (msgspec.structs.replace(LAX_PASS, reviewed_by="alice", approvals=["alice"], approval_keys=["k1"]),
         Used(H1, frozenset({"lenient"})), True),
        (LAX_PASS, Used(H1, frozenset({"strict"})), False),  # decided under what the file requires
        # A version whose registrations the events stream no longer holds: what it was registered as is unknown, and a
        # name alone trusts operators anyway; a restart must not BLOCK a PASS the file allowed when it was decided.
        (LAX_PASS, Used(H1), False),
        # Admits nothing already: a BLOCK stays as it is (a second start changes nothing), and a NEEDS_REVIEW's
        # approval is refused under the file.
        (msgspec.structs.replace(LAX_PASS, decision="BLOCK"), Used(H1, frozenset({"lenient"})), False),
        (msgspec.structs.replace(LAX_PASS, decision="NEEDS_REVIEW"), Used(H1, frozenset({"lenient"})), False),
    ],
)
def test_a_standing_pass_under_a_policy_the_gates_file_does_not_allow_is_a_block(
        current: GateDecided, used: Used, blocks: bool) -> None:
    failed = required_rules("r2", "shop", required(Pin("policy", "strict")), used, standing=current.id)
    out = under_requirement(current, failed)
    if not blocks:
        assert out is None
        return
    assert out is not None and out.decision == "BLOCK"
    assert [(r.rule, r.verdict) for r in out.rules] == [("required_policy", "FAIL")]
    assert out.reason == (f"release 'r2' of app 'shop' must be gated by policy strict (gates file {SOURCE}): its PASS "
                          f"(decision d-lax) was decided under policy lenient={H1}; run it with `--policy strict.yaml` "
                          "(a policy file registers under its file name), or any policy registered as strict; "
                          "all 1 rules of policy 'lenient' passed")


def test_a_standing_pass_under_a_version_the_stream_holds_as_another_kind_only_is_a_block() -> None:
    # Probe p21 F1: a dataset's bytes named as the eval's policy are registered under no policy name, which the
    # judgement at start took for a registration aged out of the stream, and the PASS kept admitting.
    failed = required_rules("r2", "shop", required(Pin("policy", "strict")), Used(H1, known=True), standing="d-lax")
    out = under_requirement(LAX_PASS, failed)
    assert out is not None and out.decision == "BLOCK"
    assert f"was decided under policy {H1} (registered under no name)" in out.reason


def test_a_standing_pass_under_another_pinned_version_or_suite_is_a_block() -> None:
    # An exact pin holds whatever the names: a version registered long ago is not the pinned content either.
    [old_pin] = required_rules("r2", "shop", required(Pin("policy", "strict", H2)), Used(H1), standing="d-lax")
    assert f"must be gated by policy strict={H2}" in old_pin.hint and f"was decided under policy {H1} (" in old_pin.hint
    [suite] = required_rules("r2", "shop", required(Pin("policy", "strict"), Pin("eval_suite", "full")),
                             Used(H1, frozenset({"strict"})), Used(H2, frozenset({"tiny"})), standing="d-lax")
    out = under_requirement(LAX_PASS, [suite])
    assert out is not None and out.decision == "BLOCK" and [r.rule for r in out.rules] == ["required_suite"]
    assert f"its PASS (decision d-lax) was decided under suite tiny={H2}; run it on suite full" in out.reason


# The baseline an eval is compared with (baseline.py): before, the eval's requester named any release, a BLOCKed
# one included, and a pinned "no regression vs baseline" policy passed a regression against the real yardstick.
BASE_ARTS = {"model_config/m": H1}
REL = {"name": "rel", "rules": [{"name": "no-regression", "metric": "exact_match",
                                 "relative": {"max_regression": 0.02}},
                                {"name": "errors", "metric": "error_rate", "op": "<=", "threshold": 0.05}]}


def base_decision(decision: str = "PASS", **changes: object) -> GateDecided:
    return GateDecided(**{"id": "d0", "release": "v1", "decision": decision, "rules": [], "eval_run": "run-v1",
                          "artifacts": {**BASE_ARTS, "policy": H2}, "reason": "accuracy failed", **changes})


@pytest.mark.parametrize(
    ("decision", "registered", "baseline_app", "compared", "said"),
    [
        (base_decision(), BASE_ARTS, "shop", "run-v1", ""),
        # Nothing compared (its PASS's run not stored yet, or judged on another suite): the relative rules were judged
        # on nothing, which `no_data: pass` let through (before, it was taken).
        (base_decision(), BASE_ARTS, "shop", None,
         "this eval compared with no run of baseline 'v1', but its PASS (decision d0) judged run run-v1: run the eval "
         "again once that run is stored, or gate 'v1' on this suite first"),
        (base_decision("BLOCK"), BASE_ARTS, "shop", "run-v1",
         "baseline 'v1' is not allowed by the gate: its current decision is BLOCK (accuracy failed)"),
        (base_decision("BLOCK", reviewed_by="carol"), BASE_ARTS, "shop", "run-v1",
         "its current decision is BLOCK, rejected by carol"),
        (base_decision("NEEDS_REVIEW"), BASE_ARTS, "shop", "run-v1", "its current decision is NEEDS_REVIEW"),
        (None, BASE_ARTS, "shop", "run-v1", "baseline 'v1' has no gate decision: the gate never allowed it"),
        (base_decision(), None, "", "run-v1", "baseline 'v1' is not a registered release"),
        (base_decision(), BASE_ARTS, "other", "run-v1", "baseline 'v1' is a release of app 'other', not of 'shop'"),
        (base_decision(), {"model_config/m": H2}, "shop", "run-v1", "judged other artifacts than it is registered"),
        (base_decision(), BASE_ARTS, "shop", "run-v0",
         "this eval compared with run run-v0 of baseline 'v1', but its PASS (decision d0) judged run run-v1"),
    ],
)
def test_a_baseline_is_a_yardstick_only_while_the_gate_allows_it(
        decision: GateDecided | None, registered: dict | None, baseline_app: str, compared: str | None,
        said: str) -> None:
    why = refusal("v1", decision, registered, app="shop", baseline_app=baseline_app, compared_run=compared)
    assert said in why if said else why == ""


def completed_against(baseline: str, diff: float) -> EvalCompleted:
    cmp = BaselineComparison(metric="exact_match", candidate=0.5, baseline=0.5 - diff, diff=diff, n_pairs=20)
    return EvalCompleted(run_id="r", release="v2", suite="s", baseline=baseline, baseline_run="run-b",
                         metrics={"exact_match": 0.5, "error_rate": 0.0}, comparisons={"exact_match": cmp})


def test_a_refused_baseline_blocks_a_policy_judged_against_it_and_its_comparison_is_set_aside() -> None:
    policy = parse_policy({**REL, "use_interval": False})
    fooled = decide_eval(policy, "", completed_against("v-bad", 0.0))
    assert fooled.decision == "PASS"  # what the comparison alone says (0.5 -> 0.5)
    why = "baseline 'v-bad' is not allowed by the gate: its current decision is BLOCK (accuracy failed)"
    out = decide_eval(policy, "", completed_against("v-bad", 0.0), baseline_refused=why)
    assert out.decision == "BLOCK" and out.reason.startswith(why)
    assert [(r.rule, r.verdict) for r in out.rules] == [
        ("no-regression", "NO_DATA"), ("errors", "PASS"), ("baseline_allowed", "FAIL")]
    assert out.rules[0].hint == "exact_match was not compared: the baseline was refused (rule baseline_allowed)"
    # Even where the policy lets missing data pass, a refused baseline cannot.
    lax = parse_policy({**REL, "use_interval": False, "no_data": "pass"})
    assert decide_eval(lax, "", completed_against("v-bad", 0.0), baseline_refused=why).decision == "BLOCK"
    # A policy judged on no comparison only notes it.
    absolute = parse_policy({"name": "abs", "rules": [REL["rules"][1]], "use_interval": False})
    noted = decide_eval(absolute, "", completed_against("v-bad", 0.0), baseline_refused=why)
    assert noted.decision == "PASS" and noted.reason.endswith(f"; not compared: {why}")
    assert uses_baseline(parse_policy({"name": "m", "rules": [REL["rules"][1]],
                                       "review": {"require_when": [{"metric_moved": "pii*", "by": 0.01}]}}))
    assert not uses_baseline(parse_policy({"name": "d", "rules": [{**REL["rules"][0], "dry_run": True}]}))


@pytest.mark.parametrize(
    ("decision", "said"),
    [
        (base_decision(), ""),
        (base_decision("BLOCK", reviewed_by="carol", reason="tone"),
         "baseline 'v1' is not allowed by the gate: its current decision is BLOCK, rejected by carol (tone)"),
        (base_decision("BLOCK", reason="drift: latency moved"),
         "baseline 'v1' is not allowed by the gate: its current decision is BLOCK (drift: latency moved)"),
        (base_decision("NEEDS_REVIEW"), "its current decision is NEEDS_REVIEW"),
        (None, "baseline 'v1' has no gate decision: the gate never allowed it"),
    ],
)
def test_a_release_is_an_allowed_baseline_while_its_current_decision_is_a_pass(
        decision: GateDecided | None, said: str) -> None:
    why = disallowed("v1", decision)
    assert said in why if said else why == ""


# A decision measured against a baseline the gate no longer allows (probe p85 F1: a PASS "no regression against
# v1" kept admitting after a person rejected v1, while a new eval against v1 BLOCKed on baseline_allowed).
WHY = "baseline 'v1' is not allowed by the gate: its current decision is BLOCK, rejected by carol (tone)"


def measured(decision: str = "PASS", **changes: object) -> GateDecided:
    rules = [RuleResult(rule="no-regression", metric="exact_match", op="relative", threshold=0.02, observed=0.0,
                        verdict="PASS")]
    return GateDecided(**{"id": "d2", "release": "v2", "decision": decision, "rules": rules, "baseline": "v1",
                          "eval_run": "run-v2", "reason": "all 2 rules of policy 'rel' passed", **changes})


@pytest.mark.parametrize("decision", ["PASS", "NEEDS_REVIEW"])
def test_a_standing_decision_measured_against_a_baseline_no_longer_allowed_is_a_block(decision: str) -> None:
    out = baseline_withdrawn(measured(decision), WHY, parse_policy(REL))
    assert out is not None and out.decision == "BLOCK"
    assert [(r.rule, r.verdict) for r in out.rules] == [("no-regression", "PASS"), ("baseline_allowed", "FAIL")]
    assert out.reason.startswith(WHY) and out.reason.endswith("; all 2 rules of policy 'rel' passed")
    assert "run the eval with `--baseline` naming one" in out.reason
    # A policy that cannot be read now may have judged on the comparison: held to it all the same.
    assert baseline_withdrawn(measured(decision), WHY, None) == out


@pytest.mark.parametrize(
    ("current", "why", "policy"),
    [
        (measured(), "", REL),  # the baseline is still allowed
        (measured(baseline=""), WHY, REL),  # measured against none
        # Against an earlier PASS of its own release, now awaiting review: this very decision (an approval passes it).
        (measured("NEEDS_REVIEW", baseline="v2"), WHY, REL),
        (measured("BLOCK"), WHY, REL),  # admits nothing already, and no approval can make it
        (measured(), WHY, {"name": "abs", "rules": [REL["rules"][1]]}),  # judged nothing on the comparison
        (measured(), WHY, {"name": "dry", "rules": [{**REL["rules"][0], "dry_run": True}]}),
    ],
)
def test_a_decision_stays_when_its_baseline_is_allowed_or_it_rests_on_no_comparison(
        current: GateDecided, why: str, policy: dict) -> None:
    assert baseline_withdrawn(current, why, parse_policy(policy)) is None


def test_a_pinned_baseline_is_the_deployments_known_good_release() -> None:
    pinned = Required(Pin("policy", "strict"), None, SOURCE, baseline_deployment="shop-web")
    assert required_baseline_rules("v2", "shop", pinned, "v1", "v1") == ()
    assert required_baseline_rules("v2", "shop", required(Pin("policy", "strict")), "v-bad", "v1") == ()
    [other] = required_baseline_rules("v2", "shop", pinned, "v-bad", "v1")
    assert (other.rule, other.verdict) == ("required_baseline", "FAIL")
    assert other.hint == (f"release 'v2' of app 'shop' must be compared with the known-good release of deployment "
                          f"'shop-web' (gates file {SOURCE}), now 'v1': this eval compared with v-bad; run it with "
                          "`--baseline v1`")
    [none] = required_baseline_rules("v2", "shop", pinned, "", "v1")
    assert "this eval compared with none; run it with `--baseline v1`" in none.hint
    assert required_baseline_rules("v2", "shop", pinned, "", "") == ()  # it serves nothing yet: no baseline
    [early] = required_baseline_rules("v2", "shop", pinned, "v-bad", "")
    assert "which serves none yet: this eval compared with 'v-bad'; run it without `--baseline`" in early.hint
    [unread] = required_baseline_rules("v2", "shop", pinned, "v1", None, "the route is unreadable")
    assert unread.hint.endswith("which cannot be read: the route is unreadable")


def test_a_gates_file_pins_the_baseline_to_a_deployment(tmp_path: Path) -> None:
    path = tmp_path / "gates.yaml"
    path.write_text("apps:\n  shop: {policy: strict, baseline: {deployment: shop-web}}\n")
    gates = load_gates_file(str(path))
    assert gates is not None and gates.apps["shop"].baseline_deployment == "shop-web"
    for text, said in (("{policy: strict, baseline: {deployment: 'a b'}}",
                        "deployment 'a b' is not a deployment name (1-128 characters"),
                       ("{policy: strict, baseline: {release: v1}}", "unknown field `release` - at "
                                                                     "`$.apps.shop.baseline`"),
                       ("{policy: strict, baseline: shop-web}", "Expected `object | null`, got `str` - at "
                                                                "`$.apps.shop.baseline`")):
        path.write_text(f"apps:\n  shop: {text}\n")
        with pytest.raises(ConfigError) as err:
            load_gates_file(str(path))
        assert said in err.value.message, err.value.message
