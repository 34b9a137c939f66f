"""The canary-versus-stable drift report through the real router and drift monitor, with users as the unit
(probe p81 F1/F2) and every choice's finish reason (F3).

F1/F2: the router's split is sticky, so each arm serves its own users, and one user's answers are alike. The same
model on both arms answers 20 users on each (picked by the rollout's own split) in turn, with each user's typical
length and topic fixed (tests/unit/test_drift_users.py's design, which the rows' tests read as drift): the report
finds no drift in output_tokens, and the response_text test (a gate rule's `test: true`) none either.
F3: with `n` 2, a canary cutting every request's second choice at max_tokens is aborted for its finish reason.
Probe p87 F2: a client sending most of the traffic as two user ids, one on each arm, cannot hide a canary whose
answers are three times as long as stable's."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lockgate.codec import Codec
from lockgate.contracts import DriftReport
from lockgate.server.apikeys import KeyStore
from lockgate.services.router import domain as router_domain
from lockgate.signing import Signer
from tests.helpers import ChatUpstream
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start, _traffic_until, serving
from tests.unit.test_drift_users import FACTORS, USERS, WINDOW, answer, design

http, keys, signer, router = analysis_tests.http, analysis_tests.keys, analysis_tests.signer, analysis_tests.router
pytestmark = pytest.mark.timeout(120)
_reports: Codec[DriftReport] = Codec(DriftReport)
_PROMPT = re.compile(r"L=(\d+) T=(\d+) K=(\d+)")


class Same(ChatUpstream):
    """One model on either arm: the prompt says how long the answer is, its topic and its words' seed; with `n` 2,
    the second choice ends as `second` says."""

    def __init__(self, second: str = "stop") -> None:
        super().__init__()
        self.second = second

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        found = _PROMPT.match(body["messages"][-1]["content"])
        length, topic, k = (int(g) for g in found.groups()) if found else (40, 0, 0)
        text = answer(topic, k)
        choices = [{"index": i, "message": {"role": "assistant", "content": text},
                    "finish_reason": self.second if i else "stop"} for i in range(body.get("n", 1))]
        return web.json_response({"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                                  "choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": length,
                                                                "total_tokens": 5 + length}})


async def test_an_identical_canary_serving_other_users_neither_drifts_nor_fails_the_text_test(
        context: Any, run_services: Any, signer: Signer, http: aiohttp.ClientSession) -> None:
    async with Same() as stable, Same() as canary:
        router = await serving(context, run_services, signer, stable.url, canary.url, ("same",),
                               drift_window_size=WINDOW, drift_reference_size=WINDOW)
        await run_services("drift")
        bus = router.ctx.bus
        sub = await bus.nc.subscribe(bus.subjects.drift("chat"))
        await _start(http, router, "same", {"steps": [50, 100], "interval_s": 3600,
                                            "analysis": {"metrics": [{"name": "error_rate", "max_increase": 0.05}]}})
        await _pass(router, signer, "same")
        route = router.rollouts.route("chat")
        salt = router.rollouts.sticky_salt(route)
        names = [f"user-{i}" for i in range(400)]
        arm = {n: router_domain.choose(route, n, salt=salt)[0] for n in names}
        # The design's first USERS users are the canary's: names the rollout's split puts there, the rest stable's.
        users = ([n for n in names if arm[n] == "canary"][:USERS] + [n for n in names if arm[n] == "stable"][:USERS])
        assert len(users) == 2 * USERS
        d, url = design(), f"{router.url}/v1/chat/completions"

        async def one(k: int) -> None:
            u = k % (2 * USERS)
            length, topic = d[u]
            prompt = f"L={max(1, int(length * FACTORS[k // (2 * USERS) % 5]))} T={topic} K={k}"
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "user": users[u]}
            async with http.post(url, json=body) as resp:
                assert resp.status == 200, await resp.text()

        for start in range(0, 2 * WINDOW + 4 * USERS, 2 * USERS):  # a canary window and then some, in turns
            await asyncio.gather(*(one(start + i) for i in range(2 * USERS)))
        while True:
            report = _reports.decode((await sub.next_msg(timeout=10)).data)
            if report.comparison == "canary_vs_stable":
                break
        out = next(f for f in report.features if f.feature == "output_tokens")
        # Material (the rows' PSI) but no more than these users' split explains: no DRIFT, no abort.
        assert out.psi > 0.5 and not out.test_drifted and not out.drifted, out
        assert out.p_value is not None and out.p_value > 0.1
        words = next(f for f in report.features if f.feature == "response_text")
        assert not words.test_drifted and words.p_value is not None and words.p_value > 0.1, words


async def test_a_canary_cutting_every_second_choice_is_aborted_for_its_finish_reason(
        context: Any, run_services: Any, signer: Signer, http: aiohttp.ClientSession) -> None:
    async with Same() as stable, Same("length") as canary:
        router = await serving(context, run_services, signer, stable.url, canary.url, ("same",),
                               drift_window_size=100, drift_reference_size=100)
        await run_services("drift")
        await _start(http, router, "same", {"steps": [50, 100], "interval_s": 3600,
                                            "analysis": {"metrics": [{"name": "error_rate", "max_increase": 0.05}]}})
        await _pass(router, signer, "same")
        sent = await _traffic_until(http, router, lambda r: r.phase != "progressing", limit=1200,
                                    extra={"n": 2, "max_tokens": 50})
        route = router.rollouts.route("chat")
        assert route.phase == "aborted", f"not aborted after {sent} requests: {route.reason}"
        assert "DRIFT in finish_reason:length" in route.reason, route.reason


async def test_two_giant_users_cannot_hide_a_canary_whose_answers_triple(
        router: Any, http: aiohttp.ClientSession, signer: Signer, run_services: Any) -> None:
    # Probe p87 F2: another key of the tenant sends four requests in five as two user ids, one the split puts on
    # each arm, with `max_tokens: 1` (the same one-token answer from either release). Each window is then mostly two
    # users: counted by their rows, the random splits putting both on one side parted the windows far more than the
    # canary's real users' answers, three times as long, did, and no report was DRIFT (5 of 6 runs, ~250 reports).
    drift = (await run_services("drift"))["drift"]
    other, _ = KeyStore(router.ctx.settings.home).create("default", "shop", description="a batch client")
    await _start(http, router, "long", {"steps": [50, 100], "interval_s": 3600})
    reference = router.ctx.settings.drift_reference_size
    await _traffic_until(http, router, lambda r: False, limit=reference, batch=reference // 5)
    await drift.handlers.events.wait_for(reference, 30)
    await _pass(router, signer, "long")
    route = router.rollouts.route("chat")
    salt = router.rollouts.sticky_salt(route)
    names = [f"heavy-{i}" for i in range(100)]
    arm = {n: router_domain.choose(route, n, salt=salt)[0] for n in names}
    giants = [next(n for n in names if arm[n] == "stable"), next(n for n in names if arm[n] == "canary")]
    url = f"{router.url}/v1/chat/completions"

    async def ask(session: aiohttp.ClientSession, user: str, **extra: Any) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": user, **extra}
        async with session.post(url, json=body) as resp:
            assert resp.status == 200, await resp.text()

    sent = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {other}"}) as client:
        # Each round, 10 requests of users seen once and 40 of the giants: ~50 reports in all (a window is 50).
        while router.rollouts.route("chat").phase == "progressing" and sent < 1000:
            await asyncio.gather(*(ask(http, f"real-{sent + i}") for i in range(10)),
                                 *(ask(client, giants[i % 2], max_tokens=1) for i in range(40)))
            sent += 10
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"not aborted after {sent} requests of users and {4 * sent} of two: {route.reason}"
    assert "DRIFT in output_tokens (PSI" in route.reason and "(canary long vs stable r1)" in route.reason
