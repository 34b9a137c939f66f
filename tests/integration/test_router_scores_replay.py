"""A router that restarts mid-rollout reads back the online scores of the rollouts under analysis, as it reads back
their served events: the evaluator publishes them once (on the events stream), the router keeps them in memory, and
after a blue-green promotion the old release gets no traffic, so without the read-back a restarted router judged a
`score` metric from zero and never again had the old release's scores. And a post-promotion score baseline that
can grow no more is INCONCLUSIVE, as an events baseline is: never WAITING for ever. On the real nats-server with the
simulator and the evaluator scoring what the routers served."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from lockgate.bus import Bus
from lockgate.retry import RetryPolicy
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext
from lockgate.services.router import handlers
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.store import Store
from lockgate.subjects import Subjects
from lockgate.telemetry import Telemetry
from lockgate_dev.sim import SimServer
from tests.helpers import chat_releases
from tests.integration import test_router_evidence_replay as replay_tests
from tests.integration.test_online_eval import CANARY, STABLE
from tests.integration.test_rollout_analysis import _pass, _start, _traffic_until
from tests.integration.test_router_evidence_replay import Stack

http = replay_tests.http  # the admin's API session of the evidence replay tests (a fixture)

pytestmark = pytest.mark.timeout(120)

# The leaky canary's answers score 0 on pii_free, stable's 1: a score metric fails it on its first look.
PII = {"name": "score", "scorer": "pii_free", "max_decrease": 0.02, "min_scores": 30}


@pytest.fixture
async def stack(context: ServiceContext, store: Store) -> AsyncIterator[tuple[Stack, Signer]]:
    signer = Signer.generate()
    trust_key(trust_file_path(context.settings), signer.public)
    async with SimServer(STABLE) as stable, SimServer(CANARY) as canary:
        await chat_releases(context, signer, stable.url, canary.url, ("leaky",), online_eval_sample=1.0)
        s = Stack(context, store)
        try:
            yield s, signer
        finally:
            await s.close()


class Evaluator:
    """The evaluator on a bus connection of its own, so that stopping it stops its consumers too (a process gone:
    nothing more is scored)."""

    def __init__(self, context: ServiceContext) -> None:
        self.context = context

    async def __aenter__(self) -> Any:
        s = self.context.settings
        self.bus = Bus(s.nats_url, Subjects(s.prefix), name="evaluator")
        await self.bus.connect()
        self.svcs = ServiceSet(ServiceContext(bus=self.bus, telemetry=Telemetry(), settings=s), ["evaluator"])
        await self.svcs.start()
        return self.svcs["evaluator"]

    async def __aexit__(self, *exc: object) -> None:
        await self.svcs.stop()
        await self.bus.close()


async def _until(router: Any, done: Callable[[Any], bool], timeout: float = 20) -> Any:
    """The route once `done(route)` holds, or as it is after `timeout` seconds (the caller's assertion says why)."""
    with contextlib.suppress(TimeoutError):
        await router.rollouts.wait_for(lambda routes: done(routes["chat"]), timeout=timeout)
    return router.rollouts.route("chat")


def _scores(router: Any, release: str) -> list[float]:
    route = router.rollouts.route("chat")
    return list(router.rollouts.evidence.sample("chat", release, route.started_at).scores.get("pii_free", ()))


async def _scored(router: Any, evaluator: Any, served: int) -> None:
    """Until the evaluator scored the `served` answers and the router took every score (live)."""
    await evaluator.online.scored.wait_for(served, timeout_s=30)
    await router.rollouts.wait_for_scores(lambda: len(_scores(router, "r1")) + len(_scores(router, "leaky"))
                                          >= served, timeout=30)


async def test_a_router_restarted_mid_canary_judges_the_scores_from_before_its_restart(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any]) -> None:
    # Before: the scores came by a plain subscription only, so the restarted router's score metric started from
    # zero (p5: canary/stable scores 97/109 -> 9/6) and a canary failing it kept its weight until min_scores filled
    # again, after every restart. Here no score comes after the restart (the evaluator is stopped): only the ones
    # from before it can fail the canary.
    replicas, signer = stack
    await run_services("query")  # the record is empty (no sink): the served events come from the stream
    router = await replicas.start()
    spec = {"metrics": [PII], "min_sample": 100, "failure_limit": 0, "inconclusive_limit": 1000}
    await _start(http, router, "leaky", {"steps": [50, 100], "interval_s": 0.2, "analysis": spec})
    await _pass(router, signer, "leaky")
    async with Evaluator(replicas.context) as evaluator:
        sent = await _traffic_until(http, router, lambda r: False, limit=120)  # under 100 events for one variant
        await _scored(router, evaluator, sent)
    before = {release: len(_scores(router, release)) for release in ("r1", "leaky")}
    assert min(before.values()) >= 30, before  # enough for the score metric; too few events for a look
    route = router.rollouts.route("chat")
    assert (route.phase, route.weight, route.analysis.look if route.analysis else 0) == ("progressing", 50, 0)
    await replicas.stop(router)

    router = await replicas.start()
    async with asyncio.timeout(30):
        await router.rollouts.replayed.wait()
    assert {release: len(_scores(router, release)) for release in ("r1", "leaky")} == before  # each once

    def events(release: str) -> int:
        return router.rollouts.evidence.sample("chat", release, router.rollouts.route("chat").started_at).n

    await _traffic_until(http, router, lambda r: min(events("r1"), events("leaky")) >= 100, limit=400)

    def looked(r: Any) -> bool:  # a look with the events it needs (the score metric may still wait)
        last = r.analysis.last if r.analysis else None
        return r.phase != "progressing" or (last is not None and min(last.canary_n, last.stable_n) >= 100)

    route = await _until(router, looked)
    assert route.phase == "aborted", f"not aborted: {route.reason} ({route.analysis and route.analysis.last})"
    assert "analysis failed at step 1 (50%): score:pii_free 0 < threshold 0.98 (stable 1;" in route.reason
    assert {release: len(_scores(router, release)) for release in ("r1", "leaky")} == before  # no score came after
    # The scores compared: like with like in time (probe p22 F2), so a canary score served after stable's last (or
    # before its first) and stable's scores of a time the canary has none of are not counted.
    failed = route.analysis.last.metrics[0]
    assert 30 <= failed.canary_n <= before["leaky"] and 0 < failed.stable_n <= before["r1"], failed


