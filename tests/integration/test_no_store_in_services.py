"""Only the sink and the query service open ClickHouse: a process running any other service never
imports chDB or clickhouse-connect (the router's idle memory was mostly chDB)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest

from lockgate.bus import Bus
from lockgate.config import Settings

pytestmark = pytest.mark.timeout(120)

SERVICES = ["router", "evaluator", "gatekeeper", "drift", "cost", "lineage", "gateway", "otlp"]

# A fresh interpreter, so what other tests imported into this one does not count.
SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from lockgate.config import Settings
    from lockgate.server.runtime import Runtime

    async def main(settings, names):
        runtime = Runtime(settings, services=names, embedded_nats=False)
        await runtime.start()
        try:
            loaded = sorted({m.split(".")[0] for m in sys.modules} & {"chdb", "clickhouse_connect"})
            return {"loaded": loaded, "store": runtime.ctx.store is not None, "endpoints": runtime.endpoints}
        finally:
            await runtime.stop()

    settings = Settings(**json.loads(sys.argv[1]))
    print(json.dumps(asyncio.run(main(settings, sys.argv[2].split(",")))))
""")


async def test_services_other_than_the_store_owners_run_without_chdb(settings: Settings, bus: Bus) -> None:
    # `bus` declares and later deletes this test's streams and buckets.
    raw = {k: getattr(settings, k) for k in ("nats_url", "clickhouse_url", "database", "prefix", "home")}
    ports = {"router_port": 0, "grpc_port": 0, "otlp_grpc_port": 0, "otlp_http_port": 0}
    args = [sys.executable, "-c", SCRIPT, json.dumps(raw | ports), ",".join(SERVICES)]
    proc = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["store"] is False
    assert "clickhouse" not in report["endpoints"]
    assert {"router", "grpc", "otlp-grpc", "otlp-http"} <= set(report["endpoints"])
