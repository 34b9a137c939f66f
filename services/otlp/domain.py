"""OTLP trace requests to lockgate's contracts (pure: no I/O).

Each span becomes a SpanRecord in the OTel Collector ClickHouse exporter's layout (values written as
the Collector writes them: bools `true`, arrays and maps as JSON), and each model-call span also an
InferenceEvent (`genai.py`). The API key decides the tenant and the app: a span naming another refuses
the whole request, and every stored span carries the key's tenant and app in `lockgate.tenant` and `lockgate.app`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from lockgate.contracts import InferenceEvent, SpanRecord
from lockgate.errors import InvalidEvent
from lockgate.redact import attribute_strings, scrub_mapping, scrub_span
from lockgate.server.apikeys import Forbidden, event_out_of_scope
from lockgate.services.otlp import genai

# Span.SpanKind and Status.StatusCode numbers, as the Collector's exporter names them
KINDS = {0: "Unspecified", 1: "Internal", 2: "Server", 3: "Client", 4: "Producer", 5: "Consumer"}
STATUSES = {0: "Unset", 1: "Ok", 2: "Error"}


def value(v: AnyValue) -> Any:
    """An OTLP AnyValue as a Python value (str, bool, int, float, bytes, list or dict; None if unset)."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, kind)


def attributes(kvs: Iterable[KeyValue]) -> dict[str, Any]:
    """OTLP key-values as a dict of Python values."""
    return {kv.key: value(kv.value) for kv in kvs}


# The last instant otel_traces' DateTime64(9) columns hold (2262-04-11): without a window, nothing later is kept.
_MAX_NS = 2**63 - 1


def _ts(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)


def _event_outside(events: Sequence[tuple[datetime, str, dict[str, str]]], window: tuple[datetime, datetime] | None,
                   latest: datetime) -> tuple[int, datetime] | None:
    """The first span event (index, time) outside `window` (without one: after `latest`), or None."""
    for n, (at, _, _) in enumerate(events):
        if (window is not None and not window[0] <= at <= window[1]) or at > latest:
            return n, at
    return None


def _window_text(window: tuple[datetime, datetime] | None, latest: datetime) -> str:
    if window is None:
        return f"up to {latest.isoformat(timespec='seconds')}"
    return f"{window[0].isoformat(timespec='seconds')} to {window[1].isoformat(timespec='seconds')}"


def _hex_id(raw: bytes, size: int, what: str, *, optional: bool = False) -> str:
    if optional and not raw:
        return ""
    if len(raw) != size or not any(raw):
        raise InvalidEvent(f"{what} must be {size} bytes, not all zero (got {len(raw)} bytes)")
    return raw.hex()


@dataclass
class Decoded:
    """One request's spans and events, and what was refused and why."""

    spans: list[SpanRecord] = field(default_factory=list)
    events: list[InferenceEvent] = field(default_factory=list)
    rejected: int = 0  # spans not stored
    no_event: int = 0  # model-call spans stored with no inference event made of them (not priced, not watched)
    problems: list[str] = field(default_factory=list)  # why: refused spans, and model calls with no event

    def problem(self, text: str) -> None:
        """Note a problem; the first few are reported to the client, the count always."""
        self.problems.append(text)


