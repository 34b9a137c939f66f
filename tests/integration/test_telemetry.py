"""Spans over NATS behind the SDK's BatchSpanProcessor, and metrics, on a real nats-server and chDB."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import Link, SpanContext, Status, StatusCode, TraceFlags
from prometheus_client.parser import text_string_to_metric_families

from lockgate import metrics
from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import InferenceEvent, SpanBatch
from lockgate.propagation import extract
from lockgate.server.apikeys import KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.subjects import Subjects
from lockgate.telemetry import DeferredSpan, NatsSpanExporter, Telemetry
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import eventually, metric_points

pytestmark = pytest.mark.timeout(60)

_spans: Codec[SpanBatch] = Codec(SpanBatch)
_events: Codec[list[InferenceEvent]] = Codec(list[InferenceEvent])


async def test_force_flush_ships_ended_spans_to_the_subject(bus: Bus) -> None:
    sub = await bus.nc.subscribe(bus.subjects.spans)
    exporter = NatsSpanExporter(bus, asyncio.get_running_loop())
    # The processor's own schedule is far beyond the test: only force_flush can ship these.
    telemetry = Telemetry(exporter=exporter, schedule_delay_ms=600_000)
    tracer = telemetry.tracer("test")
    with tracer.start_as_current_span("parent"):
        tracer.start_span("child").end()
    assert await asyncio.to_thread(telemetry.force_flush) is True

    batch = _spans.decode((await sub.next_msg(timeout=10)).data)
    by_name = {s.name: s for s in batch.spans}
    assert set(by_name) == {"parent", "child"}
    assert by_name["child"].parent_span_id == by_name["parent"].span_id
    assert by_name["child"].trace_id == by_name["parent"].trace_id
    assert by_name["parent"].service == "lockgate-test"
    assert exporter.exported == 2
    await telemetry.shutdown()


async def test_unsampled_spans_are_exported_only_when_failed_or_slow(bus: Bus) -> None:
    sub = await bus.nc.subscribe(bus.subjects.spans)
    telemetry = Telemetry(sample_ratio=0.0, slow_ms=1000.0,
                          exporter=NatsSpanExporter(bus, asyncio.get_running_loop()), schedule_delay_ms=600_000)
    tracer = telemetry.tracer("router")
    fast = tracer.start_span("fast and fine")
    assert fast.is_recording() and not fast.get_span_context().trace_flags.sampled
    fast.end()
    failed = tracer.start_span("failed")
    failed.set_status(Status(StatusCode.ERROR, "upstream_error"))
    failed.end()
    slow = tracer.start_span("slow", start_time=1_000_000_000)
    slow.end(end_time=1_000_000_000 + 1_500_000_000)  # 1.5 s long, past slow_ms
    child = tracer.start_span("child of a sampled caller", context=extract(
        {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}))
    child.end()
    sampled_request = SpanContext(int("ef" * 16, 16), int("12" * 8, 16), is_remote=True,
                                  trace_flags=TraceFlags(TraceFlags.SAMPLED))
    tracer.start_span("links a sampled request", links=[Link(sampled_request)]).end()
    unsampled_request = SpanContext(int("ef" * 16, 16), int("34" * 8, 16), is_remote=True)
    tracer.start_span("links an unsampled request", links=[Link(unsampled_request)]).end()
    assert await asyncio.to_thread(telemetry.force_flush) is True

    batch = _spans.decode((await sub.next_msg(timeout=10)).data)
    assert sorted(s.name for s in batch.spans) == ["child of a sampled caller", "failed", "links a sampled request",
                                                   "slow"]
    assert next(s for s in batch.spans if s.name == "failed").status_code == "Error"
    await telemetry.shutdown()


async def test_server_spans_build_a_dropped_request_span_only_when_the_tail_keeps_it(bus: Bus) -> None:
    sub = await bus.nc.subscribe(bus.subjects.spans)
    telemetry = Telemetry(sample_ratio=0.0, slow_ms=60_000.0,
                          exporter=NatsSpanExporter(bus, asyncio.get_running_loop()), schedule_delay_ms=600_000)
    spans = telemetry.server_spans("router")
    fine, failed = spans.start("fine", None), spans.start("failed", None)
    assert isinstance(fine, DeferredSpan) and not fine.get_span_context().trace_flags.sampled
    assert fine.kept(failed=False) is None  # fast and fine: never built, as the tail would drop it
    built = failed.kept(failed=True)
    assert built is not None
    built.set_status(Status(StatusCode.ERROR, "upstream_error"))
    built.end()
    followed = spans.start("followed", f"00-{'ab' * 16}-{'cd' * 8}-01")  # a sampled caller: an SDK span at once
    assert not isinstance(followed, DeferredSpan) and followed.get_span_context().trace_flags.sampled
    followed.end()
    assert await asyncio.to_thread(telemetry.force_flush) is True

    batch = {s.name: s for s in _spans.decode((await sub.next_msg(timeout=10)).data).spans}
    assert sorted(batch) == ["failed", "followed"]
    ctx = failed.get_span_context()  # the ids the request used (its traceparent upstream, its event)
    assert (batch["failed"].trace_id, batch["failed"].span_id) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert batch["failed"].status_code == "Error" and batch["failed"].parent_span_id == ""
    assert batch["followed"].trace_id == "ab" * 16
    await telemetry.shutdown()

    # Slow: with a threshold of 0 every request is slow, so kept.
    telemetry = Telemetry(sample_ratio=0.0, slow_ms=0.0,
                          exporter=NatsSpanExporter(bus, asyncio.get_running_loop()), schedule_delay_ms=600_000)
    slow = telemetry.server_spans("router").start("slow", None)
    assert isinstance(slow, DeferredSpan)
    slow_built = slow.kept(failed=False)
    assert slow_built is not None
    slow_built.end()
    assert await asyncio.to_thread(telemetry.force_flush) is True
    assert [s.name for s in _spans.decode((await sub.next_msg(timeout=10)).data).spans] == ["slow"]
    await telemetry.shutdown()

    sampled = Telemetry(sample_ratio=1.0).server_spans("router").start("sampled", None)
    assert not isinstance(sampled, DeferredSpan) and sampled.get_span_context().trace_flags.sampled


async def test_force_flush_on_the_event_loop_thread_does_not_block_it(bus: Bus) -> None:
    sub = await bus.nc.subscribe(bus.subjects.spans)
    exporter = NatsSpanExporter(bus, asyncio.get_running_loop())
    telemetry = Telemetry(exporter=exporter, schedule_delay_ms=600_000)
    telemetry.tracer("test").start_span("from the loop").end()
    # Waiting for the publish here would block the loop that must do it: it is handed over instead.
    assert telemetry.force_flush() is True
    batch = _spans.decode((await sub.next_msg(timeout=10)).data)
    assert [s.name for s in batch.spans] == ["from the loop"]
    await telemetry.shutdown()


async def test_shutdown_flushes_spans_into_otel_traces(context: ServiceContext, run_services: Any) -> None:
    svcs = await run_services("sink")
    sink = svcs["sink"].handlers
    telemetry = Telemetry(exporter=NatsSpanExporter(context.bus, asyncio.get_running_loop()),
                          schedule_delay_ms=600_000)
    tracer = telemetry.tracer("router")
    trace_ids = set()
    for i in range(5):
        span = tracer.start_span(f"chat {i}", attributes={"lockgate.release": "r1", "cached": True,
                                                          "gen_ai.response.finish_reasons": ("stop", "length")})
        trace_ids.add(format(span.get_span_context().trace_id, "032x"))
        span.end()
    await telemetry.shutdown()  # no force_flush: stopping must ship what is queued

    def stored() -> bool:
        return context.store.scalar("SELECT count() FROM otel_traces WHERE ServiceName = 'lockgate-router'") >= 5

    await eventually(stored, [sink.spans], what="spans in otel_traces")
    rows = context.store.rows("SELECT TraceId, SpanAttributes['lockgate.release'] AS release, SpanAttributes['cached']"
                              " AS cached, SpanAttributes['gen_ai.response.finish_reasons'] AS reasons FROM otel_traces")
    assert {r["TraceId"] for r in rows} == trace_ids
    assert {r["release"] for r in rows} == {"r1"}
    # Written as an application's spans are (test_otlp): arrays as JSON, booleans as the Collector writes them.
    # Before (probe p23 F1), Python's repr: `('stop', 'length')` and `True`, which no JSONExtract reads.
    assert {(r["cached"], r["reasons"]) for r in rows} == {("true", '["stop","length"]')}


async def test_a_batch_over_max_payload_is_published_in_messages_that_fit_and_every_span_stored_once(
        context: ServiceContext, run_services: Any) -> None:
    """Probe p31 F2: the processor hands the exporter up to 2,000 spans at once (after any backlog: a bus stall of a
    few seconds, or traced load), a router span encodes to ~820 bytes, and the whole batch went as one message over
    NATS' max_payload (1 MB): PayloadTooLarge, "2000 spans dropped", the spans around an outage lost. Now the batch
    is cut by encoded bytes into messages that fit the connection's max_payload."""
    svcs = await run_services("sink")
    bus = context.bus
    messages = await bus.nc.subscribe(bus.subjects.spans)
    exporter = NatsSpanExporter(bus, asyncio.get_running_loop())
    telemetry = Telemetry(exporter=exporter, schedule_delay_ms=600_000)
    tracer = telemetry.tracer("router")
    # About a router span's size: its attributes (release, deployment, model, tokens, finish reasons...) in one.
    spans = [tracer.start_span(f"chat {i}", attributes={"lockgate.detail": "x" * 560}) for i in range(2000)]
    for span in spans:
        span.end()
    assert await asyncio.to_thread(telemetry.force_flush) is True

    # One export of all 2,000 (the processor's max_export_batch_size) would be a message over max_payload.
    received: list[tuple[bytes, SpanBatch]] = []
    while sum(len(batch.spans) for _, batch in received) < 2000:
        data = (await messages.next_msg(timeout=10)).data
        received.append((data, _spans.decode(data)))
    assert sum(len(data) for data, _ in received) > bus.nc.max_payload
    assert len(received) >= 2 and all(len(data) < bus.nc.max_payload for data, _ in received)
    assert (exporter.exported, exporter.dropped, telemetry.spans_dropped) == (2000, 0, 0)

    def stored() -> bool:
        return context.store.scalar("SELECT count() FROM otel_traces WHERE ServiceName = 'lockgate-router'") >= 2000

    await eventually(stored, [svcs["sink"].handlers.spans], what="2,000 spans in otel_traces")
    rows = context.store.rows("SELECT count() AS n, uniqExact(SpanId) AS ids FROM otel_traces")
    assert (rows[0]["n"], rows[0]["ids"]) == (2000, 2000)
    assert {r["SpanId"] for r in context.store.rows("SELECT SpanId FROM otel_traces")} == {
        format(s.get_span_context().span_id, "016x") for s in spans}
    await telemetry.shutdown()


