"""OTLP requests (protobuf and JSON) to span records, events and bus messages (pure)."""

from __future__ import annotations

import time

import msgspec
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from lockgate.codec import Codec
from lockgate.contracts import SpanBatch
from lockgate.errors import InvalidEvent
from lockgate.redact import attribute_string
from lockgate.server.apikeys import Forbidden
from lockgate.services.otlp import domain, wire
from lockgate.spanbatches import span_batches

TRACE, SPAN, PARENT = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", "eee19b7ec3c1b173"
NOW = time.time_ns()


def request(*spans: dict, resource: dict | None = None) -> ExportTraceServiceRequest:
    """An OTLP/JSON request, as an SDK would send it, parsed the way the HTTP receiver parses it."""
    attrs = [{"key": k, "value": {"stringValue": v}} for k, v in (resource or {"service.name": "shop"}).items()]
    body = {"resourceSpans": [{"resource": {"attributes": attrs},
                               "scopeSpans": [{"scope": {"name": "lib", "version": "1.2"}, "spans": list(spans)}]}]}
    return wire.request_from_json(msgspec.json.encode(body))


def span(**over: object) -> dict:
    base = {"traceId": TRACE, "spanId": SPAN, "parentSpanId": PARENT, "name": "work", "kind": 2,
            "startTimeUnixNano": str(NOW), "endTimeUnixNano": str(NOW + 2_000_000),
            "status": {"code": 2, "message": "failed"},
            "attributes": [{"key": "n", "value": {"intValue": "3"}}, {"key": "ok", "value": {"boolValue": True}},
                           {"key": "ratio", "value": {"doubleValue": 0.5}},
                           {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}]}}}],
            "events": [{"timeUnixNano": str(NOW + 1000), "name": "retry", "attributes": []}],
            "links": [{"traceId": TRACE, "spanId": PARENT, "attributes": []}]}
    return base | over


def test_a_span_is_stored_as_the_collector_stores_it() -> None:
    out = domain.decode(request(span()), tenant="acme", app="a")
    (rec,) = out.spans
    assert (rec.trace_id, rec.span_id, rec.parent_span_id, rec.kind, rec.status_code) == (
        TRACE, SPAN, PARENT, "Server", "Error")
    assert (rec.service, rec.scope_name, rec.scope_version, rec.duration_ns) == ("shop", "lib", "1.2", 2_000_000)
    assert rec.attributes == {"n": "3", "ok": "true", "ratio": "0.5", "tags": '["a"]'}
    assert rec.resource == {"service.name": "shop", "lockgate.tenant": "acme", "lockgate.app": "a"}  # the key's, always
    assert rec.events[0][1] == "retry" and rec.links == [(TRACE, PARENT, "", {})]
    assert out.events == [] and out.rejected == 0


def test_spans_with_invalid_ids_are_refused_alone() -> None:
    out = domain.decode(request(span(), span(spanId=""), span(traceId="00" * 16), span(parentSpanId="ab")),
                        tenant="acme", app="a")
    assert len(out.spans) == 1 and out.rejected == 3
    assert "span_id must be 8 bytes" in out.problems[0]


def test_spans_outside_the_time_window_are_refused_alone() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.fromtimestamp(NOW / 1e9, UTC)
    window = (now - timedelta(days=30), now + timedelta(hours=1))
    out = domain.decode(request(span(), span(spanId="0000000000000001", startTimeUnixNano="0"),
                                span(spanId="0000000000000002", startTimeUnixNano=str(NOW + 10**9 * 86400 * 365))),
                        tenant="acme", app="a", window=window)
    assert [s.span_id for s in out.spans] == [SPAN] and out.rejected == 2
    assert "1970-01-01T00:00:00+00:00 is outside the accepted window" in out.problems[0]


