"""OpenTelemetry for every service. Spans are queued in memory and shipped over NATS to the sink.

Telemetry never fails a request: every exporter path swallows its own errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from lockgate import __version__
from lockgate.contracts import SpanBatch, SpanRecord

if TYPE_CHECKING:
    from lockgate.bus import Bus

log = logging.getLogger("lockgate.telemetry")
_propagator = TraceContextTextMapPropagator()
_getter = DefaultGetter()

_KIND = {
    SpanKind.INTERNAL: "Internal",
    SpanKind.SERVER: "Server",
    SpanKind.CLIENT: "Client",
    SpanKind.PRODUCER: "Producer",
    SpanKind.CONSUMER: "Consumer",
}
_STATUS = {StatusCode.UNSET: "Unset", StatusCode.OK: "Ok", StatusCode.ERROR: "Error"}


def inject(headers: dict[str, str]) -> None:
    """Add `traceparent` for the current span, if any."""
    try:
        _propagator.inject(headers)
    except Exception:  # telemetry never fails a request
        log.debug("traceparent inject failed", exc_info=True)


def extract(headers: dict[str, str]) -> Any:
    """An OTel context from `traceparent` headers (empty context if absent or malformed)."""
    try:
        return _propagator.extract(headers, getter=_getter)
    except Exception:
        return None


def _attrs(values: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (values or {}).items()}


def _ts(ns: int | None) -> datetime:
    return datetime.fromtimestamp((ns or 0) / 1e9, UTC)


def to_record(span: ReadableSpan) -> SpanRecord:
    """Map an SDK span to the OTel Collector ClickHouse exporter's row layout."""
    ctx = span.get_span_context()
    parent = span.parent
    res = span.resource.attributes if span.resource else {}
    scope = span.instrumentation_scope
    return SpanRecord(
        timestamp=_ts(span.start_time),
        trace_id=format(ctx.trace_id, "032x"),
        span_id=format(ctx.span_id, "016x"),
        parent_span_id=format(parent.span_id, "016x") if parent else "",
        trace_state=str(ctx.trace_state.to_header()) if ctx.trace_state else "",
        name=span.name,
        kind=_KIND.get(span.kind, "Internal"),
        service=str(res.get("service.name", "")),
        resource=_attrs(res),
        scope_name=scope.name if scope else "",
        scope_version=(scope.version or "") if scope else "",
        attributes=_attrs(span.attributes),
        duration_ns=max(0, (span.end_time or 0) - (span.start_time or 0)),
        status_code=_STATUS.get(span.status.status_code, "Unset"),
        status_message=span.status.description or "",
        events=[(_ts(e.timestamp), e.name, _attrs(e.attributes)) for e in span.events],
        links=[
            (
                format(link.context.trace_id, "032x"),
                format(link.context.span_id, "016x"),
                "",
                _attrs(link.attributes),
            )
            for link in span.links
        ],
    )


class _QueueProcessor(SpanProcessor):
    """Keeps finished spans in a bounded deque; the oldest are dropped under overload."""

    def __init__(self, maxlen: int) -> None:
        self.spans: deque[ReadableSpan] = deque(maxlen=maxlen)

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        self.spans.clear()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class Telemetry:
    """Tracer providers per service, sharing one span queue shipped to NATS."""

    def __init__(self, *, sample_ratio: float = 1.0, max_queue: int = 20_000) -> None:
        self.sample_ratio = sample_ratio
        self._queue = _QueueProcessor(max_queue)
        self._providers: dict[str, TracerProvider] = {}
        self.exported = 0

    def tracer(self, service: str) -> trace.Tracer:
        """A tracer whose spans carry `service.name = lockgate-<service>`."""
        provider = self._providers.get(service)
        if provider is None:
            provider = TracerProvider(
                resource=Resource.create({"service.name": f"lockgate-{service}", "service.version": __version__}),
                sampler=ParentBased(TraceIdRatioBased(self.sample_ratio)),
            )
            provider.add_span_processor(self._queue)
            self._providers[service] = provider
        return provider.get_tracer(f"lockgate.{service}", __version__)

    def drain(self, limit: int = 2000) -> list[SpanRecord]:
        """Take up to `limit` finished spans as records."""
        out: list[SpanRecord] = []
        q = self._queue.spans
        while q and len(out) < limit:
            try:
                out.append(to_record(q.popleft()))
            except Exception:
                log.debug("span conversion failed", exc_info=True)
        return out

    async def flush(self, bus: Bus) -> int:
        """Publish every queued span; returns how many were shipped. Never raises."""
        shipped = 0
        while True:
            records = self.drain()
            if not records:
                return shipped
            try:
                await bus.publish(bus.subjects.spans, SpanBatch(spans=records))
                shipped += len(records)
                self.exported += len(records)
            except Exception:
                log.debug("span export failed; %d spans dropped", len(records), exc_info=True)
                return shipped

    async def run_exporter(self, bus: Bus, interval_s: float = 0.25) -> None:
        """Ship spans every `interval_s` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self.flush(bus)
        finally:
            await asyncio.shield(self.flush(bus))
