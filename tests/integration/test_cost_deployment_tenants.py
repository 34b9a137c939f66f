"""Another tenant's, and another app's, calls naming a deployment that is not theirs, on the embedded runtime as
`lockgate up` runs it: tenant default's app `shop` reports one call of its deployment `shop-web`; tenant acme's app
`evil` reports over gRPC Ingest two calls of 1,000,000 input and output tokens naming `shop-web`, and over OTLP one
more; default's app `other` reports one naming it too. Read with the CLI: `cost --by deployment` groups a deployment
with its tenant and app, so shop-web's spend is shop's row alone and each sender's calls are a row of its own.

Found by a probe (p73, F1): `cost --by deployment` grouped by deployment alone, so five forged spans of acme's app
took shop-web's row from 0.1395 USD to 62.64 USD."""

from __future__ import annotations

import os
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
from tests.helpers import eventually, grpc_key, run_cli, run_cli_json

pytestmark = pytest.mark.timeout(120)

DEPLOYMENT = "shop-web"


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    """The embedded runtime with its own nats-server (a user per service), the gRPC API and the OTLP receiver."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"),
                      services=["sink", "query", "cost", "otlp", "gateway"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def _send(runtime: Runtime, key: str, app: str, tokens: int, n: int) -> None:
    """`n` calls of `app` naming shop-web, over gRPC Ingest with `key`."""
    batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(
        app=app, deployment=DEPLOYMENT, variant="stable", model="gpt-4o", provider="openai", operation="chat",
        input_tokens=tokens, output_tokens=tokens, status="ok") for _ in range(n)])
    address = runtime.services["gateway"].endpoints["grpc"]
    async with grpc.aio.insecure_channel(address, interceptors=grpc_key(key)) as channel:
        reply = await ingest_pb2_grpc.IngestStub(channel).Send(batch, timeout=10)
    assert (reply.accepted, reply.rejected) == (n, 0)


def _span() -> dict[str, Any]:
    """One model call of 1,000,000 input and output tokens naming shop-web, as OTLP/JSON (the probe's span)."""
    now = time.time_ns()
    attrs = [{"key": k, "value": {"stringValue": v}} for k, v in (
        ("gen_ai.operation.name", "chat"), ("gen_ai.system", "openai"), ("gen_ai.request.model", "gpt-4o"),
        ("lockgate.deployment", DEPLOYMENT))]
    attrs += [{"key": k, "value": {"intValue": "1000000"}}
              for k in ("gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens")]
    span = {"traceId": os.urandom(16).hex(), "spanId": os.urandom(8).hex(), "name": "chat gpt-4o", "kind": 3,
            "startTimeUnixNano": str(now - 2_000_000_000), "endTimeUnixNano": str(now - 1_000_000_000),
            "attributes": attrs}
    return {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "evil"}}]}, "scopeSpans": [{"spans": [span]}]}]}


async def test_a_deployments_spend_is_its_own_tenants_and_apps_and_never_another_senders(stack: Runtime) -> None:
    keys = KeyStore(stack.settings.home)
    shop_key, _ = keys.create("default", "shop", "app")
    other_key, _ = keys.create("default", "other", "app")
    evil_key, _ = keys.create("acme", "evil", "app")

    await _send(stack, shop_key, "shop", tokens=10, n=1)
    await _send(stack, evil_key, "evil", tokens=1_000_000, n=2)
    await _send(stack, other_key, "other", tokens=1_000_000, n=1)
    url = stack.services["otlp"].endpoints["otlp-http"] + "/v1/traces"
    async with aiohttp.ClientSession() as http, \
            http.post(url, json=_span(), headers={"x-api-key": evil_key}) as resp:
        assert resp.status == 200, await resp.text()
    sink = stack.services["sink"].handlers
    await eventually(lambda: stack.ctx.store.scalar("SELECT count() FROM cost_ledger") == 5,
                     [sink.spans, sink.progress("cost_ledger")], what="every call billed")

    # shop-web's spend is shop's own row; acme's and other's calls naming it are rows of theirs, labelled so.
    cost = await run_cli_json(stack, "cost", "--by", "deployment")
    assert {(r.get("tenant"), r.get("app"), r["deployment"]): r["calls"] for r in cost} == {
        ("default", "shop", DEPLOYMENT): 1, ("acme", "evil", DEPLOYMENT): 3, ("default", "other", DEPLOYMENT): 1}
    (shops,) = [r for r in cost if r["app"] == "shop"]
    assert (shops["input_tokens"], shops["output_tokens"]) == (10, 10)
    assert shops["cost_usd"] < 0.01
    # Any grouping naming a deployment gets its tenant first and the app just before it.
    by_model = await run_cli_json(stack, "cost", "--by", "model,deployment")
    assert {tuple(list(r)[:4]) for r in by_model} == {("tenant", "model", "app", "deployment")}
    shown = await run_cli(stack, "cost", "--by", "deployment")
    assert shown.exit_code == 0 and "acme" in shown.stdout and "evil" in shown.stdout
    # One tenant's read is its own rows only.
    mine = await run_cli_json(stack, "cost", "--by", "deployment", "--tenant", "default")
    assert {(r["app"], r["calls"]) for r in mine} == {("shop", 1), ("other", 1)}