@pytest.mark.parametrize("event_ns", [0, 2**64 - 1, 10_413_792_000 * 10**9])  # 1970, 2554, 2300
def test_a_span_with_an_event_outside_the_time_window_is_refused_alone(event_ns: int) -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.fromtimestamp(NOW / 1e9, UTC)
    window = (now - timedelta(days=30), now + timedelta(hours=1))
    bad = span(spanId="0000000000000001", events=[{"timeUnixNano": str(NOW), "name": "ok"},
                                                  {"timeUnixNano": str(event_ns), "name": "late"}])
    for out in (domain.decode(request(span(), bad), tenant="acme", app="a", window=window),
                domain.decode(request(span(), bad), tenant="acme", app="a") if event_ns == 2**64 - 1 else None):
        if out is None:
            continue
        assert [s.span_id for s in out.spans] == [SPAN] and out.rejected == 1
        assert out.problems[0].startswith("span 0000000000000001 refused: its event 1 ('late') time ")
        assert "outside the accepted window" in out.problems[0]


def test_service_name_trace_state_and_scope_are_scrubbed() -> None:
    key = "sk-proj-" + "Q9w8E7r6" * 4
    body = {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": key}}]},
                               "scopeSpans": [{"scope": {"name": f"lib {key}", "version": key},
                                               "spans": [span(traceState=f"v={key}",
                                                              links=[{"traceId": TRACE, "spanId": PARENT,
                                                                      "traceState": f"w={key}"}])]}]}]}
    (rec,) = domain.decode(wire.request_from_json(msgspec.json.encode(body)), tenant="acme", app="a").spans
    assert key not in repr(rec)
    assert (rec.service, rec.resource["service.name"], rec.trace_state, rec.scope_name, rec.scope_version) == (
        "[REDACTED]", "[REDACTED]", "v=[REDACTED]", "lib [REDACTED]", "[REDACTED]")
    assert rec.links[0][2] == "w=[REDACTED]"


def test_another_tenants_span_refuses_the_request() -> None:
    with pytest.raises(Forbidden, match="tenant 'globex'"):
        domain.decode(request(span(), resource={"lockgate.tenant": "globex"}), tenant="acme", app="a")
    tagged = span(attributes=[{"key": "lockgate.tenant", "value": {"stringValue": "globex"}}])
    with pytest.raises(Forbidden):
        domain.decode(request(span(), tagged), tenant="acme", app="a")
    assert len(domain.decode(request(span(), resource={"lockgate.tenant": "acme"}), tenant="acme",
                             app="a").spans) == 1


def test_a_span_of_another_app_refuses_the_request() -> None:
    # Its model calls would be that app's events (spend, drift): an app key sent spans naming `billing`
    # and charged billing with 1.8 USD. The key's app decides, as its tenant does; service.name never names it.
    with pytest.raises(Forbidden, match="span 'work' is for app 'billing'; this API key may only send spans of app 'a'"):
        domain.decode(request(span(), resource={"lockgate.app": "billing"}), tenant="acme", app="a")
    tagged = span(attributes=[{"key": "lockgate.app", "value": {"stringValue": "billing"}}])
    with pytest.raises(Forbidden):
        domain.decode(request(span(), tagged), tenant="acme", app="a")
    assert len(domain.decode(request(span(), resource={"service.name": "billing", "lockgate.app": "a"}),
                             tenant="acme", app="a").spans) == 1


def _model_call(deployment: str | None) -> dict:
    attrs = [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}]
    if deployment is not None:
        attrs.append({"key": "lockgate.deployment", "value": {"stringValue": deployment}})
    return span(attributes=attrs)


def test_an_otlp_model_call_of_a_deployment_outside_the_keys_scope_refuses_the_request() -> None:
    # Its event would count in `billing`'s drift and canary analysis.
    with pytest.raises(Forbidden, match="deployment 'billing'; this API key may only send model calls of support"):
        domain.decode(request(_model_call("billing")), tenant="acme", app="a", deployments=("support",))
    with pytest.raises(Forbidden):  # named on the resource, as an SDK's resource attributes do
        domain.decode(request(_model_call(None), resource={"lockgate.deployment": "billing"}), tenant="acme",
                      app="a", deployments=("support",))
    # No deployment: drift would count it as the deployment named like its app, which a span may name.
    with pytest.raises(Forbidden, match="names no deployment .it would count as deployment 'a'"):
        domain.decode(request(_model_call(None)), tenant="acme", app="a", deployments=("support",))
    for deployment, scope in (("support", ("support",)), (None, ()), ("billing", ())):
        (event,) = domain.decode(request(_model_call(deployment)), tenant="acme", app="a", deployments=scope).events
        assert event.deployment == (deployment or "")


