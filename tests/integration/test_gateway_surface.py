"""The gateway's OpenAI surface, driven by the real `openai` package (sync and async, streamed and not)
against the simulator, compared with the simulator called directly, with the events it records."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from lockgate.codec import Codec
from lockgate.contracts import InferenceEvent
from lockgate.server.apikeys import Bootstrap, bootstrap
from lockgate.server.service import ServiceContext
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import register_model_release, store_pass

pytestmark = pytest.mark.timeout(90)

SIM = SimConfig(models={"m": ModelSpec(answers={"hi": "hello there"}, default="the default answer",
                                       cached_tokens=1),
                        "slow": ModelSpec(default=" ".join(["word"] * 40), latency_ms=4000),
                        "lag": ModelSpec(latency_ms=1000)})
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look it up",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
OUTPUT = "gen_ai.output.messages"
_events: Codec[list[InferenceEvent]] = Codec(list[InferenceEvent])


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SIM) as s:
        yield s


@pytest.fixture
def keys(context: ServiceContext) -> Bootstrap:
    return bootstrap(context.settings.home, tenant="acme", app="shop")


@pytest.fixture
async def router(context: ServiceContext, run_services: Any, sim: SimServer, tmp_path: Any) -> Any:
    """A router whose `default` endpoint is the simulator (OpenAI-compatible) and whose `claude` endpoint
    is the same simulator's Anthropic Messages API; `claude-m` names the `assistant` deployment. These tests
    are about the wire, so the router opts in to passthrough: ungoverned deployments reach the simulator."""
    (tmp_path / "endpoints.yaml").write_text(
        f"endpoints:\n  default: {{url: {sim.url}}}\n"
        f"  claude: {{url: {sim.url}, provider: anthropic, credential: ANTHROPIC_KEY}}\n"
        "models:\n  claude-m: assistant\n")
    (tmp_path / "secrets.yaml").write_text("ANTHROPIC_KEY: sk-ant-held-by-lockgate\n")
    context.settings = context.settings.replace(endpoints_file=str(tmp_path / "endpoints.yaml"),
                                                secrets_file=str(tmp_path / "secrets.yaml"),
                                                deployment="chat", app="shop", passthrough=True)
    return (await run_services("router"))["router"]


@pytest.fixture
async def events(router: Any) -> AsyncIterator[asyncio.Queue[InferenceEvent]]:
    """Every inference event the router publishes, in order."""
    bus = router.ctx.bus
    queue: asyncio.Queue[InferenceEvent] = asyncio.Queue()

    async def on_message(msg: Any) -> None:
        for e in _events.decode(msg.data):
            queue.put_nowait(e)

    sub = await bus.nc.subscribe(bus.subjects.served("shop", "acme"), cb=on_message)
    yield queue
    await sub.unsubscribe()


async def next_event(queue: asyncio.Queue[InferenceEvent]) -> InferenceEvent:
    return await asyncio.wait_for(queue.get(), timeout=15)


def clients(router: Any, sim: SimServer, keys: Bootstrap) -> tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]:
    # 60 s: one request through the router timed out at 20 s once on a loaded CI machine.
    via = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=keys.app_key, max_retries=0, timeout=60)
    direct = openai.AsyncOpenAI(base_url=sim.url, api_key="unused", max_retries=0, timeout=20)
    return via, direct


def _strip(data: dict[str, Any]) -> dict[str, Any]:
    """A response without the fields that differ per call (ids, timestamps)."""
    return {k: v for k, v in data.items() if k not in ("id", "created", "created_at", "system_fingerprint")}


async def test_chat_n2_and_tools_recorded_streamed_and_not(router: Any, sim: SimServer, keys: Bootstrap,
                                                           events: asyncio.Queue[InferenceEvent]) -> None:
    via, direct = clients(router, sim, keys)
    msgs = [{"role": "user", "content": "hi"}]
    got = await via.chat.completions.create(model="m", messages=msgs, n=2)
    want = await direct.chat.completions.create(model="m", messages=msgs, n=2)
    assert [c.message.content for c in got.choices] == [c.message.content for c in want.choices] == [
        "hello there", "hello there [1]"]
    assert got.usage == want.usage
    e = await next_event(events)
    assert (e.operation, e.provider, e.response, e.finish_reason, e.cached_tokens, e.deployment) == (
        "chat", "openai", "hello there", "stop", 1, "chat")
    assert [m["parts"][0]["content"] for m in json.loads(e.attributes[OUTPUT])] == ["hello there", "hello there [1]"]

    stream = await via.chat.completions.create(model="m", messages=msgs, n=2, stream=True)
    texts = {0: "", 1: ""}
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {0: "hello there", 1: "hello there [1]"}
    e = await next_event(events)
    assert e.response == "hello there"  # choice 1's tokens, interleaved on the wire, stay in its own buffer
    assert [m["parts"][0]["content"] for m in json.loads(e.attributes[OUTPUT])] == ["hello there", "hello there [1]"]

    for streamed in (False, True):
        if streamed:
            calls: dict[int, dict[str, str]] = {}
            async for chunk in await via.chat.completions.create(model="m", messages=msgs, tools=TOOLS, stream=True):
                for tc in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
                    call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] = tc.id or call["id"]
                    call["name"] += tc.function.name or "" if tc.function else ""
                    call["arguments"] += tc.function.arguments or "" if tc.function else ""
            assert calls == {0: {"id": "call_0", "name": "lookup", "arguments": '{"q":"hi"}'}}
        else:
            done = await via.chat.completions.create(model="m", messages=msgs, tools=TOOLS)
            (call,) = done.choices[0].message.tool_calls
            assert (call.function.name, call.function.arguments, done.choices[0].finish_reason) == (
                "lookup", '{"q":"hi"}', "tool_calls")
        e = await next_event(events)
        assert e.finish_reason == "tool_calls"
        assert json.loads(e.attributes[OUTPUT]) == [{"role": "assistant", "finish_reason": "tool_calls", "parts": [
            {"type": "tool_call", "id": "call_0", "name": "lookup", "arguments": '{"q":"hi"}'}]}]


async def test_completions_embeddings_responses_models_match_the_simulator(
        router: Any, sim: SimServer, keys: Bootstrap, events: asyncio.Queue[InferenceEvent]) -> None:
    via, direct = clients(router, sim, keys)
    got = await via.completions.create(model="m", prompt="hi", n=2)
    want = await direct.completions.create(model="m", prompt="hi", n=2)
    assert [c.text for c in got.choices] == [c.text for c in want.choices] == ["hello there", "hello there [1]"]
    e = await next_event(events)
    assert (e.operation, e.prompt, e.response, e.input_tokens) == ("text_completion", "hi", "hello there",
                                                                   want.usage.prompt_tokens)
    assert OUTPUT in e.attributes
    text = "".join([c.choices[0].text async for c in await via.completions.create(model="m", prompt="hi", stream=True)
                    if c.choices])
    assert text == "hello there"
    e = await next_event(events)
    assert (e.operation, e.response, e.ttft_ms > 0, e.output_tokens > 0) == ("text_completion", text, True, True)

    got_e = await via.embeddings.create(model="m", input=["a", "b"])  # base64 on the wire, as the package asks
    want_e = await direct.embeddings.create(model="m", input=["a", "b"])
    assert [d.embedding for d in got_e.data] == [d.embedding for d in want_e.data] and len(got_e.data[0].embedding) == 8
    e = await next_event(events)
    assert (e.operation, e.prompt, e.response, e.input_tokens) == ("embeddings", "a\nb", None,
                                                                   want_e.usage.prompt_tokens)
    # Token arrays, as LangChain's OpenAIEmbeddings sends by default (the simulator refused them with a 400).
    got_t = await via.embeddings.create(model="m", input=[[1, 2, 3], [4]])
    want_t = await direct.embeddings.create(model="m", input=[[1, 2, 3], [4]])
    assert [d.embedding for d in got_t.data] == [d.embedding for d in want_t.data] and got_t.usage.prompt_tokens == 4
    assert (await next_event(events)).input_tokens == 4

    got_r = await via.responses.create(model="m", input="hi", instructions="be kind")
    want_r = await direct.responses.create(model="m", input="hi", instructions="be kind")
    assert got_r.output_text == want_r.output_text == "hello there"
    assert got_r.usage == want_r.usage
    e = await next_event(events)
    assert (e.operation, e.attributes["lockgate.api"], e.response, e.cached_tokens) == ("chat", "responses",
                                                                                        "hello there", 1)
    kinds, deltas = [], []
    async for ev in await via.responses.create(model="m", input="hi", stream=True):
        kinds.append(ev.type)
        if ev.type == "response.output_text.delta":
            deltas.append(ev.delta)
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(deltas) == "hello there"
    e = await next_event(events)
    assert (e.operation, e.response, e.finish_reason, e.output_tokens) == ("chat", "hello there", "stop",
                                                                           want_r.usage.output_tokens)

    listed = {m.id async for m in via.models.list()}
    assert {m.id async for m in direct.models.list()} <= listed and "claude-m" in listed


async def test_sync_client_streamed_and_not(router: Any, sim: SimServer, keys: Bootstrap) -> None:
    """The synchronous client, in a thread, while the router serves on the test's loop."""
    await asyncio.to_thread(_sync_calls, router.url, keys.app_key)


