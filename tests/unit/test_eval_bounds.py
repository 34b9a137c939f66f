"""Bounds on what an eval request may hold (probe p12 F1): a suite's rate_limit_rps has a floor, a call's timeout_s
a ceiling, a run a time limit past which it ends failed, and the evaluator's run slots are shared between tenants.

Before, `rate_limit_rps: 0.000001` made each call wait 11 days for its token, `timeout_s` took any float, nothing
ended a run, and four such runs of one tenant took every slot of the evaluator."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from lockgate.config import Settings, from_env
from lockgate.contracts import EvalRequested
from lockgate.documents import convert
from lockgate.errors import ConfigError
from lockgate.services.evaluator import domain, runner
from lockgate.services.evaluator.slots import FairSlots, SlotsClosed

pytestmark = pytest.mark.timeout(10)


def _suite(**extra: object) -> domain.Suite:
    doc = {"name": "s", "prompt": {"template": "{input}"}, "scorers": ["exact_match"],
           "dataset": [{"id": f"c{i}", "input": f"q{i}", "expected": "a"} for i in range(5)], **extra}
    return convert(doc, domain.Suite, name="suite")


@pytest.mark.parametrize("rate", [0.000001, 0.0099])
def test_a_rate_limit_below_the_floor_is_refused_naming_the_field(rate: float) -> None:
    with pytest.raises(ConfigError, match=r"Expected 0 \(unlimited\) or at least 0.01 calls a second, got .* - at "
                                          r"`\$.rate_limit_rps`"):
        _suite(rate_limit_rps=rate)


@pytest.mark.parametrize("rate", [0, 0.01, 20])
def test_no_rate_limit_or_one_at_the_floor_or_above_is_taken(rate: float) -> None:
    assert _suite(rate_limit_rps=rate).rate_limit_rps == rate


@pytest.mark.parametrize(("timeout", "error"), [(601, "<= 600.0"), (1e9, "<= 600.0"), (0, "> 0.0"), (-1, "> 0.0")])
def test_a_request_timeout_out_of_bounds_does_not_decode(timeout: float, error: str) -> None:
    raw = msgspec.json.encode(EvalRequested(run_id="r", release="rel", suite="sha256:x", endpoint="e",
                                            timeout_s=timeout))
    with pytest.raises(msgspec.ValidationError, match=rf"Expected `float` {error} - at `\$.timeout_s`"):
        msgspec.json.decode(raw, type=EvalRequested)


def test_a_request_timeout_within_bounds_decodes() -> None:
    raw = msgspec.json.encode(EvalRequested(run_id="r", release="rel", suite="sha256:x", endpoint="e", timeout_s=600))
    assert msgspec.json.decode(raw, type=EvalRequested).timeout_s == 600


def test_the_evaluator_settings_default_to_four_slots_three_per_tenant_and_an_hour_a_run() -> None:
    s = Settings()
    assert (s.eval_workers, s.eval_tenant_runs, s.eval_max_run_s) == (4, 0, 3600.0)
    got = from_env({"LOCKGATE_EVAL_WORKERS": "8", "LOCKGATE_EVAL_TENANT_RUNS": "2", "LOCKGATE_EVAL_MAX_RUN_S": "60"})
    assert (got.eval_workers, got.eval_tenant_runs, got.eval_max_run_s) == (8, 2, 60.0)
    with pytest.raises(ConfigError, match="eval_max_run_s"):
        from_env({"LOCKGATE_EVAL_MAX_RUN_S": "0"})


async def _never(_messages: list[dict[str, str]]) -> runner.Completion:
    await asyncio.Event().wait()  # an endpoint that never answers
    raise AssertionError("unreachable")


async def test_a_run_past_its_limit_ends_with_every_case_not_finished_failed_and_saying_why() -> None:
    reported: list[domain.CaseResult] = []
    answered = 0

    async def first_only(messages: list[dict[str, str]]) -> runner.Completion:
        nonlocal answered
        if answered:
            return await _never(messages)
        answered += 1
        return runner.Completion(text="a", latency_ms=1.0)

    results = await runner.run_cases(_suite(), _suite().dataset, first_only, concurrency=1,  # type: ignore[arg-type]
                                     on_result=reported.append, max_run_s=0.2)
    assert [r.case_id for r in results] == ["c0", "c1", "c2", "c3", "c4"] and len(reported) == 5
    assert (results[0].error, results[0].scores) == ("", {"exact_match": 1.0})
    why = "the run passed the evaluator's limit of 0.2 s a run (eval_max_run_s)"
    assert all(r.error == why and r.details == {domain.NOT_RUN: True} for r in results[1:])
    assert domain.failure_summary(results) == f"4 of 5 cases not run: {why}"


async def test_a_suite_whose_rate_limit_alone_passes_the_limit_fails_before_any_call() -> None:
    calls = 0

    async def call(_messages: list[dict[str, str]]) -> runner.Completion:
        nonlocal calls
        calls += 1
        return runner.Completion(text="a", latency_ms=1.0)

    suite = _suite(rate_limit_rps=0.01)
    results = await runner.run_cases(suite, suite.dataset, call, concurrency=4, max_run_s=499)  # type: ignore[arg-type]
    assert calls == 0 and len(results) == 5
    assert results[0].error == ("5 calls at rate_limit_rps 0.01 take 500 s, more than the evaluator's limit of 499 s "
                                "a run (eval_max_run_s); raise rate_limit_rps or run fewer cases")
    assert domain.failure_summary(results).startswith("5 of 5 cases not run: 5 calls at rate_limit_rps 0.01")
    # Within the limit, it runs.
    assert not any(r.error for r in await runner.run_cases(suite, suite.dataset[:1], call, concurrency=1,
                                                           max_run_s=100))


async def test_recorded_results_past_the_limit_are_failed_saying_why() -> None:
    made = [domain.CaseResult(case_id=f"c{i}", repeat=0, input="q", expected="a", output="a") for i in range(3)]

    async def judge(_result: domain.CaseResult) -> domain.CaseResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    results = await runner.judge_results(made, judge, concurrency=2, max_run_s=0.1)
    assert all(r.details.get(domain.NOT_RUN) and r.output == "a" for r in results)


async def test_a_run_without_a_limit_is_not_cut() -> None:
    suite = _suite()

    async def call(_messages: list[dict[str, str]]) -> runner.Completion:
        return runner.Completion(text="a", latency_ms=1.0)

    results = await runner.run_cases(suite, suite.dataset, call, concurrency=2)
    assert not any(r.error for r in results) and domain.failure_summary(results) == ""


async def test_one_tenant_takes_at_most_its_share_and_another_tenant_gets_a_slot() -> None:
    slots = FairSlots(4, 3)
    held = [slots.request("slow") for _ in range(4)]
    assert [f.done() for f in held] == [True, True, True, False] and slots.busy == 3
    assert slots.request("fast").done() and slots.running == {"slow": 3, "fast": 1}
    slots.release("fast")  # the free slot stays out of the slow tenant's reach
    assert not held[3].done() and slots.running == {"slow": 3}
    slots.release("slow")
    assert held[3].done() and slots.running == {"slow": 3}


async def test_a_freed_slot_goes_to_the_waiting_tenant_running_fewest() -> None:
    slots = FairSlots(2, 2)
    assert slots.request("a").done() and slots.request("a").done()
    a3, b1, b2 = slots.request("a"), slots.request("b"), slots.request("b")
    slots.release("a")
    assert b1.done() and not a3.done()  # before a3, which waited longer: "b" ran none
    slots.release("a")
    assert a3.done() and not b2.done()  # now both run one; a3 waited longest
    assert slots.running == {"a": 1, "b": 1}


async def test_a_cancelled_waiter_takes_no_slot_and_closing_wakes_the_waiting() -> None:
    slots = FairSlots(1, 1)
    await slots.acquire("a")
    gone, waiting = slots.request("b"), slots.request("c")
    gone.cancel()
    slots.release("a")
    assert waiting.done() and slots.running == {"c": 1}
    late = slots.request("d")
    slots.close()
    with pytest.raises(SlotsClosed):
        await late
    with pytest.raises(SlotsClosed):
        await slots.acquire("e")
