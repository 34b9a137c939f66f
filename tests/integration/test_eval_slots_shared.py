"""An operator's slow evals cannot hold the evaluator (probe p12 F1), on the embedded runtime as `lockgate up` runs it
(NATS auth on), the requests published straight on NATS with the operator credential: one tenant's runs held on a
rate limit take at most eval_workers - 1 of the evaluator's slots, so another tenant's eval runs meanwhile; a suite
whose rate limit alone needs longer than eval_max_run_s fails at once, saying so; a call timeout past the ceiling is
dead-lettered at the edge, naming the field.

Before, four such requests of one tenant took all four slots for ~11 days (`rate_limit_rps: 0.000001`), and no other
eval of any tenant started; `timeout_s` took any float."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from lockgate import artifacts, credentials
from lockgate.codec import Codec, encode
from lockgate.config import Settings
from lockgate.contracts import DeadLetter, EvalCompleted, EvalRequested
from lockgate.contracts.evals import EvalProgress
from lockgate.ids import uuid7
from lockgate.permissions import inbox
from lockgate.server.runtime import Runtime
from lockgate.services.evaluator import handlers
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(120)
MAX_RUN_S = 250.0  # the slow suite's 2 calls at 0.01 a second need 200 s: within it, so they run (and wait)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig(models={"m": ModelSpec(default="a")})) as server:
        yield server


@pytest.fixture
async def stack(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Runtime]:
    """The embedded runtime with its own nats-server and a user per identity; the evaluator's 4 slots."""
    monkeypatch.setattr(handlers, "DRAIN_S", 0.1)  # the held runs are cancelled at the end, not waited for
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", eval_max_run_s=MAX_RUN_S),
                      services=["sink", "query", "evaluator"])
    await runtime.start()
    yield runtime
    await runtime.stop()


@pytest.fixture
async def operator(stack: Runtime) -> AsyncIterator[nats.NATS]:
    """A plain NATS connection with the operator credential of the stack's home."""
    auth = credentials.for_identity(stack.settings, "operator")
    nc = await nats.connect(stack.settings.nats_url, user=auth.user, password=auth.password, allow_reconnect=False,
                            inbox_prefix=inbox("operator"))
    yield nc
    await nc.close()


async def _suite(stack: Runtime, name: str, cases: int, **extra: Any) -> str:
    doc = {"name": name, "prompt": {"template": "{input}"}, "scorers": ["exact_match"],
           "dataset": [{"id": f"c{i}", "input": f"q{i}", "expected": "a"} for i in range(cases)], **extra}
    return (await artifacts.register(stack.ctx.bus, "eval_suite", name, doc)).hash


class Results:
    """Every EvalCompleted, progress tick and dead letter the stack publishes."""

    def __init__(self) -> None:
        self.completed: dict[str, EvalCompleted] = {}
        self.called: set[str] = set()  # runs that finished a case
        self.letters: list[DeadLetter] = []
        self.changed = asyncio.Condition()

    async def until(self, check: Any, timeout_s: float = 60) -> Any:
        async with asyncio.timeout(timeout_s), self.changed:
            await self.changed.wait_for(check)
        return check()


@pytest.fixture
async def results(stack: Runtime) -> AsyncIterator[Results]:
    got = Results()
    s, nc = stack.ctx.bus.subjects, stack.ctx.bus.nc
    done, letter, tick = Codec(EvalCompleted), Codec(DeadLetter), Codec(EvalProgress)

    async def on_done(msg: Any) -> None:
        event = done.decode(msg.data)
        async with got.changed:
            got.completed[event.run_id] = event
            got.changed.notify_all()

    async def on_letter(msg: Any) -> None:
        async with got.changed:
            got.letters.append(letter.decode(msg.data))
            got.changed.notify_all()

    async def on_tick(msg: Any) -> None:
        progress = tick.decode(msg.data)
        if progress.done:
            async with got.changed:
                got.called.add(progress.run_id)
                got.changed.notify_all()

    subs = [await nc.subscribe(s.eval_completed, cb=on_done), await nc.subscribe(s.dlq_all, cb=on_letter),
            await nc.subscribe(f"{s.prefix}.progress.eval.>", cb=on_tick)]
    yield got
    for sub in subs:
        await sub.unsubscribe()


