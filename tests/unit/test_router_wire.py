"""Router wire helpers: request patching, completion and chunk parsing, error excerpts."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from lockgate.contracts.inference import request_digest
from lockgate.llmwire import Message, decode_api_request, decode_completion, decode_request, last_user_text
from lockgate.services.router.proxy import _Record
from lockgate.services.router.wire import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    LIMIT_FIELDS,
    RESPONSES,
    ErrorAnswer,
    chat_digest,
    openai_error,
    parse_chunk,
    parse_completion,
    parse_embeddings,
    parse_response,
    parse_response_event,
    patch_body,
)

pytestmark = pytest.mark.timeout(30)


def test_patch_body_overrides_model_and_requests_usage() -> None:
    body = b'{"model":"a","stream":true,"stream_options":{"x":1},"messages":[]}'
    out = msgspec.json.decode(patch_body(body, "b", True))
    assert out["model"] == "b" and out["stream_options"] == {"x": 1, "include_usage": True}


def test_last_user_text_handles_content_parts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"text": "b"}]
    msgs = [Message(role="user", content="first"), Message(role="assistant", content="x"),
            Message(role="user", content=parts)]
    assert last_user_text(msgs) == "a b"
    assert last_user_text([Message(role="system", content="s")]) is None


def test_parse_completion_and_chunks() -> None:
    rec = _Record("ok")
    parse_completion(b'{"model":"m-1","choices":[{"message":{"content":"hi"},"finish_reason":"length"}],'
                     b'"usage":{"prompt_tokens":3,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":2}}}',
                     rec)
    assert (rec.response_model, rec.text, rec.finish_reason) == ("m-1", "hi", "length")
    assert (rec.input_tokens, rec.output_tokens, rec.cached_tokens) == (3, 1, 2)
    rec = _Record("ok")
    assert not parse_chunk(b'{"model":"m","choices":[{"delta":{"content":"he"}}]}', rec)
    assert not parse_chunk(b'{"choices":[{"delta":{},"finish_reason":"stop"}]}', rec)
    assert parse_chunk(b'{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}', rec)
    assert (rec.text, rec.finish_reason, rec.output_tokens) == ("he", "stop", 2)
    assert not rec.out.has_more_than_text()  # one choice, text only: no output-messages attribute


def test_streamed_choices_keep_their_own_buffers() -> None:
    rec = _Record("ok")
    for chunk in (b'{"choices":[{"index":0,"delta":{"content":"a"}}]}', b'{"choices":[{"index":1,"delta":{"content":"x"}}]}',
                  b'{"choices":[{"index":0,"delta":{"content":" b"}}]}', b'{"choices":[{"index":1,"delta":{"content":" y"}}]}',
                  b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
                  b'{"choices":[{"index":1,"delta":{},"finish_reason":"length"}]}'):
        parse_chunk(chunk, rec)
    assert (rec.text, rec.finish_reason) == ("a b", "stop")
    assert json.loads(rec.out.output_messages()[0]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "a b"}], "finish_reason": "stop"},
        {"role": "assistant", "parts": [{"type": "text", "content": "x y"}], "finish_reason": "length"}]


def test_tool_calls_recorded_whole_and_from_stream_deltas() -> None:
    whole = _Record("ok")
    parse_completion(b'{"choices":[{"index":0,"message":{"content":null,"tool_calls":[{"id":"c1","type":"function",'
                     b'"function":{"name":"f","arguments":"{\\"q\\":1}"}}]},"finish_reason":"tool_calls"}]}', whole)
    streamed = _Record("ok")
    for chunk in (b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f","arguments":""}}]}}]}',
                  b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"q\\""}}]}}]}',
                  b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}',
                  b'{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}'):
        parse_chunk(chunk, streamed)
    want = [{"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "f", "arguments": '{"q":1}'}],
             "finish_reason": "tool_calls"}]
    assert json.loads(whole.out.output_messages()[0]) == json.loads(streamed.out.output_messages()[0]) == want
    assert whole.text == "" and whole.out.has_more_than_text()


def test_refusals_are_the_answers_text_marked_and_a_legacy_function_call_is_a_tool_call() -> None:
    """Probe p79 F1: both were recorded as an empty answer."""
    rec = _Record("ok")
    parse_completion(b'{"choices":[{"index":0,"message":{"content":null,"refusal":"no."},"finish_reason":"stop"}]}',
                     rec)
    assert (rec.text, json.loads(rec.out.output_messages()[0])) == ("no.", [
        {"role": "assistant", "parts": [{"type": "refusal", "content": "no."}], "finish_reason": "stop"}])
    # The evaluator reads an answer's text as the router records it (a must_refuse probe reads the refusal).
    assert decode_completion(b'{"choices":[{"message":{"content":null,"refusal":"no."}}]}').choices[0].message.text(
    ) == "no."
    both = _Record("ok")  # text and a refusal: both are the answer's text, each its own part
    parse_completion(b'{"choices":[{"index":0,"message":{"content":"a","refusal":"b"}}]}', both)
    assert (both.text, [p["type"] for p in json.loads(both.out.output_messages()[0])[0]["parts"]]) == (
        "a\nb", ["text", "refusal"])
    streamed = _Record("ok")
    for chunk in (b'{"choices":[{"index":0,"delta":{"function_call":{"name":"f","arguments":""}}}]}',
                  b'{"choices":[{"index":0,"delta":{"function_call":{"arguments":"{}"}}}]}',
                  b'{"choices":[{"index":0,"delta":{},"finish_reason":"function_call"}]}'):
        parse_chunk(chunk, streamed)
    assert streamed.out.finished() and json.loads(streamed.out.output_messages()[0])[0]["parts"] == [
        {"type": "tool_call", "id": "", "name": "f", "arguments": "{}"}]
    responses = _Record("ok")
    parse_response_event(b'{"type":"response.refusal.delta","delta":"no"}', responses)
    assert (responses.text, responses.out.has_more_than_text()) == ("no", True)
    parse_response(b'{"status":"completed","output":[{"type":"message","content":[{"type":"refusal",'
                   b'"refusal":"no."}]}]}', responses)
    assert (responses.text, responses.finish_reason) == ("no.", "stop")


def test_content_parts_are_read_for_their_text_and_a_null_model_names_none() -> None:
    """Probe p79 F4: an answer the SDK reads was refused as undecodable (a 502)."""
    rec = _Record("ok")
    parse_completion(b'{"model":null,"choices":[{"index":0,"message":{"content":[{"type":"thinking","thinking":'
                     b'[{"type":"text","text":"hmm"}]},{"type":"text","text":"Par"},{"type":"text","text":"is."}]}}]}',
                     rec)
    assert (rec.text, rec.response_model) == ("Paris.", "")
    odd = _Record("ok")
    parse_chunk(b'{"model":null,"choices":[{"index":0,"delta":{"content":{"unexpected":1}}}]}', odd)
    assert odd.text == ""


@pytest.mark.parametrize("decode", [decode_request, decode_api_request])
def test_a_null_stream_is_no_stream(decode: Any) -> None:
    """Probe p79 F3: refused, 400 "Expected `bool`, got `null`"."""
    assert decode(b'{"model":"m","stream":null}').stream is False
    assert decode(b'{"model":"m","stream":true}').stream is True


def test_responses_answers_and_events() -> None:
    body = (b'{"model":"m","status":"completed","output":[{"type":"message","content":[{"type":"output_text",'
            b'"text":"hi"}]},{"type":"function_call","call_id":"c","name":"f","arguments":"{}"}],'
            b'"usage":{"input_tokens":3,"output_tokens":2,"input_tokens_details":{"cached_tokens":1}}}')
    rec = _Record("ok")
    parse_response(body, rec)
    assert (rec.text, rec.finish_reason, rec.input_tokens, rec.output_tokens, rec.cached_tokens) == (
        "hi", "tool_calls", 3, 2, 1)
    streamed = _Record("ok")
    assert not parse_response_event(b'{"type":"response.output_text.delta","delta":"h"}', streamed)
    assert streamed.text == "h"
    parse_response_event(b'{"type":"response.completed","response":' + body + b"}", streamed)
    assert (streamed.text, streamed.input_tokens, streamed.out.output_messages()) == (
        "hi", 3, rec.out.output_messages())


def test_the_ids_a_responses_answer_is_kept_under_are_noted_as_they_appear() -> None:
    """The response's id and its output items' (owners.py claims them before the client sees them), once each, and
    none of an answer the provider keeps nothing of."""
    body = (b'{"id":"resp_1","status":"completed","output":[{"type":"message","id":"msg_1","content":[]},'
            b'{"type":"function_call","id":"fc_1","call_id":"c","name":"f","arguments":"{}"},{"type":"reasoning"}]}')
    rec = _Record("ok")
    parse_response(body, rec)
    assert rec.kept == ["resp_1", "msg_1", "fc_1"]
    streamed = _Record("ok")
    parse_response_event(b'{"type":"response.created","response":{"id":"resp_1","output":[]}}', streamed)
    assert streamed.kept == ["resp_1"]
    parse_response_event(b'{"type":"response.output_item.added","item":{"type":"message","id":"msg_1"}}', streamed)
    assert streamed.kept == ["resp_1", "msg_1"]
    parse_response_event(b'{"type":"response.completed","response":' + body + b"}", streamed)
    assert streamed.kept == ["resp_1", "msg_1", "fc_1"]
    unstored = _Record("ok")
    parse_response_event(b'{"type":"response.created","response":{"id":"resp_1","store":false}}', unstored)
    parse_response_event(b'{"type":"response.output_item.added","item":{"type":"message","id":"msg_1"}}', unstored)
    parse_response(body.replace(b'"status"', b'"store":false,"status"'), unstored)
    assert unstored.kept == []


def test_a_code_interpreter_container_is_noted_with_its_item_whatever_the_answer_keeps() -> None:
    """The container a code interpreter call ran in outlives its answer (probe p49 F2): noted even with `store: false`."""
    call = b'{"type":"code_interpreter_call","id":"ci_1","container_id":"cntr_1","outputs":[]}'
    rec = _Record("ok")
    parse_response(b'{"id":"resp_1","output":[' + call + b"," + call.replace(b"ci_1", b"ci_2") + b"]}", rec)
    assert rec.kept == ["resp_1", "ci_1", "cntr_1", "ci_2"]
    streamed = _Record("ok")
    parse_response_event(b'{"type":"response.created","response":{"id":"resp_1","store":false}}', streamed)
    parse_response_event(b'{"type":"response.output_item.added","item":' + call + b"}", streamed)
    assert streamed.kept == ["cntr_1"]


def test_error_bodies_and_error_events_are_failures() -> None:
    # A 200 whose body is an error raises (the proxy answers 502); a stream's error event is passed on
    # but the call is recorded as failed; a Responses turn that failed is a failure answered or streamed.
    for parse in (parse_completion, parse_embeddings):
        with pytest.raises(ErrorAnswer):
            parse(b'{"error":{"message":"overloaded"}}', _Record("ok"))
    for parse_event, event in ((parse_chunk, b'{"error":{"message":"overloaded"}}'),
                               (parse_response_event, b'{"type":"error","code":"server_error","message":"x"}')):
        rec = _Record("ok")
        parse_event(event, rec)
        assert (rec.status, rec.error_type) == ("error", "upstream_stream_error")
    rec = _Record("ok")
    parse_response(b'{"model":"m","status":"failed","error":{"code":"server_error","message":"x"}}', rec)
    assert (rec.status, rec.error_type, rec.finish_reason) == ("error", "response_failed", "failed")


@pytest.mark.parametrize(
    ("data", "want"),
    [(b'{"error":{"message":"boom"}}', "boom"), (b'{"error":"flat"}', "flat"), (b"<html>oops", "<html>oops"),
     (b"", "(empty body)")],
)
def test_openai_error_excerpt(data: bytes, want: str) -> None:
    assert openai_error(data) == want


# Usage an upstream reports with a billed count missing (probe p8, finding 4) or a total that is no count: not
# believed, so settlement charges the call's worst case (admission._final) as for a negative or string count. A
# total above the parts counts its excess as output (reasoning a provider leaves out of its parts).

_CHAT = b'{"model":"m","choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"usage":%s}'


@pytest.mark.parametrize(("usage", "why"), [
    (b'{"completion_tokens":11,"total_tokens":4013}', "prompt_tokens missing; counted as 0"),
    (b'{"prompt_tokens":5200}', "completion_tokens missing; counted as 0"),
    (b'{"total_tokens":13}', "prompt_tokens and completion_tokens missing; counted as 0"),
    (b'{"prompt_tokens":2,"completion_tokens":11,"total_tokens":"13"}', "total_tokens='13' is no token count"),
], ids=["no-prompt", "no-completion", "total-only", "total-string"])
def test_usage_missing_a_billed_count_or_with_a_total_that_is_no_count_is_not_believed(usage: bytes, why: str) -> None:
    for parse in (parse_completion, parse_chunk):  # whole, and a stream's usage chunk
        rec = _Record("ok")
        parse(_CHAT % usage, rec)
        assert rec.attributes["lockgate.usage_warning"] == f"usage not believed: {why}"


@pytest.mark.parametrize(("usage", "counted"), [
    (b'{"prompt_tokens":2,"completion_tokens":11}', (2, 11)),  # no total: many providers
    (b'{"prompt_tokens":2,"completion_tokens":11,"total_tokens":null}', (2, 11)),
    (b'{"prompt_tokens":2,"completion_tokens":11,"total_tokens":13}', (2, 11)),
    (b'{"prompt_tokens":2.5,"completion_tokens":10.5,"total_tokens":13}', (3, 11)),
    # Parts below the total (reasoning left out of completion_tokens): the excess is output, never dropped.
    (b'{"prompt_tokens":2,"completion_tokens":11,"total_tokens":4013}', (2, 4011)),
    (b'{"prompt_tokens":5200,"completion_tokens":11,"total_tokens":13}', (5200, 11)),  # the parts stand
])
def test_usage_with_both_counts_is_believed_and_a_larger_total_counts_its_excess_as_output(
        usage: bytes, counted: tuple[int, int]) -> None:
    rec = _Record("ok")
    parse_completion(_CHAT % usage, rec)
    assert "lockgate.usage_warning" not in rec.attributes and (rec.input_tokens, rec.output_tokens) == counted


def test_embeddings_bill_input_alone_and_responses_check_their_own_counts() -> None:
    rec = _Record("ok")
    parse_embeddings(b'{"model":"e","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}', rec)
    assert "lockgate.usage_warning" not in rec.attributes and rec.input_tokens == 8
    parse_embeddings(b'{"model":"e","data":[],"usage":{"total_tokens":8}}', rec)
    assert rec.attributes["lockgate.usage_warning"] == "usage not believed: prompt_tokens missing; counted as 0"
    rec = _Record("ok")
    parse_embeddings(b'{"model":"e","data":[],"usage":{"prompt_tokens":8,"total_tokens":80}}', rec)
    assert "lockgate.usage_warning" not in rec.attributes and rec.input_tokens == 80  # embeddings bill input
    done = b'{"model":"m","status":"completed","output":[],"usage":%s}'
    rec = _Record("ok")
    parse_response(done % b'{"output_tokens":11,"total_tokens":4013}', rec)
    assert rec.attributes["lockgate.usage_warning"] == "usage not believed: input_tokens missing; counted as 0"
    rec = _Record("ok")
    event = b'{"type":"response.completed","response":{"model":"m","status":"completed","output":[],"usage":%s}}'
    parse_response_event(event % b'{"input_tokens":2,"output_tokens":11,"total_tokens":"x"}', rec)
    assert "total_tokens='x' is no token count" in rec.attributes["lockgate.usage_warning"]
    parse_response_event(event % b'{"input_tokens":2,"output_tokens":11,"total_tokens":4013}', rec)
    assert "lockgate.usage_warning" not in rec.attributes  # the last usage is the call's
    assert (rec.input_tokens, rec.output_tokens) == (2, 4011)


# service_tier (probe p8, finding 2): a client does not choose the operator's price; the answer's tier is recorded.


def test_patch_body_drops_the_clients_service_tier_and_sends_the_releases() -> None:
    body = b'{"model":"a","service_tier":"priority","service\\u005ftier":"priority","messages":[]}'
    assert "service_tier" not in msgspec.json.decode(patch_body(body, None, False))
    out = msgspec.json.decode(patch_body(body, "b", True, {"service_tier": "flex", "temperature": 0}))
    assert (out["service_tier"], out["temperature"], out["model"]) == ("flex", 0, "b")


RELEASE_PARAMS = {"temperature": 0, "top_p": 0.5, "seed": 7, "stop": ["x"], "presence_penalty": 0.1,
                  "frequency_penalty": 0.2, "max_tokens": 300, "max_completion_tokens": 200, "service_tier": "flex"}


@pytest.mark.parametrize(("op", "sent"), [
    (CHAT, RELEASE_PARAMS),
    (COMPLETIONS, {**{k: v for k, v in RELEASE_PARAMS.items() if k not in ("max_completion_tokens", "service_tier")},
                   "max_tokens": 200}),
    (EMBEDDINGS, {}),
    (RESPONSES, {"temperature": 0, "top_p": 0.5, "service_tier": "flex", "max_output_tokens": 200}),
])
def test_a_releases_params_go_to_each_operation_under_its_own_names(op: Any, sent: dict[str, Any]) -> None:
    # Probe s4: every param went into every operation's body (an embeddings request with `temperature`, a Responses
    # request with `max_tokens`, which the router itself refuses from a client there): an upstream that checks fields
    # answers 400. Now only what the operation takes, under its name; chat's two output limits onto one: the smaller.
    out = msgspec.json.decode(patch_body(b'{"model":"a","input":"x"}', "b", False, RELEASE_PARAMS, op))
    assert {k: v for k, v in out.items() if k not in ("model", "input")} == sent


@pytest.mark.parametrize(("op", "client", "sent"), [
    (CHAT, {"max_completion_tokens": 5000}, {"max_tokens": 300}),
    (CHAT, {"max_tokens": 5000, "max_completion_tokens": 5000}, {"max_tokens": 300}),
    (CHAT, {"max_completion_tokens": 10}, {"max_tokens": 300}),  # README: the release's replaces the client's
    (COMPLETIONS, {"max_tokens": 5000}, {"max_tokens": 300}),
    (RESPONSES, {"max_output_tokens": 5000}, {"max_output_tokens": 300}),
])
def test_a_releases_output_limit_replaces_every_one_of_the_clients(op: Any, client: dict[str, Any],
                                                                   sent: dict[str, Any]) -> None:
    # Probe p17 F2: the release's max_tokens replaced the client's max_tokens alone; its max_completion_tokens stayed,
    # which the Anthropic translation and newer servers read first (OpenAI refuses a body with both).
    body = msgspec.json.encode({"model": "a", "input": "x", **client})
    out = msgspec.json.decode(patch_body(body, "b", False, {"max_tokens": 300, "temperature": 0}, op))
    assert {k: v for k, v in out.items() if k in LIMIT_FIELDS} == sent
    # A release without a limit leaves the client's as they came.
    out = msgspec.json.decode(patch_body(body, "b", False, {"temperature": 0}, op))
    assert {k: v for k, v in out.items() if k in LIMIT_FIELDS} == client


def test_the_tier_an_answer_was_served_at_is_recorded() -> None:
    rec = _Record("ok")
    parse_completion(b'{"model":"m","service_tier":"priority","choices":[],"usage":{"prompt_tokens":1,'
                     b'"completion_tokens":1}}', rec)
    assert rec.attributes["openai.response.service_tier"] == "priority"
    rec = _Record("ok")
    parse_chunk(b'{"model":"m","service_tier":"flex","choices":[{"delta":{"content":"a"}}]}', rec)
    assert rec.attributes["openai.response.service_tier"] == "flex"
    rec = _Record("ok")
    parse_response(b'{"model":"m","status":"completed","service_tier":"priority","output":[]}', rec)
    assert rec.attributes["openai.response.service_tier"] == "priority"
    rec = _Record("ok")
    parse_completion(b'{"model":"m","service_tier":42,"choices":[]}', rec)  # no tier: not recorded, not a 502
    assert "openai.response.service_tier" not in rec.attributes


_MESSAGES = b'[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]'


@pytest.mark.parametrize(("extra", "plain"), [
    (b'', True),
    # how the answer is delivered, who asks, the operator's tier: the same answer
    (b', "stream": true, "stream_options": {"include_usage": true}, "user": "u1", "metadata": {"k": "v"}, '
     b'"store": false, "service_tier": "priority", "model": "anything"', True),
    (b', "temperature": 1.5, "max_tokens": 3', True),  # the release sets both: the client's are never sent
    (b', "temperature": 1.5, "max_completion_tokens": 3', True),  # its max_tokens replaces this one too (p17 F2)
    (b', "top_p": 0.5', False),  # the release does not set this one
    (b', "tools": [], "tool_choice": "required"', False),
    (b', "n": 2', False),
    (b', "response_format": {"type": "json_object"}', False),
    (b', "some_future_field": 1', False),  # not known not to change the answer: counted
])
def test_the_digest_of_a_chat_request_counts_what_may_change_its_answer(extra: bytes, plain: bool) -> None:
    # Probe p12 F5: a recorded eval took any request whose last user message was the case's question.
    body = b'{"model": "m", "messages": ' + _MESSAGES + extra + b"}"
    digest = chat_digest(body, "m", {"temperature": 0, "max_tokens": 64})
    assert (digest == request_digest(_MESSAGES)) is plain


def test_a_target_without_a_model_counts_the_clients_and_a_body_that_is_no_object_has_no_digest() -> None:
    body = b'{"model": "big", "messages": ' + _MESSAGES + b"}"
    assert chat_digest(body, "m", {}) == request_digest(_MESSAGES)
    assert chat_digest(body, "", {}) != request_digest(_MESSAGES)
    assert chat_digest(b"[1]", "m", {}) is None
