"""Canary analysis judges what clients and the ledger see, on the real nats-server, chDB, the simulator (stable) and
a scripted canary upstream (probe p63): a canary whose clients give up on a share of its calls before
`router_unanswered_s` (their hang-ups are `client_disconnected`, the clients' own one by one) fails `hang_up_rate`,
and one whose upstream reports no usage is judged at the worst case each of its calls is billed, not at 0 tokens
and $0. Before, both were promoted. A hang-up counts only when the upstream kept its client waiting
(`router_hang_up_s`) before the answer was whole: clients leaving at the finish reason, or an app key closing the
canary's streams as their first chunk names its model, leave a healthy canary unharmed (probe p71 F1/F2)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lockgate.signing import Signer
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import ChatUpstream
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import (
    STABLE,
    _impatient_until,
    _pass,
    _start,
    _traffic_until,
    serving,
)

http, keys, signer = analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)

WORDY = " ".join(["verbose"] * 300)


class Canary(ChatUpstream):
    """The canary's upstream: `text` as one JSON answer or an SSE stream (as asked), with its `usage` or without it;
    a share `stall` of its calls (seeded) never answers (a stream: its first token, then nothing more) until the
    router hangs up."""

    def __init__(self, model: str, text: str, usage: bool = True, stall: float = 0.0) -> None:
        super().__init__()
        self.model, self.text, self.usage, self.stall = model, text, usage, stall
        self.rng = random.Random(7)
        self.stalled = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        stalls = self.rng.random() < self.stall
        self.stalled += stalls
        words = self.text.split(" ")
        usage = {"prompt_tokens": 2, "completion_tokens": len(words), "total_tokens": 2 + len(words)}
        if not body.get("stream"):
            if stalls:
                await asyncio.Event().wait()  # no answer: the router hangs up on this call when its client does
            message = {"role": "assistant", "content": self.text}
            return web.json_response({"id": "c1", "object": "chat.completion", "created": 0, "model": self.model,
                                      "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                                      **({"usage": usage} if self.usage else {})})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(self._chunk({"role": "assistant", "content": words[0]}))
        if stalls:
            await asyncio.Event().wait()  # the stream stalls after its first token
        for word in words[1:]:
            await out.write(self._chunk({"content": " " + word}))
        await out.write(self._chunk({}, "stop"))
        if self.usage and (body.get("stream_options") or {}).get("include_usage"):
            await out.write(b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 0,
                                                    "model": self.model, "choices": [], "usage": usage}).encode()
                            + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_canary_whose_clients_give_up_before_the_unanswered_bound_is_aborted(
        context: Any, run_services: Any, signer: Signer, http: aiohttp.ClientSession, stream: bool) -> None:
    """Probe p63 A: a canary that never answered 30% of its calls (streamed: stalled after the first token), its
    clients giving up after 0.5 s, under the router's `router_unanswered_s` of 10 s: each hang-up was
    `client_disconnected`, the client's own, left out of every metric, and the canary was promoted on its answers
    with `error_rate 0.0` (stable's clients hung up on none). Now each arm's share of hang-ups is judged as
    `hang_up_rate`, which an analysis judging error_rate judges too, and the canary is aborted on it. (The clients'
    0.5 s against a `router_hang_up_s` of 0.2 s, as the probe's 5 s against the default 1 s.)"""
    async with SimServer(STABLE) as stable, Canary("stally", "stable says hi", stall=0.3) as canary:
        router = await serving(context, run_services, signer, stable.url, canary.url, ("stally",),
                               router_unanswered_s=10.0, router_hang_up_s=0.2)
        analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.05}], "min_sample": 30, "failure_limit": 0}
        await _start(http, router, "stally", {"steps": [50, 100], "interval_s": 0.2, "analysis": analysis})
        await _pass(router, signer, "stally")
        sent, hung = await _impatient_until(http, router, lambda r: r.phase != "progressing", streams=lambda i: stream)
        route = router.rollouts.route("chat")
        assert route.phase == "aborted", f"not aborted after {sent} requests ({hung} hung up): {route.reason}"
        assert route.stable.release == "r1" and canary.stalled >= 10
        assert route.reason.startswith("aborted stally: analysis failed at step 1 (50%): hang_up_rate "), route.reason
        assert route.analysis is not None
        failed = next(m for m in route.analysis.last.metrics if m.name == "hang_up_rate")
        assert failed.verdict == "FAILED" and failed.canary > 0.15 and failed.stable < 0.05


