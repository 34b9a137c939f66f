"""A run resumed after an evaluator restart asks no case whose answer it already published (probe p1).

Before, a resumed run skipped only the cases the sink had stored, read back from ClickHouse through the query
service. Cases the stopped evaluator had published that the sink had not stored yet (it was behind, or down) were
asked again: the upstream was paid twice for them (the sink kept the first answer, so the result stayed right).

Here the stack runs as `lockgate up` does but without a sink, so nothing published is stored; the operator requests
the eval with its own credential, and the evaluator runs as `lockgate serve evaluator` does, stopped mid-run once
it has answered all but one case and started again on the same nats-server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest

from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import EvalCompleted
from lockgate.server.runtime import Runtime
from lockgate.services.query.evals import eval_cases
from tests.integration.test_eval_gate import request
from tests.integration.test_eval_resume_binding import (
    HoldingSim,
    _operator,
    _register_parts,
    evaluator,
    sim,
    stopped_mid_run,
)

sim = sim  # the simulator fixture of the binding tests: it holds the last case until the evaluator stops
pytestmark = pytest.mark.timeout(120)
completed: Codec[EvalCompleted] = Codec(EvalCompleted)


@pytest.fixture
async def stack(settings: Settings, sim: HoldingSim) -> AsyncIterator[Runtime]:
    """The embedded stack with no sink (nothing published is stored) and no evaluator; the allow-list's `default`
    endpoint is the simulator."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", stable_upstream=sim.url), services=["query"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def test_a_resumed_run_asks_no_case_it_published_that_the_sink_has_not_stored(
    stack: Runtime, sim: HoldingSim
) -> None:
    admin = stack.ctx.bus  # only watches
    evals = await admin.nc.subscribe(admin.subjects.eval_completed)
    operator = await _operator(stack.settings)
    try:
        suite, policy, _, _ = await _register_parts(operator)
        req = request(release="p-unstored", suite=suite, policy=policy, endpoint="default", model="good",
                      concurrency=1, cache=False, timeout_s=30.0)
        await stopped_mid_run(stack.settings, sim, operator, req)
        assert eval_cases(stack.ctx.store, req.run_id) == []  # type: ignore[arg-type]  # none of them stored

        async with evaluator(stack.settings):  # the same request, redelivered, resumes
            done = completed.decode((await evals.next_msg(timeout=60)).data)
    finally:
        await operator.close()
        await evals.unsubscribe()

    # Each case was asked once: the resumed run asked only the case the first evaluator never answered.
    asked = Counter(sim.users)
    assert len(asked) == 20 and set(asked.values()) == {1}, asked.most_common(3)
    # And the result counts the cases published before the restart with the one asked after it.
    assert (done.run_id, done.status, done.n_cases, done.n_errors) == (req.run_id, "completed", 20, 0)
    assert done.metrics["exact_match"] == 1.0
