"""A relative rule is judged against the baseline's cases as the evaluator published them, never what the query lane
says (probe p65, the baseline half of F1's "What remains").

Before, a run compared with a baseline asked the query service which run was the baseline's (`baseline_run`) and that
run's cases (`eval_case_results`). Whoever held the `query` NATS credential answered in the query service's queue
group with the baseline's real run (the one its PASS judged, which the gatekeeper checks) and made-up cases, every one
wrong: a candidate right on half the cases was "no worse than baseline" by +0.5, and the gatekeeper signed a PASS.

The stack is the one of test_eval_resume_forged: the embedded nats-server with every identity's permissions, the
evaluator and the gatekeeper, no query service; the holder of the query credential answers every named query.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lockgate import artifacts, credentials
from lockgate.bus import Bus
from lockgate.evalruns import binding_digest, binding_of
from lockgate.server.runtime import Runtime
from lockgate.subjects import Subjects
from tests.helpers import answer_queries, register_model_release
from tests.integration.test_eval_gate import register_qa, request
from tests.integration.test_eval_resume_binding import _operator
from tests.integration.test_eval_resume_forged import _perfect, decided, sim, stack  # noqa: F401 (the fixtures)
from tests.integration.test_required_gates import REL

pytestmark = pytest.mark.timeout(120)


def _all_wrong(digest: str) -> list[dict[str, Any]]:
    """Every qa.jsonl case as `eval_case_results` rows answered wrong, under the binding `digest`."""
    return [{**r, "output": "no idea", "scores": {"exact_match": 0.0, "token_f1": 0.0}} for r in _perfect(digest)]


@pytest.mark.parametrize("left_the_stream", [False, True])
async def test_a_forged_answer_for_the_baseline_cases_does_not_pass_a_worse_candidate(
    stack: Runtime, left_the_stream: bool  # noqa: F811
) -> None:
    admin = stack.ctx.bus  # watches, and (left_the_stream) purges the facts stream as its age limit would
    gates = await admin.nc.subscribe(admin.subjects.gate_decided_all)
    completed = await admin.nc.subscribe(admin.subjects.eval_completed)
    operator = await _operator(stack.settings)
    holder = Bus(stack.settings.nats_url, Subjects(stack.settings.prefix), name="query-credential-holder",
                 auth=credentials.for_identity(stack.settings, "query"), manage_topology=False)
    await holder.connect()
    base_run: list[str] = []
    try:
        suite, _ = await register_qa(operator)
        policy = (await artifacts.register(operator, "policy", "rel", REL)).hash
        await register_model_release(operator, "v-good", "good")  # right on every case
        await register_model_release(operator, "v-weak", "bad")  # right on half: 0.5 below v-good
        forged = _all_wrong(binding_digest(binding_of(await artifacts.release_of(operator, "v-good"))))

        await answer_queries(holder, lambda query, args: {
            "baseline_run": base_run[0] if base_run else None,  # the run v-good's PASS judged, as the query service says
            "eval_case_results": [] if "after_case" in args else forged,
            "consecutive_errors": 0,  # the gatekeeper's, as the query service would answer
        }.get(query))
        base = request(release="v-good", suite=suite, policy=policy, endpoint="", model="")
        base_run.append(base.run_id)
        await operator.publish(operator.subjects.eval_requested, base)
        passed = decided.decode((await gates.next_msg(timeout=60)).data)
        assert (passed.release, passed.eval_run, passed.decision) == ("v-good", base.run_id, "PASS"), passed.reason
        if left_the_stream:
            await admin.js.purge_stream(admin.subjects.streams["facts"].name)
        cand = request(release="v-weak", suite=suite, policy=policy, baseline="v-good", endpoint="", model="")
        await operator.publish(operator.subjects.eval_requested, cand)
        decision = decided.decode((await gates.next_msg(timeout=60)).data)
        done: dict[str, Any] | None = None
        while done is None:
            event = json.loads((await completed.next_msg(timeout=60)).data)
            done = event if event["run_id"] == cand.run_id else None
    finally:
        await holder.close()
        await operator.close()
        await gates.unsubscribe()
        await completed.unsubscribe()

    assert (decision.release, decision.eval_run) == ("v-weak", cand.run_id)
    verdicts = {r.rule: r.verdict for r in decision.rules}
    if not left_the_stream:
        # The baseline's cases read back from the facts stream: the candidate is compared with what v-good answered.
        assert decision.decision == "BLOCK" and verdicts["no-regression"] == "FAIL", decision.reason
        assert "no-regression: exact_match fell 0.5 below baseline (1 -> 0.5)" in decision.reason
        assert done["baseline_run"] == base.run_id
    else:
        # Gone from the stream, and the query lane's answer is not the cases the run completed with: nothing is
        # compared, said so, and the gatekeeper refuses the baseline as one the eval did not compare with.
        assert decision.decision == "BLOCK" and verdicts["baseline_allowed"] == "FAIL", decision.reason
        assert verdicts["no-regression"] == "NO_DATA"
        assert done["baseline_run"] == "" and done["comparisons"] == {}
        assert (f"baseline 'v-good': the cases of run {base.run_id} cannot be checked: the query service's answer is "
                "not the cases the evaluator recorded it completing with, and they have left the facts stream "
                f"{admin.subjects.streams['facts'].name}; nothing was compared") in done["warnings"]