async def test_a_router_restarted_after_a_blue_green_promotion_judges_it_on_the_old_releases_scores(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any]) -> None:
    # Before: after the restart the old release's scores were gone for good (it gets no traffic once promoted),
    # and the post-promotion look read "score:pii_free WAITING canary_n 1146, stable_n 0" for ever: the release
    # kept all the traffic unverified, never scaled down, never rolled back.
    replicas, signer = stack
    await run_services("query")
    evaluator = (await run_services("evaluator"))["evaluator"]
    router = await replicas.start()
    after = {"metrics": [PII], "min_sample": 50, "failure_limit": 0, "inconclusive_limit": 1000}
    await _start(http, router, "leaky", {"interval_s": 0.1, "blue_green": {"post_promotion_analysis": after,
                                                                          "scale_down_delay_s": 3600}})
    await _pass(router, signer, "leaky")
    sent = await _traffic_until(http, router, lambda r: False, limit=120)  # the old release's evidence
    await _scored(router, evaluator, sent)
    baseline = len(_scores(router, "r1"))
    assert baseline == sent
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/promote") as resp:
        body = await resp.json()
        assert resp.status == 200 and body["verifying"], body
    await replicas.stop(router)

    router = await replicas.start()
    route = router.rollouts.route("chat")
    assert (route.phase, route.verifying, route.stable.release) == ("promoted", True, "leaky")
    async with asyncio.timeout(30):
        await router.rollouts.replayed.wait()
    assert len(router.rollouts.evidence.sample("chat", "r1", route.started_at).scores["pii_free"]) == baseline
    sent = await _traffic_until(http, router, lambda r: r.phase == "aborted", limit=600, batch=20)
    route = await _until(router, lambda r: r.phase == "aborted")
    assert route.phase == "aborted", \
        f"not rolled back after {sent} requests: {route.reason} ({route.analysis and route.analysis.last})"
    assert route.stable.release == "r1" and route.reason.startswith(
        "rolled back leaky: post-promotion analysis failed: score:pii_free 0 < threshold 0.98 (stable 1;"), \
        route.reason