async def test_a_span_larger_than_a_message_alone_is_dropped_counted_and_logged(
        context: ServiceContext, run_services: Any, metric_reader: InMemoryMetricReader,
        caplog: pytest.LogCaptureFixture) -> None:
    """Such a span is dropped (not cut: cut, it would read as what was recorded), counted in
    `lockgate.spans.dropped` and the router's /healthz `spans_dropped`, and logged; its batch's others are published."""
    async with SimServer(SimConfig(models={"m": ModelSpec(default="hello")})) as sim, aiohttp.ClientSession() as http:
        context.settings = context.settings.replace(stable_upstream=sim.url, canary_upstream=sim.url,
                                                    deployment="chat", app="shop", passthrough=True)
        exporter = NatsSpanExporter(context.bus, asyncio.get_running_loop())
        context.telemetry = Telemetry(exporter=exporter, schedule_delay_ms=600_000)
        router = (await run_services("router"))["router"]
        messages = await context.bus.nc.subscribe(context.bus.subjects.spans)
        tracer = context.telemetry.tracer("test")
        tracer.start_span("before").end()
        tracer.start_span("huge", attributes={"stack": "y" * (context.bus.nc.max_payload + 1)}).end()
        tracer.start_span("after").end()
        with caplog.at_level(logging.WARNING, logger="lockgate.telemetry"):
            assert await asyncio.to_thread(context.telemetry.force_flush) is True
        batch = _spans.decode((await messages.next_msg(timeout=10)).data)
        assert [s.name for s in batch.spans] == ["before", "after"]
        assert (exporter.exported, exporter.dropped) == (2, 1)
        assert metric_points(metric_reader, "lockgate.spans.dropped") == {(("reason", "too_large"),): 1}
        warned = [r.getMessage() for r in caplog.records if r.name == "lockgate.telemetry"]
        assert len(warned) == 1 and "1 spans dropped" in warned[0] and "'huge' (lockgate-test" in warned[0]
        async with http.get(f"{router.url}/healthz") as resp:
            assert (await resp.json())["spans_dropped"] == 1
        await context.telemetry.shutdown()