def _sync_calls(url: str, key: str) -> None:
    with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20) as c:
        assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]
                                         ).choices[0].message.content == "hello there"
        assert "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True) if ch.choices) == "hello there"
        assert c.completions.create(model="m", prompt="hi").choices[0].text == "hello there"
        assert len(c.embeddings.create(model="m", input="x").data[0].embedding) == 8
        assert c.responses.create(model="m", input="hi").output_text == "hello there"
        assert "m" in {m.id for m in c.models.list()}


async def test_anthropic_endpoint_behind_the_openai_wire(router: Any, context: ServiceContext, sim: SimServer,
                                                         keys: Bootstrap, events: asyncio.Queue[InferenceEvent]) -> None:
    # The `assistant` deployment's releases send it to the `claude` endpoint (Anthropic Messages); they are the app
    # key's tenant's (`keys`), as an app key is served only deployments of its own tenant's releases.
    for release in ("a1", "a2"):
        await register_model_release(context.bus, release, "m", "claude", tenant="acme")
    await store_pass(context.bus, "a1", context.settings)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http, http.put(
            f"{router.url}/lockgate/v1/deployments/assistant", json={"stable_release": "a1", "canary_release": "a2"}
    ) as resp:
        assert resp.status == 200, await resp.text()
    via, _ = clients(router, sim, keys)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    done = await via.chat.completions.create(model="claude-m", messages=msgs)  # mapped to `assistant` by name
    assert (done.choices[0].message.content, done.choices[0].finish_reason) == ("hello there", "stop")
    assert done.usage.prompt_tokens_details.cached_tokens == 1
    assert sim.headers[-1]["x-api-key"] == "sk-ant-held-by-lockgate" and "Authorization" not in sim.headers[-1]
    e = await next_event(events)
    assert (e.provider, e.deployment, e.model, e.response, e.cached_tokens, e.input_tokens) == (
        "anthropic", "assistant", "m", "hello there", 1, done.usage.prompt_tokens)

    chunks = [c async for c in await via.chat.completions.create(model="claude-m", messages=msgs, stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there"
    assert all(c.usage is None for c in chunks)  # the usage chunk lockgate asked for stays hidden
    e = await next_event(events)
    assert (e.provider, e.response, e.finish_reason, e.output_tokens > 0, e.cached_tokens) == (
        "anthropic", "hello there", "stop", True, 1)

    chunks = [c async for c in await via.chat.completions.create(
        model="claude-m", messages=msgs, tools=TOOLS, stream=True, stream_options={"include_usage": True})]
    args = "".join(tc.function.arguments or "" for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ())
    assert json.loads(args) == {"q": "hi"} and chunks[-1].usage.completion_tokens == 5
    e = await next_event(events)
    assert (e.finish_reason, json.loads(e.attributes[OUTPUT])[0]["parts"][0]["name"]) == ("tool_calls", "lookup")

    # The header overrides the model map: `chat` sends claude-m to the OpenAI-compatible endpoint, which has no such model.
    with pytest.raises(openai.NotFoundError, match="claude-m"):
        await via.chat.completions.create(model="claude-m", messages=msgs, extra_headers={"x-lockgate-deployment": "chat"})
    assert (await next_event(events)).deployment == "chat"
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        await via.chat.completions.create(model="claude-m", messages=msgs, n=2)
    with pytest.raises(openai.BadRequestError, match="Anthropic Messages"):
        await via.embeddings.create(model="claude-m", input="x")
    # Responses tools have no `function`: the refusal is the operation's, before any translation (before,
    # "request cannot be translated: KeyError('function')").
    with pytest.raises(openai.BadRequestError, match="Anthropic Messages, which has no responses operation"):
        await via.responses.create(model="claude-m", input="hi", tools=[
            {"type": "function", "name": "lookup", "parameters": {"type": "object"}, "strict": False}])


async def test_client_disconnect_is_recorded_and_cancels_the_upstream(
        router: Any, sim: SimServer, keys: Bootstrap, events: asyncio.Queue[InferenceEvent]) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "go"}], "stream": True}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{router.url}/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {keys.app_key}"})
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data:")
        resp.close()  # the client goes away mid-stream
    e = await next_event(events)
    assert (e.status, e.error_type) == ("error", "client_disconnected")
    # The router dropped its upstream connection: the simulator's next write failed, long before its 4 s answer.
    await asyncio.wait_for(sim.disconnected.wait(), timeout=15)
    assert sim.disconnects == 1


