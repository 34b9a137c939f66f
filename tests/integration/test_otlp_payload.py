"""The OTLP receiver cuts an export's spans into messages the NATS server takes, whatever its max_payload: before, it
cut at a fixed 900,000 bytes, and a server configured below that refused every large export whole."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.contracts import SpanBatch
from lockgate.server.apikeys import KeyStore, bootstrap
from lockgate.server.natsserver import NatsServer
from lockgate.subjects import Subjects
from services.otlp.ingest import Receiver

pytestmark = pytest.mark.timeout(60)

MAX_PAYLOAD = 64 * 1024


async def test_an_export_larger_than_the_servers_max_payload_is_cut_to_fit(tmp_path: Path, unique: str) -> None:
    server = NatsServer(tmp_path / "nats", config=f"max_payload: {MAX_PAYLOAD}\njetstream {{ max_file_store: 1TB }}\n")
    await server.start()
    bus = Bus(server.url, Subjects(unique), name="test-otlp-payload", manage_topology=True)
    await bus.connect()
    receiver = Receiver(bus, KeyStore(tmp_path))
    try:
        key = receiver.authenticate({"x-api-key": bootstrap(tmp_path, tenant="acme", app="shop").app_key})
        request = trace_service_pb2.ExportTraceServiceRequest()
        spans = request.resource_spans.add().scope_spans.add().spans
        for i in range(60):  # about 2 KB each: 120 KB in all, twice the server's max_payload
            span = spans.add(name=f"step {i}", trace_id=b"\x01" * 16, span_id=(i + 1).to_bytes(8, "big"),
                             start_time_unix_nano=time.time_ns())
            span.attributes.add(key="note").value.string_value = "x" * 2000
        reply = await receiver.export(key, request)
        assert not reply.partial_success.rejected_spans, reply.partial_success.error_message
        # Every span is on the bus, in more than one message.
        sub = await bus.js.pull_subscribe(bus.subjects.spans, stream=bus.subjects.streams["telemetry"].name)
        batches = [Codec(SpanBatch).decode(m.data) for m in await sub.fetch(10, timeout=2)]
        assert len(batches) > 1 and sum(len(b.spans) for b in batches) == 60
    finally:
        receiver.close()
        await bus.close()
        server.stop()
