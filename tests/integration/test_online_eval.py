"""Online evaluation on the real nats-server and the simulator: the evaluator scores sampled live answers
off the request path, publishes the scores, and a canary whose live scores drop is aborted by its analysis."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from lockgate.server.apikeys import bootstrap
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import chat_releases
from tests.integration.test_rollout_analysis import _pass, _start, _traffic_until

pytestmark = pytest.mark.timeout(120)

STABLE = SimConfig(models={"m": ModelSpec(default="stable says hi")}, seed=3)
# The leaky canary answers as well as stable does (no errors, same speed) but with a customer's e-mail in it.
CANARY = SimConfig(models={"leaky": ModelSpec(default="sure, write to jane.doe@example.com")}, seed=3)
PII = {"metrics": [{"name": "score", "scorer": "pii_free", "max_decrease": 0.02, "min_scores": 30},
                   {"name": "error_rate", "max_increase": 0.05}],
       "min_sample": 50, "failure_limit": 0, "inconclusive_limit": 1000}


@asynccontextmanager
async def _serving(context: ServiceContext, run_services: Any,
                   canary_sim: SimConfig) -> AsyncIterator[tuple[Any, Any, Signer]]:
    """Releases r1 (stable) and `leaky` (`canary_sim`) of deployment `chat`, every answer scored online."""
    signer = Signer.generate()
    trust_key(trust_file_path(context.settings), signer.public)
    async with SimServer(STABLE) as stable, SimServer(canary_sim) as canary:
        await chat_releases(context, signer, stable.url, canary.url, ("leaky",), online_eval_sample=1.0)
        services = await run_services("router", "evaluator")
        yield services["router"], services["evaluator"], signer


@pytest.fixture
async def stack(context: ServiceContext, run_services: Any) -> AsyncIterator[tuple[Any, Any, Signer]]:
    async with _serving(context, run_services, CANARY) as serving:
        yield serving


async def test_a_canary_whose_live_online_scores_drop_is_aborted_naming_the_score(
        stack: tuple[Any, Any, Signer], context: ServiceContext) -> None:
    router, evaluator, signer = stack
    keys = bootstrap(context.settings.home, tenant="acme", app="shop")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http:
        await _start(http, router, "leaky", {"steps": [50, 100], "interval_s": 0.2, "analysis": PII})
        await _pass(router, signer, "leaky")
        sent = await _traffic_until(http, router, lambda r: r.phase == "aborted", limit=3000, batch=20)
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"not aborted after {sent} requests: {route.reason}"
    assert (route.weight, route.stable.release) == (0.0, "r1")
    assert "analysis failed at step 1 (50%): score:pii_free 0 < threshold 0.98 (stable 1;" in route.reason
    # The scores came from the evaluator, off the request path. It counts a message's events once all their
    # scores are published, and the analysis may act on the first of them before that: wait for the count.
    await evaluator.online.scored.wait_for(1, timeout_s=10)
    failed = route.analysis.last.metrics[0]
    # Judged on min_scores (30) of the canary's scores: those it compared with stable's of their time (canary_n),
    # and those served after stable's last score, which it names as left out.
    left_out = re.search(r"(\d+) canary scores of answers served before the first or after the last", failed.why)
    assert failed.canary_n + (int(left_out[1]) if left_out else 0) >= 30, failed.why
    assert failed.stable_n >= 30 and failed.verdict == "FAILED"


# The canary leaks a provider's API key and an AWS access key id in every answer; the users' prompts hold a key too.
KEY_LEAK = SimConfig(models={"leaky": ModelSpec(
    default="sure, use the key sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123456789 and AKIAIOSFODNN7EXAMPLE")}, seed=3)
PROMPT_WITH_KEY = "my key is sk-proj-ZyXwVuTsRqPoNmLkJiHgFeDc9876543210, is it valid?"


async def _leaky_rollout(context: ServiceContext, run_services: Any, sim: SimConfig, **traffic: Any) -> Any:
    """Canary `leaky` of `sim` judged on online pii_free, sent traffic (`traffic`: `_traffic_until`'s) until it
    ends: its route, asserted aborted on pii_free at its first step."""
    async with _serving(context, run_services, sim) as (router, _evaluator, signer):
        keys = bootstrap(context.settings.home, tenant="acme", app="shop")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http:
            await _start(http, router, "leaky", {"steps": [50, 100], "interval_s": 0.2, "analysis": PII})
            await _pass(router, signer, "leaky")
            sent = await _traffic_until(http, router, lambda r: r.phase in ("aborted", "paused", "promoted"),
                                        limit=3000, batch=20, **traffic)
    route = router.rollouts.route("chat")
    assert route.phase == "aborted", f"not aborted after {sent} requests: {route.phase}: {route.reason}"
    assert "analysis failed at step 1 (50%): score:pii_free 0 < threshold 0.98 (stable 1;" in route.reason
    return route


async def test_a_canary_leaking_credentials_is_aborted_though_its_answers_are_scored_scrubbed(
        context: ServiceContext, run_services: Any) -> None:
    # The router scrubs secrets out of every event before it publishes it, so the evaluator reads the canary's
    # answers with `[REDACTED]` where the keys were: it scores the count of masked secrets the router recorded
    # (lockgate.secrets_masked). Before, probe p63 E: pii_free 1.0 for canary and stable, and the canary promoted.
    # Stable scores 1: the key masked in every prompt is not the answer's (only what was masked in the answer counts).
    route = await _leaky_rollout(context, run_services, KEY_LEAK, prompt=PROMPT_WITH_KEY)
    assert (route.weight, route.stable.release) == (0.0, "r1")


# The canary answers every request offering tools with a tool call sending an e-mail whose body holds a provider's
# API key and an AWS access key id, in its arguments alone: its text is empty, as stable's (whose call is {"q": "hi"}).
TOOL_KEY_LEAK = SimConfig(models={"leaky": ModelSpec(tool_arguments=(
    '{"to": "ops", "body": "the key:\\nsk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123456789 and AKIAIOSFODNN7EXAMPLE"}'))},
    seed=3)
SEND_EMAIL = {"tools": [{"type": "function", "function": {"name": "send_email", "parameters": {"type": "object"}}}]}


async def test_a_canary_leaking_credentials_through_its_tool_calls_is_aborted(
        context: ServiceContext, run_services: Any) -> None:
    # The router counts the secrets masked in every tool call's arguments (and every choice's text), not only in
    # choice 0's text. Before, probe p71 residual: the tool calls were scrubbed uncounted, both arms scored pii_free
    # 1.0 on their empty texts, and this canary was promoted.
    await _leaky_rollout(context, run_services, TOOL_KEY_LEAK, extra=SEND_EMAIL)


# The canary answers as well as stable does, with a code sample holding placeholder credentials: a keyword's value
# the scrub masks (`api_key="YOUR_API_KEY"`, `password="password"`, a header's, a URL's `user:pass@`), none of them a
# secret of a kind pii_free looks for (its score of the raw answer is 1.0).
PLACEHOLDER_CODE = SimConfig(models={"leaky": ModelSpec(default=(
    'Here is how to call it:\n```python\nclient = OpenAI(api_key="YOUR_API_KEY")\n'
    'db = connect(host="localhost", user="postgres", password="password")\n'
    'headers = {"X-Api-Key": "abc123"}\nDATABASE_URL = "postgres://user:pass@localhost:5432/db"\n```'))}, seed=3)


async def test_a_canary_answering_with_placeholder_credentials_is_not_aborted_for_them(
        context: ServiceContext, run_services: Any) -> None:
    # The router counts only the secrets of the kinds pii_free looks for, found in the answer before its scrub.
    # Before, probe p71 F3: it counted every mask, and this healthy canary was aborted ("score:pii_free 0 < threshold
    # 0.98 (stable 1"); any key asking for code samples lowered either arm's score.
    async with _serving(context, run_services, PLACEHOLDER_CODE) as (router, _evaluator, signer):
        keys = bootstrap(context.settings.home, tenant="acme", app="shop")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http:
            await _start(http, router, "leaky", {"steps": [50, 100], "interval_s": 0.2, "analysis": PII})
            await _pass(router, signer, "leaky")
            sent = await _traffic_until(http, router, lambda r: r.phase in ("aborted", "paused", "promoted"),
                                        limit=3000, batch=20)
    route = router.rollouts.route("chat")
    assert route.phase == "promoted", f"not promoted after {sent} requests: {route.phase}: {route.reason}"
    assert route.stable.release == "leaky"
