"""The online judge grades only answers a router served, on the real nats-server with a judge simulator (found by a
red-team probe): an application's own events, and another tenant's events naming the deployment, are scored by the
deterministic scorers (marked not served) but never judged, so they cannot spend the judge's daily budget and leave
the served answers without an `llm_judge` score; nor are another tenant's answers a router served under the
deployment's name (the default route's, under passthrough: probe p25 F2b); a cache hit (an earlier answer replayed by the router) is neither
judged nor scored; and a flood of one deployment's answers does not keep another deployment's from being judged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lockgate.codec import Codec
from lockgate.contracts import InferenceEvent, InferenceScored
from lockgate.server.service import ServiceContext
from lockgate.services.evaluator import judgeledger, online_handler
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import eventually
from tests.integration.test_judge_budget import DOC, PER_CALL, REPLY, N
from tests.integration.test_online_eval_config import _apply, _endpoints, _event, _folder

pytestmark = pytest.mark.timeout(120)
_scored: Codec[InferenceScored] = Codec(InferenceScored)


@pytest.fixture
async def judge() -> AsyncIterator[SimServer]:
    # `slow-m` keeps a flooded deployment's workers busy while the other deployment's judge (`judge-m`) answers.
    models = {"judge-m": ModelSpec(default=REPLY), "slow-m": ModelSpec(default=REPLY, latency_ms=3000)}
    async with SimServer(SimConfig(models=models)) as sim:
        yield sim


async def _outcomes(context: ServiceContext, deployment: str = "chat") -> list[InferenceScored]:
    """Every InferenceScored the evaluator publishes for `deployment` from now on (filled in the background)."""
    seen: list[InferenceScored] = []

    async def on(msg: Any) -> None:
        seen.append(_scored.decode(msg.data))

    await context.bus.nc.subscribe(context.bus.subjects.eval_scores(deployment), cb=on)
    return seen


def _judged(seen: list[InferenceScored]) -> dict[str, InferenceScored]:
    return {s.event_id: s for s in seen if s.results and s.results[0].scorer == "llm_judge"}


async def test_unserved_events_of_another_tenant_or_the_app_neither_call_the_judge_nor_spend_its_budget(
        context: ServiceContext, run_services: Any, tmp_path: Path, judge: SimServer) -> None:
    # The global plan scores every answer: another tenant's events naming `chat` get it (not `chat`'s, acme's).
    context.settings = context.settings.replace(endpoints_file=_endpoints(tmp_path, judge=judge.url),
                                                online_eval_sample=1.0)
    await _apply(context.bus, context.settings, _folder(tmp_path, DOC))  # a budget worth N calls a day
    evaluator = (await run_services("evaluator"))["evaluator"].online
    seen = await _outcomes(context)
    bus = context.bus
    # What the probe sent over gRPC: canary answers naming the deployment from another tenant's key, and the
    # deployment's own app reporting answers nobody served; many more than the budget pays for.
    other = [msgspec.structs.replace(_event(i, "canary"), tenant="gitshop") for i in range(4 * N)]
    own = [_event(i, "canary") for i in range(4 * N)]
    await bus.publish(bus.subjects.inference("shop", "gitshop"), other)
    await bus.publish(bus.subjects.inference("shop", "acme"), own)
    # Scored before their message is acked, and a judge job is queued before that: every decision is made.
    await evaluator.scored.wait_for(len(other) + len(own), timeout_s=30)

    served = [_event(i, "canary") for i in range(N)]
    await bus.publish(bus.subjects.served("shop", "acme"), served)
    await eventually(lambda: len(_judged(seen)) >= N, [evaluator.judged, evaluator.judge_skipped], timeout_s=60,
                     what=lambda: f"{N} judge outcomes (judged {evaluator.judged.count}, "
                                  f"skipped {evaluator.judge_skipped.count})")

    judged = _judged(seen)
    assert set(judged) == {e.id for e in served}, "the judge graded events no router served"
    assert all(s.scores == {"llm_judge": 0.75} and s.served for s in judged.values())
    assert judge.requests == {"judge-m": N} and evaluator.judge_skipped.count == 0
    kv = await bus.kv(bus.subjects.kv_budgets)
    ledger = msgspec.json.decode((await kv.get(judgeledger.key("chat", datetime.now(UTC)))).value,
                                 type=judgeledger.Ledger)
    assert ledger.spent == N * PER_CALL  # the served answers' calls only
    # The application's events were still scored by the deterministic scorers, marked not served.
    unserved = {e.id for e in [*other, *own]}
    assert {s.event_id for s in seen if not s.served and "length" in s.scores} == unserved


async def test_another_tenants_served_answers_under_the_deployments_name_neither_call_its_judge_nor_spend_its_budget(
        context: ServiceContext, run_services: Any, tmp_path: Path, judge: SimServer) -> None:
    # Probe p25 F2b: under passthrough a router serves another tenant's key naming the deployment by the default
    # route, under that name (release ""), as a name nobody configured. Before, the evaluator judged those answers
    # on the deployment's own judge: 17 of its 20 calls of a minute, and its own answers went unjudged.
    # The global plan scores every answer: gitshop's are scored, as those of a deployment nobody configured.
    context.settings = context.settings.replace(endpoints_file=_endpoints(tmp_path, judge=judge.url),
                                                online_eval_sample=1.0)
    await _apply(context.bus, context.settings, _folder(tmp_path, DOC))  # acme's `chat`: a budget worth N calls a day
    evaluator = (await run_services("evaluator"))["evaluator"].online
    seen = await _outcomes(context)
    bus = context.bus
    theirs = [msgspec.structs.replace(_event(i, "canary"), tenant="gitshop", release="") for i in range(4 * N)]
    await bus.publish(bus.subjects.served("shop", "gitshop"), theirs)
    await evaluator.scored.wait_for(len(theirs), timeout_s=30)  # a judge job, had there been one, queued before
    own = [_event(i, "canary") for i in range(N)]
    await bus.publish(bus.subjects.served("shop", "acme"), own)
    await eventually(lambda: len(_judged(seen)) >= N, [evaluator.judged, evaluator.judge_skipped], timeout_s=60,
                     what=lambda: f"{N} judge outcomes (judged {evaluator.judged.count}, "
                                  f"skipped {evaluator.judge_skipped.count})")

    assert set(_judged(seen)) == {e.id for e in own}, "the judge graded another tenant's answers"
    assert judge.requests == {"judge-m": N} and evaluator.judge_skipped.count == 0
    kv = await bus.kv(bus.subjects.kv_budgets)
    ledger = msgspec.json.decode((await kv.get(judgeledger.key("chat", datetime.now(UTC)))).value,
                                 type=judgeledger.Ledger)
    assert ledger.spent == N * PER_CALL  # acme's own answers' calls only
    assert {s.event_id for s in seen if s.tenant == "gitshop" and s.served} == {e.id for e in theirs}


async def test_a_cache_hit_the_router_served_is_neither_judged_nor_scored(
        context: ServiceContext, run_services: Any, tmp_path: Path, judge: SimServer) -> None:
    context.settings = context.settings.replace(endpoints_file=_endpoints(tmp_path, judge=judge.url))
    await _apply(context.bus, context.settings, _folder(tmp_path, DOC))
    evaluator = (await run_services("evaluator"))["evaluator"].online
    seen = await _outcomes(context)
    bus = context.bus
    # The attributes the router gives an answer generated for the request and one replayed from its response
    # cache (tests/integration/test_router_admission.py::test_cache_hit_miss_ttl_and_temperature).
    miss = msgspec.structs.replace(_event(0, "canary"), attributes={"cache": "miss", "lockgate.endpoint": "default"})
    hit = msgspec.structs.replace(_event(1, "canary"), attributes={"cache": "hit", "cost_saved": "0.000012000"})
    await bus.publish(bus.subjects.served("shop", "acme"), [hit, miss])
    await evaluator.scored.wait_for(1, timeout_s=30)
    await evaluator.judged.wait_for(1, timeout_s=30)
    # A later answer: judged once the hit's job, had there been one, was long under way.
    marker = _event(2, "canary")
    await bus.publish(bus.subjects.served("shop", "acme"), [marker])
    await eventually(lambda: marker.id in _judged(seen), [evaluator.judged], timeout_s=30, what="the marker judged")

    assert set(_judged(seen)) == {miss.id, marker.id} and judge.requests == {"judge-m": 2}
    assert [s for s in seen if s.event_id == hit.id] == []  # no deterministic score either
    assert {s.event_id for s in seen if "length" in s.scores} == {miss.id, marker.id}
    assert evaluator.scored.count == 2 and evaluator.judged.count == 2


FLOOD = 1100  # more than the judge queue once held for every deployment together


ROOMY = """\
online_eval:
  sample: {{canary: 1.0}}
  scorers: [length]
  judge: {{endpoint: judge, model: {model}, rubric: "Is it right?", max_calls_per_minute: 6000, max_tokens: 16,
          max_usd_per_day: 100, timeout_s: 10, price: {{input_per_mtok: 0, output_per_mtok: 1000}}}}
