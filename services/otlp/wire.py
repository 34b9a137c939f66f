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


def _hex_to_b64(obj: dict[str, Any], *keys: str) -> None:
    for key in keys:
        raw = obj.get(key)
        if isinstance(raw, str) and raw:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(raw)).decode()
            except ValueError:
                raise InvalidEvent(f"{key} {raw[:40]!r} is not hex") from None


def request_from_json(body: bytes) -> ExportTraceServiceRequest:
    """Parse an OTLP/JSON request (unknown fields ignored, as the spec asks); InvalidEvent if malformed."""
    try:
        data = msgspec.json.decode(body)
        if not isinstance(data, dict):
            raise InvalidEvent("an OTLP/JSON request is an object with `resourceSpans`")
        for rs in data.get("resourceSpans") or data.get("resource_spans") or ():
            for ss in rs.get("scopeSpans") or rs.get("scope_spans") or ():
                for span in ss.get("spans") or ():
                    _hex_to_b64(span, "traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")
                    for link in span.get("links") or ():
                        _hex_to_b64(link, "traceId", "spanId", "trace_id", "span_id")
        return json_format.ParseDict(data, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except (*UNDECODABLE, json_format.ParseError, AttributeError, TypeError, binascii.Error) as exc:
        raise InvalidEvent(f"not an OTLP/JSON trace request: {undecodable(exc)}") from None


def request_from_protobuf(body: bytes) -> ExportTraceServiceRequest:
    """Parse a binary OTLP request; InvalidEvent if it is not one."""
    try:
        return ExportTraceServiceRequest.FromString(body)
    except (DecodeError, ValueError) as exc:
        raise InvalidEvent(f"not an OTLP/protobuf trace request: {exc}") from None


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