@pytest.mark.parametrize("stream", [False, True])
async def test_a_canary_whose_upstream_reports_no_usage_is_judged_at_what_it_is_billed(
        context: Any, run_services: Any, signer: Signer, http: aiohttp.ClientSession, tmp_path: Path,
        stream: bool) -> None:
    """Probe p63 B: a canary answering 300 words where stable answers 3, from an upstream that reports no `usage`
    (a self-hosted server; a stream without its usage chunk). The router charges each such call its worst case
    (`lockgate.usage_unknown`, 4,096 output tokens) and the ledger books that, but analysis read the reported
    tokens: `tokens_per_request 0.0` and `cost_per_request 0.0` against stable's, and the canary was promoted.
    Now analysis counts what each call is billed for (`InferenceEvent.billed_tokens`, priced as the ledger does)."""
    prices = tmp_path / "prices.yaml"
    prices.write_text(json.dumps({"version": "t", "currency": "USD", "models": {
        "m": {"input_per_mtok": 1, "output_per_mtok": 10}, "nousage": {"input_per_mtok": 1, "output_per_mtok": 10}}}))
    async with SimServer(STABLE) as stable, Canary("nousage", WORDY, usage=False) as canary:
        router = await serving(context, run_services, signer, stable.url, canary.url, ("nousage",),
                               price_book=str(prices))
        metric = "cost_per_request" if stream else "tokens_per_request"  # each alone, so each is seen to fail
        analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.05}, {"name": metric, "max_ratio": 1.5}],
                    "min_sample": 30, "failure_limit": 0}
        await _start(http, router, "nousage", {"steps": [50, 100], "interval_s": 0.2, "analysis": analysis})
        await _pass(router, signer, "nousage")
        sent = await _streams_until(http, router, lambda r: r.phase != "progressing") if stream else \
            await _traffic_until(http, router, lambda r: r.phase != "progressing", limit=1000)
        route = router.rollouts.route("chat")
        assert route.phase == "aborted", f"not aborted after {sent} requests: {route.reason}"
        assert route.stable.release == "r1"
        assert route.reason.startswith(f"aborted nousage: analysis failed at step 1 (50%): {metric} "), route.reason
        assert route.analysis is not None
        failed = next(m for m in route.analysis.last.metrics if m.name == metric)
        assert failed.verdict == "FAILED" and failed.canary > 10 * failed.stable > 0


async def _streams_until(http: aiohttp.ClientSession, router: Any, done: Any, limit: int = 1000) -> int:
    """As `_traffic_until`, each request streamed (without asking for a usage chunk: the canary sends none anyway)."""
    url = f"{router.url}/v1/chat/completions"
    sent = 0

    async def one(i: int) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": f"user-{i}", "stream": True}
        async with http.post(url, json=body) as resp:
            await resp.read()

    while not done(router.rollouts.route("chat")) and sent < limit:
        await asyncio.gather(*(one(sent + i) for i in range(40)))
        sent += 40
    return sent


# Healthy arms answering alike: a stream of 10 words 15 ms apart (the simulator spreads a model's latency over its
# tokens), then the finish chunk; the twin's usage chunk and `[DONE]` come 50 ms after it (`TAILED`), as real
# providers' do.
_WORDS = " ".join(["w"] * 10)
PACED = SimConfig(models={m: ModelSpec(default=_WORDS, latency_ms=135) for m in ("m", "twin")}, seed=3)
TAILED = SimConfig(models={"m": ModelSpec(default=_WORDS, latency_ms=135),
                           "twin": ModelSpec(default=_WORDS, latency_ms=135, usage_tail_ms=50)}, seed=3)


