"""The secret pattern table, format by format, and the masking of credential-named headers and attributes."""

from __future__ import annotations

import pytest

from lockgate.contracts import InferenceEvent
from lockgate.redact import MARK, scrub_bytes, scrub_event, scrub_mapping, scrub_secrets
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
