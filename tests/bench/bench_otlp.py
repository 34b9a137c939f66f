"""OTLP ingest end to end: an application process sends spans with the standard Python OTLP exporter
(gRPC, then HTTP/protobuf) to the OTLP receiver; time until every span is counted in `otel_traces`. And
the longest event-loop stall while the receiver takes large exports (in embedded mode the router shares
that loop).

`python -m tests.bench.bench_otlp --spans 20000` runs it alone; `--stall-only` runs only the stall figures.
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


def _large_request(target_bytes: int, tag: str) -> Any:
    """One OTLP request of about `target_bytes` encoded: spans with a few hundred bytes of attributes each."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    now = time.time_ns()
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = f"bench-stall-{tag}"
    ss = rs.scope_spans.add()
    filler = "GET /v1/orders?page=2 200 OK " * 8
    per_span = 0
    i = 0
    while per_span == 0 or i * per_span < target_bytes:
        span = ss.spans.add(name=f"request {i % 50}", trace_id=os.urandom(16), span_id=os.urandom(8), kind=2,
                            start_time_unix_nano=now, end_time_unix_nano=now + 1_000_000)
        span.attributes.add(key="http.route").value.string_value = "/ask"
        span.attributes.add(key="http.response.body").value.string_value = filler
        span.attributes.add(key="bench.i").value.int_value = i
        span.events.add(time_unix_nano=now + 1000, name="retry")
        if i == 0:
            per_span = max(1, span.ByteSize())
        i += 1
    return request


async def loop_stall(env: BenchEnv, size_mb: float = 15.0, concurrent: int = 3) -> dict[str, Any]:
    """The longest event-loop stall (a 5 ms ticker's worst lateness) while the receiver takes one
    `size_mb` export over each transport and encoding, then `concurrent` at once over HTTP/protobuf."""
    import aiohttp
    import grpc
    from google.protobuf import json_format

    from lockgate.services.otlp import wire

    async with stack(env, "otlp") as st:
        key = bootstrap(st.ctx.settings.home, tenant="default", app="bench").app_key
        url = st.services.endpoints["otlp-http"] + "/v1/traces"
        target = int(size_mb * 2**20)
        requests = [await asyncio.to_thread(_large_request, target, str(n)) for n in range(max(1, concurrent))]
        protobuf = [r.SerializeToString() for r in requests]
        # OTLP/JSON is about twice protobuf's size: a request of half the size, to stay under the 16 MiB limit
        half = await asyncio.to_thread(_large_request, target // 2, "json")
        as_json = await asyncio.to_thread(lambda: json_format.MessageToJson(half, indent=None).encode())
        # OTLP/JSON's ids are hex, not base64: a span's ids as the receiver reads them
        as_json = await asyncio.to_thread(_hex_ids, as_json)
        worst = 0.0
        stop = asyncio.Event()

        async def ticker() -> None:
            # The timer is the instrument, not a wait for anything: how late a 5 ms sleep wakes is how long
            # the event loop was held by something else (the export being received).
            nonlocal worst
            tick = 0.005
            clock = asyncio.get_running_loop()
            while not stop.is_set():
                due = clock.time() + tick
                await asyncio.sleep(tick)
                worst = max(worst, clock.time() - due)

        async def measured(make: Any) -> dict[str, Any]:
            nonlocal worst
            worst = 0.0
            stop.clear()
            task = asyncio.create_task(ticker())
            t0 = time.perf_counter()
            statuses = await make()
            elapsed = time.perf_counter() - t0
            stop.set()
            await task
            return {"statuses": statuses, "answered_s": round(elapsed, 3), "longest_loop_stall_ms": round(worst * 1e3, 1)}

        async with aiohttp.ClientSession() as http:
            async def post(body: bytes, ctype: str) -> int:
                async with http.post(url, data=body, headers={"x-api-key": key, "Content-Type": ctype}) as r:
                    await r.read()
                    return r.status

            async def one_http_protobuf() -> list[int]:
                return [await post(protobuf[0], wire.PROTOBUF)]

            async def one_http_json() -> list[int]:
                return [await post(as_json, wire.JSON)]

            async def many_http_protobuf() -> list[int]:
                return list(await asyncio.gather(*(post(b, wire.PROTOBUF) for b in protobuf)))

            async with grpc.aio.insecure_channel(st.services.endpoints["otlp-grpc"], options=[
                    ("grpc.max_send_message_length", 32 * 2**20)]) as channel:
                export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")

                async def one_grpc() -> list[str]:
                    try:
                        await export(protobuf[0], metadata=(("x-api-key", key),))
                        return ["OK"]
                    except grpc.aio.AioRpcError as exc:
                        return [exc.code().name]

                figures = {"request_bytes": len(protobuf[0]), "json_bytes": len(as_json),
                           "spans": len(requests[0].resource_spans[0].scope_spans[0].spans),
                           "http_protobuf": await measured(one_http_protobuf),
                           "http_json": await measured(one_http_json),
                           "grpc": await measured(one_grpc),
                           f"http_protobuf_x{len(protobuf)}": await measured(many_http_protobuf)}
    return figures


def _hex_ids(body: bytes) -> bytes:
    import base64

    doc = json.loads(body)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for k in ("traceId", "spanId"):
                    span[k] = base64.b64decode(span[k]).hex()
    return json.dumps(doc).encode()


async def run(env: BenchEnv, n: int = 20_000, timeout_s: float = 300.0) -> dict[str, Any]:
    """OTLP ingest spans/s end to end with the standard Python exporter, gRPC and HTTP; the loop's stalls."""
    async with stack(env, "sink", "otlp") as st:
        key = bootstrap(st.ctx.settings.home, tenant="default", app="bench").app_key
        grpc_figures = await _send(env, st, "grpc", key, n, timeout_s)
        http_figures = await _send(env, st, "http", key, n, timeout_s)
        capacity = await receiver_capacity(st, key, timeout_s=timeout_s)
    return {"bench": "otlp", "export_batch": EXPORT_BATCH, "grpc": grpc_figures, "http_protobuf": http_figures,
            "receiver_capacity_grpc": capacity, "loop_stall_15mb": await loop_stall(env)}


async def _main(n: int, stall_only: bool) -> None:
    async with bench_env() as env:
        figures = {"bench": "otlp", "loop_stall_15mb": await loop_stall(env)} if stall_only else await run(env, n)
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--stall-only", action="store_true", help="only the event-loop stall figures")
    args = parser.parse_args()
    asyncio.run(_main(args.spans, args.stall_only))