def decode(request: ExportTraceServiceRequest, *, tenant: str, app: str,
           window: tuple[datetime, datetime] | None = None, deployments: tuple[str, ...] = (),
           routers: genai.Routers = genai.NO_ROUTERS) -> Decoded:
    """Map a request sent with an API key of `tenant` (whose app is `app`, the app of every event made, and
    whose scope is `deployments`, empty for every deployment); a model call made through one of `routers` is
    marked billed by the router (genai.to_event).

    A span starting outside `window` (earliest, latest) is refused: a span dated 1970 or 2299 would
    open a storage partition of its own. Raises Forbidden if any span or resource names another
    tenant or app, or a model call names a deployment outside the key's scope: nothing of the request is kept.
    A span the request carries again (its trace and span id) is the same span: the first kept is stored, once."""
    out = Decoded()
    kept: set[tuple[str, str]] = set()
    # No span ends after this: not after the window's end, nor (without a window) past what the store holds.
    latest = window[1] if window is not None else _ts(_MAX_NS)
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        # Scrubbed once per resource, and the service name taken from the scrubbed copy: ServiceName is a
        # column of its own, and kept a secret that ResourceAttributes['service.name'] had masked. The API key's
        # tenant and app are stamped after the scrub, and `scrub_span` keeps them (names, never free text): the
        # sink's SenderTenant and SenderApp are these, so a tenant named like a key (probe p10) keeps its spans.
        stored_resource = dict(scrub_mapping(attribute_strings(resource))) | {genai.TENANT: tenant, genai.APP: app}
        service = stored_resource.get("service.name", "")
        for ss in rs.scope_spans:
            scope = ss.scope
            for span in ss.spans:
                attrs = attributes(span.attributes)
                try:
                    trace_id = _hex_id(span.trace_id, 16, "trace_id")
                    span_id = _hex_id(span.span_id, 8, "span_id")
                    parent = _hex_id(span.parent_span_id, 8, "parent_span_id", optional=True)
                    links = [(_hex_id(link.trace_id, 16, f"link {n} trace_id"), _hex_id(link.span_id, 8, f"link {n} span_id"),
                              link.trace_state, attribute_strings(attributes(link.attributes)))
                             for n, link in enumerate(span.links)]
                except InvalidEvent as exc:
                    out.rejected += 1
                    out.problem(f"span {span.name!r} refused: {exc.message}")
                    continue
                start = _ts(span.start_time_unix_nano)
                if window is not None and not window[0] <= start <= window[1]:
                    out.rejected += 1
                    out.problem(f"span {span_id} refused: its start {start.isoformat()} is outside the accepted "
                                f"window {window[0].isoformat(timespec='seconds')} to "
                                f"{window[1].isoformat(timespec='seconds')}")
                    continue
                if span.end_time_unix_nano and _ts(span.end_time_unix_nano) > latest:
                    # Its duration (the event's latency) would be as wrong: 2**64-1 made 584 years.
                    out.rejected += 1
                    out.problem(f"span {span_id} refused: its end {_ts(span.end_time_unix_nano).isoformat()} is "
                                f"after the accepted window's end {latest.isoformat(timespec='seconds')}")
                    continue
                # Span events' times are a column too (Events.Timestamp, DateTime64(9): 1900 to 2262): one the
                # store cannot hold failed the insert of every span published with it. (Links carry no time.)
                events = [(_ts(e.time_unix_nano), e.name, attribute_strings(attributes(e.attributes))) for e in span.events]
                if late := _event_outside(events, window, latest):
                    n, at = late
                    out.rejected += 1
                    out.problem(f"span {span_id} refused: its event {n} ({span.events[n].name!r}) time "
                                f"{at.isoformat()} is outside the accepted window {_window_text(window, latest)}")
                    continue
                facts = genai.SpanFacts(
                    trace_id=trace_id, span_id=span_id, name=span.name, start=start,
                    duration_ns=max(0, span.end_time_unix_nano - span.start_time_unix_nano),
                    error=span.status.code == 2, status_message=span.status.message, attributes=attrs,
                    resource=resource)
                named = genai.other_tenant(facts, tenant)
                if named is not None:
                    raise Forbidden(f"span {span.name!r} is for tenant {named!r}; this API key may only send "
                                    f"spans for tenant {tenant!r}")
                # Its model calls are the key's app's events (spend, drift): another app named is refused too.
                named = genai.other_app(facts, app)
                if named is not None:
                    raise Forbidden(f"span {span.name!r} is for app {named!r}; this API key may only send "
                                    f"spans of app {app!r}")
                if (trace_id, span_id) in kept:
                    continue  # not refused: it is stored (as its first copy), and a retry would change nothing
                kept.add((trace_id, span_id))
                # Scrubbed here, at the edge: an instrumentation records request headers, statements and
                # prompts as they were, and the span travels the bus before the store.
                out.spans.append(scrub_span(SpanRecord(
                    timestamp=facts.start, trace_id=trace_id, span_id=span_id, parent_span_id=parent,
                    trace_state=span.trace_state, name=span.name, kind=KINDS.get(span.kind, "Unspecified"),
                    service=service, resource=stored_resource, scope_name=scope.name, scope_version=scope.version,
                    attributes=attribute_strings(attrs), duration_ns=facts.duration_ns,
                    status_code=STATUSES.get(span.status.code, "Unset"), status_message=span.status.message,
                    events=events, links=links,
                )))
                try:
                    event = genai.to_event(facts, tenant=tenant, app=app, routers=routers)
                except InvalidEvent as exc:
                    out.no_event += 1
                    out.problem(f"span {span_id} stored, but no inference event made of it: {exc.message}")
                    continue
                if event is not None:
                    if what := event_out_of_scope(deployments, event.deployment, event.app):
                        raise Forbidden(f"span {span.name!r} {what}; this API key may only send model calls of "
                                        f"{', '.join(deployments)}: name the deployment (lockgate.deployment)")
                    out.events.append(event)
    return out
