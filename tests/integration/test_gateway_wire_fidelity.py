"""Upstream answers the simulator does not give, through the router to the real `openai` package: refusals, legacy
function calls, content parts, a null model, an upstream's `x-should-retry`, `"stream": null`, and the request id
of the model list (probe p79). The upstream is a small aiohttp double; the router passes the client's model through."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web

from lockgate.contracts import InferenceEvent
from lockgate.server.apikeys import Bootstrap, bootstrap
from lockgate.server.service import ServiceContext
from tests.helpers import served
from tests.integration.test_gateway_surface import events, next_event  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(90)

OUTPUT = "gen_ai.output.messages"
REFUSAL = "I'm sorry, I can't help with that."
USAGE = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}


def _answer(message: dict[str, Any], finish: str = "stop", model: Any = "fake-model") -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": USAGE}


# Each mode (the last user message) answered unstreamed, and streamed as these deltas with this finish reason.
ANSWERS = {
    "refuse": _answer({"content": None, "refusal": REFUSAL}),
    "legacyfn": _answer({"content": None, "function_call": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                        "function_call"),
    "listcontent": _answer({"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
                                        {"type": "text", "text": "Paris."}]}),
    "nullmodel": _answer({"content": "ok"}, model=None),
}
DELTAS = {
    "refuse": ([{"role": "assistant", "content": None, "refusal": ""}, {"refusal": "I'm sorry, "},
                {"refusal": "I can't help with that."}], "stop"),
    "legacyfn": ([{"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": ""}},
                  {"function_call": {"arguments": '{"city":'}}, {"function_call": {"arguments": '"Paris"}'}}],
                 "function_call"),
    "listcontent": ([{"role": "assistant", "content": [{"type": "text", "text": "Par"}]},
                     {"content": [{"type": "text", "text": "is."}]}], "stop"),
}


class Upstream:
    """An OpenAI-compatible double: chat answers by mode, a Responses refusal, a model list, and counts of calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.should_retry = "false"
        app = self.app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/models", self.models)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        mode = body["messages"][-1]["content"] if "messages" in body else "plain"
        self.calls[mode] = self.calls.get(mode, 0) + 1
        if mode in ("noretry500", "noretry429"):
            status = 500 if mode == "noretry500" else 429
            return web.json_response({"error": {"message": "do not retry this", "type": "insufficient_quota",
                                                "param": None, "code": "insufficient_quota"}},
                                     status=status, headers={"x-should-retry": self.should_retry})
        if body.get("stream") and mode in DELTAS:
            deltas, finish = DELTAS[mode]
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake-model"}
            chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
            chunks += [{**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
                       {**base, "choices": [], "usage": USAGE}]
            for chunk in chunks:
                await out.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await out.write(b"data: [DONE]\n\n")
            return out
        if mode in ANSWERS:
            return web.json_response(ANSWERS[mode])
        if "prompt" in body:
            return web.json_response({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "fake-model",
                                      "choices": [{"index": 0, "text": "plain", "finish_reason": "stop"}],
                                      "usage": USAGE})
        return web.json_response(_answer({"content": "plain"}))

    async def responses(self, request: web.Request) -> web.Response:
        body = await request.json()
        content = ([{"type": "refusal", "refusal": REFUSAL}] if body["input"] == "refuse"
                   else [{"type": "output_text", "text": "plain", "annotations": []}])
        return web.json_response({
            "id": "resp_1", "object": "response", "created_at": 1, "model": body["model"], "status": "completed",
            "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                        "content": content}],
            "usage": {"input_tokens": 5, "output_tokens": 9, "total_tokens": 14}, "store": False})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                                              "owned_by": "x"}]})


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    double = Upstream()
    async with served(double.app) as url:
        double.url = f"{url}/v1"
        yield double


@pytest.fixture
def keys(context: ServiceContext) -> Bootstrap:
    return bootstrap(context.settings.home, tenant="acme", app="shop")


@pytest.fixture
async def router(context: ServiceContext, run_services: Any, upstream: Upstream, tmp_path: Any) -> Any:
    """A passthrough router whose `default` endpoint is the double, retrying 3 times (the default) without waiting."""
    (tmp_path / "endpoints.yaml").write_text(
        f"endpoints:\n  default: {{url: {upstream.url}, retry: {{attempts: 3, initial_s: 0, max_s: 0}}}}\n")
    context.settings = context.settings.replace(endpoints_file=str(tmp_path / "endpoints.yaml"), deployment="chat",
                                                app="shop", passthrough=True)
    return (await run_services("router"))["router"]