async def test_export_to_a_closed_bus_fails_without_raising(settings: Settings) -> None:
    gone = Bus(settings.nats_url, Subjects(settings.prefix), name="gone")
    await gone.connect()
    await gone.close()
    exporter = NatsSpanExporter(gone, asyncio.get_running_loop(), timeout_s=2.0)
    span = TracerProvider().get_tracer("t").start_span("lost")
    span.end()
    assert await asyncio.to_thread(exporter.export, [span]) is SpanExportResult.FAILURE


async def test_dead_letters_are_counted_by_origin(bus: Bus, metric_reader: InMemoryMetricReader) -> None:
    for origin in ("sink", "sink", "cost"):
        await bus.dead_letter(origin, subject="lg.x", payload=b"not json", reason="invalid event")
    assert metric_points(metric_reader, "lockgate.dead_letters") == {
        (("origin", "sink"),): 2,
        (("origin", "cost"),): 1,
    }


_ROUTER_SAMPLES = ("lockgate_router_requests_total", "lockgate_router_request_duration_seconds_count")


async def _scrape(http: aiohttp.ClientSession, base: str, key: str) -> dict[tuple[str, str, str], float]:
    """Router request samples from GET /metrics read with `key`: (sample name, variant, status) -> value."""
    async with http.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _ROUTER_SAMPLES:
                out[(sample.name, sample.labels["variant"], sample.labels["status"])] = sample.value
    return out


