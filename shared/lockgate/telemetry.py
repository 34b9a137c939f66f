"""OpenTelemetry tracing for every service: spans go through the SDK's BatchSpanProcessor to a
SpanExporter that publishes them over NATS, where the sink stores them in `otel_traces`.

Metrics live in `lockgate.metrics`. Telemetry never fails a request: every exporter path swallows
its own errors.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanContext, SpanKind, StatusCode, TraceFlags, Tracer

from lockgate import __version__, metrics
from lockgate.contracts import SpanRecord
from lockgate.propagation import extract
from lockgate.redact import attribute_strings, scrub_span
from lockgate.spanbatches import Message, span_batches, span_bytes

if TYPE_CHECKING:
    from lockgate.bus import Bus

log = logging.getLogger("lockgate.telemetry")

SOURCE = "lockgate"  # the SpanBatch source of lockgate's own spans (an application's arrive from `otlp`)

_KIND = {
    SpanKind.INTERNAL: "Internal",
    SpanKind.SERVER: "Server",
    SpanKind.CLIENT: "Client",
    SpanKind.PRODUCER: "Producer",
    SpanKind.CONSUMER: "Consumer",
}
_STATUS = {StatusCode.UNSET: "Unset", StatusCode.OK: "Ok", StatusCode.ERROR: "Error"}


def _ts(ns: int | None) -> datetime:
    return datetime.fromtimestamp((ns or 0) / 1e9, UTC)


def to_record(span: ReadableSpan) -> SpanRecord:
    """Map an SDK span to the OTel Collector ClickHouse exporter's row layout, secrets scrubbed."""
    ctx = span.get_span_context()
    parent = span.parent
    res = span.resource.attributes if span.resource else {}
    scope = span.instrumentation_scope
    return scrub_span(SpanRecord(
        timestamp=_ts(span.start_time),
        trace_id=format(ctx.trace_id, "032x"),
        span_id=format(ctx.span_id, "016x"),
        parent_span_id=format(parent.span_id, "016x") if parent else "",
        trace_state=str(ctx.trace_state.to_header()) if ctx.trace_state else "",
        name=span.name,
        kind=_KIND.get(span.kind, "Internal"),
        service=str(res.get("service.name", "")),
        resource=attribute_strings(res),
        scope_name=scope.name if scope else "",
        scope_version=(scope.version or "") if scope else "",
        attributes=attribute_strings(span.attributes),
        duration_ns=max(0, (span.end_time or 0) - (span.start_time or 0)),
        status_code=_STATUS.get(span.status.status_code, "Unset"),
        status_message=span.status.description or "",
        events=[(_ts(e.timestamp), e.name, attribute_strings(e.attributes)) for e in span.events],
        links=[
            (
                format(link.context.trace_id, "032x"),
                format(link.context.span_id, "016x"),
                "",
                attribute_strings(link.attributes),
            )
            for link in span.links
        ],
    ))


