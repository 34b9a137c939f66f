"""Finished OpenTelemetry spans on their way to `otel_traces`."""

from __future__ import annotations

from datetime import datetime

import msgspec

from lockgate.contracts.envelope import Event


class SpanRecord(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One span in the OTel Collector ClickHouse exporter's column layout."""

    timestamp: datetime
    trace_id: str
    span_id: str
    parent_span_id: str
    trace_state: str
    name: str
    kind: str
    service: str
    resource: dict[str, str]
    scope_name: str
    scope_version: str
    attributes: dict[str, str]
    duration_ns: int
    status_code: str
    status_message: str
    events: list[tuple[datetime, str, dict[str, str]]] = []
    links: list[tuple[str, str, str, dict[str, str]]] = []


class SpanBatch(Event, frozen=True, kw_only=True, tag="lockgate.telemetry.spans"):
    """A batch of spans exported by one service process."""

    spans: list[SpanRecord]
