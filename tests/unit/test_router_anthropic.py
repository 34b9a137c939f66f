"""OpenAI chat completions <-> Anthropic Messages translation (pure)."""

from __future__ import annotations

import json

import pytest

from lockgate import anthropicwire as anthropic
from lockgate.llmwire import Usage

pytestmark = pytest.mark.timeout(30)


def test_request_moves_system_merges_turns_and_maps_tools() -> None:
    body = {
        "model": "claude", "stream": True, "temperature": 0.2, "stop": "END", "user": "u1",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "no lies"}]},
            {"role": "user", "content": "weather?"},
            {"role": "user", "content": [{"type": "text", "text": "in Paris"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "wx", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": [{"type": "function", "function": {"name": "wx", "description": "weather",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": "required",
        "stream_options": {"include_usage": True},
    }
    out = anthropic.request(body)
    assert out["system"] == "be brief\n\nno lies"
    assert out["max_tokens"] == anthropic.DEFAULT_MAX_TOKENS
    assert (out["stream"], out["temperature"], out["stop_sequences"], out["metadata"]) == (
        True, 0.2, ["END"], {"user_id": "u1"})
    assert [t["role"] for t in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "weather?"}, {"type": "text", "text": "in Paris"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}}]
    assert out["messages"][1]["content"] == [{"type": "tool_use", "id": "call_1", "name": "wx",
                                              "input": {"city": "Paris"}}]
    assert out["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]
    assert out["tools"] == [{"name": "wx", "description": "weather", "input_schema": {"type": "object"}}]
    assert out["tool_choice"] == {"type": "any"}
    assert "stream_options" not in out


@pytest.mark.parametrize(("choice", "want"), [
    ("auto", {"type": "auto"}), ("none", {"type": "none"}),
    ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"})])
def test_tool_choice(choice: object, want: dict[str, str]) -> None:
    assert anthropic.request({"messages": [], "tool_choice": choice, "max_tokens": 5})["tool_choice"] == want


@pytest.mark.parametrize("body", [{"n": 2}, {"logprobs": True}, {"messages": [{"role": "function", "content": "x"}]}])
def test_untranslatable_requests_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(anthropic.Untranslatable):
        anthropic.request({"messages": [], **body})


def test_response_maps_text_tools_stop_reason_and_cached_usage() -> None:
    msg = {"id": "msg_1", "type": "message", "model": "claude-x", "stop_reason": "tool_use",
           "content": [{"type": "text", "text": "let me "}, {"type": "text", "text": "check"},
                       {"type": "tool_use", "id": "toolu_1", "name": "wx", "input": {"city": "Paris"}}],
           "usage": {"input_tokens": 10, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 5,
                     "output_tokens": 7}}
    out = anthropic.response(msg, created=1)
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "let me check"
    assert choice["message"]["tool_calls"] == [{"id": "toolu_1", "type": "function",
                                                "function": {"name": "wx", "arguments": '{"city":"Paris"}'}}]
    assert out["usage"] == {"prompt_tokens": 45, "completion_tokens": 7, "total_tokens": 52,
                            "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 5,
                                                      "cache_write_1h_tokens": 0}}
    assert (out["id"], out["model"], out["object"]) == ("msg_1", "claude-x", "chat.completion")


@pytest.mark.parametrize(("reason", "want"), [("end_turn", "stop"), ("stop_sequence", "stop"),
                                              ("max_tokens", "length"), ("tool_use", "tool_calls"),
                                              ("refusal", "content_filter"), ("new_reason", "new_reason")])
def test_stop_reasons(reason: str, want: str) -> None:
    assert anthropic.finish_reason(reason) == want


def test_error_body() -> None:
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert anthropic.error(body)["error"] == {"message": "Overloaded", "type": "overloaded_error", "param": None,
                                              "code": None}


def test_stream_events_become_openai_chunks() -> None:
    tr = anthropic.StreamTranslator(include_usage=True, created=1)
    events = [
        {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x",
                                              "usage": {"input_tokens": 4, "cache_read_input_tokens": 6,
                                                        "output_tokens": 1}}},
        {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1",
                                                                      "name": "wx", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"ci"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "ty\":1}"}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]
    chunks = [c for e in events for c in tr.feed(e)]
    assert all(c["id"] == "msg_1" and c["model"] == "claude-x" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "Hi there"
    calls = [tc for d in deltas for tc in d.get("tool_calls", ())]
    assert calls[0] == {"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "wx", "arguments": ""}}
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"city": 1}
    assert all(tc["index"] == 0 for tc in calls)  # the first tool call, though Anthropic's block index is 1
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19, "prompt_tokens_details": {"cached_tokens": 6}}
    assert tr.finished


def test_stream_without_usage_and_error_event() -> None:
    tr = anthropic.StreamTranslator(include_usage=False)
    tr.feed({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}})
    assert tr.feed({"type": "message_stop"}) == []
    with pytest.raises(anthropic.Untranslatable, match="Overloaded"):
        tr.feed({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


@pytest.mark.parametrize("bad", [10**30, -5, "many", None, True])
def test_usage_that_is_no_count_is_passed_on_never_added(bad: object) -> None:
    # Before: a string or None in a count raised TypeError (a 500), 10^30 was summed into the prompt as it came.
    u = anthropic.usage({"input_tokens": 5, "cache_read_input_tokens": bad, "output_tokens": 2})
    if bad is None:  # absent: nothing cached
        assert (u["prompt_tokens"], u["total_tokens"]) == (5, 7)
    else:
        assert u["prompt_tokens"] == bad and u["total_tokens"] == bad and u["completion_tokens"] == 2
    # No usage (or not a mapping): no counts, so the router does not take them for 0 (llmwire.token_usage).
    assert anthropic.usage(["not", "a", "dict"]) == {"prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize("usage", [{"output_tokens": 11}, {"input_tokens": 5200, "output_tokens": None},
                                   {"input_tokens": None, "output_tokens": 3}])
def test_usage_missing_a_count_is_passed_on_missing_never_as_zero(usage: dict[str, object]) -> None:
    # Found by a probe (p8): a count Anthropic left out became 0, so a 5,200-token prompt was charged 11 tokens.
    got = Usage(**{k: v for k, v in anthropic.usage(usage).items() if k != "prompt_tokens_details"}).tokens()
    assert got.doubt.endswith("missing; counted as 0")
    assert "total_tokens" not in anthropic.usage(usage)


def test_anthropic_request_id_and_rate_limit_headers_get_openais_names() -> None:
    got = anthropic.returned_headers({"Request-Id": "req_1", "anthropic-ratelimit-requests-limit": "50",
                                      "anthropic-ratelimit-requests-remaining": "49",
                                      "anthropic-ratelimit-requests-reset": "2026-12-05T00:00:01Z",
                                      "anthropic-ratelimit-tokens-limit": "1000",
                                      "anthropic-ratelimit-tokens-remaining": "900",
                                      "anthropic-ratelimit-tokens-reset": "2026-12-05T00:00:02Z",
                                      "anthropic-ratelimit-input-tokens-limit": "5", "content-type": "x"})
    assert got == {"x-request-id": "req_1", "x-ratelimit-limit-requests": "50", "x-ratelimit-remaining-requests": "49",
                   "x-ratelimit-reset-requests": "2026-12-05T00:00:01Z", "x-ratelimit-limit-tokens": "1000",
                   "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "2026-12-05T00:00:02Z"}
