"""A release says the model: through the real router and the official `openai` client, against a double of an
aggregator upstream (OpenRouter, a LiteLLM proxy) that answers with another model when a request lets it. Found by
a probe (p50 F1): an app key's `models: ["m", "vendor/ungated-model"]`, `route`, `provider` and `fallbacks` reached
an OpenRouter-like upstream, which answered `200 model: vendor/ungated-model`, an ungated model answering users,
priced as the release's model while the provider billed the other."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import msgspec
import openai
import pytest
from aiohttp import web

from lockgate.llmwire import ROUTING_FIELDS
from lockgate.server.apikeys import Bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.router.budgets import Counter
from lockgate.services.router.wire import OTHER_MODEL
from tests.integration import test_router_resilience as resilience

pytestmark = pytest.mark.timeout(60)
keys, gateway, events = resilience.keys, resilience.gateway, resilience.events
FakeLLM, client, MESSAGES = resilience.FakeLLM, resilience.client, resilience.MESSAGES
UNGATED = "vendor/ungated-model"
USAGE = {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


def _aggregator(seen: list[dict[str, Any]], answers: str | None = None) -> Any:
    """An OpenRouter-like upstream: with a `models` list it answers by the last one (the first failed, as a long
    prompt's context length makes it), else by `answers` (its own fallback), else by the model asked for."""

    def answer(auth: str, body: Any) -> web.Response:
        seen.append(body)
        model = body["models"][-1] if body.get("models") else answers or body["model"]
        if "input" in body:  # the Responses API
            return web.json_response({"id": "r1", "object": "response", "model": model, "status": "completed",
                                      "output": [], "usage": {"input_tokens": 1, "output_tokens": 3,
                                                              "total_tokens": 4}})
        if "prompt" in body:  # legacy completions
            return web.json_response({"id": "t1", "object": "text_completion", "created": 1, "model": model,
                                      "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
                                      "usage": USAGE})
        if "messages" not in body:  # embeddings
            return web.json_response({"object": "list", "model": model, "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1]}], "usage": {"prompt_tokens": 1,
                                                                                     "total_tokens": 1}})
        return web.json_response({"id": "c1", "object": "chat.completion", "created": 1, "model": model,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hi from {model}"},
                                               "finish_reason": "stop"}], "usage": USAGE})

    return answer


async def _serving_r1(router: Any, context: ServiceContext, keys: Bootstrap) -> None:
    """Deployment `chat` served by release r1 (model m on endpoint `default`), which passed its gate."""
    await resilience._serving(router, context, keys, "chat", "r1", "default")


async def test_a_field_that_lets_an_aggregator_choose_the_model_is_refused_on_every_operation(
        gateway: Any, keys: Bootstrap, context: ServiceContext) -> None:
    seen: list[dict[str, Any]] = []
    async with FakeLLM("openrouter", ("answer", _aggregator(seen))) as up:
        router = await gateway({"default": {"url": up.url}})
        await _serving_r1(router, context, keys)
        async with client(router, keys) as c:
            # The probe's request: before, `200 model: vendor/ungated-model`, the fields passed on as sent.
            with pytest.raises(openai.BadRequestError) as refused:
                await c.chat.completions.create(model="m", messages=MESSAGES, extra_body={
                    "models": ["m", UNGATED], "route": "fallback", "provider": {"order": ["cheap-host"]},
                    "fallbacks": [UNGATED]})
            assert refused.value.status_code == 400 and refused.value.param == "models"
            assert refused.value.code == "unsupported_parameter" and "'models' is not accepted" in refused.value.message
            for field in ROUTING_FIELDS:  # each alone, whatever its value
                with pytest.raises(openai.BadRequestError) as refused:
                    await c.chat.completions.create(model="m", messages=MESSAGES, extra_body={field: [UNGATED]})
                assert refused.value.param == field
            # Every operation alike, streamed too.
            with pytest.raises(openai.BadRequestError, match="'fallbacks' is not accepted"):
                await c.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                                extra_body={"fallbacks": [UNGATED]})
            with pytest.raises(openai.BadRequestError, match="'provider' is not accepted"):
                await c.completions.create(model="m", prompt="hi", extra_body={"provider": {"only": ["x"]}})
            with pytest.raises(openai.BadRequestError, match="'api_base' is not accepted"):
                await c.embeddings.create(model="m", input="hi", extra_body={"api_base": "http://elsewhere/v1"})
            with pytest.raises(openai.BadRequestError, match="'models' is not accepted"):
                await c.responses.create(model="m", input="hi", extra_body={"models": [UNGATED]})
            assert up.calls == 0
            # A null asks for nothing (the SDK's own default), and the rest is served as before, by the release's model.
            done = await c.chat.completions.create(model="m", messages=MESSAGES, extra_body={"provider": None})
        assert done.model == "m" and up.calls == 1 and seen[0].get("provider") is None
        # Ungoverned passthrough serves the client's own model and parameters: its routing fields pass on too.
        async with client(router, keys) as c:
            passed = await c.chat.completions.create(model="free", messages=MESSAGES, extra_body={"models": [UNGATED]},
                                                     extra_headers={"x-lockgate-deployment": "nobody-rolled-out"})
        assert passed.model == UNGATED and seen[-1]["models"] == [UNGATED]


async def test_an_answer_by_another_model_is_recorded_as_such_and_priced_as_the_model_that_answered(
        gateway: Any, keys: Bootstrap, context: ServiceContext, events: Any, tmp_path: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    # An aggregator may still answer with another model on its own (a fallback the operator's account sets): the
    # event says so, and budgets charge the model that answered, as the provider bills it (before, the release's m).
    resilience._priced(context, tmp_path, {"m": (1.0, 1.0), UNGATED: (1000.0, 1000.0)}, {"usd": 100.0})
    caplog.set_level(logging.WARNING, logger="lockgate.services.router.proxy")
    answers = [UNGATED, UNGATED, "m-2024-07-18", "openrouter/m", "vendor/unpriced"]
    seen: list[dict[str, Any]] = []
    async with FakeLLM("openrouter", *(("answer", _aggregator(seen, a)) for a in answers)) as up:
        router = await gateway({"default": {"url": up.url}})
        await _serving_r1(router, context, keys)
        async with client(router, keys) as c:
            got = [(await c.chat.completions.create(model="m", messages=MESSAGES)).model for _ in answers]
        assert got == answers
        await router.admission.return_expired(force=True)
        kv = await context.bus.kv(context.bus.subjects.kv_budgets)
        leased = msgspec.json.decode((await kv.get(f"daily.{datetime.now(UTC):%Y-%m-%d}")).value, type=Counter).leased
    served = await events(len(answers))
    assert [(e.model, e.response_model) for e in served] == [("m", a) for a in answers]
    assert [e.attributes.get(OTHER_MODEL) for e in served] == [
        f"answered by {UNGATED!r}, not 'm'; priced as {UNGATED!r}"] * 2 + [None, None] + [
        "answered by 'vendor/unpriced', not 'm'; priced as 'm': the price book has no 'vendor/unpriced'"]
    # 1 input and 3 output tokens each: two at $1,000 per million ($0.004 each), three at m's $1 ($0.000004 each).
    assert leased.usd == 2 * 4_000_000 + 3 * 4_000
    # Logged once per deployment and model that answered.
    told = [r.getMessage() for r in caplog.records if "was answered by" in r.getMessage()]
    assert len(told) == 2 and UNGATED in told[0] and "vendor/unpriced" in told[1]