class NatsSpanExporter(SpanExporter):
    """Publishes each batch the BatchSpanProcessor hands over on `<prefix>.telemetry.spans`, as many SpanBatch
    messages as it takes to keep each under the connection's max_payload (`lockgate.spanbatches`).

    The processor calls `export` from its own worker thread while the bus lives on the event loop:
    the batch is converted and encoded in the worker, handed to the loop, and its messages waited for at most
    `timeout_s`. A span that cannot be published is dropped, counted (`dropped`, `lockgate.spans.dropped`)
    and logged, never raised.
    """

    def __init__(self, bus: Bus, loop: asyncio.AbstractEventLoop, *, timeout_s: float = 5.0) -> None:
        self._bus = bus
        self._loop = loop
        self._timeout_s = timeout_s
        self._stopped = False
        self._pending: set[asyncio.Future[Any]] = set()
        # Counted from the processor's thread and from the loop's.
        self._counts = threading.Lock()
        self.exported = 0
        self.dropped = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Publish `spans` in messages that fit the bus; SUCCESS once JetStream acknowledged every one."""
        if self._stopped or self._loop.is_closed() or not self._loop.is_running():
            self._drop(len(spans), "stopped")
            return SpanExportResult.FAILURE
        unsent = len(spans)  # spans not counted yet and not handed to the loop (whose `_publish` counts them)
        try:
            records = []
            for span in spans:
                try:
                    records.append(to_record(span))
                except Exception:
                    log.debug("span conversion failed", exc_info=True)
            if len(records) < len(spans):
                self._drop(len(spans) - len(records), "unconvertible")
            unsent = len(records)
            if not records:
                return SpanExportResult.SUCCESS
            # A batch is up to max_export_batch_size spans (2,000 of ~820 bytes each, a router's): after any
            # backlog it was one message over max_payload, refused whole (probe p31). Cut by encoded bytes instead.
            limit = span_bytes(self._bus.max_payload)
            messages, too_large = span_batches(records, source=SOURCE, max_bytes=limit)
            if too_large:
                # Dropped, not cut: a span with its attributes or events cut short would read as what was recorded.
                unsent -= len(too_large)
                self._drop(len(too_large), "too_large")
                log.warning("span export: %d spans dropped, each over %s bytes encoded, more than one bus message "
                            "holds: %s", len(too_large), f"{limit:,}",
                            ", ".join(f"{s.name!r} ({s.service}, span {s.span_id})" for s in too_large[:5]))
            if not messages:
                return SpanExportResult.FAILURE
            publish = self._publish(messages)
            if _running_loop() is self._loop:
                # Called on the loop's own thread (a force_flush from async code): waiting here
                # would block the loop that must do the publishing. Hand it over and move on.
                task = self._loop.create_task(publish)
                unsent = 0
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                return SpanExportResult.SUCCESS
            future = asyncio.run_coroutine_threadsafe(publish, self._loop)
            unsent = 0
            try:
                # `_publish` gives up after timeout_s and counts what it lost; longer means the loop itself is held.
                published = future.result(2 * self._timeout_s)
            except BaseException:
                future.cancel()
                raise
            return SpanExportResult.SUCCESS if published and not too_large else SpanExportResult.FAILURE
        except Exception as exc:
            if unsent:
                self._drop(unsent, "unpublished")
                log.warning("span export failed; %d spans dropped: %r", unsent, exc)
            else:  # handed over: the event loop, held past twice the timeout, counts them when it runs `_publish`
                log.warning("span export: no answer from the event loop within %g s: %r", 2 * self._timeout_s, exc)
            return SpanExportResult.FAILURE

    async def _publish(self, messages: list[Message]) -> bool:
        """Publish every message at once, waiting at most timeout_s for all; count each message's spans as
        exported or dropped. True if JetStream acknowledged them all."""
        subject = self._bus.subjects.spans
        tasks = [asyncio.ensure_future(self._bus.publish(subject, m.data, msg_id=m.id)) for m in messages]
        try:
            await asyncio.wait(tasks, timeout=self._timeout_s)
        finally:
            lost, why = 0, ""
            for task, message in zip(tasks, messages, strict=True):
                if task.done() and not task.cancelled() and task.exception() is None:
                    self._count(exported=message.spans)
                    continue
                lost += message.spans
                if not why:
                    why = (repr(task.exception()) if task.done() and not task.cancelled() else
                           f"no acknowledgement within {self._timeout_s:g} s")
                task.cancel()
            if lost:
                # Counted as lost, though a message sent before its acknowledgement was given up on may still be
                # stored (nats-py holds what it could not write yet, and sends it once the server reads again).
                self._drop(lost, "unacknowledged")
                log.warning("span export failed; %d of %d spans dropped (not acknowledged: those already sent may "
                            "still be stored): %s", lost, sum(m.spans for m in messages), why)
        return not lost

    def _count(self, *, exported: int = 0, dropped: int = 0) -> None:
        with self._counts:
            self.exported += exported
            self.dropped += dropped

    def _drop(self, n: int, reason: str) -> None:
        self._count(dropped=n)
        metrics.spans_dropped(n, reason)

    def shutdown(self) -> None:
        """Refuse further batches (the processor exported what it had before calling this)."""
        self._stopped = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here: each export waits for its acknowledgement."""
        return True


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _RecordAlways(Sampler):
    """Wraps a sampler so that what it would drop is still recorded (not exported): the span's end,
    with its status and duration, then reaches `_TailProcessor`, which keeps errors and slow spans."""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
        result = self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        if result.decision is Decision.DROP:
            return SamplingResult(Decision.RECORD_ONLY, result.attributes, result.trace_state)
        return result

    def get_description(self) -> str:
        return f"RecordAlways{{{self._inner.get_description()}}}"