async def _streams_read_until(app: aiohttp.ClientSession, router: Any, stop: Any, done: Any,
                              limit: int) -> tuple[int, int]:
    """Streamed requests from distinct users, 20 at a time, each read line by line until `stop(chunk)` holds for a
    chunk (then closed: a hang-up) or to its end, until `done(route)` or `limit` requests: (sent, hung up)."""
    url = f"{router.url}/v1/chat/completions"
    sent = hung = 0

    async def one(i: int) -> bool:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": f"user-{i}", "stream": True}
        async with app.post(url, json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {") and stop(json.loads(line[6:])):
                    resp.close()
                    return True
        return False

    while not done(router.rollouts.route("chat")) and sent < limit:
        hung += sum(await asyncio.gather(*(one(sent + i) for i in range(20))))
        sent += 20
    return sent, hung


async def test_clients_leaving_at_the_finish_reason_leave_a_healthy_canary_to_be_promoted(
        context: Any, run_services: Any, signer: Signer, http: aiohttp.ClientSession, keys: Any) -> None:
    """Probe p71 F1: both arms healthy with the same answer, the canary's upstream sending its usage chunk and
    `[DONE]` 50 ms after its finish chunk (as real providers do), its clients stopping at the finish reason
    (`if choice.finish_reason: break`). Each was recorded `client_disconnected` and counted in hang_up_rate: the
    canary was aborted with `hang_up_rate 0.931 > threshold 0.05`. Now a client leaving once every choice has its
    finish reason had the whole answer: recorded as answered, and the canary is promoted."""
    async with SimServer(TAILED) as sim:
        router = await serving(context, run_services, signer, sim.url, sim.url, ("twin",))
        analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.05}], "min_sample": 30, "failure_limit": 0}
        await _start(http, router, "twin", {"steps": [50, 100], "interval_s": 0.2, "analysis": analysis})
        await _pass(router, signer, "twin")

        def finished(chunk: dict[str, Any]) -> bool:
            return bool(chunk["choices"] and chunk["choices"][0].get("finish_reason"))
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as app:
            sent, hung = await _streams_read_until(app, router, finished, lambda r: r.phase != "progressing", 600)
        route = router.rollouts.route("chat")
        assert route.phase == "promoted", f"{route.phase} after {sent} requests ({hung} left): {route.reason}"
        assert hung == sent  # every client left at the finish reason


async def test_an_app_key_closing_the_canary_streams_cannot_abort_a_healthy_canary(
        context: Any, run_services: Any, signer: Signer, http: aiohttp.ClientSession, keys: Any) -> None:
    """Probe p71 F2: identical healthy arms but for their `model` field; an app key, knowing nothing of the split,
    read each stream's first chunk and closed it when it named the canary's model. Each was `client_disconnected`
    and counted in hang_up_rate: the canary was aborted within 80 requests (`hang_up_rate 1 > threshold 0.05`), and
    any app key could stop every canary of its tenant's deployments. Now a hang-up counts only when the upstream had
    kept its client waiting for `router_hang_up_s` (its stream silent since its latest chunk): these left while the
    answer flowed, count nowhere, and the canary is never judged on them."""
    async with SimServer(PACED) as sim:
        router = await serving(context, run_services, signer, sim.url, sim.url, ("twin",))
        analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.05}], "min_sample": 30, "failure_limit": 0}
        await _start(http, router, "twin", {"steps": [50, 100], "interval_s": 0.2, "analysis": analysis})
        await _pass(router, signer, "twin")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as app:
            sent, hung = await _streams_read_until(app, router, lambda chunk: chunk["model"] == "twin",
                                                   lambda r: r.phase != "progressing", 240)
        route = router.rollouts.route("chat")
        assert route.phase == "progressing", f"{route.phase} after {sent} requests ({hung} hung up): {route.reason}"
        assert hung >= 60 and sent - hung >= 60  # the canary's streams closed, stable's read whole
        assert route.analysis is not None
        assert route.analysis.last.verdict == "WAITING", route.analysis.last  # none of its requests is evidence
