"""The online judge's budget is shared by every evaluator replica and reserved before each call (issue 8): two
evaluators on a server with lockgate's permissions, a budget worth N calls and many more answers to judge at
once spend at most the budget (the simulator sees exactly N calls); a budget store that does not answer
means no call and an error outcome, never a score."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lockgate.bus import Bus
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext
from lockgate.services.evaluator import judgeledger
from lockgate.telemetry import Telemetry
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import eventually
from tests.integration.test_nats_auth import _bus, secured  # noqa: F401 - the fixture
from tests.integration.test_online_eval_config import _apply, _endpoints, _event, _folder

pytestmark = pytest.mark.timeout(120)
N = 3  # calls the day's budget pays for
PER_CALL = 16_000_000  # nano-USD: 16 output tokens (max_tokens, which every reply fills) at 1,000 USD per million
DOC = f"""\
online_eval:
  sample: {{canary: 1.0}}
  scorers: [length]
  judge: {{endpoint: judge, model: judge-m, rubric: "Is it right?", max_calls_per_minute: 6000, max_tokens: 16,
          max_usd_per_day: {N * PER_CALL / judgeledger.NANO}, timeout_s: 10,
          price: {{input_per_mtok: 0, output_per_mtok: 1000}}}}
"""
# Longer than 16 tokens: the simulator cuts it at max_tokens, so each call costs exactly what it reserved.
REPLY = "score: 0.75 because the answer names the capital correctly and says nothing else that is wrong at all"


@pytest.fixture
async def judge() -> AsyncIterator[SimServer]:
    # Slow enough that the calls of both replicas' workers are in flight together.
    async with SimServer(SimConfig(models={"judge-m": ModelSpec(default=REPLY, latency_ms=300)})) as sim:
        yield sim


async def test_two_evaluator_replicas_spend_at_most_the_judges_budget_with_calls_in_flight(
        secured: Any, tmp_path: Path, judge: SimServer) -> None:  # noqa: F811
    _, settings, admin = secured
    settings = settings.replace(endpoints_file=_endpoints(tmp_path, judge=judge.url))
    await _apply(admin, settings, _folder(tmp_path, DOC))
    buses: list[Bus] = []
    replicas: list[ServiceSet] = []
    try:
        for _ in range(2):  # each on its own connection as the evaluator identity, as two processes would be
            buses.append(await _bus(settings, "evaluator"))
            replicas.append(ServiceSet(ServiceContext(bus=buses[-1], telemetry=Telemetry(), settings=settings),
                                       ["evaluator"]))
            await replicas[-1].start()
        online = [r["evaluator"].online for r in replicas]
        events = [_event(i, "canary") for i in range(4 * N)]
        for e in events:  # one message each: both replicas' consumers take a share
            await admin.publish(admin.subjects.served("shop", "acme"), e)
        progress = [p for o in online for p in (o.judged, o.judge_skipped)]
        await eventually(lambda: sum(o.judged.count + o.judge_skipped.count for o in online) == len(events),
                         progress, timeout_s=60, what="every answer judged or skipped")

        assert judge.requests == {"judge-m": N}  # never more calls than the budget reserved
        assert sum(o.judged.count for o in online) == N and sum(o.judge_errors.count for o in online) == 0
        kv = await admin.kv(admin.subjects.kv_budgets)
        ledger = msgspec.json.decode((await kv.get(judgeledger.key("chat", datetime.now(UTC)))).value,
                                     type=judgeledger.Ledger)
        assert ledger.spent == N * PER_CALL  # the settled costs: exactly the budget, not a nano-USD more

        # The evaluator changes only its judges' ledgers, never a gateway budget's counter.
        mine = await buses[0].kv(buses[0].subjects.kv_budgets)
        with pytest.raises(Exception):  # noqa: B017 - refused by the server (a permissions violation)
            await asyncio.wait_for(mine.put("acme-daily.2026-12-03", b"{}"), 5)
    finally:
        for r in replicas:
            await r.stop()
        for b in buses:
            await b.close()


async def test_an_unreachable_budget_store_means_no_judge_call_and_an_error_outcome(
        context: ServiceContext, run_services: Any, tmp_path: Path, judge: SimServer) -> None:
    context.settings = context.settings.replace(endpoints_file=_endpoints(tmp_path, judge=judge.url))
    await _apply(context.bus, context.settings, _folder(tmp_path, DOC))
    await context.bus.js.delete_key_value(context.bus.subjects.kv_budgets)  # the store is gone
    evaluator = (await run_services("evaluator"))["evaluator"]
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on(msg: Any) -> None:
        await got.put(msg.data)

    await context.bus.nc.subscribe(context.bus.subjects.eval_scores("chat"), cb=on)
    await context.bus.publish(context.bus.subjects.served("shop", "acme"), [_event(i, "canary") for i in range(2)])
    await evaluator.online.judge_errors.wait_for(2, timeout_s=60)
    outcomes = [msgspec.json.decode(await asyncio.wait_for(got.get(), 10)) for _ in range(4)]
    judged = [o for o in outcomes if o["results"][0]["scorer"] == "llm_judge"]
    assert len(judged) == 2 and all(o["scores"] == {} for o in judged)
    assert judged[0]["results"][0]["error"].startswith("judge of chat: its budget cannot be checked, so it was "
                                                       "not called: the judge budget store"), judged[0]
    assert judge.total_requests == 0 and evaluator.online.judged.count == 2
