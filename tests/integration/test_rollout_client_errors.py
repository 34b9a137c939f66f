"""A canary that refuses a part of its users' requests with a 4xx, which stable answers, is aborted (probe p15 F2):
through the real router, nats-server and chDB.

Found by a probe: every upstream 4xx but 401/403/407/408/429 is taken for the client's fault and left out of
analysis, so a canary whose upstream refused 39% of requests with 400 `context_length_exceeded` (a new model with
a smaller window) was judged on the rest and promoted, even with `error_rate max 0.05`. The router's own 400 for a
body the canary's provider cannot translate left no event at all."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from lockgate.server.service import ServiceContext
from lockgate.services.router.domain import Route
from lockgate.signing import Signer
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import ChatUpstream, register_model_release
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _pass, _start, serving

http, keys, signer = analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)

# The probe's limits: error_rate relative and absolute; client_error_rate is judged with it (AnalysisSpec.judged).
ANALYSIS = {"metrics": [{"name": "error_rate", "max_increase": 0.05, "max": 0.05}], "min_sample": 100,
            "failure_limit": 0, "inconclusive_limit": 1000}
_ANSWER = msgspec.json.encode({
    "id": "c1", "object": "chat.completion", "created": 0, "model": "narrow",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "narrow canary"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
_TOO_LONG = msgspec.json.encode({"error": {"message": "This model's maximum context length is 4096 tokens",
                                           "type": "invalid_request_error", "code": "context_length_exceeded"}})


class NarrowCanary(ChatUpstream):
    """A canary upstream with a smaller context window: it refuses every `long` prompt with 400
    `context_length_exceeded` (which stable answers) and answers the others."""

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        long = body["messages"][-1]["content"] == "long"
        return web.Response(body=_TOO_LONG if long else _ANSWER, status=400 if long else 200,
                            content_type="application/json")


STABLE = SimConfig(models={"m": ModelSpec(default="stable says hi"), "same": ModelSpec(default="same canary")},
                   seed=3)


@pytest.fixture
async def router(context: ServiceContext, run_services: Any, signer: Signer, tmp_path: Path) -> AsyncIterator[Any]:
    """Deployment `chat`: stable on a simulator that answers everything; release `narrow` on NarrowCanary, and
    `claude-same` on an Anthropic endpoint (the same simulator), which cannot take some chat bodies (`n: 2`)."""
    async with SimServer(STABLE) as stable, NarrowCanary() as canary:
        (tmp_path / "endpoints.yaml").write_text(json.dumps({"endpoints": {
            "default": {"url": stable.url}, "canary": {"url": canary.url},
            "claude": {"url": stable.url, "provider": "anthropic"}}}))
        router = await serving(context, run_services, signer, stable.url, canary.url, ("narrow",),
                               endpoints_file=str(tmp_path / "endpoints.yaml"))
        await register_model_release(context.bus, "claude-same", "same", "claude")
        yield router


async def _traffic(http: aiohttp.ClientSession, router: Any, done: Callable[[Route], bool],
                   body: Callable[[int], dict[str, Any]], limit: int = 4000) -> dict[tuple[str, int], int]:
    """Requests from distinct users, 40 at a time, until `done(route)`: how many each (variant, status) got."""
    seen: dict[tuple[str, int], int] = {}
    url = f"{router.url}/v1/chat/completions"

    async def one(i: int) -> None:
        async with http.post(url, json={"model": "m", **body(i)}, headers={"x-lockgate-user": f"user-{i}"}) as resp:
            await resp.read()
            key = (resp.headers.get("x-lockgate-variant", ""), resp.status)
            seen[key] = seen.get(key, 0) + 1

    sent = 0
    while not done(router.rollouts.route("chat")) and sent < limit:
        await asyncio.gather(*(one(sent + i) for i in range(40)))
        sent += 40
    return seen


def _over(route: Route) -> bool:
    return route.phase in ("promoted", "aborted")


async def test_a_canary_refusing_part_of_its_requests_with_400_is_aborted(router: Any, http: aiohttp.ClientSession,
                                                                          signer: Signer) -> None:
    await _start(http, router, "narrow", {"steps": [50, 100], "interval_s": 0.1, "analysis": ANALYSIS})
    await _pass(router, signer, "narrow")
    # Two prompts in five are long: the canary refuses them, stable answers them.
    seen = await _traffic(http, router, _over,
                          lambda i: {"messages": [{"role": "user", "content": "long" if i % 5 < 2 else "hi"}]})
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"{route.phase}: {route.reason} ({seen})"
    assert route.reason.startswith("aborted narrow: analysis failed at step 1 (50%): client_error_rate ")
    assert seen.get(("canary", 400)) and not seen.get(("stable", 400))
    assert route.analysis is not None and route.analysis.last is not None
    judged = {m.name: m for m in route.analysis.last.metrics}
    # error_rate never fails on the requests answered (what promoted it); it may not have its sample yet.
    assert judged["error_rate"].verdict in ("SUCCESSFUL", "WAITING")
    refused = judged["client_error_rate"]
    assert refused.verdict == "FAILED" and refused.stable == 0.0 and refused.canary > 0.3


async def test_a_body_the_canary_provider_cannot_translate_counts_as_refused(router: Any, http: aiohttp.ClientSession,
                                                                             signer: Signer) -> None:
    # `n: 2` has no Anthropic Messages counterpart: the router refuses it for the canary's users (400, before any
    # upstream call), and stable (OpenAI-compatible) answers it. Before, that 400 left no event: the canary was
    # judged on the other requests only.
    await _start(http, router, "claude-same", {"steps": [50, 100], "interval_s": 0.1, "analysis": ANALYSIS})
    await _pass(router, signer, "claude-same")
    seen = await _traffic(http, router, _over,
                          lambda i: {"messages": [{"role": "user", "content": "hi"}], **({"n": 2} if i % 5 < 2 else {})})
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"{route.phase}: {route.reason} ({seen})"
    assert route.reason.startswith("aborted claude-same: analysis failed at step 1 (50%): client_error_rate ")
    # Refused before any upstream call: the answer names no variant, and stable refuses none.
    assert seen.get(("", 400)) and not seen.get(("stable", 400))
