"""What a resumed run takes as answered (probes p1, p65): the cases the run published, read back from their stream
whether or not the sink has stored them yet, one per (case, repeat), so none is asked again."""

from __future__ import annotations

from dataclasses import replace

import msgspec

from lockgate.codec import Codec, encode
from lockgate.contracts import EvalRequested
from lockgate.evalruns import EvalRun
from lockgate.services.evaluator import domain


def _case(case_id: str, repeat: int = 0, output: str = "") -> domain.CaseResult:
    return domain.CaseResult(case_id=case_id, repeat=repeat, input="q", expected="a", output=output,
                             scores={"exact_match": 1.0}, latency_ms=3.5, input_tokens=4, output_tokens=2,
                             details={"binding": "sha256:b"})


def test_a_published_case_reads_back_as_it_was_answered() -> None:
    case = _case("c1", 1, "a")
    assert domain.fact_case(domain.case_fact(case)) == case


def test_a_published_expected_value_reads_back_as_text_as_the_table_stores_it() -> None:
    case = domain.CaseResult(case_id="c1", repeat=0, input="q", expected={"n": 1})
    assert domain.fact_case(domain.case_fact(case)).expected == '{"n": 1}'


def test_answered_cases_are_the_published_ones_the_first_of_each_winning() -> None:
    # Not the table's, read through the query service: anyone holding the query credential answered first (p65 F1).
    published = [_case("c2", 0, "first"), _case("c3", 0, "first"), _case("c3", 1, "first"), _case("c3", 0, "again")]
    got = {(r.case_id, r.repeat): r.output for r in domain.finished(published)}
    # The sink keeps the first answer it stores: the first published.
    assert got == {("c2", 0): "first", ("c3", 0): "first", ("c3", 1): "first"}
    assert domain.finished([]) == []


def test_a_record_says_where_its_published_cases_start_and_an_older_one_reads_from_the_start() -> None:
    records: Codec[EvalRun] = Codec(EvalRun)
    req = EvalRequested(run_id="run-1", release="r", suite="sha256:s", endpoint="default")
    assert records.decode(encode(EvalRun(request=req, cases_after=42))).cases_after == 42
    older = msgspec.json.decode(encode(EvalRun(request=req, cases_after=42)))
    del older["cases_after"]
    assert records.decode(msgspec.json.encode(older)) == EvalRun(request=req, cases_after=0)


def test_the_digest_a_compared_run_is_checked_by_is_of_what_a_comparison_reads_in_any_order() -> None:
    # The query service answers a run's cases in (case, repeat) order, its numbers as floats, without the details the
    # run kept: the same cases digest the same. A score or an error changed is another digest (probe p65: a baseline's
    # cases made up by whoever holds the query credential).
    ran = [_case("c2"), _case("c1", 1), domain.CaseResult(case_id="c1", repeat=0, input="q", expected="a",
                                                           scores={"exact_match": 1}, latency_ms=3)]
    answered = [replace(r, details={}, scores={k: float(v) for k, v in r.scores.items()},
                                        latency_ms=float(r.latency_ms)) for r in reversed(ran)]
    assert domain.cases_digest(answered) == domain.cases_digest(ran)
    assert domain.cases_digest([replace(ran[0], scores={"exact_match": 0.0}), *ran[1:]]) \
        != domain.cases_digest(ran)
    assert domain.cases_digest([replace(ran[0], error="timeout"), *ran[1:]]) != domain.cases_digest(ran)
