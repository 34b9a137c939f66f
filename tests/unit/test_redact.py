"""The secret pattern table, format by format, and the masking of credential-named headers and attributes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from lockgate.contracts import InferenceEvent, SpanRecord
from lockgate.errors import InvalidEvent
from lockgate.redact import (
    MARK,
    id_error,
    scrub_bytes,
    scrub_event,
    scrub_events,
    scrub_json,
    scrub_mapping,
    scrub_secrets,
    scrub_span,
    scrub_value,
    secret_name,
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


@pytest.mark.parametrize("text", [
    # Provider prefixes in ordinary text: model ids, identifiers and words hold them, never a long random body.
    "use xai-grok-2-latest or pplx-70b-online", "accounts/fireworks/models/llama-v3p1-70b-instruct",
    "fw_update_firmware_version_2024", "r8_test and r8_ prefixes", "lsv2_pt_ is LangSmith's prefix",
    "Pellentesque dapibus suscipit ligula", "dapi0123 is too short", "tvly-search results", "gsk_ keys from Groq",
    "pcsk_abcd_ef", "the sort-key: name header", "AcmeCorporation is a tenant",
])
def test_provider_prefixes_in_ordinary_words_and_names_are_kept(text: str) -> None:
    assert scrub_secrets(text) == text


@pytest.mark.parametrize(("text", "scrubbed"), [
    # Found by a probe (p10): a `\b` sees no boundary between an escape's hex digit and the secret, and `=`, `:`,
    # `/`, `@` and spaces are escapes too, so a URL quoted in a query (url.full, http.target) kept its key.
    ("https://x/cb?next=https%3A%2F%2Fapi%2F%3Fkey%3Dsk-proj-Ab1Ab1Ab1Ab1Ab1Ab1Ab1Ab1%26b%3D2",
     f"https://x/cb?next=https%3A%2F%2Fapi%2F%3Fkey%3D{MARK}%26b%3D2"),
    ("q=api_key%3DZq9Zq9Zq9Zq9", f"q=api_key%3D{MARK}"),
    ("h=Authorization%3A%20Bearer%20Zx9Zx9Zx9Zx9Zx9Zx9Zx9Zx9", f"h=Authorization%3A%20Bearer%20{MARK}"),
    ("u=https%3A%2F%2Fuser%3APassw0rd123%40db%2Fx", f"u=https%3A%2F%2Fuser%3A{MARK}%40db%2Fx"),
    ("u=https%3a%2f%2fuser%3aPassw0rd123%40db", f"u=https%3a%2f%2fuser%3a{MARK}%40db"),  # lower-case hex
    # quoted twice (a redirect parameter inside a quoted URL): read twice decoded, written as it was
    ("x=%253Fkey%253Dsk-proj-Ab1Ab1Ab1Ab1Ab1Ab1Ab1Ab1%2526z", f"x=%253Fkey%253D{MARK}%2526z"),
    # two secrets, one found as written and one only decoded
    ("a sk-proj-Ab1Ab1Ab1Ab1Ab1Ab1Ab1Ab1 b%3Dghp_A1b2A1b2A1b2A1b2A1b2A1b2", f"a {MARK} b%3D{MARK}"),
    # percent signs and escapes that hide nothing stay as they were
    ("50% off, 100%25 sure, %41BC and %E2%9C%93 done", "50% off, 100%25 sure, %41BC and %E2%9C%93 done"),
    ("https://x/search?q=hello%20world%3F&page=2", "https://x/search?q=hello%20world%3F&page=2"),
])
def test_percent_encoded_secrets_are_masked_where_they_stand(text: str, scrubbed: str) -> None:
    assert scrub_secrets(text) == scrubbed


@pytest.mark.parametrize("name", [
    "ocp-apim-subscription-key", "Ocp-Apim-Subscription-Key", "x-functions-key", "x-subscription-key",
    "x-access-key", "x-upstream-key", "x-key", "http.request.header.x-functions-key", "access_key",
    "aws_secret_access_key", "storage.account_key",
])
def test_header_names_ending_in_key_are_credential_names(name: str) -> None:
    # Found by a probe (p10): captured headers of Azure API Management and Azure Functions were stored whole.
    assert secret_name(name)
    assert scrub_mapping({name: "0123456789abcdef0123456789abcdef"}) == {name: MARK}


@pytest.mark.parametrize("name", [
    "idempotency-key", "Idempotency-Key", "x-idempotency-key", "sec-websocket-key", "x-cache-key",
    "messaging.kafka.message.key", "messaging.rabbitmq.destination.routing_key", "sort_key", "primary_key", "keyboard",
    "monkey", "key_count",
])
def test_names_that_only_mention_a_key_are_not_credential_names(name: str) -> None:
    assert not secret_name(name)


def test_a_structured_value_masks_what_a_key_named_access_key_or_a_key_header_holds() -> None:
    args = {"access_key": "AKIDEXAMPLE", "x-functions-key": "abc", "sort_key": "name", "idempotency-key": "r-1"}
    assert scrub_value(args) == {**args, "access_key": MARK, "x-functions-key": MARK}


def test_scrub_events_scrubs_each_event_of_a_message() -> None:
    text, secret = FORMATS["groq gsk_"]
    one = InferenceEvent(app="a", model=f"m {text}")
    assert secret not in repr(scrub_events(one)[0])
    clean = InferenceEvent(app="a")
    out, refused = scrub_events([clean, one])
    assert isinstance(out, list) and out[0] is clean and secret not in repr(out[1]) and refused == []


def test_scrub_events_refuses_an_event_whose_id_reads_as_a_key_alone_naming_its_index() -> None:
    # Probe p16: one such id refused its whole message, and the reason said `$.id`.
    key = "sk-proj-" + "Ab3" * 16
    events = [InferenceEvent(app="a"), InferenceEvent(app="a", id=key, model=f"m {key}"), InferenceEvent(app="a")]
    out, refused = scrub_events(events)
    assert [e.id for e in out] == [e.id for e in events]
    assert [(i, r.endswith("- at `$[1].id`")) for i, r in refused] == [(1, True)]
    with pytest.raises(InvalidEvent, match=r"- at `\$\.id`"):
        scrub_events(events[1])


@pytest.mark.parametrize("event_id", [
    "s4fAcH9kKnwAKOtJ1WwLw3UjHmhEXf7NhNSLIem1",  # a random 40-character base62 request id (probe p16)
    "req_cAn3CE6zz4806Ddp9IkJvG4abUiRxg7z83hhnM5K",
    "AcmeCorporationInternationalHoldings2024",
    "q1W2e3R4t5Y6u7I8o9P0aSdFgHjKlZxCvBnM+/Ab",  # standard base64 of 30 bytes
    "01900000-0000-7000-8000-000000000001", "0123456789abcdef" * 4,
])
def test_an_id_that_only_has_the_shape_of_a_bare_aws_secret_is_an_id(event_id: str) -> None:
    assert id_error(event_id, "$.id") == ""
    assert scrub_event(InferenceEvent(app="a", id=event_id)).id == event_id


@pytest.mark.parametrize("event_id", [
    "sk-proj-" + "Ab3" * 16, "AKIAABCDEFGHIJKLMNOP", "ghp_" + "A1b2" * 9, "eyJhbGciOiJIUzI1.eyJzdWIiOiIxMjM0.c2lnbmF0dXJl",
    "lg-" + "x" * 43, "api_key=hunter2hunter2", "key%3Dsk-ant-api03-abcdefghijklmnopqr",
])
def test_an_id_holding_a_credential_of_a_known_shape_is_refused(event_id: str) -> None:
    assert id_error(event_id, "$[3].id").endswith("- at `$[3].id`")
    with pytest.raises(InvalidEvent, match="reads as a credential"):
        scrub_event(InferenceEvent(app="a", id=event_id))


@pytest.mark.parametrize("field", ["deployment", "release"])
def test_an_event_whose_deployment_or_release_holds_a_credential_is_refused_alone(field: str) -> None:
    # Probe p35: names key rows, windows and routes, so no scrub may change them; one holding a key was stored whole.
    key = "sk-proj-" + "Ab3" * 16
    with pytest.raises(InvalidEvent, match=rf"its {field} holds what reads as a credential .* at `\$\.{field}`"):
        scrub_event(InferenceEvent(app="a", **{field: key}))
    events, refused = scrub_events([InferenceEvent(app="a", **{field: "AcmeCorporationInternationalHoldings2024"}),
                                    InferenceEvent(app="a", **{field: key})])
    assert [i for i, _ in refused] == [1] and refused[0][1].endswith(f"at `$[1].{field}`")
    assert getattr(events[0], field) == "AcmeCorporationInternationalHoldings2024"  # a 40-character name is kept


def _span(**values: dict[str, str]) -> SpanRecord:
    return SpanRecord(timestamp=datetime(2026, 1, 1, tzinfo=UTC), trace_id="a" * 32, span_id="b" * 16,
                      parent_span_id="", trace_state="", name="chat", kind="Server", service="svc",
                      resource=values.get("resource", {}), scope_name="", scope_version="",
                      attributes=values.get("attributes", {}), duration_ns=1, status_code="Unset", status_message="")


def test_a_spans_lockgate_names_are_kept_whatever_they_look_like_and_its_free_text_is_scrubbed() -> None:
    # Found by a probe (p10): a tenant named like an AWS secret key (40 mixed letters and digits) had the tenant the
    # OTLP receiver stamped, and the one lockgate's own spans name, stored as the marker.
    tenant, release = "AcmeCorporationInternationalHoldings2024", "AKIAABCDEFGHIJKLMNOP"
    key = FORMATS["openai sk-proj-"][0]
    span = scrub_span(_span(resource={"lockgate.tenant": tenant, "lockgate.app": "web", "note": key},
                            attributes={"lockgate.tenant": tenant, "lockgate.release": release,
                                        "lockgate.deployment": "chat", "lockgate.variant": key, "prompt": key}))
    assert span.resource == {"lockgate.tenant": tenant, "lockgate.app": "web", "note": MARK}
    # But a name that holds a credential of a known shape is masked as any text (probe p35: a release of an
    # `AKIA...` access key id, or `sk-proj-...`, was stored whole in `otel_traces`).
    assert span.attributes == {"lockgate.tenant": tenant, "lockgate.release": MARK, "lockgate.deployment": "chat",
                               "lockgate.variant": MARK, "prompt": MARK}
    # A value off the name grammar is no name: free text, scrubbed.
    off = scrub_span(_span(attributes={"lockgate.release": f"v2 {key}"}))
    assert off.attributes == {"lockgate.release": f"v2 {MARK}"}


def test_a_lockgate_api_keys_label_is_an_id_not_a_secret() -> None:
    # The actor that decisions, routes and the audit log name (`ApiKey.label`): once the audit log scrubbed its
    # reasons, "rolled out by apikey:a2774c37653a(admin@acme/shop)" lost who did it. A key after the word still goes.
    assert scrub_secrets("rolled out by apikey:a2774c37653a(admin@acme/shop)") == \
        "rolled out by apikey:a2774c37653a(admin@acme/shop)"
    assert scrub_secrets("apikey: a2774c37653a9999") == "apikey: [REDACTED]"
    assert scrub_secrets("apikey=a2774c37653a") == "apikey=[REDACTED]"


# Probe p35: the private-key and JWT patterns searched from every one of many starts to the end of the text, so one
# event of repeated BEGIN lines (112 KB) took 8 s to scrub, holding the consumer every tenant's events wait on.
# Scrubbed in one pass now: a megabyte of each (the bus's largest message) takes well under a second, where before
# it took minutes, so the test's timeout is a bound the old cost exceeds by far, not a measurement.
@pytest.mark.timeout(30)
@pytest.mark.parametrize("unit", ["-----BEGIN PRIVATE KEY-----x", "eyJ-", "-----BEGIN RSA PRIVATE KEY-----\\n"])
def test_text_of_many_secret_starts_is_scrubbed_in_one_pass(unit: str) -> None:
    text = unit * ((1 << 20) // len(unit))
    out = scrub_secrets(text)
    assert "PRIVATE KEY-----" not in out if "BEGIN" in unit else out == text  # every start masked, or nothing to


def test_a_jwt_is_masked_whole_and_one_with_eyj_after_a_dash_keeps_no_payload_or_signature() -> None:
    header, payload, signature = "eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiIxMjM0NTY3ODkwIn0", "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    assert scrub_secrets(f"token {header}.{payload}.{signature} ok") == f"token {MARK} ok"
    cut = scrub_secrets(f"token {header}-eyJxyz12345.{payload}.{signature}")
    assert payload not in cut and signature not in cut and MARK in cut, cut