def test_a_model_call_becomes_an_event_and_a_bad_one_is_reported_but_stored() -> None:
    call = span(attributes=[{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                            {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "12"}}])
    bad = span(spanId="eee19b7ec3c1b175", attributes=[
        {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
        {"key": "gen_ai.usage.input_tokens", "value": {"stringValue": "lots"}}])
    out = domain.decode(request(call, bad), tenant="acme", app="a")
    assert len(out.spans) == 2 and out.rejected == 0
    (event,) = out.events
    assert (event.input_tokens, event.app, event.status) == (12, "a", "error")  # the key's app, not service.name
    assert "no inference event" in out.problems[0]


def test_a_span_carried_twice_by_one_request_is_one_span_and_one_event() -> None:
    from datetime import UTC, datetime, timedelta

    # It was published twice, and stored twice; the first copy the request holds is kept.
    call = [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}]
    out = domain.decode(request(span(spanId="0000000000000000"), span(name="first", attributes=call),
                                span(name="again", attributes=call), span(spanId="eee19b7ec3c1b175")),
                        tenant="acme", app="a")
    assert [(s.span_id, s.name) for s in out.spans] == [(SPAN, "first"), ("eee19b7ec3c1b175", "work")]
    assert [e.span_id for e in out.events] == [SPAN]
    assert out.rejected == 1  # the span with no valid id only: a repeat is not refused, it is stored
    # A copy that is refused does not count as the span: a valid copy after it is stored.
    now = datetime.fromtimestamp(NOW / 1e9, UTC)
    late = domain.decode(request(span(startTimeUnixNano="0"), span(name="valid")), tenant="acme", app="a",
                         window=(now - timedelta(days=1), now + timedelta(days=1)))
    assert [s.name for s in late.spans] == ["valid"] and late.rejected == 1


def test_any_value_kinds() -> None:
    v = AnyValue()
    json_format.ParseDict({"kvlistValue": {"values": [{"key": "k", "value": {"bytesValue": "AQI="}}]}}, v)
    assert domain.value(v) == {"k": b"\x01\x02"}
    assert attribute_string(domain.value(v)) == '{"k":"AQI="}'
    assert domain.value(AnyValue()) is None


def test_span_batches_fit_a_bus_message_and_keep_their_id() -> None:
    spans = domain.decode(request(*[span(spanId=f"{i + 1:016x}") for i in range(50)]), tenant="acme",
                          app="a").spans
    batches, too_large = span_batches(spans, source="otlp", tenant="acme", app="shop", max_bytes=3000, max_spans=20)
    assert too_large == [] and len(batches) > 2
    decoded = [Codec(SpanBatch).decode(m.data) for m in batches]
    assert sum(len(b.spans) for b in decoded) == 50
    assert all(len(m.data) < 3000 + 500 and b.id == m.id and m.id.startswith("otlp-")
               for m, b in zip(batches, decoded, strict=True))
    again, _ = span_batches(spans, source="otlp", tenant="acme", app="shop", max_bytes=3000, max_spans=20)
    assert [m.id for m in again] == [m.id for m in batches]  # a re-sent request: the same message ids
    _, too_large = span_batches(spans[:1], source="otlp", tenant="acme", app="shop", max_bytes=100)
    assert too_large == spans[:1]


def test_json_requests_and_answers() -> None:
    with pytest.raises(InvalidEvent, match="not hex"):
        request(span(traceId="zz"))
    with pytest.raises(InvalidEvent, match="OTLP/JSON"):
        wire.request_from_json(b"[1]")
    with pytest.raises(InvalidEvent, match="OTLP/protobuf"):
        wire.request_from_protobuf(b"\xff\xff\xff")
    with pytest.raises(InvalidEvent, match="OTLP/JSON trace request: JSON is nested too deeply"):
        wire.request_from_json(b'{"resourceSpans": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert wire.encode_message(wire.response(0, []), wire.JSON) == b"{}"
    answer = wire.response(2, [f"p{i}" for i in range(7)])
    assert answer.partial_success.rejected_spans == 2
    assert answer.partial_success.error_message == "p0; p1; p2; p3; p4; and 2 more"
