"""Online scores on the real nats-server and chDB, events sent through the gateway's gRPC Send with app keys: an
answer's scores are never taken for another answer's, whichever application or tenant sent an event under an id
first (probe p47 F1)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from lockgate.server.apikeys import KeyStore
from lockgate.server.service import ServiceContext
from lockgate.v1 import ingest_pb2, ingest_pb2_grpc
from tests.helpers import eventually, grpc_key

pytestmark = pytest.mark.timeout(120)


async def _send(address: str, key: str, app: str, *ids: str) -> None:
    batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(
        id=i, app=app, deployment=app, model="m", status="ok", response=f"{app} answers {i}") for i in ids])
    async with grpc.aio.insecure_channel(address, interceptors=grpc_key(key)) as ch:
        reply = await ingest_pb2_grpc.IngestStub(ch).Send(batch, timeout=10)
    assert (reply.accepted, reply.rejected) == (len(ids), 0)


async def test_an_answers_scores_are_stored_whoever_sent_its_id_first(
        context: ServiceContext, run_services: Any, unique: str) -> None:
    context.settings = context.settings.replace(online_eval_sample=1.0)  # every answer scored
    store = context.store
    assert store is not None
    keys = KeyStore(context.settings.home)
    key = {who: keys.create(*who.split("/"))[0] for who in ("acme/app1", "acme/app2", "acme/corp", "acme-corp/app1")}
    services = await run_services("gateway", "sink", "evaluator")
    grpc_at = services["gateway"].endpoints["grpc"]
    progress = [services["sink"].handlers.facts["inference_scores"].stored, services["evaluator"].online.scored]

    def scored() -> set[tuple[str, str, str]]:
        return {(r["tenant"], r["app"], r["event_id"]) for r in store.rows(
            "SELECT DISTINCT tenant, app, event_id FROM inference_scores")}

    # The other sender's events come first, and their scores are stored first: they hold their message ids.
    order, invoice = f"order-{unique}", f"inv-{unique}"
    await _send(grpc_at, key["acme/app2"], "app2", order)  # another application of the tenant, the same id
    await _send(grpc_at, key["acme/corp"], "corp", f"corp-{invoice}")  # tenant acme's `corp-inv-X`
    first = {("acme", "app2", order), ("acme", "corp", f"corp-{invoice}")}
    await eventually(lambda: first <= scored(), progress, timeout_s=60, what="the first senders' scores stored")

    # Each victim's batch ends with an id nobody else sent: once its scores are stored, the batch's others were
    # scored and published before them (one evaluator consumer, one sink consumer, in order).
    await _send(grpc_at, key["acme/app1"], "app1", order, f"marker-{unique}")
    await _send(grpc_at, key["acme-corp/app1"], "app1", invoice, f"marker-{unique}")
    markers = {("acme", "app1", f"marker-{unique}"), ("acme-corp", "app1", f"marker-{unique}")}
    await eventually(lambda: markers <= scored(), progress, timeout_s=60, what="the markers' scores stored")
    # Before, probe p47 F1: both missing, dropped by JetStream as duplicates of the first senders' scores.
    assert {("acme", "app1", order), ("acme-corp", "app1", invoice)} - scored() == set()
