"""Another application of the same tenant naming a release that is not its own, on the embedded runtime as
`lockgate up` runs it: tenant default's app `shop` registered `shop-v2-rc2` and reports one call of it; app
`other`, with a key scoped to its own deployment, reports over gRPC Ingest two calls of 2,000,000 output tokens
naming shop's release, and over OTLP a model call signed `service.name=lockgate-router` naming it. Read with the CLI:
`cost --by release` keeps other's calls in a row of its own, labelled with its app, and `traces --release R
--service router` lists no trace lockgate's router never saw, while the release's listing marks the span other sent.

Found by a probe (p6, F1 and F2): `cost --by release` grouped a release with its tenant only, so other's calls were
added to shop's release (0.06 USD -> 360 USD); `traces --release R --service router` dropped `--service` and listed
other's span as a router trace of R, with nothing saying an application had sent it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from lockgate.config import Settings
from lockgate.server.apikeys import KeyStore
from lockgate.server.runtime import Runtime
from lockgate.v1 import ingest_pb2, ingest_pb2_grpc
from tests.helpers import eventually, grpc_key, register_model_release, run_cli, run_cli_json

pytestmark = pytest.mark.timeout(120)

RELEASE = "shop-v2-rc2"
OTHERS_TRACE = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    """The embedded runtime with its own nats-server (a user per service), the gRPC API and the OTLP receiver."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", trace_sample_ratio=1.0),
                      services=["sink", "query", "lineage", "cost", "otlp", "gateway"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def _send(runtime: Runtime, key: str, app: str, deployment: str, output_tokens: int, n: int) -> None:
    """`n` calls of `app` naming shop's release, over gRPC Ingest with `key`."""
    batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(
        app=app, deployment=deployment, release=RELEASE, variant="canary", model="gpt-4o-mini", provider="openai",
        operation="chat", input_tokens=10, output_tokens=output_tokens, status="ok") for _ in range(n)])
    address = runtime.services["gateway"].endpoints["grpc"]
    async with grpc.aio.insecure_channel(address, interceptors=grpc_key(key)) as channel:
        reply = await ingest_pb2_grpc.IngestStub(channel).Send(batch, timeout=10)
    assert (reply.accepted, reply.rejected) == (n, 0)


def _router_claim() -> dict[str, Any]:
    """One model call naming shop's release and the canary, as OTLP/JSON, its sender claiming to be the router."""
    now = time.time_ns()
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini", "gen_ai.provider.name": "openai",
             "gen_ai.usage.input_tokens": "10", "gen_ai.usage.output_tokens": "2000000", "lockgate.release": RELEASE,
             "lockgate.variant": "canary", "lockgate.deployment": "other-web"}
    span = {"traceId": OTHERS_TRACE, "spanId": "abcdef0123456789", "name": "chat sim-good", "kind": 3,
            "startTimeUnixNano": str(now - 50_000_000), "endTimeUnixNano": str(now),
            "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attrs.items()]}
    return {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "lockgate-router"}}]},
        "scopeSpans": [{"spans": [span]}]}]}


async def test_another_apps_calls_naming_a_release_are_its_own_row_and_never_a_router_trace_of_it(
        stack: Runtime) -> None:
    keys = KeyStore(stack.settings.home)
    shop_key, _ = keys.create("default", "shop", "app")
    other_key, _ = keys.create("default", "other", "app", deployments=["other-web"])
    await register_model_release(stack.ctx.bus, RELEASE, tenant="default", app="shop")
    sink = stack.services["sink"].handlers
    await eventually(lambda: stack.ctx.store.scalar("SELECT count() FROM releases") == 1,
                     [sink.progress("releases")], what="the release's binding stored")

    await _send(stack, shop_key, "shop", "shop-web", output_tokens=5, n=1)
    await _send(stack, other_key, "other", "other-web", output_tokens=2_000_000, n=2)
    url = stack.services["otlp"].endpoints["otlp-http"] + "/v1/traces"
    async with aiohttp.ClientSession() as http, \
            http.post(url, json=_router_claim(), headers={"x-api-key": other_key}) as resp:
        assert resp.status == 200, await resp.text()

    def stored() -> bool:  # other's span, the sink's span of its event (in other's trace), and every call billed
        spans = stack.ctx.store.scalar(f"SELECT count() FROM otel_traces WHERE TraceId = '{OTHERS_TRACE}'")
        return spans == 2 and stack.ctx.store.scalar("SELECT count() FROM cost_ledger") == 4

    await eventually(stored, [sink.spans, sink.progress("cost_ledger")], what="other's spans and every call billed")

    # The release's spend is its own app's row; other's calls naming it are other's, labelled so.
    cost = await run_cli_json(stack, "cost", "--by", "release")
    assert {(r["tenant"], r["app"], r["release"]): r["calls"] for r in cost} == {
        ("default", "shop", RELEASE): 1, ("default", "other", RELEASE): 3}
    (shops,) = [r for r in cost if r["app"] == "shop"]
    assert shops["output_tokens"] == 5
    shown = await run_cli(stack, "cost", "--by", "release")
    assert shown.exit_code == 0 and "app" in shown.stdout and "other" in shown.stdout
    # Any grouping naming a release gets the app, just before it.
    by_model = await run_cli_json(stack, "cost", "--by", "model,release")
    assert [list(r)[:4] for r in by_model] == [["tenant", "model", "app", "release"]] * 2

    # Lockgate's router never saw a call of the release: none is a router trace of it, whatever other's span says;
    # the sink did store other's call (its span is in other's trace), so `--service sink` lists that trace.
    assert await run_cli_json(stack, "traces", "--release", RELEASE, "--service", "router") == []
    through_sink = await run_cli_json(stack, "traces", "--release", RELEASE, "--service", "sink")
    assert [r["trace_id"] for r in through_sink] == [OTHERS_TRACE]
    # The release's listing marks the span other sent: its service name is its sender's claim.
    listed = await run_cli_json(stack, "traces", "--release", RELEASE)
    assert [(r["trace_id"], r["services"]) for r in listed] == [(OTHERS_TRACE, ["lockgate-router (otlp)", "lockgate-sink"])]
