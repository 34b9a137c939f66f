"""The LLM simulator: OpenAI-shaped answers, streaming, errors, determinism, config loading."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import msgspec
import pytest

from lockgate.errors import ConfigError
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer, count_tokens, load_config

pytestmark = pytest.mark.timeout(30)

CONFIG = SimConfig(
    models={
        "m1": ModelSpec(answers={"What is 2+2?": "four"}, default="I do not know that one"),
        "flaky": ModelSpec(error_rate=0.5),
    },
    seed=7,
)


async def _post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(f"{url}/chat/completions", json=body) as resp:
        return resp.status, await resp.json()


async def test_answers_from_table_with_usage() -> None:
    async with SimServer(CONFIG) as sim, aiohttp.ClientSession() as s:
        status, data = await _post(s, sim.url, {"model": "m1", "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "  What is 2+2? "}]})
        assert status == 200
        assert data["object"] == "chat.completion"
        assert data["choices"][0]["message"]["content"] == "four"
        assert data["choices"][0]["finish_reason"] == "stop"
        assert data["usage"]["completion_tokens"] == 2
        assert data["usage"]["prompt_tokens"] == count_tokens("be brief What is 2+2?")
        _, other = await _post(s, sim.url, {"model": "m1", "messages": [{"role": "user", "content": "hm"}]})
        assert other["choices"][0]["message"]["content"] == "I do not know that one"
        assert sim.requests == {"m1": 2} and sim.total_requests == 2


async def test_streaming_sse_with_usage_chunk() -> None:
    async with SimServer(CONFIG) as sim, aiohttp.ClientSession() as s:
        body = {"model": "m1", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "x"}]}
        async with s.post(f"{sim.url}/chat/completions", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            lines = [ln.decode().strip() async for ln in resp.content if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "I do not know that one"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == count_tokens(text)


async def test_logprobs_only_when_asked_in_openai_shape() -> None:
    config = SimConfig(models={"m": ModelSpec(answers={"q": "it is four"}, logprob=-0.25)})
    async with SimServer(config) as sim, aiohttp.ClientSession() as s:
        msgs = [{"role": "user", "content": "q"}]
        _, plain = await _post(s, sim.url, {"model": "m", "messages": msgs})
        _, asked = await _post(s, sim.url, {"model": "m", "messages": msgs, "logprobs": True})
        body = {"model": "m", "messages": msgs, "logprobs": True, "stream": True}
        async with s.post(f"{sim.url}/chat/completions", json=body) as resp:
            lines = [ln.decode().strip() async for ln in resp.content if ln.strip()]
    assert plain["choices"][0]["logprobs"] is None
    content = asked["choices"][0]["logprobs"]["content"]
    assert [(t["token"], t["logprob"]) for t in content] == [("it", -0.25), (" is", -0.25), (" four", -0.25)]
    streamed = [c["choices"][0]["logprobs"]["content"][0]["token"] for c in map(lambda ln: json.loads(ln[6:]), lines[:-1])
                if c["choices"] and "logprobs" in c["choices"][0]]
    assert streamed == ["it", " is", " four"]
    assert ModelSpec().logprob == -0.1
    with pytest.raises(msgspec.ValidationError, match=r"Expected `float` <= 0.0 - at `\$.logprob`"):
        msgspec.convert({"logprob": 0.5}, ModelSpec)


async def test_unknown_model_is_openai_style_404_and_models_listed() -> None:
    async with SimServer(CONFIG) as sim, aiohttp.ClientSession() as s:
        status, data = await _post(s, sim.url, {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert status == 404 and data["error"]["code"] == "model_not_found"
        async with s.get(f"{sim.url}/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["m1", "flaky"]


async def test_errors_are_deterministic_given_the_seed() -> None:
    async def statuses() -> list[int]:
        async with SimServer(CONFIG) as sim, aiohttp.ClientSession() as s:
            return [(await _post(s, sim.url, {"model": "flaky", "messages": [{"role": "user", "content": "x"}]}))[0]
                    for _ in range(40)]

    first, second = await statuses(), await statuses()
    assert first == second
    assert set(first) == {200, 500}


def test_load_config_from_yaml(tmp_path: Path) -> None:
    p = tmp_path / "sim.yaml"
    p.write_text("seed: 3\nmodels:\n  a:\n    answers: {hi: hello}\n    latency_ms: 5\n")
    cfg = load_config(p)
    assert cfg.seed == 3 and cfg.models["a"].answers == {"hi": "hello"} and cfg.models["a"].latency_ms == 5


@pytest.mark.parametrize(
    ("text", "part"),
    [("models: [1, 2]", "invalid"), ("models:\n  a: {error_rate: 2}", "error_rate"), ("a: [", "not valid YAML"),
     ("seed: 1", "models")],
)
def test_load_config_rejects_bad_input(tmp_path: Path, text: str, part: str) -> None:
    p = tmp_path / "sim.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=part):
        load_config(p)
