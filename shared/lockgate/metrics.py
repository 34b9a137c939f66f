"""The process's metrics: one MeterProvider, the instruments that matter, recorders that never raise.

`install()` makes the process's MeterProvider (resource `service.name`) with a Prometheus reader, so
any HTTP server of the process can answer `GET /metrics` with `prometheus_text()`, plus an OTLP/HTTP
exporter when an endpoint is configured. Until then, and after `shutdown()`, recording goes to no-op
instruments: code records unconditionally and pays nearly nothing when nobody reads.

Attributes stay low-cardinality on purpose (service, origin, variant, status, reason): never a
tenant, model or deployment taken from a request, which a caller could make unbounded.

Telemetry never fails a request: every recorder swallows its own errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from lockgate import __version__

log = logging.getLogger("lockgate.metrics")

# LLM calls take from milliseconds (cached, errors) to minutes (long generations); the SDK's
# default buckets are made for milliseconds and would put every call in the last few.
_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Instruments:
    """Every instrument lockgate records, created once per MeterProvider."""

    def __init__(self, meter: Meter) -> None:
        self.events_in = meter.create_counter(
            "lockgate.events.received", unit="{event}", description="events a service took in")
        self.events_out = meter.create_counter(
            "lockgate.events.published", unit="{event}", description="events a service published")
        self.events_dropped = meter.create_counter(
            "lockgate.events.dropped", unit="{event}",
            description="events a service lost, by reason (buffer overflow, failed flush nobody awaited)")
        self.spans_dropped = meter.create_counter(
            "lockgate.spans.dropped", unit="{span}",
            description="spans of lockgate's own tracing lost on their way to the bus, by reason (too_large: over a "
                        "bus message alone; unacknowledged, though maybe stored; unpublished; unconvertible; "
                        "stopped)")
        self.dead_letters = meter.create_counter(
            "lockgate.dead_letters", unit="{message}", description="messages sent to the DLQ, by origin")
        self.dead_letters_failed = meter.create_counter(
            "lockgate.dead_letters.failed", unit="{message}",
            description="dead letters JetStream did not take (DLQ full or down), by origin: their messages are "
                        "redelivered until one is stored")
        self.provenance_skipped = meter.create_counter(
            "lockgate.provenance.skipped", unit="{record}",
            description="messages on a provenance history's subject that readers skip (unreadable, not signed by a "
                        "trusted person, a copy, another history's), by kind; each counted once per process")
        self.redeliveries_skipped = meter.create_counter(
            "lockgate.redeliveries.skipped", unit="{message}",
            description="redelivered messages whose rows were already stored")
        # Observed from a plain dict at collection time rather than an SDK counter's add() per request:
        # the same cumulative sum, without the SDK's attribute hashing and locking on the hot path.
        self.router_requests = meter.create_observable_counter(
            "lockgate.router.requests", callbacks=[_observe_router_requests], unit="{request}",
            description="requests the router answered")
        self.router_duration = meter.create_histogram(
            "lockgate.router.request.duration", unit="s",
            description="time from request to the response's last byte, upstream included",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_S)


# Requests the router answered, by (variant, status), since the provider was installed.
_router_counts: dict[tuple[str, str], int] = {}
_router_attributes: dict[tuple[str, str], dict[str, str]] = {}


def _observe_router_requests(options: CallbackOptions) -> list[Observation]:
    # A copy: an OTLP export collects on its own thread while the loop counts.
    return [Observation(n, _router_attributes[k]) for k, n in dict(_router_counts).items()]


_NOOP = _Instruments(NoOpMeter("lockgate"))
_instruments = _NOOP
_provider: MeterProvider | None = None
_registry: CollectorRegistry | None = None


def install(service_name: str, *, otlp_endpoint: str = "",
            readers: Sequence[MetricReader] = ()) -> MeterProvider:
    """Make this process's MeterProvider (replacing an earlier one): Prometheus text always, OTLP if configured.

    `readers` adds more (tests pass an InMemoryMetricReader).
    """
    global _instruments, _provider, _registry
    if _provider is not None:
        shutdown(_provider)
    # A registry of our own rather than prometheus_client's global one, so a replaced provider
    # leaves no collector behind and /metrics shows only lockgate's instruments.
    registry = CollectorRegistry(auto_describe=True)
    all_readers: list[MetricReader] = [PrometheusMetricReader(registry=registry), *readers]
    if otlp_endpoint:
        # Imported only when used: requests and protobuf are not worth their memory otherwise.
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(endpoint=_metrics_url(otlp_endpoint))
        all_readers.append(PeriodicExportingMetricReader(exporter))
    provider = MeterProvider(
        metric_readers=all_readers,
        resource=Resource.create({"service.name": service_name, "service.version": __version__}),
        shutdown_on_exit=False,  # the runtime shuts it down, with a last OTLP export, before the loop ends
    )
    _router_counts.clear()  # a new provider counts from zero, as its SDK counters would
    _instruments = _Instruments(provider.get_meter("lockgate", __version__))
    _provider, _registry = provider, registry
    return provider


def shutdown(provider: MeterProvider | None = None) -> None:
    """Export once more and stop `provider` (default: the installed one); blocks on OTLP, so not on the loop."""
    global _instruments, _provider, _registry
    provider = provider or _provider
    if provider is None:
        return
    if provider is _provider:
        _instruments, _provider, _registry = _NOOP, None, None
    try:
        provider.shutdown()
    except Exception:  # an unreachable collector must not fail a clean stop
        log.warning("metrics shutdown failed", exc_info=True)


def _metrics_url(endpoint: str) -> str:
    # Like OTEL_EXPORTER_OTLP_ENDPOINT: a base URL to which the signal's path is appended.
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/metrics") else f"{endpoint}/v1/metrics"


# Keeps a sample of a metric family (the family's Prometheus name, the sample's labels) or leaves it out.
Keep = Callable[[str, Mapping[str, str]], bool]


def routers_own(family: str, labels: Mapping[str, str]) -> bool:
    """Whether a sample counts the router's own requests: its request counters and durations, and the events it
    published or dropped (one per request or call it made). Not the rest of the process's: in an embedded stack
    (`lockgate up`) the sink, evaluator, drift, cost, gatekeeper and lineage count every tenant's events on the same
    provider, and the router's own consumers every tenant's decisions and drift reports."""
    return family.startswith("lockgate_router_") or (
        family in ("lockgate_events_published", "lockgate_events_dropped") and labels.get("service") == "router")


class _Kept(Collector):
    """A registry's metrics with only the samples `keep` keeps, and the process's `target_info` (the resource: its
    service name and version, no count)."""

    def __init__(self, registry: CollectorRegistry, keep: Keep) -> None:
        self._registry, self._keep = registry, keep

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.type == "info":  # target_info, whose family the exporter names `target`
                yield family
                continue
            samples = [s for s in family.samples if self._keep(family.name, s.labels)]
            if samples:
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = samples
                yield kept


def prometheus_text(keep: Keep | None = None) -> tuple[bytes, str]:
    """The installed provider's metrics in the Prometheus text format (only the samples `keep` keeps, when given),
    and its content type."""
    registry = _registry
    if registry is None:
        return b"", CONTENT_TYPE_LATEST
    try:
        return generate_latest(registry if keep is None else _Kept(registry, keep)), CONTENT_TYPE_LATEST
    except Exception:
        log.warning("metrics collection failed", exc_info=True)
        return b"", CONTENT_TYPE_LATEST


async def serve_prometheus(request: Any, keep: Keep | None = None) -> Any:
    """aiohttp handler for `GET /metrics`: the installed provider's metrics as Prometheus text (only the samples
    `keep` keeps, when given)."""
    from aiohttp import web  # only processes that serve HTTP have it loaded already

    body, content_type = prometheus_text(keep)
    return web.Response(body=body, headers={"Content-Type": content_type})


def _add(instrument: str, n: float, attributes: dict[str, str]) -> None:
    try:
        getattr(_instruments, instrument).add(n, attributes)
    except Exception:  # telemetry never fails a request
        log.debug("metric %s failed", instrument, exc_info=True)


def events_in(service: str, n: int = 1) -> None:
    """Count events a service took in."""
    _add("events_in", n, {"service": service})


def events_out(service: str, n: int = 1) -> None:
    """Count events a service published."""
    _add("events_out", n, {"service": service})


def events_out_counter(service: str) -> Callable[[int], None]:
    """An `on_sent` callback (e.g. for an Outbox) that counts events this service published."""

    def on_sent(n: int) -> None:
        events_out(service, n)

    return on_sent


def events_dropped(service: str, n: int = 1, reason: str = "overflow") -> None:
    """Count events a service lost, and why."""
    _add("events_dropped", n, {"service": service, "reason": reason})


def spans_dropped(n: int, reason: str) -> None:
    """Count spans of the process's own tracing lost before the bus took them, and why."""
    _add("spans_dropped", n, {"reason": reason})