"""


def _two_deployments(tmp_path: Path) -> Path:
    """Deployments `chat` (a slow judge) and `faq` (a quick one), each judging every canary answer."""
    root = _folder(tmp_path, ROOMY.format(model="slow-m"))
    (root / "faq.yaml").write_text("kind: deployment\nname: faq\napp: shop\nstable: r1\n" + ROOMY.format(model="judge-m"))
    return root


def _faq(i: int) -> InferenceEvent:
    return msgspec.structs.replace(_event(i, "canary"), deployment="faq")


async def test_a_flood_of_one_deployments_answers_does_not_starve_anothers_judge(
        context: ServiceContext, run_services: Any, tmp_path: Path, judge: SimServer) -> None:
    context.settings = context.settings.replace(endpoints_file=_endpoints(tmp_path, judge=judge.url))
    await _apply(context.bus, context.settings, _two_deployments(tmp_path))
    evaluator = (await run_services("evaluator"))["evaluator"].online
    flooded, quiet = await _outcomes(context, "chat"), await _outcomes(context, "faq")
    bus = context.bus
    flood = [_event(i, "canary") for i in range(FLOOD)]
    for at in range(0, FLOOD, 100):
        await bus.publish(bus.subjects.served("shop", "acme"), flood[at:at + 100])
    await evaluator.scored.wait_for(FLOOD, timeout_s=60)  # every flood job queued or skipped

    answers = [_faq(i) for i in range(3)]
    await bus.publish(bus.subjects.served("shop", "acme"), answers)
    await eventually(lambda: len(_judged(quiet)) == len(answers), [evaluator.judged, evaluator.judge_skipped],
                     timeout_s=30, what=lambda: f"faq's answers judged (judged {evaluator.judged.count}, "
                                                f"skipped {evaluator.judge_skipped.count})")
    assert all(s.scores == {"llm_judge": 0.75} for s in _judged(quiet).values())
    # Judged while the flood still waits in its own queue: neither its queue nor its workers held faq's answers.
    assert len(_judged(flooded)) + evaluator.judge_skipped.count < FLOOD
    assert evaluator.judge_skipped.count > FLOOD // 2  # beyond the deployment's share: not judged, and counted
    assert judge.requests["judge-m"] == len(answers) and judge.requests["slow-m"] <= online_handler.QUEUE + 4 * online_handler.WORKERS
