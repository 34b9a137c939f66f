"""The router's events cut to fit one bus message (services/router/fit.py): pure, no I/O."""

from __future__ import annotations

import msgspec

from lockgate.contracts import InferenceEvent
from lockgate.contracts.inference import SECRETS_MASKED
from lockgate.outbox import BATCH_BYTES, encode_event
from lockgate.services.router.fit import EVENT_BYTES, Tally, encode_served
from lockgate.services.router.wire import Choices
from lockgate.textbound import TEXT_BYTES, TRUNCATED, cut


def _event(**fields: object) -> InferenceEvent:
    base: dict[str, object] = {"tenant": "acme", "app": "shop", "model": "m", "input_tokens": 300_000,
                               "output_tokens": 9, "latency_ms": 12.5,
                               "attributes": {"cache": "miss", "lockgate.charged_input_tokens": "7"}}
    return InferenceEvent(**{**base, **fields})  # type: ignore[arg-type]


def _decoded(event: InferenceEvent, sizes: dict[str, int] | None = None) -> dict:
    data = encode_served(event, sizes).data
    assert len(data) <= EVENT_BYTES < BATCH_BYTES
    return msgspec.json.decode(data)


def test_cut_keeps_whole_characters_within_the_byte_limit() -> None:
    text = "aé€😀" * 10  # 1, 2, 3 and 4 bytes
    for limit in range(0, 45):
        short = cut(text, limit)
        assert len(short.encode()) <= limit and text.startswith(short) and len(short.encode()) > limit - 4
    assert cut(text, 1000) is text


def test_a_usual_event_is_encoded_as_before() -> None:
    event = _event(prompt="hi", response="hello")
    assert encode_served(event).data == encode_event(event).data


def test_long_text_is_cut_and_marked_and_the_numbers_kept() -> None:
    got = _decoded(_event(prompt="p" * 300_000, response="é" * 700_000))
    assert len(got["prompt"]) == TEXT_BYTES and len(got["response"].encode()) == TEXT_BYTES
    assert got["attributes"][TRUNCATED] == "prompt:300000,response:1400000"
    assert (got["input_tokens"], got["output_tokens"], got["latency_ms"], got["model"]) == (300_000, 9, 12.5, "m")
    assert got["attributes"]["lockgate.charged_input_tokens"] == "7"


def test_a_secret_across_the_cut_is_scrubbed_first() -> None:
    secret = "sk-" + "A" * 40
    got = _decoded(_event(prompt="x" * (TEXT_BYTES - 10) + " " + secret + " tail" * 20_000))
    assert "sk-" not in got["prompt"] and "AAAA" not in got["prompt"]
    assert got["prompt"].endswith(" [REDACTED")  # the mask was cut, not the secret (cut first: "sk-AAAAAA")


def test_an_event_still_too_large_loses_its_text_never_its_accounting() -> None:
    # Control characters encode to 6 bytes each: three capped fields of them are over the event's bound.
    got = _decoded(_event(prompt="\x01" * 200_000, response="\x01" * 200_000,
                          attributes={"gen_ai.output.messages": "\x01" * 200_000, "cache": "miss"}))
    assert got.get("prompt") is None and got.get("response") is None
    assert len(got["attributes"]["gen_ai.output.messages"]) == 256
    assert got["attributes"][TRUNCATED] == "prompt:200000,response:200000,gen_ai.output.messages:200000"
    assert (got["input_tokens"], got["output_tokens"], got["attributes"]["cache"]) == (300_000, 9, "miss")


def test_sizes_cut_as_the_event_was_built_are_reported_and_not_cut_again() -> None:
    messages = '[{"parts":[' + '"x",' * 20_000 + '"y"]}]'  # over TEXT_BYTES, cut part by part already
    got = _decoded(_event(prompt="hi", attributes={"gen_ai.output.messages": messages}),
                   {"gen_ai.output.messages": 2_000_000})
    assert got["attributes"]["gen_ai.output.messages"] == messages
    assert got["attributes"][TRUNCATED] == "gen_ai.output.messages:2000000"


def test_a_cut_event_still_counts_the_secrets_masked_in_its_answer() -> None:
    # Counted on the whole answer, before the cut: the secret past the cut was masked all the same.
    key = "sk-proj-" + "B" * 40
    got = _decoded(_event(prompt=f"mine is {key}", response=f"{key} " + "x" * 700_000 + f" {key}"))
    assert got["attributes"][SECRETS_MASKED] == "api_key:2" and TRUNCATED in got["attributes"]
    assert key not in got["response"] and key not in got["prompt"]


def test_only_the_secrets_pii_free_looks_for_are_counted_by_kind() -> None:
    # The scrub masks each credential a keyword names; only the shapes of known credentials count (probe p71 F3:
    # placeholder code counted "3", and its answers scored pii_free 0).
    placeholders = 'OpenAI(api_key="YOUR_API_KEY"); connect(password="password"); "postgres://user:pass@localhost"'
    got = _decoded(_event(response=placeholders))
    assert "YOUR_API_KEY" not in got["response"] and SECRETS_MASKED not in got["attributes"]
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    keys = f'{placeholders} token={jwt} AKIAIOSFODNN7EXAMPLE, ASIAIOSFODNN7EXAMPLE and -----BEGIN PRIVATE KEY-----\nAB=='
    got = _decoded(_event(response=keys))
    assert got["attributes"][SECRETS_MASKED] == "aws_access_key:2,jwt:1,private_key:1"
    assert "AKIA" not in got["response"] and jwt not in got["response"]


def test_the_secrets_masked_in_tool_calls_and_other_choices_are_counted_with_the_response() -> None:
    # Every choice's text and every tool call's arguments, name and id, counted before the scrub; choice 0's text is
    # the response, counted once. Before, probe p71 residual: only the response's ("api_key:1"), the rest masked
    # uncounted.
    key, aws = "sk-proj-" + "C" * 40, "AKIAIOSFODNN7EXAMPLE"
    out = Choices()
    out.add_text(0, f"here: {key}")
    out.add_text(1, f"and {key}")
    out.add_tool(0, 0, aws, "send_email", '{"to": "ops", "body": "the key:\\n' + key + '"}')
    out.add_tool(1, 0, "call_1", aws, '{"q": "hi"}')
    tally = Tally()
    messages, _ = out.output_messages(TEXT_BYTES, tally.scrub)
    assert key not in messages and aws not in messages
    event = _event(response=out.text(0), attributes={"gen_ai.output.messages": messages, SECRETS_MASKED: "jwt:9"})
    got = msgspec.json.decode(encode_served(event, None, tally.counts).data)
    assert got["attributes"][SECRETS_MASKED] == "api_key:3,aws_access_key:2"


def test_output_messages_with_nothing_masked_cost_no_count() -> None:
    out = Choices()
    out.add_text(1, "no secret here, only words of an answer well over forty characters long")
    out.add_tool(0, 0, "call_0", "send_email", '{"to": "ops", "body": "nothing to hide"}')
    tally = Tally()
    out.output_messages(TEXT_BYTES, tally.scrub)
    assert not tally.counts
    got = _decoded(_event(response="hi", attributes={"gen_ai.output.messages": "[]", SECRETS_MASKED: "api_key:1"}))
    assert SECRETS_MASKED not in got["attributes"]  # an earlier value is never the router's count
