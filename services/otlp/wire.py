"""OTLP's two encodings of a trace request and its answers: binary protobuf and OTLP/JSON.

OTLP/JSON is protobuf's JSON mapping with one difference: trace and span ids are hex strings, not
base64. They are turned into base64 here before the standard parser reads the request.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import msgspec
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from lockgate.codec import UNDECODABLE, undecodable
from lockgate.errors import InvalidEvent

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
MAX_PROBLEMS = 5  # reasons quoted in a partial-success message; the counts cover the rest


_Id = str | None  # hex in OTLP/JSON (protobuf's JSON mapping would read base64)


class _Link(msgspec.Struct):  # OTLP/JSON's names; protobuf's JSON parser reads either spelling
    traceId: _Id = None
    spanId: _Id = None
    trace_id: _Id = None
    span_id: _Id = None


class _Span(_Link):
    parentSpanId: _Id = None
    parent_span_id: _Id = None
    links: list[_Link] | None = None


class _Scope(msgspec.Struct):
    spans: list[_Span] | None = None


class _Resource(msgspec.Struct):
    scopeSpans: list[_Scope] | None = None
    scope_spans: list[_Scope] | None = None


class _Request(msgspec.Struct):
    """The part of an OTLP/JSON request this module rewrites (the ids), so a request of another shape is
    refused naming where (`... - at `$.resourceSpans[0].scopeSpans``) before anything walks it. The rest
    is the standard parser's to check; unknown fields are ignored, as the spec asks."""

    resourceSpans: list[_Resource] | None = None
    resource_spans: list[_Resource] | None = None


_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_to_b64(obj: dict[str, Any], where: str) -> None:
    for key in _ID_KEYS:
        raw = obj.get(key)
        if isinstance(raw, str) and raw:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(raw)).decode()
            except ValueError:
                raise InvalidEvent(f"{key} {raw[:40]!r} is not hex - at `{where}.{key}`") from None


def _items(obj: dict[str, Any], *keys: str) -> tuple[str, list[Any]]:
    """The first of `keys` that holds a non-empty list (the shape was checked), and that list."""
    for key in keys:
        if obj.get(key):
            return key, obj[key]
    return keys[0], []


def request_from_json(body: bytes) -> ExportTraceServiceRequest:
    """Parse an OTLP/JSON request (unknown fields ignored, as the spec asks); InvalidEvent if malformed."""
    try:
        data = msgspec.json.decode(body)
        if not isinstance(data, dict):
            raise InvalidEvent("an OTLP/JSON request is an object with `resourceSpans` - at `$`")
        msgspec.convert(data, _Request)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"not an OTLP/JSON trace request: {exc}") from None
    except UNDECODABLE as exc:
        raise InvalidEvent(f"not an OTLP/JSON trace request: {undecodable(exc)}") from None
    key, resources = _items(data, "resourceSpans", "resource_spans")
    for i, rs in enumerate(resources):
        scope_key, scopes = _items(rs, "scopeSpans", "scope_spans")
        for j, ss in enumerate(scopes):
            for k, span in enumerate(ss.get("spans") or ()):
                where = f"$.{key}[{i}].{scope_key}[{j}].spans[{k}]"
                _hex_to_b64(span, where)
                for n, link in enumerate(span.get("links") or ()):
                    _hex_to_b64(link, f"{where}.links[{n}]")
    try:
        return json_format.ParseDict(data, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except (json_format.ParseError, AttributeError, TypeError, ValueError, binascii.Error, RecursionError) as exc:
        raise InvalidEvent(f"not an OTLP/JSON trace request: {undecodable(exc)}") from None


def request_from_protobuf(body: bytes, what: str = "an OTLP/protobuf trace request") -> ExportTraceServiceRequest:
    """Parse a binary OTLP request; InvalidEvent (`not {what}: why`) if it is not one."""
    try:
        return ExportTraceServiceRequest.FromString(body)
    except (DecodeError, ValueError) as exc:
        raise InvalidEvent(f"not {what}: {exc}") from None


def response(rejected: int, problems: list[str]) -> ExportTraceServiceResponse:
    """Success, or partial success with the spans refused and why (the message also carries warnings
    when nothing was refused, as the spec allows)."""
    if not rejected and not problems:
        return ExportTraceServiceResponse()
    text = "; ".join(problems[:MAX_PROBLEMS])
    if len(problems) > MAX_PROBLEMS:
        text += f"; and {len(problems) - MAX_PROBLEMS} more"
    return ExportTraceServiceResponse(partial_success=ExportTracePartialSuccess(rejected_spans=rejected,
                                                                                error_message=text))


def retry_info(delay_s: float) -> error_details_pb2.RetryInfo:
    """How long the client should wait before retrying."""
    whole = int(delay_s)
    return error_details_pb2.RetryInfo(retry_delay=Duration(seconds=whole, nanos=int((delay_s - whole) * 1e9)))


def status(code: int, message: str, retry_after_s: float | None = None) -> status_pb2.Status:
    """A google.rpc.Status (the body of every OTLP/HTTP error), with RetryInfo when retryable."""
    st = status_pb2.Status(code=code, message=message)
    if retry_after_s is not None:
        st.details.add().Pack(retry_info(retry_after_s))
    return st


def encode_message(message: Any, content_type: str) -> bytes:
    """A protobuf message in the request's encoding."""
    if content_type == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


UNAVAILABLE = code_pb2.UNAVAILABLE
UNAUTHENTICATED = code_pb2.UNAUTHENTICATED
PERMISSION_DENIED = code_pb2.PERMISSION_DENIED
INVALID_ARGUMENT = code_pb2.INVALID_ARGUMENT
INTERNAL = code_pb2.INTERNAL
