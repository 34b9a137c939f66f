"""Metrics read back with an InMemoryMetricReader; spans flushed through the SDK's BatchSpanProcessor."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from lockgate import metrics
from lockgate.batcher import Batcher
from lockgate.propagation import extract
from lockgate.telemetry import Telemetry
from tests.helpers import metric_points


def test_dead_letters_are_counted_by_origin(metric_reader: InMemoryMetricReader) -> None:
    for origin in ("sink", "sink", "drift"):
        metrics.dead_letter(origin)
    assert metric_points(metric_reader, "lockgate.dead_letters") == {
        (("origin", "sink"),): 2,
        (("origin", "drift"),): 1,
    }


async def test_batcher_drops_are_counted_by_reason(metric_reader: InMemoryMetricReader) -> None:
    gate = asyncio.Event()

    async def slow(items: list[int]) -> None:
        await gate.wait()

    b: Batcher[int] = Batcher(slow, max_items=1, max_age_s=60, capacity=2,
                              on_drop=metrics.drop_counter("router"))
    assert [b.add(i) for i in range(5)] == [True, True, False, False, False]
    gate.set()
    await b.close()

    async def broken(items: list[int]) -> None:
        raise ConnectionError("bus down")

    failing: Batcher[int] = Batcher(broken, max_items=3, max_age_s=60, on_drop=metrics.drop_counter("router"))
    failing.add(1)
    failing.add(2)
    with pytest.raises(ConnectionError):
        await failing.submit(3)  # fills the batch; its caller hears of the failure: not a silent loss
    await failing.close()

    assert metric_points(metric_reader, "lockgate.events.dropped") == {
        (("reason", "overflow"), ("service", "router")): 3,
        (("reason", "flush_failed"), ("service", "router")): 2,
    }
    assert b.dropped == 3


async def test_a_failing_drop_callback_does_not_break_the_batcher() -> None:
    def boom(n: int, reason: str) -> None:
        raise RuntimeError("metrics backend gone")

    flushed: list[int] = []

    async def keep(items: list[int]) -> None:
        flushed.extend(items)

    b: Batcher[int] = Batcher(keep, max_items=10, max_age_s=60, capacity=1, on_drop=boom)
    assert b.add(1) is True
    assert b.add(2) is False
    await b.close()
    assert flushed == [1] and b.dropped == 1


def test_router_requests_by_variant_and_status_with_latency(metric_reader: InMemoryMetricReader) -> None:
    metrics.router_request("stable", "ok", 0.02)
    metrics.router_request("stable", "ok", 1.5)
    metrics.router_request("canary", "error", 0.3)
    assert metric_points(metric_reader, "lockgate.router.requests") == {
        (("status", "ok"), ("variant", "stable")): 2,
        (("status", "error"), ("variant", "canary")): 1,
    }
    assert metric_points(metric_reader, "lockgate.router.request.duration") == {
        (("status", "ok"), ("variant", "stable")): 2,
        (("status", "error"), ("variant", "canary")): 1,
    }


def test_service_counters(metric_reader: InMemoryMetricReader) -> None:
    metrics.events_in("sink", 500)
    metrics.events_out("router", 499)
    metrics.events_dropped("router", 1)
    metrics.redeliveries_skipped("sink", 2)
    metrics.redeliveries_skipped("sink", 0)
    assert metric_points(metric_reader, "lockgate.events.received") == {(("service", "sink"),): 500}
    assert metric_points(metric_reader, "lockgate.events.published") == {(("service", "router"),): 499}
    assert metric_points(metric_reader, "lockgate.redeliveries.skipped") == {(("service", "sink"),): 2}


def test_prometheus_text_shows_the_installed_provider_only() -> None:
    metrics.shutdown()  # whatever an earlier test may have left installed
    metrics.dead_letter("before")  # nothing installed: recorded nowhere, and no error
    assert metrics.prometheus_text()[0] == b""
    provider = metrics.install("lockgate-unit")
    try:
        metrics.dead_letter("gatekeeper")
        text, content_type = metrics.prometheus_text()
        assert content_type.startswith("text/plain")
        assert b'lockgate_dead_letters_total{origin="gatekeeper"' in text
        assert b'service_name="lockgate-unit"' in text  # the resource, as target_info
        assert b"before" not in text
    finally:
        metrics.shutdown(provider)
    assert metrics.prometheus_text()[0] == b""


def test_prometheus_text_kept_to_the_routers_own_series(metric_reader: InMemoryMetricReader) -> None:
    # Probe p27 F1: an embedded stack's other services count every tenant's events on the same provider.
    metrics.router_request("canary", "ok", 0.1)
    metrics.events_out("router", 3)
    metrics.events_dropped("router", 1)
    metrics.events_in("sink", 50)
    metrics.events_in("router", 2)  # every tenant's decisions and drift reports the router follows
    metrics.events_out("cost", 4)
    metrics.dead_letter("router")
    def samples(keep: metrics.Keep | None) -> dict[tuple[str, str], float]:
        text = metrics.prometheus_text(keep)[0].decode()
        return {(s.name, s.labels.get("service") or s.labels.get("origin") or s.labels.get("variant", "")): s.value
                for family in text_string_to_metric_families(text) for s in family.samples
                if not s.name.endswith(("_created", "_bucket"))}

    own = samples(metrics.routers_own)
    assert own.pop(("target_info", "")) == 1
    assert own == {("lockgate_router_requests_total", "canary"): 1, ("lockgate_events_published_total", "router"): 3,
                   ("lockgate_events_dropped_total", "router"): 1, ("lockgate_router_request_duration_seconds_count",
                                                                    "canary"): 1,
                   ("lockgate_router_request_duration_seconds_sum", "canary"): 0.1}
    assert samples(None)[("lockgate_events_received_total", "sink")] == 50


def test_recording_never_raises(metric_reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("instrument gone")

    monkeypatch.setattr(metrics, "_instruments", Broken())
    metrics.dead_letter("sink")
    metrics.events_dropped("router", 3, "overflow")
    metrics.redeliveries_skipped("sink", 1)
    metrics.router_request("stable", "ok", 0.1)


def test_otlp_endpoint_is_a_base_url() -> None:
    assert metrics._metrics_url("http://collector:4318/") == "http://collector:4318/v1/metrics"
    assert metrics._metrics_url("http://collector:4318/v1/metrics") == "http://collector:4318/v1/metrics"


def test_force_flush_exports_ended_spans_at_once() -> None:
    exporter = InMemorySpanExporter()
    # A schedule far beyond the test: only force_flush can have exported these.
    telemetry = Telemetry(exporter=exporter, schedule_delay_ms=600_000)
    tracer = telemetry.tracer("unit")
    for name in ("a", "b", "c"):
        tracer.start_span(name).end()
    assert telemetry.force_flush() is True
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["a", "b", "c"]
    assert {s.resource.attributes["service.name"] for s in spans} == {"lockgate-unit"}
    asyncio.run(telemetry.shutdown())


def test_sampling_ratio_zero_records_nothing_but_follows_a_sampled_parent() -> None:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(sample_ratio=0.0, exporter=exporter, schedule_delay_ms=600_000)
    tracer = telemetry.tracer("unit")
    tracer.start_span("root").end()
    parent = extract({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    tracer.start_span("child", context=parent).end()
    telemetry.force_flush()
    assert [s.name for s in exporter.get_finished_spans()] == ["child"]
    asyncio.run(telemetry.shutdown())


def test_the_sdk_loads_no_telemetry_stack() -> None:
    """`pip install lockgate` has no OpenTelemetry: the SDK and its batcher must not import it."""
    code = ("import sys, lockgate.client, lockgate.batcher; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'opentelemetry', 'prometheus_client'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_outbox_callbacks_count_a_services_events(metric_reader: InMemoryMetricReader) -> None:
    metrics.events_out_counter("router")(500)
    metrics.drop_counter("router")(2, "publish_failed")
    assert metric_points(metric_reader, "lockgate.events.published") == {(("service", "router"),): 500}
    assert metric_points(metric_reader, "lockgate.events.dropped") == {
        (("reason", "publish_failed"), ("service", "router")): 2,
    }