async def test_a_post_promotion_score_baseline_too_short_to_judge_is_inconclusive_not_waiting_for_ever(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any]) -> None:
    # Before: an events baseline short of min_sample turned INCONCLUSIVE once promoted (it gets no more), but a
    # score baseline short of min_scores stayed WAITING, which is not a look: inconclusive_limit never rolled the
    # unverified release back, and it kept all the traffic for ever (the README's `sample: {stable: 0.05}` does it).
    replicas, signer = stack
    await run_services("query")
    evaluator = (await run_services("evaluator"))["evaluator"]
    router = await replicas.start()
    after = {"metrics": [{**PII, "min_scores": 100}], "min_sample": 10, "failure_limit": 0, "inconclusive_limit": 2}
    await _start(http, router, "leaky", {"interval_s": 0.1, "blue_green": {"post_promotion_analysis": after,
                                                                          "scale_down_delay_s": 3600}})
    await _pass(router, signer, "leaky")
    sent = await _traffic_until(http, router, lambda r: False, limit=40)  # events enough, scores not
    await _scored(router, evaluator, sent)
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/promote") as resp:
        assert resp.status == 200, await resp.text()
    sent = await _traffic_until(http, router, lambda r: r.phase == "aborted", limit=600, batch=20)
    route = await _until(router, lambda r: r.phase == "aborted")
    assert route.phase == "aborted", \
        f"not rolled back after {sent} requests: {route.reason} ({route.analysis and route.analysis.last})"
    assert route.stable.release == "r1" and route.reason.startswith(
        "rolled back leaky: post-promotion analysis inconclusive 3 times: score:pii_free: baseline has 40 scores "
        "of the 100 needed and gets no more"), route.reason


async def test_a_score_both_taken_live_and_read_back_counts_once(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The read-back waits for the query service (the served events' record) before it reads the scores, while the
    # scores of the answers served since the restart keep coming live: those are then in both. Counted twice, the
    # canary's sample would be half made of copies.
    replicas, signer = stack
    monkeypatch.setattr(handlers, "REPLAY_RETRY", RetryPolicy(attempts=None, initial_s=0.05, max_s=0.2))
    router = await replicas.start()
    spec = {"metrics": [PII], "min_sample": 1000, "failure_limit": 0, "inconclusive_limit": 1000}
    await _start(http, router, "leaky", {"steps": [50, 100], "interval_s": 0.2, "analysis": spec})
    await _pass(router, signer, "leaky")

    def total() -> int:
        return len(_scores(router, "r1")) + len(_scores(router, "leaky"))

    async with Evaluator(replicas.context) as evaluator:
        before = await _traffic_until(http, router, lambda r: False, limit=60)
        await _scored(router, evaluator, before)
        await replicas.stop(router)
        router = await replicas.start()  # no query service: the read-back is tried again until there is one
        after = await _traffic_until(http, router, lambda r: False, limit=60)
        await evaluator.online.scored.wait_for(before + after, timeout_s=30)
        await router.rollouts.wait_for_scores(lambda: total() >= after, timeout=30)
        assert not router.rollouts.replayed.is_set() and total() == after  # live ones only so far
        await run_services("query")
        async with asyncio.timeout(30):
            await router.rollouts.replayed.wait()
    assert total() == before + after


async def test_a_step_is_not_passed_on_the_scores_of_the_step_before_it_when_the_evaluator_stops(
        stack: tuple[Stack, Signer], http: aiohttp.ClientSession, run_services: Callable[..., Any]) -> None:
    # Probe p22 F3: the evaluator stopped during the 50% step; the 100% step, and the promotion, passed on the 50%
    # step's scores (`min_scores` counts the whole window), not one score of the 100% step among them. Now the
    # 100% step waits for scores of its own, and past its progress deadline pauses for an operator, as a step
    # judged on drift does with the drift monitor down. The canary is healthy on `refusal` (neither arm refuses).
    replicas, signer = stack
    await run_services("query")
    router = await replicas.start()
    refusal = {"name": "score", "scorer": "refusal", "max_increase": 0.05, "min_scores": 20}
    spec = {"metrics": [refusal], "min_sample": 50, "failure_limit": 0, "inconclusive_limit": 1,
            "progress_deadline_s": 1.0}
    await _start(http, router, "leaky", {"steps": [50, 100], "interval_s": 0.2, "analysis": spec})
    await _pass(router, signer, "leaky")
    async with Evaluator(replicas.context) as evaluator:
        sent = await _traffic_until(http, router, lambda r: False, limit=80)  # under 50 events for one variant
        await _scored(router, evaluator, sent)
    scored = {release: len(_scores(router, release)) for release in ("r1", "leaky")}
    assert min(scored.values()) >= 20, scored  # the score metric's min_scores, all of the 50% step
    assert router.rollouts.route("chat").weight == 50
    sent = await _traffic_until(http, router, lambda r: r.paused or r.phase != "progressing", limit=4000)
    route = router.rollouts.route("chat")
    assert route.paused and route.phase == "progressing", \
        f"not paused after {sent} requests: {route.reason} ({route.analysis and route.analysis.last})"
    assert route.weight == 100, route.reason  # the 50% step passed on its own scores
    assert "waiting for 10 scores of canary answers served at this step (min_step_sample; 0 since it began" \
        in route.reason, route.reason