class _FollowLinks(Sampler):
    """Samples a span that links to a sampled span: the sink's span for a message of events links to
    each request in it, and a request someone traced must keep its storing step in its trace."""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
        if links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"FollowLinks{{{self._inner.get_description()}}}"


def tail_aware_sampler(ratio: float) -> Sampler:
    """Head sampling at `ratio` for new traces, a caller's decision followed, a span linking to a
    sampled one kept, and everything else recorded but unexported unless it ends in error or slowly
    (see `_TailProcessor`)."""
    return ParentBased(_FollowLinks(_RecordAlways(TraceIdRatioBased(ratio))), remote_parent_sampled=ALWAYS_ON,
                       remote_parent_not_sampled=_FollowLinks(_RecordAlways(ALWAYS_OFF)),
                       local_parent_sampled=ALWAYS_ON, local_parent_not_sampled=_FollowLinks(_RecordAlways(ALWAYS_OFF)))


class _TailProcessor(SpanProcessor):
    """Passes sampled spans to the batch processor, plus unsampled ones that ended in error or took at
    least `slow_ms`: every failure and every slow request is traced, whatever the head ratio."""

    def __init__(self, inner: SpanProcessor, slow_ms: float) -> None:
        self._inner = inner
        self._slow_ns = int(slow_ms * 1e6)

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None or ctx.trace_flags.sampled:
            self._inner.on_end(span)
            return
        slow = span.end_time is not None and span.start_time is not None and \
            span.end_time - span.start_time >= self._slow_ns
        if span.status.status_code is StatusCode.ERROR or slow:
            # The batch processor exports sampled spans only: hand it a copy marked sampled.
            kept = SpanContext(ctx.trace_id, ctx.span_id, ctx.is_remote, TraceFlags(TraceFlags.SAMPLED),
                               ctx.trace_state)
            self._inner.on_end(ReadableSpan(
                name=span.name, context=kept, parent=span.parent, resource=span.resource,
                attributes=span.attributes, events=span.events, links=span.links, kind=span.kind,
                status=span.status, start_time=span.start_time, end_time=span.end_time,
                instrumentation_scope=span.instrumentation_scope))

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


# The ids a span about to be built must take (a deferred server span, built after its request ended).
_preset_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("lockgate_span_ids",
                                                                                      default=None)
# A root server span's parent: an explicit empty context skips the SDK's current-context lookups.
_ROOT = Context()
_UNSAMPLED = TraceFlags(TraceFlags.RANDOM_TRACE_ID)  # as the SDK flags a dropped span with a random trace id


class _Ids(RandomIdGenerator):
    """Random ids, unless a deferred span is being built with the ids its request already used."""

    def generate_trace_id(self) -> int:
        preset = _preset_ids.get()
        return preset[0] if preset is not None else super().generate_trace_id()

    def generate_span_id(self) -> int:
        preset = _preset_ids.get()
        return preset[1] if preset is not None else super().generate_span_id()


class DeferredSpan:
    """A root server span the head sampler dropped, not built yet: most requests end well and fast, and
    the SDK would build, fill and end a recorded span for each only for `_TailProcessor` to drop it.
    `kept` builds it at the request's end, with the ids and start time the request used, when the
    tail keeps it (an error, or slow); the SDK then samples it as before (same trace id, same verdict)."""

    __slots__ = ("_context", "_kind", "_name", "_spans", "_start_ns")

    def __init__(self, spans: ServerSpans, name: str, kind: SpanKind, context: SpanContext) -> None:
        self._spans, self._name, self._kind, self._context = spans, name, kind, context
        self._start_ns = time.time_ns()

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return False

    def end(self, end_time: int | None = None) -> None:
        """Nothing was built: nothing to end (the tail's rules run in `kept`)."""

    def kept(self, failed: bool) -> Span | None:
        """The SDK span, built now, when the request failed or was slow; else None (dropped, as before)."""
        if not failed and time.time_ns() - self._start_ns < self._spans.slow_ns:
            return None
        token = _preset_ids.set((self._context.trace_id, self._context.span_id))
        try:
            return self._spans.tracer.start_span(self._name, context=_ROOT, kind=self._kind, start_time=self._start_ns)
        finally:
            _preset_ids.reset(token)