async def test_router_metrics_move_with_requests(context: ServiceContext, run_services: Any,
                                                 metric_reader: InMemoryMetricReader) -> None:
    config = SimConfig(models={"m": ModelSpec(default="hello"), "broken": ModelSpec(error_rate=1.0)})
    async with SimServer(config) as sim, aiohttp.ClientSession() as http:
        # passthrough: the client's own model (`broken` fails upstream) reaches the simulator
        context.settings = context.settings.replace(stable_upstream=sim.url, canary_upstream=sim.url,
                                                    deployment="chat", app="shop", passthrough=True)
        router = (await run_services("router"))["router"]
        auth = {"Authorization": f"Bearer {bootstrap(context.settings.home, app='shop').app_key}"}
        viewer, _ = KeyStore(context.settings.home).create("default", "ops", "viewer")  # what Prometheus scrapes with
        bus = context.bus
        events = await bus.nc.subscribe(bus.subjects.served("shop"))
        assert await _scrape(http, router.url, viewer) == {}

        async def chat(model: str) -> int:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            # The router takes only API keys; the event's app (its subject) comes from the key.
            async with http.post(f"{router.url}/v1/chat/completions", json=body, headers=auth) as resp:
                await resp.read()
                return resp.status

        async def recorded(n: int) -> None:
            # The router counts a request where it queues its event, after the response is
            # sent: once the events are on the bus, the counters have moved.
            seen = 0
            while seen < n:
                seen += len(_events.decode((await events.next_msg(timeout=10)).data))

        assert [await chat("m") for _ in range(3)] + [await chat("broken")] == [200, 200, 200, 502]
        await recorded(4)
        first = await _scrape(http, router.url, viewer)
        assert first[("lockgate_router_requests_total", "stable", "ok")] == 3
        assert first[("lockgate_router_requests_total", "stable", "error")] == 1
        assert first[("lockgate_router_request_duration_seconds_count", "stable", "ok")] == 3

        assert await chat("m") == 200
        await recorded(1)
        second = await _scrape(http, router.url, viewer)
        assert second[("lockgate_router_requests_total", "stable", "ok")] == 4
        assert second[("lockgate_router_requests_total", "stable", "error")] == 1

        # The router's outbox counts what JetStream acknowledged as the router's published events.
        await router.batcher.flush()
        async with http.get(f"{router.url}/metrics", headers={"Authorization": f"Bearer {viewer}"}) as resp:
            text = await resp.text()
        # 5 requests, and the 2 retried calls of the broken one (error events of their own, not requests).
        assert 'lockgate_events_published_total{' in text and 'service="router"} 7.0' in text

        # A simulator beside the router (as `dev up` runs it) serves no /metrics: they would be the router's, keyless.
        async with http.get(f"{sim.url.removesuffix('/v1')}/metrics") as resp:
            assert resp.status == 404