def client(router: Any, keys: Bootstrap, retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=keys.app_key, max_retries=retries, timeout=60)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_refusals_and_legacy_function_calls_are_recorded(
        router: Any, keys: Bootstrap, events: asyncio.Queue[InferenceEvent]) -> None:  # noqa: F811
    """A refusal is the answer's text, marked a refusal part; a legacy function call is a tool call (probe p79 F1)."""
    via = client(router, keys)
    got = await via.chat.completions.create(model="fake-model", messages=_user("refuse"))
    assert got.choices[0].message.refusal == REFUSAL
    streamed = "".join([c.choices[0].delta.refusal or "" async for c in await via.chat.completions.create(
        model="fake-model", messages=_user("refuse"), stream=True) if c.choices])
    assert streamed == REFUSAL
    for _ in range(2):
        e = await next_event(events)
        assert (e.status, e.response, e.finish_reason) == ("ok", REFUSAL, "stop")
        assert json.loads(e.attributes[OUTPUT]) == [{"role": "assistant", "finish_reason": "stop", "parts": [
            {"type": "refusal", "content": REFUSAL}]}]

    r = await via.responses.create(model="fake-model", input="refuse")
    assert r.output[0].content[0].refusal == REFUSAL
    e = await next_event(events)
    assert (e.status, e.response) == ("ok", REFUSAL)
    assert json.loads(e.attributes[OUTPUT])[0]["parts"] == [{"type": "refusal", "content": REFUSAL}]

    functions = [{"name": "get_weather", "parameters": {"type": "object"}}]
    done = await via.chat.completions.create(model="fake-model", messages=_user("legacyfn"), functions=functions)
    assert (done.choices[0].message.function_call.name, done.choices[0].finish_reason) == ("get_weather",
                                                                                          "function_call")
    args = "".join([c.choices[0].delta.function_call.arguments async for c in await via.chat.completions.create(
        model="fake-model", messages=_user("legacyfn"), functions=functions, stream=True)
        if c.choices and c.choices[0].delta.function_call])
    assert args == '{"city":"Paris"}'
    for _ in range(2):
        e = await next_event(events)
        assert (e.status, e.finish_reason) == ("ok", "function_call")
        assert json.loads(e.attributes[OUTPUT]) == [{"role": "assistant", "finish_reason": "function_call", "parts": [
            {"type": "tool_call", "id": "", "name": "get_weather", "arguments": '{"city":"Paris"}'}]}]


async def test_content_parts_and_a_null_model_are_passed_on(
        router: Any, keys: Bootstrap, events: asyncio.Queue[InferenceEvent]) -> None:  # noqa: F811
    """A 200 the SDK reads is passed on and recorded, not turned into a 502 (probe p79 F4)."""
    via = client(router, keys)
    got = await via.chat.completions.create(model="fake-model", messages=_user("listcontent"))
    assert got.choices[0].message.content[1]["text"] == "Paris."
    e = await next_event(events)
    assert (e.status, e.response) == ("ok", "Paris.")  # the text parts, not the thinking
    text = "".join([c.choices[0].delta.content[0]["text"] async for c in await via.chat.completions.create(
        model="fake-model", messages=_user("listcontent"), stream=True) if c.choices and c.choices[0].delta.content])
    assert text == "Paris."
    e = await next_event(events)
    assert (e.status, e.response) == ("ok", "Paris.")

    got = await via.chat.completions.create(model="fake-model", messages=_user("nullmodel"))
    assert (got.model, got.choices[0].message.content) == (None, "ok")
    e = await next_event(events)
    assert (e.status, e.response, e.response_model) == ("ok", "ok", "fake-model")


@pytest.mark.parametrize("mode", ["noretry500", "noretry429"])
async def test_an_upstreams_no_retry_is_heeded_and_passed_on(
        router: Any, upstream: Upstream, keys: Bootstrap, mode: str) -> None:
    """`x-should-retry: false`: one upstream call, and the SDK (retrying by default) is told too (probe p79 F2)."""
    with pytest.raises(openai.APIStatusError) as raised:
        await client(router, keys, retries=2).chat.completions.create(model="fake-model", messages=_user(mode))
    assert (raised.value.response.headers.get("x-should-retry"), upstream.calls[mode]) == ("false", 1)
    upstream.should_retry, upstream.calls = "true", {}
    with pytest.raises(openai.APIStatusError) as raised:
        await client(router, keys).chat.completions.create(model="fake-model", messages=_user(mode))
    assert (raised.value.response.headers.get("x-should-retry"), upstream.calls[mode]) == ("true", 3)


async def test_stream_null_is_not_streamed_and_models_carry_a_request_id(router: Any, keys: Bootstrap) -> None:
    """`"stream": null`, which the SDK's types allow, is false (probe p79 F3); the model list answers carry an
    `x-request-id` as every other answer (F5)."""
    via = client(router, keys)
    chat = await via.chat.completions.create(model="fake-model", messages=_user("plain"), stream=None)
    assert chat.choices[0].message.content == "plain"
    assert (await via.completions.create(model="fake-model", prompt="hi", stream=None)).choices[0].text == "plain"
    assert (await via.responses.create(model="fake-model", input="hi", stream=None)).output_text == "plain"
    listed = await via.models.with_raw_response.list()
    assert listed.request_id and "fake-model" in {m.id for m in listed.parse().data}
    one = await via.models.with_raw_response.retrieve("fake-model")
    assert one.request_id and one.parse().id == "fake-model"