class ServerSpans:
    """Starts a server's request spans. A caller's `traceparent` (followed, sampled or not) and a trace
    the head sampler keeps get an SDK span at once; any other new trace a DeferredSpan (see there).
    A tracer not made by `Telemetry` (no deferred ids) always gets SDK spans."""

    def __init__(self, tracer: Tracer, slow_ms: float, ratio: float) -> None:
        self.tracer = tracer
        self.slow_ns = int(slow_ms * 1e6)
        # Only a Telemetry tracer can build a span with given ids; its sampler is tail_aware_sampler(ratio),
        # which for a new trace without links decides as TraceIdRatioBased does, so the head decision is
        # taken here from the trace id alone (no sampler objects per request).
        self._deferrable = isinstance(getattr(tracer, "id_generator", None), _Ids)
        self._bound = TraceIdRatioBased.get_bound_for_rate(ratio)

    def start(self, name: str, traceparent: str | None, kind: SpanKind = SpanKind.SERVER) -> Span | DeferredSpan:
        """The span of one request; `traceparent` as the client sent it (None if absent)."""
        if traceparent or not self._deferrable:
            parent = (extract({"traceparent": traceparent}) if traceparent else None) or _ROOT
            return self.tracer.start_span(name, context=parent, kind=kind)
        trace_id = random.getrandbits(128) or 1
        span_id = random.getrandbits(64) or 1
        if trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < self._bound:
            token = _preset_ids.set((trace_id, span_id))
            try:
                return self.tracer.start_span(name, context=_ROOT, kind=kind)
            finally:
                _preset_ids.reset(token)
        return DeferredSpan(self, name, kind, SpanContext(trace_id, span_id, False, _UNSAMPLED))


class Telemetry:
    """A process's tracing: one TracerProvider per service (its own `service.name`), all sharing one
    sampler setting and one BatchSpanProcessor, so one bounded queue and one export thread.

    Sampling is tail-aware: `sample_ratio` of new traces are exported, and so is every span that ends
    in error or lasts `slow_ms` or more. Without an exporter (tests, benches) spans go nowhere.
    """

    def __init__(self, *, sample_ratio: float = 1.0, slow_ms: float = 5000.0, exporter: SpanExporter | None = None,
                 max_queue: int = 20_000, max_batch: int = 2000, schedule_delay_ms: float = 250) -> None:
        self.sample_ratio = sample_ratio
        self.slow_ms = slow_ms
        self._exporter = exporter
        # Spans reach otel_traces within about `schedule_delay_ms` (a quarter second, like the
        # loop this replaced), not the SDK's default five seconds; a full queue drops the oldest.
        self._processor = (
            _TailProcessor(BatchSpanProcessor(exporter, max_queue_size=max_queue,
                                              schedule_delay_millis=schedule_delay_ms,
                                              max_export_batch_size=min(max_batch, max_queue)), slow_ms)
            if exporter is not None else None
        )
        self._providers: dict[str, TracerProvider] = {}

    def tracer(self, service: str) -> trace.Tracer:
        """A tracer whose spans carry `service.name = lockgate-<service>`."""
        provider = self._providers.get(service)
        if provider is None:
            provider = TracerProvider(
                resource=Resource.create({"service.name": f"lockgate-{service}", "service.version": __version__}),
                sampler=tail_aware_sampler(self.sample_ratio),
                id_generator=_Ids(),  # a DeferredSpan is built with the ids its request already used
                shutdown_on_exit=False,  # `shutdown` runs while the bus can still publish, not at exit
            )
            if self._processor is not None:
                provider.add_span_processor(self._processor)
            self._providers[service] = provider
        return provider.get_tracer(f"lockgate.{service}", __version__)

    def server_spans(self, service: str) -> ServerSpans:
        """Request spans for a server of `service` (see ServerSpans)."""
        return ServerSpans(self.tracer(service), self.slow_ms, self.sample_ratio)

    @property
    def spans_dropped(self) -> int:
        """Spans lockgate's bus exporter lost since the start (0 with another exporter, which counts none)."""
        return self._exporter.dropped if isinstance(self._exporter, NatsSpanExporter) else 0

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export every ended span now and wait for it; blocks, so from async code use `asyncio.to_thread`."""
        if self._processor is None:
            return True
        return self._processor.force_flush(timeout_millis)

    async def shutdown(self) -> None:
        """Export what is queued and stop the export thread; call it before the bus closes."""
        if self._processor is not None:
            try:
                await asyncio.to_thread(self._processor.shutdown)
            except Exception:
                log.warning("span processor shutdown failed", exc_info=True)
