"""The secret pattern table, format by format, and the masking of credential-named headers and attributes."""

from __future__ import annotations

import json

import pytest

from lockgate.contracts import InferenceEvent
from lockgate.redact import (
    MARK,
    scrub_bytes,
    scrub_event,
    scrub_json,
    scrub_mapping,
    scrub_secrets,
    scrub_value,
    shown_url,
)
from tests.integration.test_secrets import planted

FORMATS = planted()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_is_scrubbed_in_running_text(name: str) -> None:
    text, secret = FORMATS[name]
    for wrapped in (f"here: {text} ok", f'{{"k": "{text}"}}', text):
        out = scrub_secrets(wrapped)
        assert secret not in out and MARK in out, (name, out)


def test_json_escaped_private_key_in_raw_bytes() -> None:
    # A dead letter's payload is raw JSON: newlines inside the key are the two characters `\n`.
    raw = b'{"prompt": "-----BEGIN PRIVATE KEY-----\\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7\\n-----END PRIVATE KEY-----"}\xff'
    out = scrub_bytes(raw)
    assert b"MIIBVQ" not in out and out.endswith(b"\xff")


def test_credential_names_mask_the_whole_value() -> None:
    masked = scrub_mapping({"Authorization": "x", "X-Api-Key": "short", "api-key": "k", "Cookie": "a=b",
                            "Proxy-Authorization": "p", "db_password": "pw", "traceparent": "00-" + "a" * 32 + "-01",
                            "Nats-Msg-Id": "m-1"})
    assert {k for k, v in masked.items() if v == MARK} == {"Authorization", "X-Api-Key", "api-key", "Cookie",
                                                           "Proxy-Authorization", "db_password"}


def test_event_session_id_and_attributes_are_scrubbed_and_clean_events_are_unchanged() -> None:
    clean = InferenceEvent(app="a", prompt="hi", session_id="s-1", attributes={"locale": "en"})
    assert scrub_event(clean) is clean
    text, secret = FORMATS["stripe sk_live_"]
    dirty = InferenceEvent(app="a", session_id=text, attributes={text: "v", "note": text, "token": "t"})
    out = scrub_event(dirty)
    assert secret not in out.session_id and secret not in repr(out.attributes) and out.attributes["token"] == MARK


def test_every_free_text_field_of_an_event_is_scrubbed() -> None:
    # Found by a probe: a secret in a span's gen_ai.request.model was masked in otel_traces but stored as the
    # inference event's model (and the ledger's); gRPC events kept it in user_hash, finish_reason and the like.
    text, secret = FORMATS["openai sk-proj-"]
    fields = dict.fromkeys(("model", "response_model", "provider", "operation", "status", "finish_reason",
                            "variant", "user_hash", "error_type"), text)
    out = scrub_event(InferenceEvent(app="a", **fields))
    assert all(getattr(out, name) == MARK for name in fields), out
    assert secret not in repr(out)


def test_a_services_own_span_is_scrubbed_as_it_becomes_a_record() -> None:
    # A service's span may record an upstream's error text or a header: to_record is where it is made.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from lockgate.telemetry import to_record

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    key = "sk-proj-" + "Q9w8E7r6" * 4
    with provider.get_tracer("t").start_as_current_span("call") as span:
        span.set_attribute("http.request.header.x-api-key", key)
        span.add_event("exception", {"exception.message": f"refused {key}"})
    record = to_record(exported.get_finished_spans()[0])
    assert key not in repr(record)
    assert record.attributes["http.request.header.x-api-key"] == MARK


