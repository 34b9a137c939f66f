"""A run takes as answered only the cases the evaluator published itself, never what the query lane says (probe p65 F1).

Before, a run starting (or resuming) asked the query service which of its cases were already stored
(`eval_case_results`). Whoever held the `query` NATS credential, read-only as it seems, subscribed to the services'
query subject and answered first on the evaluator's inbox with 20 made-up perfect cases (their ids and the release's
binding digest are what a viewer reads): the evaluator took them as answered, called nothing, and the gatekeeper
signed a PASS for a release whose eval BLOCKs.

Here the stack runs as `lockgate up` does (embedded nats-server with every identity's permissions) with the evaluator
and the gatekeeper; the operator registers the release and requests its eval with its own credential, and the holder
of the query credential (the stack's `credentials/query.json`) is the one answering named queries: no query service
runs, so every request on the services' subject reaches it, in the query service's queue group, as its grant allows.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lockgate import artifacts, credentials, natsclient
from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import GateDecided
from lockgate.evalruns import binding_digest, binding_of
from lockgate.server.runtime import Runtime
from lockgate.subjects import Subjects
from lockgate_dev.sim import SimServer
from tests.helpers import answer_queries, register_model_release
from tests.integration.test_eval_gate import good_and_bad, register_qa, request
from tests.integration.test_eval_resume_binding import _operator

pytestmark = pytest.mark.timeout(120)
FIXTURES = Path(__file__).parent.parent / "fixtures"
decided: Codec[GateDecided] = Codec(GateDecided)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(good_and_bad()) as server:
        yield server


@pytest.fixture
async def stack(settings: Settings, sim: SimServer) -> AsyncIterator[Runtime]:
    """The embedded stack's evaluator and gatekeeper, no query service; the allow-list's `default` endpoint is the
    simulator."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", stable_upstream=sim.url),
                      services=["evaluator", "gatekeeper"])
    await runtime.start()
    yield runtime
    await runtime.stop()


def _perfect(digest: str) -> list[dict[str, Any]]:
    """Every qa.jsonl case as `eval_case_results` rows answered right, under the binding `digest`."""
    rows = [json.loads(line) for line in (FIXTURES / "suites" / "qa.jsonl").read_text().splitlines()]
    return [{"case_id": r["id"], "repeat": 0, "input": r["vars"]["question"], "expected": r["expected"],
             "output": r["expected"], "scores": {"exact_match": 1.0, "token_f1": 1.0}, "latency_ms": 40.0,
             "input_tokens": 20, "output_tokens": 2, "error": "", "details": json.dumps({"binding": digest})}
            for r in rows]


async def test_a_forged_answer_to_the_resume_query_is_not_taken_as_the_runs_answered_cases(
    stack: Runtime, sim: SimServer
) -> None:
    admin = stack.ctx.bus  # only watches
    gates = await admin.nc.subscribe(admin.subjects.gate_decided_all)
    operator = await _operator(stack.settings)
    holder = Bus(stack.settings.nats_url, Subjects(stack.settings.prefix), name="query-credential-holder",
                 auth=credentials.for_identity(stack.settings, "query"), manage_topology=False)
    await holder.connect()
    try:
        suite, policy = await register_qa(operator)
        await register_model_release(operator, "v-weak", "bad")  # right on half the cases: a genuine eval BLOCKs
        forged = _perfect(binding_digest(binding_of(await artifacts.release_of(operator, "v-weak"))))
        asked = await answer_queries(holder, lambda query, args: {
            "eval_case_results": [] if "after_case" in args else forged,
            "consecutive_errors": 0,  # the gatekeeper's, as the query service would answer
        }.get(query))
        req = request(release="v-weak", suite=suite, policy=policy, endpoint="", model="")  # as the release ships
        await operator.publish(operator.subjects.eval_requested, req)
        decision = decided.decode((await gates.next_msg(timeout=60)).data)
    finally:
        await holder.close()
        await operator.close()
        await gates.unsubscribe()

    # The run asked every case of the release's model and was judged on those answers: a BLOCK, never the PASS the
    # forged cases would have signed.
    assert (decision.release, decision.eval_run, decision.decision) == ("v-weak", req.run_id, "BLOCK")
    assert [(r.rule, r.observed) for r in decision.rules if r.verdict == "FAIL"] == [("accuracy", 0.5)]
    assert sim.requests == {"bad": 20}
    assert "eval_case_results" not in asked  # the query lane is not where a run learns what it answered


async def test_the_query_credential_is_sent_requests_in_the_query_services_queue_group_only(stack: Runtime) -> None:
    # Outside the group, the holder of the credential was sent every service's request as well as the query service
    # was, and its answer came first (probe p65 F1); in it, it is sent its share, and answers nothing a gate rests on.
    auth = credentials.for_identity(stack.settings, "query")
    errors: list[str] = []
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())
        refused.set()

    rogue = await natsclient.connect(stack.settings.nats_url, user=auth.user, password=auth.password,
                                     allow_reconnect=False, inbox_prefix=f"_INBOX.{auth.user}", error_cb=on_error)
    try:
        await rogue.subscribe(stack.ctx.bus.subjects.query)
        await rogue.flush()
        await asyncio.wait_for(refused.wait(), 10)
        assert f'permissions violation for subscription to "{stack.ctx.bus.subjects.query}"' in errors[0]
    finally:
        await rogue.close()