async def test_client_gone_before_a_non_streamed_answer_is_recorded(
        router: Any, keys: Bootstrap, events: asyncio.Queue[InferenceEvent]) -> None:
    body = {"model": "lag", "messages": [{"role": "user", "content": "go"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as http:
        with pytest.raises(TimeoutError):  # the client gives up and closes its connection
            await http.post(f"{router.url}/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {keys.app_key}"})
    e = await next_event(events)
    assert (e.status, e.error_type, e.model) == ("error", "client_disconnected", "lag")


async def test_openai_client_timeout_cancels_the_non_streamed_upstream_call(
        router: Any, sim: SimServer, keys: Bootstrap, events: asyncio.Queue[InferenceEvent]) -> None:
    # The official client gives up on a slow non-streamed call (its timeout) and closes its connection.
    via = openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=keys.app_key, max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        await via.chat.completions.create(model="slow", messages=[{"role": "user", "content": "go"}])
    await via.close()
    e = await next_event(events)
    assert (e.status, e.error_type, e.model) == ("error", "client_disconnected", "slow")
    # The router cancelled its upstream call and closed that connection: when the simulator's 4 s answer
    # is ready, nobody is there to take it (before, the router waited for it and read it).
    await asyncio.wait_for(sim.disconnected.wait(), timeout=15)
    assert sim.disconnects == 1


@pytest.mark.parametrize("path", ["chat/completions", "completions", "embeddings", "responses"])
async def test_a_body_that_is_not_utf8_is_a_400_in_openais_shape(router: Any, keys: Bootstrap, path: str) -> None:
    # Before: msgspec's UnicodeDecodeError escaped the decoding: a plain-text 500 and an ERROR traceback.
    body = b'{"model":"m","messages":[{"role":"user","content":"\xff"}],"prompt":"a","input":"a"}'
    async with aiohttp.ClientSession() as http, http.post(
            f"{router.url}/v1/{path}", data=body, headers={"Authorization": f"Bearer {keys.app_key}",
                                                           "Content-Type": "application/json"}) as resp:
        status, error = resp.status, (await resp.json())["error"]
    assert status == 400 and error["type"] == "invalid_request_error"
    assert "JSON is not valid UTF-8" in error["message"]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PUT", "", b'{"stable_release":"\xff"}'),
    ("PATCH", "", b'{"canary_release":"\xff"}'),
    ("POST", "/promote", b'{"to":"\xff"}'),
    ("POST", "/pause", b'{"reason":"\xff"}'),
], ids=["put", "patch", "promote", "pause"])
async def test_an_admin_body_that_is_not_utf8_is_refused_in_the_apis_shape(
        router: Any, keys: Bootstrap, method: str, path: str, body: bytes) -> None:
    async with aiohttp.ClientSession() as http, http.request(
            method, f"{router.url}/lockgate/v1/deployments/zz{path}", data=body,
            headers={"Authorization": f"Bearer {keys.admin_key}", "Content-Type": "application/json"}) as resp:
        status, error = resp.status, (await resp.json())["error"]
    assert status in (400, 409) and "JSON is not valid UTF-8" in error["message"], (status, error)


async def test_every_v1_answer_is_in_openais_error_shape(router: Any, sim: SimServer, keys: Bootstrap) -> None:
    # Before: GET /v1/models/{id} (models.retrieve), unknown /v1 paths (moderations.create) and wrong methods got
    # aiohttp's plain-text 404/405, which the SDK raises without a message or code.
    via, _ = clients(router, sim, keys)
    assert (await via.models.retrieve("claude-m")).id == "claude-m"  # a name GET /v1/models lists
    assert (await via.models.retrieve("m")).id == "m"  # listed from the passthrough endpoint's own list
    with pytest.raises(openai.NotFoundError) as caught:
        await via.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found" and "'no-such-model'" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        await via.moderations.create(input="hi")
    assert caught.value.type == "invalid_request_error" and "POST /v1/moderations" in caught.value.message
    async with aiohttp.ClientSession() as http, http.get(
            f"{router.url}/v1/chat/completions", headers={"Authorization": f"Bearer {keys.app_key}"}) as resp:
        status, allow, error = resp.status, resp.headers.get("Allow"), (await resp.json())["error"]
    assert (status, allow, error["type"]) == (405, "POST", "invalid_request_error")