# Serialized text: JSON (a dead letter's raw bytes, an attribute holding JSON), where a newline before a secret is
# `\n` and a keyword's quotes are `\"` once JSON is nested in a string. Before, `\b` saw no boundary after `\n`
# (its `n` is a word character) and the keyword pattern no pair behind `\"`: every one of these was kept whole.


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("before", ["\n", "\t", "\r\n", "\u00a0", "\u2028", "\x0b"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_each_format_after_an_escape_in_json_is_scrubbed_and_the_json_stays_whole(
        name: str, before: str, depth: int) -> None:
    text, secret = FORMATS[name]
    doc: object = {"prompt": f"my key is:{before}{text}{before}thanks", "n": 1}
    serialized = json.dumps(doc)  # ensure_ascii: `\u00a0`, `\u2028`, `\u000b` as escapes
    for _ in range(depth - 1):  # JSON in a JSON string (a tool call's arguments in an event, in a dead letter)
        serialized = json.dumps({"wrapped": serialized})
    out = scrub_secrets(serialized)
    assert secret not in out and MARK in out, out
    for _ in range(depth - 1):
        out = json.loads(out)["wrapped"]
    prompt = json.loads(out)["prompt"]  # every escape left whole: each level still decodes
    assert prompt.startswith(f"my key is:{before}") and prompt.endswith(f"{before}thanks") and secret not in prompt


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_keyword_pairs_in_json_nested_in_json_are_scrubbed(depth: int) -> None:
    serialized = json.dumps({"api_key": "TOOLARGCANARY99", "password": "TOOLPW_CANARY_77", "note": "ok"})
    for _ in range(depth):
        serialized = json.dumps({"arguments": serialized})
    out = scrub_secrets(serialized)
    assert "CANARY" not in out, out
    for _ in range(depth):
        out = json.loads(out)["arguments"]
    assert json.loads(out) == {"api_key": MARK, "password": MARK, "note": "ok"}


def test_escaped_text_masks_as_decoded_text_does() -> None:
    # A backslash inside a password is kept in it (JSON's `\\`, a prompt's own backslash), the `\/` of PHP's and
    # .NET's encoders reads as `/`, and an escape's letter is never taken for a secret's start (`\npm_...` is a
    # newline then `pm_...`).
    assert scrub_secrets(json.dumps({"m": "password=Pa\\ss1234 end"})) == json.dumps({"m": f"password={MARK} end"})
    assert scrub_secrets("password=Pa\\ss1234 in C:\\Users") == f"password={MARK} in C:\\Users"
    url = json.dumps({"u": "https://app:hunter22pw@db.internal/x"}).replace("/", "\\/")
    assert scrub_secrets(url) == url.replace("hunter22pw", MARK)
    for kept in ("x\\npm_" + "a" * 36, "x\\rk_live_" + "a" * 12, "C:\\Users\\tokens\\file.txt", '{"a": "b\\nc"}'):
        assert scrub_secrets(kept) == kept


@pytest.mark.parametrize(("text", "scrubbed"), [
    # SQL sets passwords with a quoted literal (db.statement spans)
    ("ALTER USER bob WITH PASSWORD 'OTLPSQLPWCANARY1'", "ALTER USER bob WITH PASSWORD '[REDACTED]'"),
    ("CREATE USER a IDENTIFIED BY 's3cret pw'", "CREATE USER a IDENTIFIED BY '[REDACTED]'"),
    ("CREATE USER a IDENTIFIED WITH sha256_password BY 'pw123'",
     "CREATE USER a IDENTIFIED WITH sha256_password BY '[REDACTED]'"),
    # a URL with an empty user: how Redis URLs carry a password
    ("redis://:OTLPREDISPWCANARY@cache:6379", "redis://:[REDACTED]@cache:6379"),
    # a credential header without a scheme; with one, the scheme is kept
    ("failed: Authorization: OTLPSTATUSRAWCANARY12345", "failed: Authorization: [REDACTED]"),
    ('{"Proxy-Authorization": "c2VjcmV0OnNlY3JldA"}', '{"Proxy-Authorization": "[REDACTED]"}'),
    ("Authorization: Bearer abcdefghijklmnop", "Authorization: Bearer [REDACTED]"),
    # prose stays as it was
    ("how do I reset my password?", "how do I reset my password?"),
    ("the Authorization header is missing", "the Authorization header is missing"),
    ("identified by the caller", "identified by the caller"),
])
def test_sql_passwords_empty_user_urls_and_bare_authorization_values(text: str, scrubbed: str) -> None:
    assert scrub_secrets(text) == scrubbed


def test_scrub_value_scrubs_every_string_and_masks_credential_named_keys_at_any_depth() -> None:
    key = FORMATS["github ghp_"][0]
    value = [{"role": "user", "parts": [{"type": "text", "content": f"mine:\n{key}"}]},
             {"kv": {"authorization": "OTLPKVNESTEDCANARY", "n": 3, "x-api-key": {"a": "b"}}}, b"\x00", None]
    assert scrub_value(value) == [{"role": "user", "parts": [{"type": "text", "content": f"mine:\n{MARK}"}]},
                                  {"kv": {"authorization": MARK, "n": 3, "x-api-key": MARK}}, b"\x00", None]
    assert scrub_json('{"token": "abc", "q": "hi"}') == '{"token":"[REDACTED]","q":"hi"}'
    assert scrub_json('{"q": "hi"}') == '{"q": "hi"}'  # unchanged text is returned as it was
    # A key that only mentions a credential word, and numbers or booleans, are what they say (found by a probe:
    # a tool's `password_length: 16` was stored "[REDACTED]").
    args = {"password_length": 16, "auth_type": "oauth", "max_token": 256, "token_count": 7, "is_auth": True,
            "note": "signature below", "db_password": "hunter2hunter2", "session": {"api_key": "k-123456"}}
    assert scrub_value(args) == {**args, "db_password": MARK, "session": {"api_key": MARK}}
    assert scrub_json(f"not json {key}") == f"not json {MARK}"


@pytest.mark.parametrize(("url", "shown"), [
    ("nats://ci:CIPWCANARY6@127.0.0.1:1", "nats://ci:[REDACTED]@127.0.0.1:1"),
    ("tls://q6user:CLIPW/CANARY2@127.0.0.1:1", "tls://q6user:[REDACTED]@127.0.0.1:1"),
    ("nats://s3cr3t-token@n1:4222,nats://a:b@n2:4222", "nats://[REDACTED]@n1:4222,nats://a:[REDACTED]@n2:4222"),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("https://lineage.example/api/v1?api-key=LGKEYCANARY01", "https://lineage.example/api/v1?api-key=[REDACTED]"),
])
def test_shown_url_masks_userinfo_passwords_and_tokens(url: str, shown: str) -> None:
    assert shown_url(url) == shown


@pytest.mark.parametrize(("text", "scrubbed"), [
    # Found by a probe: a 12-letter word after "basic" or "token" was masked in ordinary prompts.
    ("Explain this basic introduction to Python", "Explain this basic introduction to Python"),
    ("the token authentication scheme", "the token authentication scheme"),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", f"Authorization: Basic {MARK}"),
    ("token ghx7f8a9b0c1d2e3", f"token {MARK}"),
    ("Token 0123456789abcdef", f"Token {MARK}"),
    ("Bearer abcdefghijklmnopqrstu", f"Bearer {MARK}"),
])
def test_basic_and_token_mask_credentials_not_the_plain_words_after_them(text: str, scrubbed: str) -> None:
    assert scrub_secrets(text) == scrubbed