async def test_router_metrics_need_a_key_that_reads_the_admin_api(context: ServiceContext, run_services: Any,
                                                                  metric_reader: InMemoryMetricReader) -> None:
    """The request counters are by variant: an app (or anyone) reading them before and after one request would
    learn which arm its user id loads. GET /metrics takes a key of role viewer, approver, operator or admin."""
    async with SimServer(SimConfig(models={"m": ModelSpec(default="hello")})) as sim, aiohttp.ClientSession() as http:
        context.settings = context.settings.replace(stable_upstream=sim.url, canary_upstream=sim.url,
                                                    deployment="chat", app="shop", passthrough=True)
        router = (await run_services("router"))["router"]
        keys = bootstrap(context.settings.home, app="shop")
        store = KeyStore(context.settings.home)
        url = f"{router.url}/metrics"
        events = await context.bus.nc.subscribe(context.bus.subjects.served("shop"))
        body = {"model": "m", "user": "u1", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{router.url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {keys.app_key}"}) as resp:
            assert resp.status == 200 and "x-lockgate-variant" not in resp.headers
        await events.next_msg(timeout=10)  # counted where its event is queued, after the answer

        refused = [(None, 401, "invalid_request_error", "invalid_api_key"),
                   ("lg-not-a-key", 401, "invalid_request_error", "invalid_api_key"),
                   (keys.app_key, 403, "permission_denied", "insufficient_role")]
        for key, status, type_, code in refused:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for method in ("GET", "HEAD"):
                async with http.request(method, url, headers=headers) as resp:
                    assert resp.status == status, (key, method)
                    assert resp.headers["Content-Type"].startswith("application/json")
                    if method == "GET":
                        error = (await resp.json())["error"]
                        assert (error["type"], error["code"]) == (type_, code)
                        assert "lockgate_router" not in error["message"]

        for role in ("viewer", "approver", "operator"):
            reader, _ = store.create("default", "ops", role)
            assert (await _scrape(http, router.url, reader))[("lockgate_router_requests_total", "stable", "ok")] == 1
        assert (await _scrape(http, router.url, keys.admin_key))[("lockgate_router_requests_total", "stable", "ok")] == 1


async def test_router_metrics_take_a_key_that_reads_every_tenant_and_deployment(
        context: ServiceContext, run_services: Any, metric_reader: InMemoryMetricReader) -> None:
    """Probe p25 F1: the counters are the whole router's, of every tenant's and deployment's requests; another
    tenant's viewer key, even one scoped to a deployment of its own, read them all (whether a tenant runs a canary,
    how its arms answer). They take a key that reads every tenant and deployment: an admin key, or an unscoped key of
    the only tenant the router has keys of."""
    async with SimServer(SimConfig(models={"m": ModelSpec(default="hello")})) as sim, aiohttp.ClientSession() as http:
        context.settings = context.settings.replace(stable_upstream=sim.url, canary_upstream=sim.url,
                                                    deployment="chat", app="shop", passthrough=True)
        router = (await run_services("router"))["router"]
        keys = bootstrap(context.settings.home, app="shop")  # tenant default's
        store = KeyStore(context.settings.home)
        events = await context.bus.nc.subscribe(context.bus.subjects.served("shop"))
        body = {"model": "m", "user": "u1", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{router.url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {keys.app_key}"}) as resp:
            assert resp.status == 200
        await events.next_msg(timeout=10)  # counted where its event is queued, after the answer

        # One tenant's router: its unscoped keys read them; one scoped to a deployment reads one deployment only.
        viewer, _ = store.create("default", "prometheus", "viewer")
        assert (await _scrape(http, router.url, viewer))[("lockgate_router_requests_total", "stable", "ok")] == 1
        scoped_default, _ = store.create("default", "ops", "viewer", deployments=["chat"])

        # Another tenant's keys (a revoked one too: its requests stay in the counters).
        acme = {f"acme {role}": store.create("acme", "shop", role)[0] for role in ("viewer", "approver", "operator")}
        acme["acme viewer scoped"] = store.create("acme", "shop", "viewer", deployments=["acme-web"])[0]
        gone = store.create("acme", "shop", "app")[1]
        store.revoke(gone.id)
        for who, key in {**acme, "default viewer": viewer, "default viewer scoped": scoped_default}.items():
            for method in ("GET", "HEAD"):
                async with http.request(method, f"{router.url}/metrics",
                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                    assert resp.status == 403, (who, method)
                    assert resp.headers["Content-Type"].startswith("application/json")
                    if method == "GET":
                        error = (await resp.json())["error"]
                        assert (error["type"], error["code"]) == ("permission_denied", "metrics_not_in_scope"), who
                        assert "admin key" in error["message"] and "lockgate_router" not in error["message"]
                        assert "acme" not in error["message"] or who.startswith("acme"), who  # names no other tenant
        assert (await _scrape(http, router.url, keys.admin_key))[("lockgate_router_requests_total", "stable", "ok")] == 1


async def test_a_one_tenant_routers_key_reads_the_routers_own_counters_not_the_processs(
        context: ServiceContext, run_services: Any, metric_reader: InMemoryMetricReader) -> None:
    """Probe p27 F1: in an embedded stack the router serves the process's provider, on which the sink (and the
    evaluator, drift, cost, gatekeeper, lineage) count every tenant's events. Tenant default's viewer, on a router
    whose keys are all default's, read another tenant's event rate there: acme has no API key, only an application
    NATS user. Now such a key reads the router's own request counters alone; an admin key reads them all."""
    async with SimServer(SimConfig(models={"m": ModelSpec(default="hello")})) as sim, aiohttp.ClientSession() as http:
        context.settings = context.settings.replace(stable_upstream=sim.url, canary_upstream=sim.url,
                                                    deployment="chat", app="shop", passthrough=True)
        svcs = await run_services("router", "sink")
        router = svcs["router"]
        keys = bootstrap(context.settings.home, app="shop")  # tenant default's
        viewer, _ = KeyStore(context.settings.home).create("default", "prometheus", "viewer")
        bus = context.bus
        served = await bus.nc.subscribe(bus.subjects.served("shop"))
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(f"{router.url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {keys.app_key}"}) as resp:
            assert resp.status == 200
        await served.next_msg(timeout=10)
        await router.batcher.flush()
        # acme's application sends 5 events on its own subject (as its NATS user does); the sink takes them in.
        stored = svcs["sink"].handlers.events  # inference events the sink handled
        before = stored.count
        await bus.publish(bus.subjects.inference("shop", tenant="acme"),
                          [InferenceEvent(tenant="acme", app="shop", deployment="acme-web", model="m")] * 5)
        await stored.wait_for(before + 5, 30)

        async def scrape(key: str) -> dict[tuple[str, str], float]:
            async with http.get(f"{router.url}/metrics", headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 200
                text = await resp.text()
            return {(sample.name, sample.labels.get("service", "")): sample.value
                    for family in text_string_to_metric_families(text) for sample in family.samples
                    if not sample.name.endswith("_created")}

        everything = await scrape(keys.admin_key)
        assert everything[("lockgate_events_received_total", "sink")] >= 5
        own = await scrape(viewer)
        assert not [name for name in own if name[1] not in ("", "router")], own
        assert "lockgate_events_received_total" not in {name for name, _ in own}, own
        # What the router counts of its own requests stays the viewer's to read.
        assert own[("lockgate_router_requests_total", "")] == 1
        assert own[("lockgate_events_published_total", "router")] == everything[("lockgate_events_published_total",
                                                                                 "router")] >= 1


async def test_metrics_are_exported_over_otlp_when_an_endpoint_is_set() -> None:
    """A stand-in Collector (plain aiohttp) receives the OTLP/HTTP export with lockgate's metrics."""
    from aiohttp import web
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    received: list[ExportMetricsServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        received.append(ExportMetricsServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/metrics", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        provider = metrics.install("lockgate-otlp-test", otlp_endpoint=f"http://{host}:{port}")
        metrics.dead_letter("cost")
        await asyncio.to_thread(metrics.shutdown, provider)  # the last export happens on shutdown
    finally:
        await runner.cleanup()
    names = {m.name for r in received for rm in r.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    services = {a.value.string_value for r in received for rm in r.resource_metrics
                for a in rm.resource.attributes if a.key == "service.name"}
    assert "lockgate.dead_letters" in names
    assert services == {"lockgate-otlp-test"}