def drop_counter(service: str) -> Callable[[int, str], None]:
    """An `on_drop` callback for a Batcher that counts its losses as this service's dropped events."""

    def on_drop(n: int, reason: str) -> None:
        events_dropped(service, n, reason)

    return on_drop


def dead_letter(origin: str) -> None:
    """Count one message sent to the DLQ by `origin`."""
    _add("dead_letters", 1, {"origin": origin})


def dead_letter_failed(origin: str) -> None:
    """Count one dead letter `origin` could not publish (its message waits for redelivery)."""
    _add("dead_letters_failed", 1, {"origin": origin})


def redeliveries_skipped(service: str, n: int) -> None:
    """Count redelivered messages skipped because their rows were already stored."""
    if n:
        _add("redeliveries_skipped", n, {"service": service})


def provenance_skipped(kind: str) -> None:
    """Count one message a provenance reader skipped, by why (`chain.SkipKind`)."""
    _add("provenance_skipped", 1, {"kind": kind})


def router_request(variant: str, status: str, duration_s: float) -> None:
    """Count one answered router request and record its duration."""
    key = (variant, status)
    attributes = _router_attributes.get(key)
    if attributes is None:
        attributes = _router_attributes[key] = {"variant": variant, "status": status}
    _router_counts[key] = _router_counts.get(key, 0) + 1
    try:
        _instruments.router_duration.record(duration_s, attributes)
    except Exception:
        log.debug("metric failed", exc_info=True)
