"""Suite validation, prompt rendering, scoring and aggregation: pure, no I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lockgate.artifacts import canonical_bytes
from lockgate.codec import encode
from lockgate.ids import content_hash
from lockgate.services.evaluator import domain
from lockgate.services.evaluator.domain import Case, CaseResult, SuiteError

pytestmark = pytest.mark.timeout(10)
FIXTURES = Path(__file__).parent.parent / "fixtures"


def suite_doc(**changes: object) -> dict:
    doc = {
        "name": "qa",
        "prompt": {"system": "Be brief.", "template": "Q: {question}"},
        "dataset": [{"id": "a", "vars": {"question": "2+2?"}, "expected": "4"}],
        "scorers": [{"name": "exact_match", "weight": 2}, {"name": "token_f1"}],
    }
    doc.update(changes)
    return doc


def test_valid_suite_parses_with_defaults() -> None:
    suite = domain.parse_suite(suite_doc())
    assert suite.name == "qa" and suite.repeats == 1 and suite.model == ""
    assert [(s.name, s.weight) for s in suite.scorers] == [("exact_match", 2.0), ("token_f1", 1.0)]
    assert suite.dataset == (Case(id="a", vars={"question": "2+2?"}, expected="4"),)


def test_scorer_shorthand_and_hash_dataset() -> None:
    suite = domain.parse_suite(suite_doc(scorers=["exact_match"], dataset="sha256:" + "0" * 64, repeats=3))
    assert suite.scorers[0].name == "exact_match" and suite.dataset.startswith("sha256:") and suite.repeats == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": None}, "Expected `str`, got `null` - at `$.name`"),
        ({"prompt": "hi"}, "Expected `object`, got `str` - at `$.prompt`"),
        ({"prompt": {"system": "x"}}, "missing required field `template` - at `$.prompt`"),
        ({"prompt": {"template": "  "}}, "template must not be blank - at `$.prompt`"),
        ({"prompt": {"template": "x", "system": 3}}, "Expected `str`, got `int` - at `$.prompt.system`"),
        ({"dataset": "data.jsonl"}, "Expected `str` matching regex '^sha256:' - at `$.dataset`"),
        ({"dataset": 7}, "Expected `str | array`, got `int` - at `$.dataset`"),
        ({"dataset": []}, "Expected `array` of length >= 1 - at `$.dataset`"),
        ({"dataset": [{"vars": {}}]}, "missing required field `expected` - at `$.dataset[0]`"),
        ({"dataset": [{"expected": 1}]}, "needs 'vars' (a mapping) or 'input' (a string) - at `$.dataset[0]`"),
        ({"dataset": [{"vars": [1], "expected": 1}]}, "got `array` - at `$.dataset[0].vars`"),
        ({"scorers": []}, "Expected `array` of length >= 1 - at `$.scorers`"),
        ({"scorers": [{"name": "vibes"}]}, "unknown scorer 'vibes'; known scorers: contains,"),
        ({"scorers": [{"name": "exact_match", "weight": -1}]}, "Expected `float` >= 0.0 - at `$.scorers[0].weight`"),
        ({"scorers": [{"name": "exact_match", "weight": 0}]}, "weight above 0 - at `$.scorers`"),
        ({"scorers": ["exact_match", "exact_match"]}, "listed twice - at `$.scorers[1]`"),
        ({"scorers": [{"name": "exact_match", "params": [1]}]}, "Expected `object`, got `array` - at `$.scorers[0].params`"),
        ({"repeats": 0}, "Expected `int` >= 1 - at `$.repeats`"),
        ({"repeats": True}, "Expected `int`, got `bool` - at `$.repeats`"),
        ({"model": 5}, "Expected `str`, got `int` - at `$.model`"),
    ],
)
def test_invalid_suites_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(SuiteError) as err:
        domain.parse_suite(suite_doc(**changes))
    assert message in err.value.message


def test_missing_top_level_field_and_non_mapping() -> None:
    doc = suite_doc()
    del doc["scorers"]
    with pytest.raises(SuiteError, match="suite: Object missing required field `scorers`"):
        domain.parse_suite(doc)
    with pytest.raises(SuiteError, match="suite: Expected `object`, got `array`"):
        domain.parse_suite(["not", "a", "suite"])


def test_cases_accept_input_shorthand_and_default_ids() -> None:
    cases = domain.parse_cases([{"input": "hello", "expected": "hi"}, {"vars": {"x": 1}, "expected": [1, 2]}])
    assert cases == (Case(id="0", vars={"input": "hello"}, expected="hi"), Case(id="1", vars={"x": 1}, expected=[1, 2]))


def test_duplicate_case_ids_and_non_list_dataset_are_rejected() -> None:
    with pytest.raises(SuiteError, match=r"duplicate case id 'a' - at `\$\[1\].id`"):
        domain.parse_cases([{"id": "a", "input": "x", "expected": 1}, {"id": "a", "input": "y", "expected": 2}])
    with pytest.raises(SuiteError, match="dataset sha256:x: Expected `array`, got `object`"):
        domain.parse_cases({"id": "a"}, where="dataset sha256:x")


def test_a_case_id_over_its_bound_is_refused_naming_the_case_and_the_bound() -> None:
    # Probe p58 F2: an id of 1.1 MB was read as any other, and the case's result, kept whole, dead-lettered the run.
    long = [{"id": "a", "input": "x", "expected": 1}, {"id": "x" * (domain.CASE_ID_MAX + 1), "input": "y", "expected": 2}]
    with pytest.raises(SuiteError, match=rf"dataset sha256:x: Expected `str` of length <= {domain.CASE_ID_MAX} - at "
                                         r"`\$\[1\].id`"):
        domain.parse_cases(long, where="dataset sha256:x")
    with pytest.raises(SuiteError, match=rf"suite: Expected `str` of length <= {domain.CASE_ID_MAX} - at "
                                         r"`\$.dataset\[1\].id`"):
        domain.parse_suite(suite_doc(dataset=long))
    with pytest.raises(SuiteError, match=r"Expected `int` <= 9223372036854775807 - at `\$\[0\].id`"):
        domain.parse_cases([{"id": 10**30, "input": "x", "expected": 1}])
    at_bound = domain.parse_cases([{"id": "x" * domain.CASE_ID_MAX, "input": "x", "expected": 1},
                                   {"id": 2**63 - 1, "input": "y", "expected": 1}])
    assert [len(c.id) for c in at_bound] == [domain.CASE_ID_MAX, 19]


def test_an_unpublishable_case_fits_a_message_whatever_its_details_hold() -> None:
    # Every text JSON escapes six-fold; its details hold 20,000 short values under long keys, the binding last.
    details = {f"{i:05}" + "\x01" * 200: True for i in range(20_000)} | {"note": "\x01" * 200, "binding": "sha256:b"}
    r = CaseResult(case_id="\x01" * domain.CASE_ID_MAX, repeat=0, input="\x01" * 2_000_000, expected="\x01" * 99_999,
                   output="\x01" * 2_000_000, scores={"contains": 1.0}, details=details)
    size = len(encode(domain.case_fact(r)))
    assert size > domain.FACT_BYTES
    stored = domain.unpublishable(r, size)
    assert len(encode(domain.case_fact(stored))) <= domain.FACT_BYTES
    assert stored.case_id == r.case_id and stored.details["binding"] == "sha256:b" and stored.output == ""
    assert stored.error.startswith(f"its result is {size:,} bytes encoded")


def test_render_builds_chat_messages() -> None:
    suite = domain.parse_suite(suite_doc())
    assert domain.render(suite, suite.dataset[0]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: 2+2?"},
    ]
    no_system = domain.parse_suite(suite_doc(prompt={"template": "{input} {{literal}}"}))
    assert domain.render(no_system, Case(id="z", vars={"input": "x"}, expected="")) == [
        {"role": "user", "content": "x {literal}"}
    ]


def test_render_names_the_case_and_the_missing_variable() -> None:
    suite = domain.parse_suite(suite_doc())
    with pytest.raises(SuiteError, match=r"case 'b': template variable \{question\} is not in its vars \(q\)"):
        domain.render(suite, Case(id="b", vars={"q": 1}, expected=""))


# The rendering rule (probe p1, F3): a release's prompt artifact renders every case; the suite's prompt only when the
# release binds none. Before, the suite's prompt rendered every case whatever prompt the release bound.
P = "prompt/answer=sha256:" + "1" * 64


@pytest.mark.parametrize(("artifact", "messages", "where"), [
    # the artifact's system message and template, the suite's neither
    (b'{"system":"Be rude.","template":"Question: {question}"}',
     [{"role": "system", "content": "Be rude."}, {"role": "user", "content": "Question: 2+2?"}], f"prompt artifact {P}"),
    # a system prompt alone: the suite's template asks the case
    (b'{"system":"Be rude."}', [{"role": "system", "content": "Be rude."}, {"role": "user", "content": "Q: 2+2?"}],
     "suite.prompt.template"),
    # text (a .txt prompt) is a system message
    (b"Be rude.", [{"role": "system", "content": "Be rude."}, {"role": "user", "content": "Q: 2+2?"}],
     "suite.prompt.template"),
    # a template alone: no system message (the suite's is not the release's)
    (b'{"template":"{question}"}', [{"role": "user", "content": "2+2?"}], f"prompt artifact {P}"),
])
def test_a_release_prompt_renders_the_cases_with_its_system_and_template(artifact: bytes, messages: list,
                                                                          where: str) -> None:
    suite = domain.parse_suite(suite_doc())
    rendered, source = domain.with_prompt(suite, P, artifact)
    assert domain.render(rendered, suite.dataset[0]) == messages and source == where
    assert rendered.scorers == suite.scorers and rendered.dataset == suite.dataset  # only the prompt changed


@pytest.mark.parametrize(("artifact", "said"), [
    (b"{}", "gives neither a system message nor a template"),
    (b'{"system":" ","template":""}', "gives neither a system message nor a template"),
    (b'{"messages":[]}', "Object contains unknown field `messages`"),
    (b'{"system":1}', "Expected `str`, got `int` - at `$.system`"),
    (b"[1]", "Expected `object`, got `array`"),
    (b"\xff\xfe", "is neither JSON nor UTF-8 text"),
])
def test_an_artifact_that_is_no_prompt_is_refused_naming_it(artifact: bytes, said: str) -> None:
    with pytest.raises(domain.PromptError, match=f"prompt artifact {P}") as err:
        domain.with_prompt(domain.parse_suite(suite_doc()), P, artifact)
    assert said in err.value.message


def test_a_release_prompt_that_cannot_render_a_case_names_the_artifact_and_the_case() -> None:
    suite, where = domain.with_prompt(domain.parse_suite(suite_doc()), P, b'{"template":"{customer}: {question}"}')
    with pytest.raises(SuiteError) as err:
        domain.render(suite, suite.dataset[0], where=where)
    assert err.value.message == (f"prompt artifact {P}: case 'a': template variable {{customer}} is not in its vars "
                                 "(question)")


def test_the_prompt_a_release_binds() -> None:
    assert domain.bound_prompt({"model_config/m": "sha256:m"}, "r1") is None  # the suite's prompt renders
    assert domain.bound_prompt({"model_config/m": "sha256:m", "prompt/p": "sha256:p"}, "r1") == ("prompt/p", "sha256:p")
    with pytest.raises(domain.PromptError, match=r"release 'r1' binds 2 prompt artifacts \(prompt/a, prompt/b\)"):
        domain.bound_prompt({"prompt/b": "sha256:b", "prompt/a": "sha256:a"}, "r1")


def test_what_of_a_release_a_run_did_not_read() -> None:
    arts = {"prompt/p": "sha256:p", "model_config/m": "sha256:m", "eval_suite/s": "sha256:s", "dataset/d": "sha256:d",
            "policy/q": "sha256:q", "tool/t": "sha256:t"}
    assert domain.unread(arts, suite="sha256:s", dataset="sha256:d", policy="sha256:q") == ["tool/t=sha256:t"]
    assert domain.unread(arts, suite="sha256:S", dataset="", policy="") == [
        "dataset/d=sha256:d", "eval_suite/s=sha256:s", "policy/q=sha256:q", "tool/t=sha256:t"]


def test_score_uses_every_suite_scorer_and_wraps_scorer_failures() -> None:
    suite = domain.parse_suite(suite_doc())
    assert domain.score(suite, "4", "4") == {"exact_match": 1.0, "token_f1": 1.0}
    assert domain.score(suite, "five", "4")["exact_match"] == 0.0
    bad = domain.parse_suite(suite_doc(scorers=[{"name": "regex", "params": {"pattern": "("}}]))
    with pytest.raises(SuiteError, match="scorer 'regex' failed on case 'c7'"):
        domain.score(bad, "x", None, case_id="c7")


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([5.0], 95, 5.0), ([1, 2, 3, 4], 50, 2.5), ([1, 2, 3, 4, 5], 95, 4.8), ([10, 0], 0, 0.0), ([3, 1, 2], 100, 3.0)],
)
def test_percentile_matches_linear_interpolation(values: list[float], q: float, expected: float) -> None:
    assert domain.percentile(values, q) == pytest.approx(expected)


def result(case: str, em: float, f1: float, latency: float, error: str = "") -> CaseResult:
    scores = {} if error else {"exact_match": em, "token_f1": f1}
    return CaseResult(case_id=case, repeat=0, input="", expected="", scores=scores, latency_ms=latency, error=error)


def test_aggregate_weighted_score_latency_and_errors() -> None:
    suite = domain.parse_suite(suite_doc())  # exact_match weight 2, token_f1 weight 1
    results = [result("a", 1, 1, 10), result("b", 1, 0.5, 20), result("c", 0, 0.5, 30),
               result("d", 0, 0, 0, error="HTTP 500")]
    m = domain.aggregate(suite, results)
    assert m["n"] == 4
    assert m["exact_match"] == pytest.approx(0.5)  # the errored case counts as 0
    assert m["token_f1"] == pytest.approx(0.5)
    assert m["score"] == pytest.approx((2 * 0.5 + 1 * 0.5) / 3)
    assert m["error_rate"] == pytest.approx(0.25)
    assert m["latency_p50_ms"] == pytest.approx(20)  # over successful calls only
    assert m["latency_p95_ms"] == pytest.approx(29)


def test_aggregate_without_successes_has_no_latency_and_a_failure_summary() -> None:
    suite = domain.parse_suite(suite_doc())
    results = [result("a", 0, 0, 0, error="timed out"), result("b", 0, 0, 0, error="HTTP 503")]
    m = domain.aggregate(suite, results)
    assert m["error_rate"] == 1.0 and "latency_p95_ms" not in m
    assert domain.failure_summary(results) == "all 2 calls failed; first error: timed out"
    assert domain.failure_summary(results + [result("c", 1, 1, 5)]) == ""
    assert domain.aggregate(suite, []) == {"n": 0.0}


def test_fixture_suite_is_valid_and_its_dataset_hash_is_current() -> None:
    suite = domain.parse_suite(yaml.safe_load((FIXTURES / "suites" / "qa.yaml").read_text()))
    raw = (FIXTURES / "suites" / "qa.jsonl").read_bytes()
    assert suite.dataset == content_hash(canonical_bytes(raw, "application/jsonl"))
    cases = domain.parse_cases([yaml.safe_load(line) for line in raw.decode().splitlines()])
    assert len(cases) == 20
    assert all(domain.render(suite, c)[-1]["content"] == c.vars["question"] for c in cases)
