"""Every document (policy, suite, dataset, judge params, canary request, simulator config, price book)
refuses malformed input with its domain error, naming the document and the exact path."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lockgate.errors import ConfigError, LockgateError, PolicyError
from lockgate.pricebook import PriceBookError, parse_price_book
from lockgate.services.evaluator import domain as evaluator
from lockgate.services.evaluator import judge
from lockgate.services.evaluator.domain import SuiteError
from lockgate.services.gatekeeper import domain as gatekeeper
from lockgate.services.router import domain as router
from lockgate.services.router.domain import InvalidRollout
from lockgate_dev.sim import load_config

pytestmark = pytest.mark.timeout(10)

POLICY = {"name": "p", "rules": [{"name": "acc", "metric": "exact_match", "op": ">=", "threshold": 0.8},
                                 {"name": "rel", "metric": "score", "relative": {"max_regression": 0.02}},
                                 {"name": "lat", "metric": "latency_p95_ms", "op": "<=", "threshold": 2000}],
          "review": {"require_when": [{"metric_moved": "safety.*", "by": 0.01}]}}
SUITE = {"name": "qa", "prompt": {"template": "{input}"}, "dataset": [{"input": "2+2?", "expected": "4"}],
         "scorers": ["exact_match", {"name": "llm_judge", "params": {"model": "j", "rubric": "correct?"}}],
         "task": {"type": "call"}, "calibration": {"confidence": "logprobs"}}
CANARY = {"stable_release": "r1", "canary_release": "r2", "initial_weight": 10}
SIM = {"seed": 1, "models": {"m": {"latency_ms": 5, "error_rate": 0.1}}}
BOOK = {"version": "v1", "models": {"m": {"input_per_mtok": 1, "output_per_mtok": 2}}}


def changed(doc: dict, path: tuple[Any, ...], value: Any) -> dict:
    """A deep copy of `doc` with the value at `path` replaced (or added)."""
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def sim_config(doc: dict, tmp_path: Path) -> Any:
    p = tmp_path / "sim.yaml"
    p.write_bytes(msgspec.yaml.encode(doc))
    return load_config(p)


CASES: list[tuple[str, Callable[..., Any], type[LockgateError], dict, tuple[Any, ...], Any, str]] = [
    # (document, parse, error, valid doc, where to break it, bad value, expected message)
    ("policy", gatekeeper.parse_policy, PolicyError, POLICY, ("rules", 2, "threshold"), "high",
     "policy: Expected `float | null`, got `str` - at `$.rules[2].threshold`"),
    ("policy", gatekeeper.parse_policy, PolicyError, POLICY, ("rules", 1, "relative", "min_chnage"), 0.1,
     "policy: Object contains unknown field `min_chnage` - at `$.rules[1].relative`"),
    ("policy", gatekeeper.parse_policy, PolicyError, POLICY, ("review", "require_when", 0, "by"), -1,
     "policy: Expected `float` >= 0.0 - at `$.review.require_when[0].by`"),
    ("policy", gatekeeper.parse_policy, PolicyError, POLICY, ("rules", 0, "op"), "=>",
     "policy: Invalid enum value '=>' - at `$.rules[0].op`"),
    ("policy", gatekeeper.parse_policy, PolicyError, POLICY, ("rules", 0, "op"), None,
     "policy: an absolute rule needs `op` and `threshold` (or use relative, non_inferiority, max_count, max_rate or slices) - at `$.rules[0]`"),
    ("policy", gatekeeper.parse_policy, PolicyError, POLICY, ("rules", 2, "name"), "acc",
     "policy: rule names must be unique; repeated: acc - at `$.rules`"),
    ("suite", evaluator.parse_suite, SuiteError, SUITE, ("dataset", 0, "vars"), "x",
     "suite: Expected `object | null`, got `str` - at `$.dataset[0].vars`"),
    ("suite", evaluator.parse_suite, SuiteError, SUITE, ("prompt", "templat"), "{input}",
     "suite: Object contains unknown field `templat` - at `$.prompt`"),
    ("suite", evaluator.parse_suite, SuiteError, SUITE, ("repeats",), 101,
     "suite: Expected `int` <= 100 - at `$.repeats`"),
    ("suite", evaluator.parse_suite, SuiteError, SUITE, ("task", "type"), "replay",
     "suite: Invalid value 'replay' - at `$.task.type`"),
    ("suite", evaluator.parse_suite, SuiteError, SUITE, ("scorers", 1, "params", "n"), 16,
     "suite: Expected `int` <= 15 - at `$.scorers[1].params.n`"),
    ("suite", evaluator.parse_suite, SuiteError, SUITE, ("scorers", 1, "params", "judge"), "x",
     "suite: Object contains unknown field `judge` - at `$.scorers[1].params`"),
    ("suite", evaluator.parse_suite, SuiteError, SUITE, ("scorers", 0), "vibes",
     "suite: unknown scorer 'vibes'"),
    ("suite", evaluator.parse_suite, SuiteError, SUITE, ("calibration", "scorer"), "token_f1",
     "suite: expected one of the suite's scorers (exact_match, llm_judge), got 'token_f1' - at "
     "`$.calibration.scorer`"),
    ("judge params", judge.parse_params, judge.JudgeConfigError, SUITE["scorers"][1]["params"], ("n",), "3",
     "llm_judge params: Expected `int`, got `str` - at `$.n`"),
    ("judge params", judge.parse_params, judge.JudgeConfigError, SUITE["scorers"][1]["params"], ("temperature",), 3,
     "llm_judge params: Expected `float` <= 2.0 - at `$.temperature`"),
    ("judge params", judge.parse_params, judge.JudgeConfigError, SUITE["scorers"][1]["params"], ("rubrik",), "x",
     "llm_judge params: Object contains unknown field `rubrik`"),
    ("price book", parse_price_book, PriceBookError, BOOK, ("currency",), "EUR",
     "price book is malformed: Invalid enum value 'EUR' - at `$.currency`"),
    ("price book", parse_price_book, PriceBookError, BOOK, ("vat",), 0.2,
     "price book is malformed: Object contains unknown field `vat`"),
]


@pytest.mark.parametrize(("name", "parse", "error", "doc", "path", "value", "message"), CASES,
                         ids=[f"{c[0]}-{'.'.join(map(str, c[4]))}" for c in CASES])
def test_malformed_documents_name_the_path(name: str, parse: Callable[..., Any], error: type[LockgateError],
                                          doc: dict, path: tuple[Any, ...], value: Any, message: str) -> None:
    parse(copy.deepcopy(doc))  # the unbroken document is valid
    with pytest.raises(error) as err:
        parse(changed(doc, path, value))
    assert message in err.value.message


def test_dataset_rows_may_carry_metadata_columns() -> None:
    cases = evaluator.parse_cases([{"input": "a", "expected": 1, "tags": ["x"], "source": "web"}], where="dataset")
    assert [(c.id, c.vars, c.expected) for c in cases] == [("0", {"input": "a"}, 1)]


@pytest.mark.parametrize(("rows", "message"), [
    ([{"input": "a", "expected": 1}, {"input": 2, "expected": 1}],
     "dataset sha256:d: Expected `str | null`, got `int` - at `$[1].input`"),
    ([{"vars": {}, "input": "a", "expected": 1}], "give 'vars' or 'input', not both - at `$[0]`"),
    ([{"id": 7, "input": "a", "expected": 1}, {"id": "7", "input": "b", "expected": 2}],
     "dataset sha256:d: duplicate case id '7' - at `$[1].id`"),
])
def test_malformed_datasets_name_the_row(rows: list, message: str) -> None:
    with pytest.raises(SuiteError) as err:
        evaluator.parse_cases(rows, where="dataset sha256:d")
    assert message in err.value.message


@pytest.mark.parametrize(("path", "value", "message"), [
    (("initial_weight",), "10", "invalid canary request: Expected `float | null`, got `str` - at `$.initial_weight`"),
    (("initial_weight",), 100.5, "invalid canary request: Expected `float` <= 100.0 - at `$.initial_weight`"),
    (("stable_upstream",), "file:///etc", "Object contains unknown field `stable_upstream`"),  # releases only
    (("weight",), 5, "invalid canary request: Object contains unknown field `weight`"),
    (("canary_release",), "r1", "invalid canary request: canary_release must differ from stable_release"),
])
def test_malformed_canary_requests_name_the_path(path: tuple[str], value: Any, message: str) -> None:
    assert router.decode_canary(msgspec.json.encode(CANARY)).initial_weight == 10
    with pytest.raises(InvalidRollout) as err:
        router.decode_canary(msgspec.json.encode(changed(CANARY, path, value)))
    assert message in err.value.message


@pytest.mark.parametrize(("path", "value", "message"), [
    (("seed",), "one", "Expected `int`, got `str` - at `$.seed`"),
    (("models", "m", "error_rate"), 1.5, "Expected `float` <= 1.0 - at `$.models[...].error_rate`"),
    (("models", "m", "latency"), 5, "Object contains unknown field `latency` - at `$.models[...]`"),
    (("models", "m", "jitter_ms"), -1, "Expected `float` >= 0.0 - at `$.models[...].jitter_ms`"),
])
def test_malformed_simulator_configs_name_the_path(tmp_path: Path, path: tuple[str, ...], value: Any,
                                                   message: str) -> None:
    assert sim_config(SIM, tmp_path).models["m"].latency_ms == 5
    with pytest.raises(ConfigError) as err:
        sim_config(changed(SIM, path, value), tmp_path)
    assert "simulator config" in err.value.message and message in err.value.message


def test_defaults_survive_decoding() -> None:
    policy = gatekeeper.parse_policy({"name": "p", "use_interval": False, "version": 2,
                                      "rules": [{"metric": "m", "op": ">=", "threshold": 1},
                                                {"metric": "m", "op": "<", "threshold": 9, "use_interval": True}]})
    assert (policy.no_data, policy.version, policy.limits, policy.review) == ("fail", "2", gatekeeper.Limits(), None)
    assert [(r.name, r.use_interval, r.hard, r.no_data) for r in policy.rules] == [
        ("m >= 1", False, False, None), ("m < 9", True, False, None)]
    suite = evaluator.parse_suite(SUITE)
    assert (suite.repeats, suite.margin, suite.rate_limit_rps, suite.model, suite.price_book, suite.task.type) == (
        1, 0.05, 0.0, "", "", "call")
    assert suite.calibration == evaluator.CalibrationSpec(confidence="logprobs", scorer="exact_match", bins=10)
    assert [(s.name, s.weight, s.threshold) for s in suite.scorers] == [("exact_match", 1.0, None),
                                                                         ("llm_judge", 1.0, None)]
    assert suite.dataset == (evaluator.Case(id="0", vars={"input": "2+2?"}, expected="4"),)
    params = judge.parse_params(SUITE["scorers"][1]["params"])
    assert (params.n, params.endpoint, params.temperature, params.pass_mark) == (3, "", 0.7, 0.5)


@pytest.mark.parametrize("c_parser", [False, True])
def test_aliases_are_counted_as_expanded_and_a_bomb_is_refused_before_anything_is_built(
        c_parser: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from lockgate import onereading
    from lockgate.onereading import Expands, yaml_loads
    from lockgate.services.evaluator.safety import ProbeSetError, parse_probes

    shared = "defaults: &d {model: m, retries: 2}\na: *d\nb: *d\nlist: &l [1, 2, 3]\nagain: *l\n"
    assert yaml_loads(shared, c_parser=c_parser)["b"] == {"model": "m", "retries": 2}
    looped = yaml_loads("a: &a [1, *a]\n", c_parser=c_parser)  # built once, however deep it is walked
    assert looped["a"][1] is looped["a"]
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n" for p, x in zip("abcdefgh", "bcdefghi", strict=True))
    with pytest.raises(Expands, match="more than 5,000,000 values"):
        yaml_loads(bomb, c_parser=c_parser)
    with pytest.raises(Expands, match="more than 64 MiB of text"):
        yaml_loads(f"a: &a {'x' * 1_000_000}\nb: [{', '.join(['*a'] * 70)}]\n", c_parser=c_parser)
    monkeypatch.setattr(onereading, "MAX_YAML_BYTES", 100)
    assert yaml_loads(f"a: {'x' * 200}\n", c_parser=c_parser)  # no alias: nothing bounds a file's own size here
    with pytest.raises(Expands, match="more than 0 MiB"):
        yaml_loads(f"a: &a {'x' * 60}\nb: *a\n", c_parser=c_parser)
    with pytest.raises(ProbeSetError, match="probe set is refused: its aliases expand it"):
        parse_probes(bomb + "probes: [*i]\n")