async def _request(nc: nats.NATS, stack: Runtime, tenant: str, release: str, suite: str, url: str,
                   **extra: Any) -> str:
    req = EvalRequested(run_id=uuid7(), release=release, suite=suite, endpoint=url, model="m", tenant=tenant,
                        cache=False, **extra)
    await nc.jetstream().publish(stack.ctx.bus.subjects.eval_requested, encode(req), timeout=10)
    return req.run_id


async def test_a_slow_tenants_runs_leave_a_slot_to_another_tenants_eval(
        stack: Runtime, operator: nats.NATS, results: Results, sim: SimServer) -> None:
    slots = stack.services["evaluator"].slots
    slow = await _suite(stack, "slow", 2, rate_limit_rps=0.01)  # the 2nd call waits 100 s for its token
    slow_runs = [await _request(operator, stack, "slowco", f"slow-{i}", slow, sim.url) for i in range(4)]
    # Runs made their first call and wait 100 s for the next token (before, all four, taking every slot).
    await results.until(lambda: len(results.called) >= 3)

    fast = await _suite(stack, "fast", 3)
    fast_run = await _request(operator, stack, "fastco", "fast-1", fast, sim.url)
    done = await results.until(lambda: results.completed.get(fast_run))
    assert (done.status, done.n_cases, done.n_errors, done.metrics["exact_match"]) == ("completed", 3, 0, 1.0)
    # Three slow runs hold their slots; the fourth waits for one of its tenant's, holding none.
    assert slots.running["slowco"] == 3 and len(results.called & set(slow_runs)) == 3
    assert not set(slow_runs) & set(results.completed)

    # A suite whose rate limit alone needs longer than a run may take fails before its first call, saying why.
    calls = sim.total_requests
    too_slow = await _suite(stack, "too-slow", 5, rate_limit_rps=0.01)
    refused = await _request(operator, stack, "fastco", "fast-2", too_slow, sim.url)
    done = await results.until(lambda: results.completed.get(refused))
    assert (done.status, done.n_cases, done.n_errors) == ("failed", 5, 5) and sim.total_requests == calls
    assert done.error == ("5 of 5 cases not run: 5 calls at rate_limit_rps 0.01 take 500 s, more than the "
                          "evaluator's limit of 250 s a run (eval_max_run_s); raise rate_limit_rps or run fewer cases")


async def test_a_call_timeout_past_the_ceiling_or_a_rate_below_the_floor_is_refused_naming_the_field(
        stack: Runtime, operator: nats.NATS, results: Results, sim: SimServer) -> None:
    suite = await _suite(stack, "any", 1)
    run = await _request(operator, stack, "slowco", "r-1", suite, sim.url, timeout_s=1e9)
    (letter,) = await results.until(lambda: results.letters)
    assert letter.reason == "invalid event" and "Expected `float` <= 600.0 - at `$.timeout_s`" in letter.error
    assert run not in results.completed

    # A suite stored with a rate below the floor (by hand, or before it had one) fails its run, naming the field.
    crawl = await _suite(stack, "crawl", 5, rate_limit_rps=0.000001)
    run = await _request(operator, stack, "slowco", "r-2", crawl, sim.url)
    done = await results.until(lambda: results.completed.get(run))
    assert done.status == "failed" and "got 1e-06 - at `$.rate_limit_rps`" in done.error, done.error
    assert sim.total_requests == 0


async def test_the_cli_refuses_a_suite_below_the_rate_floor_in_one_line(stack: Runtime, tmp_path: Path) -> None:
    suite = tmp_path / "slow-suite.yaml"
    suite.write_text('name: slow\nprompt: {template: "{question}"}\nscorers: [exact_match]\nrate_limit_rps: 0.000001\n'
                     'dataset: [{id: c1, vars: {question: q}, expected: a}]\n')
    result = await run_cli(stack, "eval", "run", str(suite), "--candidate", "slow-1", "--timeout", "3")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: eval suite {suite}: Expected 0 (unlimited) or at least 0.01 calls a second, got 1e-06 - at "
        "`$.rate_limit_rps`"]
