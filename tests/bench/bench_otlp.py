"""OTLP ingest end to end: an application process sends spans with the standard Python OTLP exporter
(gRPC, then HTTP/protobuf) to the OTLP receiver; time until every span is counted in `otel_traces`.

`python -m tests.bench.bench_otlp --spans 20000` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import time
from typing import Any

from lockgate.server.apikeys import bootstrap
from tests.bench.common import BenchEnv, Stack, bench_env, stack

EXPORT_BATCH = 512  # the SDK's default export batch


def _emitter(protocol: str, endpoint: str, key: str, n: int, conn: Any) -> None:
    """The application, in its own process: a TracerProvider + BatchSpanProcessor + the OTLP exporter."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, headers={"authorization": f"Bearer {key}"})
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]

        exporter = OTLPSpanExporter(endpoint=endpoint + "/v1/traces", headers={"x-api-key": key})
    provider = TracerProvider(resource=Resource.create({"service.name": f"bench-{protocol}"}))
    # A queue holding the whole run: the figure is the receiver's rate, not the SDK dropping spans.
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=n, max_export_batch_size=EXPORT_BATCH,
                                                   schedule_delay_millis=50))
    tracer = provider.get_tracer("bench")
    conn.send("ready")
    conn.recv()
    t0 = time.time()
    for i in range(n):
        with tracer.start_as_current_span("request") as span:
            span.set_attribute("http.route", "/ask")
            span.set_attribute("bench.i", i)
    t_created = time.time()
    ok = provider.force_flush(600_000)
    t_exported = time.time()
    provider.shutdown()
    conn.send({"t0": t0, "created": t_created, "exported": t_exported, "flushed": ok})


async def _send(env: BenchEnv, st: Stack, protocol: str, key: str, n: int, timeout_s: float) -> dict[str, Any]:
    sink = st.services["sink"].handlers
    before = sink.spans.count
    endpoint = st.services.endpoints[f"otlp-{protocol}"]
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_emitter, args=(protocol, endpoint, key, n, child), daemon=True)
    proc.start()
    assert await asyncio.to_thread(parent.recv) == "ready"
    parent.send("go")
    t0 = time.time()
    with contextlib.suppress(TimeoutError):
        await sink.spans.wait_for(before + n, timeout_s)
    t_visible = time.time()
    app = await asyncio.to_thread(parent.recv)
    await asyncio.to_thread(proc.join, 30)
    where = f"ServiceName = 'bench-{protocol}'"
    visible = int(await asyncio.to_thread(st.ctx.store.scalar, f"SELECT count() FROM otel_traces WHERE {where}"))
    return {
        "spans": n,
        "visible": visible,
        "complete": visible == n,
        "exporter_flushed": app["flushed"],
        "sdk_create_spans_per_s": round(n / max(app["created"] - app["t0"], 1e-9)),
        "exported_spans_per_s": round(n / max(app["exported"] - app["t0"], 1e-9)),
        "end_to_end_spans_per_s": round(visible / max(t_visible - t0, 1e-9)),
        "end_to_end_s": round(t_visible - t0, 3),
    }


def _requests(count: int, spans: int) -> list[bytes]:
    """Encoded OTLP requests of distinct spans (a re-sent span would be deduplicated, not stored)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    now = time.time_ns()
    out = []
    for r in range(count):
        request = ExportTraceServiceRequest()
        rs = request.resource_spans.add()
        rs.resource.attributes.add(key="service.name").value.string_value = "bench-capacity"
        ss = rs.scope_spans.add()
        for i in range(spans):
            span = ss.spans.add(name="request", trace_id=os.urandom(16), span_id=os.urandom(8), kind=2,
                                start_time_unix_nano=now, end_time_unix_nano=now + 1_000_000)
            span.attributes.add(key="http.route").value.string_value = "/ask"
            span.attributes.add(key="bench.i").value.int_value = r * spans + i
        out.append(request.SerializeToString())
    return out


async def receiver_capacity(st: Stack, key: str, requests: int = 40, concurrency: int = 4,
                            timeout_s: float = 300.0) -> dict[str, Any]:
    """The receiver and sink alone: pre-encoded 512-span requests over OTLP/gRPC, `concurrency` in
    flight (the Python SDK, not lockgate, bounds the figures above: it builds and encodes in Python)."""
    import grpc

    bodies = await asyncio.to_thread(_requests, requests, EXPORT_BATCH)
    sink = st.services["sink"].handlers
    before = sink.spans.count
    n = requests * EXPORT_BATCH
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    async with grpc.aio.insecure_channel(st.services.endpoints["otlp-grpc"]) as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")

        async def worker() -> None:
            while not queue.empty():
                await export(queue.get_nowait(), metadata=(("x-api-key", key),))

        t0 = time.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        t_acked = time.time()
        with contextlib.suppress(TimeoutError):
            await sink.spans.wait_for(before + n, timeout_s)
        t_visible = time.time()
    visible = int(await asyncio.to_thread(st.ctx.store.scalar,
                                          "SELECT count() FROM otel_traces WHERE ServiceName = 'bench-capacity'"))
    return {"spans": n, "visible": visible, "complete": visible == n, "concurrency": concurrency,
            "acknowledged_spans_per_s": round(n / max(t_acked - t0, 1e-9)),
            "end_to_end_spans_per_s": round(visible / max(t_visible - t0, 1e-9))}


async def run(env: BenchEnv, n: int = 20_000, timeout_s: float = 300.0) -> dict[str, Any]:
    """OTLP ingest spans/s end to end with the standard Python exporter, gRPC and HTTP."""
    async with stack(env, "sink", "otlp") as st:
        key = bootstrap(st.ctx.settings.home, tenant="default", app="bench").app_key
        grpc_figures = await _send(env, st, "grpc", key, n, timeout_s)
        http_figures = await _send(env, st, "http", key, n, timeout_s)
        capacity = await receiver_capacity(st, key, timeout_s=timeout_s)
    return {"bench": "otlp", "export_batch": EXPORT_BATCH, "grpc": grpc_figures, "http_protobuf": http_figures,
            "receiver_capacity_grpc": capacity}


async def _main(n: int) -> None:
    async with bench_env() as env:
        print(json.dumps(await run(env, n), indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spans", type=int, default=20_000)
    asyncio.run(_main(parser.parse_args().spans))
