"""Failed calls a retry went past are calls, not requests or answers (probe p78): each is an event of its own
(`lockgate.attempt: superseded`, status error, no tokens) that error_rate counts, but cost_per_request and the drift
monitor took it as a request that cost $0 and an answer of 0 tokens, so an arm whose upstream failed calls looked
cheaper and drifted. Upstream doubles fail a fixed pattern of calls (every `every`-th) with a fast 503."""

from __future__ import annotations

import json
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lockgate.signing import Signer
from tests.helpers import ChatUpstream
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start, _traffic_until, serving

http, keys, signer = analysis_tests.http, analysis_tests.keys, analysis_tests.signer
pytestmark = pytest.mark.timeout(240)


class Flaky(ChatUpstream):
    """Answers `words` completion tokens (a list: cycled through, call by call); every `every`-th call (0: none)
    is a fast 503, which the router retries."""

    def __init__(self, model: str, words: list[int], every: int = 0) -> None:
        super().__init__()
        self.model, self.words, self.every = model, words, every
        self.calls = self.failed = 0
        self._answers = count()

    async def chat(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        if self.every and self.calls % self.every == 0:
            self.failed += 1
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)
        n = self.words[next(self._answers) % len(self.words)]
        return web.json_response(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(["w"] * n)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 2, "completion_tokens": n, "total_tokens": 2 + n},
            }
        )


def _prices(tmp_path: Path) -> str:
    """One price for every model: an answer's cost is its tokens'."""
    path = tmp_path / "prices.yaml"
    path.write_text(
        json.dumps(
            {
                "version": "t",
                "currency": "USD",
                "models": {m: {"input_per_mtok": 1, "output_per_mtok": 10} for m in ("m", "good", "dear")},
            }
        )
    )
    return str(path)


def _why(router: Any) -> str:
    route = router.rollouts.route("chat")
    last = route.analysis.last if route.analysis is not None else None
    metrics = (
        "; ".join(f"{m.name} {m.verdict} canary={m.canary} stable={m.stable}" for m in last.metrics)
        if last
        else ""
    )
    return f"{route.phase}: {route.reason} [{metrics}]"


async def _rollout(
    http: aiohttp.ClientSession,
    router: Any,
    signer: Signer,
    canary: str,
    error_rate: float,
    judged: tuple[str, ...],
) -> str:
    metrics = [
        {"name": "error_rate", "max_increase": error_rate},
        *({"name": n, "max_ratio": 1.2} for n in judged),
    ]
    analysis = {"metrics": metrics, "min_sample": 30, "failure_limit": 0}
    await _start(http, router, canary, {"steps": [50, 100], "interval_s": 0.2, "analysis": analysis})
    await _pass(router, signer, canary)
    await _traffic_until(http, router, lambda r: r.phase != "progressing", limit=2000)
    return router.rollouts.route("chat").phase


async def test_a_stable_whose_calls_fail_does_not_make_a_good_canary_dearer(
    context: Any, run_services: Any, signer: Signer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Stable fails every 3rd call (retried to an answer); the canary answers alike at the same price and never
    fails: as cheap per request. Before, stable's failed calls were requests costing $0, and the canary read 1.47x
    dearer and was aborted on cost_per_request."""
    async with Flaky("m", [10], every=3) as stable, Flaky("good", [10]) as canary:
        router = await serving(
            context, run_services, signer, stable.url, canary.url, ("good",), price_book=_prices(tmp_path)
        )
        phase = await _rollout(http, router, signer, "good", 0.05, ("cost_per_request", "tokens_per_request"))
        assert stable.failed and not canary.failed
        assert phase == "promoted", _why(router)


async def test_a_dearer_canary_is_not_made_cheaper_by_its_failed_calls(
    context: Any, run_services: Any, signer: Signer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The canary answers 14 tokens where stable answers 10 (1.38x per answer, over max_ratio 1.2) and fails every
    3rd call, retried: its clients see answers, and error_rate is loose (cost alone judges it). Before, its failed
    calls were requests costing $0 and 0 tokens, which hid the cost, and it was promoted."""
    async with Flaky("m", [10]) as stable, Flaky("dear", [14], every=3) as canary:
        router = await serving(
            context, run_services, signer, stable.url, canary.url, ("dear",), price_book=_prices(tmp_path)
        )
        phase = await _rollout(http, router, signer, "dear", 0.5, ("cost_per_request",))
        assert canary.failed
        assert phase == "aborted", _why(router)
        assert "cost_per_request" in router.rollouts.route("chat").reason


@pytest.mark.parametrize("words", [[10], [20, 200, 60, 140, 90, 35]], ids=["constant", "varied"])
async def test_a_stable_whose_calls_fail_does_not_drift_an_identical_canary(
    context: Any, run_services: Any, signer: Signer, http: aiohttp.ClientSession, words: list[int]
) -> None:
    """Stable fails every 3rd call (retried to an answer); the canary is identical and never fails. The drift
    monitor compares answers, and both arms' are alike: no DRIFT aborts it (the router's direct abort on DRIFT is
    on by default). Before, each failed call was an answer of 0 output tokens in stable's window:
    `DRIFT in output_tokens (PSI 1.64, mean 6 -> 10)`."""
    async with Flaky("m", words, every=3) as stable, Flaky("good", words) as canary:
        router = await serving(context, run_services, signer, stable.url, canary.url, ("good",))
        drift = (await run_services("drift"))["drift"]
        analysis = {
            "metrics": [{"name": "error_rate", "max_increase": 0.05}],
            "min_sample": 30,
            "failure_limit": 0,
        }
        await _start(http, router, "good", {"steps": [50, 100], "interval_s": 4, "analysis": analysis})
        reference = router.ctx.settings.drift_reference_size
        await _traffic_until(http, router, lambda r: False, limit=reference, batch=reference // 5)
        await drift.handlers.events.wait_for(reference, 30)
        await _pass(router, signer, "good")
        await _traffic_until(http, router, lambda r: r.phase != "progressing", limit=3000, batch=20)
        assert stable.failed and not canary.failed
        route = router.rollouts.route("chat")
        # What this guards is the answers' shape: no failed call read as an answer of 0 tokens, so no DRIFT abort in
        # the traffic sent (at 100% a look may still wait for users' worth of evidence: promoted or progressing). The
        # arms' latency is the machine's as much as theirs (both doubles answer at once on a loaded 2-core runner),
        # and a DRIFT in latency alone says nothing of that.
        assert route.phase in ("promoted", "progressing") or (
            "DRIFT in latency_ms" in route.reason and "output_tokens" not in route.reason
        ), _why(router)
