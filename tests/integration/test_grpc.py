"""The gRPC API through a real channel, against a real nats-server."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import msgspec
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.codec import Codec, encode
from lockgate.config import Settings
from lockgate.contracts import GateDecided, InferenceEvent, RuleResult
from lockgate.ids import uuid7, uuid7_time
from lockgate.server.apikeys import Bootstrap, KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer, publish_key, retire_key, revoke_key, trust_file_path, trust_key
from lockgate.store import Store
from lockgate.subjects import token
from lockgate.v1 import gates_pb2, gates_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests.helpers import eventually, gate_decided, grpc_key, rss_growth_mib

pytestmark = pytest.mark.timeout(60)

events_codec: Codec[list[InferenceEvent]] = Codec(list[InferenceEvent])


@pytest.fixture
async def gateway(run_services: Callable[..., Any]) -> Any:
    """The gateway service, given port 0 (it reports the port it bound)."""
    return (await run_services("gateway"))["gateway"]


@pytest.fixture
def keys(settings: Settings) -> Bootstrap:
    """An app key of tenant acme in the gateway's home."""
    return bootstrap(settings.home, tenant="acme", app="shop")


@pytest.fixture
async def channel(gateway: Any, keys: Bootstrap) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the gateway that presents the app key on every call."""
    address = gateway.endpoints["grpc"]
    assert not address.endswith(":0")
    async with grpc.aio.insecure_channel(address, interceptors=grpc_key(keys.app_key)) as ch:
        yield ch


def _auth(keys: Bootstrap) -> tuple[tuple[str, str], ...]:
    """Metadata presenting the app key (streaming calls pass it themselves)."""
    return (("authorization", f"Bearer {keys.app_key}"),)


SIGNER = Signer.generate()


@pytest.fixture(autouse=True)
def _trusted(settings: Settings) -> None:
    """SIGNER stands in for the gatekeeper: its key is in the trust file the gateway reads."""
    trust_key(trust_file_path(settings), SIGNER.public)


def decision(release: str, verdict: str = "PASS") -> GateDecided:
    return SIGNER.sign(GateDecided(
        release=release,
        decision="PASS" if verdict == "PASS" else "BLOCK",
        rules=[
            RuleResult(
                rule="quality", metric="accuracy", op=">=", threshold=0.8, observed=0.91, verdict=verdict
            ),
            RuleResult(
                rule="cost", metric="usd", op="<=", threshold=1.0, observed=None, verdict="NO_DATA", hint="x"
            ),
        ],
        eval_run="run-1",
        policy="default",
        reason="all rules pass",
    ))


async def bind(bus: Bus, *releases: str, tenant: str = "acme", app: str = "shop") -> None:
    """Bind release names as `release create` does: the binding says whose each release is (the keys fixture's
    acme/shop by default), and a key reads the decisions of its own releases only."""
    for release in releases:
        await artifacts.bind_release(bus, artifacts.release_bundle(release, app, {}, tenant=tenant))


async def put_decision(bus: Bus, d: GateDecided) -> None:
    """Store a decision of a release bound to acme/shop."""
    await bind(bus, d.release)
    kv = await bus.kv(bus.subjects.kv_gates)
    await kv.put(token(d.release), encode(d))


async def stored_events(bus: Bus) -> dict[str, list[InferenceEvent]]:
    """Every event on the inference stream, by subject."""
    stream = bus.subjects.streams["inference"].name
    info = await bus.js.stream_info(stream)
    sub = await bus.js.pull_subscribe(bus.subjects.inference_all, stream=stream)
    out: dict[str, list[InferenceEvent]] = {}
    fetched = 0
    while fetched < info.state.messages:
        for msg in await sub.fetch(info.state.messages - fetched, timeout=5):
            out.setdefault(msg.subject, []).extend(events_codec.decode(msg.data))
            fetched += 1
    await sub.unsubscribe()
    return out


async def test_send_rejects_invalid_events_and_publishes_the_rest_as_the_keys_app(
    bus: Bus, channel: grpc.aio.Channel
) -> None:
    stub = ingest_pb2_grpc.IngestStub(channel)
    when, at = Timestamp(), datetime.now(UTC).replace(microsecond=600000) - timedelta(hours=1)
    when.FromDatetime(at)
    too_old = Timestamp()
    too_old.FromDatetime(datetime(1900, 1, 1, tzinfo=UTC))
    batch = ingest_pb2.InferenceBatch(
        events=[
            ingest_pb2.InferenceEvent(
                id="01900000-0000-7000-8000-000000000001",
                app="shop",
                model="m",
                input_tokens=5,
                time=when,
                prompt="hi",
                attributes={"k": "v"},
                scores={"helpful": 0.5},
            ),
            ingest_pb2.InferenceEvent(app="shop", input_tokens=-1),
            ingest_pb2.InferenceEvent(app="shop", model="m2"),
            ingest_pb2.InferenceEvent(model="no app"),  # the key's app (acme/shop)
            ingest_pb2.InferenceEvent(app="shop", tenant="acme"),
            ingest_pb2.InferenceEvent(app="shop", time=too_old),  # outside the accepted window
            ingest_pb2.InferenceEvent(app="shop", id="x" * 129),  # an id is a key, not a payload
        ]
    )
    reply = await stub.Send(batch, timeout=10)
    assert (reply.accepted, reply.rejected) == (4, 3)
    assert [r.index for r in reply.rejections] == [1, 5, 6]
    assert "$.input_tokens" in reply.rejections[0].reason
    assert "before now" in reply.rejections[1].reason and "$.time" in reply.rejections[1].reason
    assert reply.rejections[2].reason == "Expected `str` of length <= 128 - at `$.id`"

    stored = await stored_events(bus)
    assert sorted(stored) == [bus.subjects.inference("shop", "acme")]
    shop = stored[bus.subjects.inference("shop", "acme")]
    assert [e.model for e in shop] == ["m", "m2", "no app", ""]
    first = shop[0]
    assert first.id == "01900000-0000-7000-8000-000000000001"
    assert first.time == at
    # an application's: no arm a router chose (before, "stable", as if the router had served it)
    assert (first.prompt, first.response, first.variant, first.source) == ("hi", None, "", "application")
    assert (first.attributes, first.scores) == ({"k": "v"}, {"helpful": 0.5})
    assert {(e.tenant, e.app) for e in shop} == {("acme", "shop")}


async def test_an_event_of_another_app_refuses_the_batch(bus: Bus, channel: grpc.aio.Channel) -> None:
    # Its spend and drift would be that app's: an acme/shop key charged app `billing` (seen through OTLP).
    stub = ingest_pb2_grpc.IngestStub(channel)
    batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(app="shop"),
                                              ingest_pb2.InferenceEvent(app="billing", input_tokens=900_000)])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Send(batch, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "event 1 is for app 'billing'" in err.value.details() and "may only ingest for app 'shop'" in err.value.details()
    assert await stored_events(bus) == {}


async def test_send_refuses_alone_an_event_too_large_for_the_bus(bus: Bus, channel: grpc.aio.Channel) -> None:
    # It was published, refused by NATS (max_payload) and the whole call answered UNAVAILABLE: a client
    # that retries as told retried for ever, and could not tell its valid neighbours were stored.
    stub = ingest_pb2_grpc.IngestStub(channel)
    batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(app="shop", prompt="x" * 1_500_000),
                                              ingest_pb2.InferenceEvent(app="shop", prompt="small")])
    reply = await stub.Send(batch, timeout=10)
    assert (reply.accepted, reply.rejected) == (1, 1)
    assert reply.rejections[0].index == 0 and "larger than 900000 bytes" in reply.rejections[0].reason
    stored = await stored_events(bus)
    assert [e.prompt for e in stored[bus.subjects.inference("shop", "acme")]] == ["small"]


async def test_send_keeps_random_40_character_ids_and_refuses_alone_one_that_is_a_key(
        bus: Bus, channel: grpc.aio.Channel) -> None:
    # Probe p16: a random base62 request id of 40 characters has the shape of a bare AWS secret key, and every such
    # event was refused as a credential; only a key of a known shape (`sk-proj-...`) is refused now.
    stub = ingest_pb2_grpc.IngestStub(channel)
    ids = ["s4fAcH9kKnwAKOtJ1WwLw3UjHmhEXf7NhNSLIem1", "req_cAn3CE6zz4806Ddp9IkJvG4abUiRxg7z83hhnM5K",
           "sk-proj-" + "Ab3" * 16]
    reply = await stub.Send(ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(app="shop", id=i)
                                                              for i in ids]), timeout=10)
    assert (reply.accepted, reply.rejected) == (2, 1)
    assert reply.rejections[0].index == 2 and "reads as a credential" in reply.rejections[0].reason
    stored = await stored_events(bus)
    assert [e.id for e in stored[bus.subjects.inference("shop", "acme")]] == ids[:2]


async def test_send_refuses_alone_an_event_whose_deployment_or_release_is_a_key(
        bus: Bus, channel: grpc.aio.Channel) -> None:
    # Probe p35: `release=lg-<43 chars>` and `deployment=AKIA...` were accepted and stored whole in inference_events
    # and cost_ledger, and `lockgate cost --by ...,release` printed them. A name of 40 mixed characters is a name.
    stub = ingest_pb2_grpc.IngestStub(channel)
    events = [ingest_pb2.InferenceEvent(app="shop", release="lg-" + "x1Y" * 15),
              ingest_pb2.InferenceEvent(app="shop", deployment="AKIAIOSFODNN7EXAMPLE"),
              ingest_pb2.InferenceEvent(app="shop", deployment="AcmeCorporationInternationalHoldings2024")]
    reply = await stub.Send(ingest_pb2.InferenceBatch(events=events), timeout=10)
    assert (reply.accepted, reply.rejected) == (1, 2)
    assert [(r.index, r.reason.rpartition(" - at ")[2]) for r in reply.rejections] == \
        [(0, "`$.release`"), (1, "`$.deployment`")], reply.rejections
    stored = await stored_events(bus)
    assert [e.deployment for e in stored[bus.subjects.inference("shop", "acme")]] == [events[2].deployment]


async def test_a_timestamp_out_of_range_is_refused_alone(bus: Bus, channel: grpc.aio.Channel) -> None:
    # protobuf's ToDatetime raised ValueError: the whole call failed UNKNOWN ("Unexpected <class ...>").
    stub = ingest_pb2_grpc.IngestStub(channel)
    batch = ingest_pb2.InferenceBatch(events=[
        ingest_pb2.InferenceEvent(app="shop", time=Timestamp(seconds=253402300800)),  # after 9999-12-31
        ingest_pb2.InferenceEvent(app="shop", time=Timestamp(seconds=1, nanos=-1)),
        ingest_pb2.InferenceEvent(app="shop", model="kept")])
    reply = await stub.Send(batch, timeout=10)
    assert (reply.accepted, reply.rejected) == (1, 2)
    assert all(r.reason.endswith("at `$.time`") for r in reply.rejections), reply.rejections
    stored = await stored_events(bus)
    assert [e.model for e in stored[bus.subjects.inference("shop", "acme")]] == ["kept"]


async def test_a_request_that_does_not_decode_is_invalid_argument(bus: Bus, channel: grpc.aio.Channel,
                                                                  keys: Bootstrap) -> None:
    # grpc.aio decoded it before the servicer ran, and answered UNKNOWN "Unexpected <class DecodeError>".
    # (Decoded once the key is accepted: the watch presents it too.)
    good = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(app="shop", model="ZZZZ")]).SerializeToString()
    send = channel.unary_unary("/lockgate.v1.Ingest/Send", request_serializer=lambda b: b,
                               response_deserializer=ingest_pb2.IngestReply.FromString)
    watch = channel.unary_stream("/lockgate.v1.Gates/WatchDecisions", request_serializer=lambda b: b,
                                 response_deserializer=gates_pb2.Decision.FromString)
    for call in (send, lambda body, **kw: watch(body, metadata=_auth(keys), **kw).read()):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(good.replace(b"ZZZZ", b"\xff\xfe\xfa\xfb"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "request: Error parsing message" in err.value.details()
    assert (await send(good, timeout=10)).accepted == 1


async def test_send_retried_with_the_same_ids_is_stored_once(bus: Bus, channel: grpc.aio.Channel) -> None:
    stub = ingest_pb2_grpc.IngestStub(channel)
    events = [InferenceEvent(app="shop") for _ in range(3)]
    batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(id=e.id, app=e.app) for e in events])
    for _ in range(2):
        assert (await stub.Send(batch, timeout=10)).accepted == 3
    stored = await stored_events(bus)
    assert [e.id for e in stored[bus.subjects.inference("shop", "acme")]] == [e.id for e in events]


async def test_get_decision_returns_the_kv_value_or_not_found(bus: Bus, channel: grpc.aio.Channel) -> None:
    stub = gates_pb2_grpc.GatesStub(channel)
    d = decision("shop/v1.2")
    await put_decision(bus, d)

    got = await stub.GetDecision(gates_pb2.GetDecisionRequest(release="shop/v1.2"), timeout=10)
    assert (got.release, got.decision, got.id, got.signature, got.key_id) == (
        "shop/v1.2",
        "PASS",
        d.id,
        d.signature,
        SIGNER.key_id,
    )
    assert (got.eval_run, got.policy, got.reason) == ("run-1", "default", "all rules pass")
    assert got.time.ToDatetime(tzinfo=UTC) == d.time
    quality, cost = got.rules
    assert (quality.rule, quality.metric, quality.op, quality.threshold) == ("quality", "accuracy", ">=", 0.8)
    assert quality.HasField("observed") and quality.observed == 0.91
    assert not cost.HasField("observed") and (cost.verdict, cost.hint) == ("NO_DATA", "x")
    # What the signature covers, for a client to check itself against its own pinned key (probe p20 F9: the fields
    # above leave some signed ones out, approvals among them, so a gRPC client could not check a decision at all).
    SIGNER.public.verify(base64.b64decode(got.signature), got.signed)  # raises InvalidSignature if it does not cover them
    signed = json.loads(got.signed)
    assert (signed["id"], signed["release"], signed["decision"], signed["key_id"], signed["signature"]) == (
        d.id, "shop/v1.2", "PASS", SIGNER.key_id, "")
    assert signed["rules"][0]["rule"] == "quality" and signed["eval_run"] == "run-1"

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDecision(gates_pb2.GetDecisionRequest(release="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in err.value.details()

    tampered = msgspec.structs.replace(decision("shop/v9", "FAIL"), decision="PASS")
    await put_decision(bus, tampered)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDecision(gates_pb2.GetDecisionRequest(release="shop/v9"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "signature invalid" in err.value.details()


async def test_watch_streams_current_then_new_decisions_for_a_prefix(
    bus: Bus, context: ServiceContext, channel: grpc.aio.Channel, keys: Bootstrap
) -> None:
    stub = gates_pb2_grpc.GatesStub(channel)
    await put_decision(bus, decision("shop-v1"))
    call = stub.WatchDecisions(gates_pb2.WatchRequest(release_prefix="shop-"), metadata=_auth(keys))
    assert ("lockgate-watch", "ready") in tuple(await asyncio.wait_for(call.initial_metadata(), 10))
    assert (await asyncio.wait_for(call.read(), 10)).release == "shop-v1"

    # New decisions through the gatekeeper's write path: stored in KV, then announced (what the watch follows).
    await bind(bus, "search-v1", "shop-v2")
    await gate_decided(context.bus, decision("search-v1"), "k-search")  # filtered out by the prefix
    await gate_decided(context.bus, decision("shop-v2", verdict="FAIL"), "k-shop")
    got = await asyncio.wait_for(call.read(), 10)
    assert (got.release, got.decision) == ("shop-v2", "BLOCK")
    call.cancel()


async def test_watch_on_an_empty_bucket_sees_a_decision_made_after_it_started(
    bus: Bus, context: ServiceContext, channel: grpc.aio.Channel, keys: Bootstrap
) -> None:
    stub = gates_pb2_grpc.GatesStub(channel)
    await bind(bus, "any")
    call = stub.WatchDecisions(gates_pb2.WatchRequest(), metadata=_auth(keys))
    await asyncio.wait_for(call.initial_metadata(), 10)
    await gate_decided(context.bus, decision("any"), "k-any")
    assert (await asyncio.wait_for(call.read(), 10)).release == "any"
    call.cancel()


@pytest.mark.parametrize("how", ["revoke", "retire"])
async def test_a_watch_ends_when_a_decision_it_streamed_stops_verifying(
    bus: Bus, settings: Settings, channel: grpc.aio.Channel, keys: Bootstrap, how: str
) -> None:
    # Before: its key revoked or retired in the trust file, GetDecision refused the PASS but the watch said nothing,
    # and a service acting on the watch kept serving it.
    key = Signer.generate()
    trust_key(trust_file_path(settings), key.public)
    passed = key.sign(GateDecided(release="shop-v1", decision="PASS", rules=[]))
    await put_decision(bus, passed)
    stub = gates_pb2_grpc.GatesStub(channel)
    call = stub.WatchDecisions(gates_pb2.WatchRequest(), metadata=_auth(keys))
    assert (await asyncio.wait_for(call.read(), 10)).id == passed.id
    if how == "revoke":
        revoke_key(trust_file_path(settings), key.key_id)
    else:
        retire_key(trust_file_path(settings), key.key_id, until_seq=0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call.read(), 10)  # no new decision: the trust file changed
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details()
    assert "release 'shop-v1'" in details and passed.id in details, details
    assert ("revoked key id" if how == "revoke" else "a retired key admits nothing") in details, details
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDecision(gates_pb2.GetDecisionRequest(release="shop-v1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION



async def test_a_watch_ends_when_a_release_it_streamed_holds_a_value_that_is_no_decision(
    bus: Bus, context: ServiceContext, channel: grpc.aio.Channel, keys: Bootstrap
) -> None:
    # Before (probe p68 F1): a signed BLOCK whose rule's threshold was -inf (written null) replaced the PASS; the watch
    # logged "skipping undecodable gate decision" and its last message, the PASS, stood.
    passed = decision("shop-v1")
    await put_decision(bus, passed)
    stub = gates_pb2_grpc.GatesStub(channel)
    call = stub.WatchDecisions(gates_pb2.WatchRequest(), metadata=_auth(keys))
    assert (await asyncio.wait_for(call.read(), 10)).id == passed.id
    inf = RuleResult(rule="per-slice", metric="m", op=">=", threshold=float("-inf"), observed=None, verdict="NO_DATA")
    blocked = SIGNER.sign(GateDecided(release="shop-v1", decision="BLOCK", rules=[inf]))
    await (await bus.kv(bus.subjects.kv_gates)).put(token("shop-v1"), encode(blocked))
    await context.bus.nc.publish(bus.subjects.gate_decided("shop-v1"), b"")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call.read(), 10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details()
    assert "release 'shop-v1'" in details and passed.id in details and "does not decode" in details, details
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDecision(gates_pb2.GetDecisionRequest(release="shop-v1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# Identity on the gRPC API: API keys in metadata, tenant-scoped ingest, TLS when configured.


@pytest.mark.parametrize("key", [None, "lg-wrong"])
async def test_send_without_a_valid_key_is_unauthenticated(bus: Bus, gateway: Any, key: str | None) -> None:
    # Before: Ingest/Send without any credential added $12.50 to a tenant's ledger.
    interceptors = grpc_key(key) if key else None
    async with grpc.aio.insecure_channel(gateway.endpoints["grpc"], interceptors=interceptors) as ch:
        batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(app="shop", tenant="acme",
                                                                            input_tokens=10**9)])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ingest_pb2_grpc.IngestStub(ch).Send(batch, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gates_pb2_grpc.GatesStub(ch).GetDecision(gates_pb2.GetDecisionRequest(release="x"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await stored_events(bus) == {}


async def test_send_for_another_tenant_is_permission_denied(bus: Bus, channel: grpc.aio.Channel) -> None:
    batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(app="shop"),
                                              ingest_pb2.InferenceEvent(app="shop", tenant="victim")])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ingest_pb2_grpc.IngestStub(channel).Send(batch, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "tenant 'victim'" in err.value.details() and "lg-" not in err.value.details()
    assert await stored_events(bus) == {}  # the whole batch was refused, the valid event too


async def test_send_by_a_key_scoped_to_deployments_reports_only_theirs(bus: Bus, gateway: Any,
                                                                        settings: Settings) -> None:
    # Events count in their deployment's drift and canary analysis: a key scoped to `support` must not sway
    # `billing`'s. Before: a scoped key did not exist, and any key reported events of every deployment.
    plain, _ = KeyStore(settings.home).create("acme", "shop", deployments=["support"])
    async with grpc.aio.insecure_channel(gateway.endpoints["grpc"], interceptors=grpc_key(plain)) as ch:
        stub = ingest_pb2_grpc.IngestStub(ch)
        batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(app="shop", deployment="support"),
                                                  ingest_pb2.InferenceEvent(app="shop", deployment="billing")])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Send(batch, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "event 1 is for deployment 'billing'" in err.value.details() and "may only ingest for support" in \
            err.value.details() and plain not in err.value.details()
        assert await stored_events(bus) == {}  # the whole batch was refused
        reply = await stub.Send(ingest_pb2.InferenceBatch(events=[
            ingest_pb2.InferenceEvent(app="shop", deployment="support")]), timeout=10)
        assert reply.accepted == 1
    assert [e.deployment for e in (await stored_events(bus))[bus.subjects.inference("shop", "acme")]] == ["support"]


async def test_a_scoped_key_cannot_report_events_of_no_deployment_that_count_as_the_one_named_like_their_app(
        bus: Bus, gateway: Any, settings: Settings) -> None:
    # Drift watches an event of no deployment as the deployment named like its app: a key scoped to `support`
    # sent canary events of no deployment into the drift and canary analysis of the deployment named like its
    # app. Before: accepted (the scope was checked only on events that named a deployment).
    plain, _ = KeyStore(settings.home).create("acme", "shop", deployments=["support"])
    everywhere, _ = KeyStore(settings.home).create("acme", "shop")
    async with grpc.aio.insecure_channel(gateway.endpoints["grpc"], interceptors=grpc_key(plain)) as ch:
        stub = ingest_pb2_grpc.IngestStub(ch)
        for app in ("", "shop"):  # the key's app, named or not
            batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(app=app, variant="canary")])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Send(batch, timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "event 0 names no deployment (it would count as deployment 'shop'" in err.value.details()
            assert "may only ingest for support" in err.value.details() and plain not in err.value.details()
    assert await stored_events(bus) == {}
    async with grpc.aio.insecure_channel(gateway.endpoints["grpc"], interceptors=grpc_key(everywhere)) as ch:
        reply = await ingest_pb2_grpc.IngestStub(ch).Send(
            ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(app="shop")]), timeout=10)
        assert reply.accepted == 1  # a key of every deployment may still leave it out
    assert [e.deployment for e in (await stored_events(bus))[bus.subjects.inference("shop", "acme")]] == [""]


def _self_signed(tmp: Any) -> tuple[Any, Any]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "grpc.crt", tmp / "grpc.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_tls_when_configured(context: Any, run_services: Callable[..., Any], keys: Bootstrap,
                                   tmp_path: Any) -> None:
    cert, key = _self_signed(tmp_path)
    context.settings = context.settings.replace(grpc_tls_cert=str(cert), grpc_tls_key=str(key))
    gateway = (await run_services("gateway"))["gateway"]
    address = gateway.endpoints["grpc"]
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(address, creds, interceptors=grpc_key(keys.app_key)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gates_pb2_grpc.GatesStub(ch).GetDecision(gates_pb2.GetDecisionRequest(release="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # authenticated over TLS, then answered
    async with grpc.aio.insecure_channel(address) as plain:  # a plaintext client gets no answer
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gates_pb2_grpc.GatesStub(plain).GetDecision(gates_pb2.GetDecisionRequest(release="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_names_that_used_to_share_a_key_get_their_own_decision(
    bus: Bus, context: ServiceContext, channel: grpc.aio.Channel
) -> None:
    # Issue 7: `shop.v3` and `shop_v3` mapped to one KV key, so asking for the BLOCKed `shop.v3`
    # returned `shop_v3`'s PASS. Both are written through the gatekeeper's own write path.
    stub = gates_pb2_grpc.GatesStub(channel)
    blocked, passed = decision("shop.v3", "FAIL"), decision("shop_v3")
    await bind(bus, "shop.v3", "shop_v3", "shop-v3")
    await gate_decided(context.bus, blocked, "k-blocked")
    await gate_decided(context.bus, passed, "k-passed")

    for release, want in (("shop.v3", blocked), ("shop_v3", passed)):
        got = await stub.GetDecision(gates_pb2.GetDecisionRequest(release=release), timeout=10)
        assert (got.release, got.decision, got.id) == (release, want.decision, want.id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDecision(gates_pb2.GetDecisionRequest(release="shop-v3"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Names outside the grammar are refused at the edge, never mapped onto someone else's key.
    for bad in ("shop v3", "shop*v3", "shop>v3"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetDecision(gates_pb2.GetDecisionRequest(release=bad), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid release" in err.value.details() and "no spaces or wildcards" in err.value.details()


async def test_a_decision_stored_under_another_release_is_refused(bus: Bus, channel: grpc.aio.Channel) -> None:
    # A validly signed PASS for `shop_v3`, copied under `shop.v3`'s key, must not answer for `shop.v3`.
    stub = gates_pb2_grpc.GatesStub(channel)
    await bind(bus, "shop.v3", "shop_v3")
    kv = await bus.kv(bus.subjects.kv_gates)
    await kv.put(token("shop.v3"), encode(decision("shop_v3")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDecision(gates_pb2.GetDecisionRequest(release="shop.v3"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is for 'shop_v3'" in err.value.details()


async def test_a_value_stored_under_a_release_that_is_no_decision_is_refused_as_one(
        bus: Bus, channel: grpc.aio.Channel) -> None:
    # Found by a probe: what the gates key holds when it is no decision (a JetStream reply aimed at it, junk) was
    # answered UNKNOWN "Unexpected <class 'lockgate.errors.InvalidEvent'>: ...", a Python class name, not an answer.
    stub = gates_pb2_grpc.GatesStub(channel)
    await bind(bus, "shop-v4")
    kv = await bus.kv(bus.subjects.kv_gates)
    await kv.put(token("shop-v4"), b'{"stream": "LG_GATES", "seq": 7}')
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDecision(gates_pb2.GetDecisionRequest(release="shop-v4"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the value stored for release 'shop-v4' is no gate decision" in err.value.details()
    assert "<class" not in err.value.details()


async def test_get_decision_refuses_unknown_revoked_and_unsigned_keys(
    bus: Bus, settings: Settings, channel: grpc.aio.Channel
) -> None:
    stub = gates_pb2_grpc.GatesStub(channel)
    rogue, retired = Signer.generate(), Signer.generate()
    await publish_key(bus, rogue)  # announced on the bus: must make no difference
    trust_key(trust_file_path(settings), retired.public)
    revoke_key(trust_file_path(settings), retired.key_id)
    kv = await bus.kv(bus.subjects.kv_gates)
    cases = {"r-rogue": (rogue.sign, "unknown key id"), "r-retired": (retired.sign, "revoked key id"),
             "r-unsigned": (lambda d: d, "is not signed")}
    await bind(bus, *cases)
    for release, (sign, _) in cases.items():
        await kv.put(token(release), encode(sign(GateDecided(release=release, decision="PASS", rules=[]))))
    for release, (_, reason) in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetDecision(gates_pb2.GetDecisionRequest(release=release), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason in err.value.details()


# Reading decisions: a key reads its own tenant's and app's releases only, whose its binding says.


async def _not_found(stub: gates_pb2_grpc.GatesStub, release: str) -> str:
    """GetDecision's NOT_FOUND details for `release`, with the name taken out (what tells one release from another)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDecision(gates_pb2.GetDecisionRequest(release=release), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value
    return err.value.details().replace(repr(release), "<release>")


async def test_another_tenants_or_apps_key_cannot_tell_a_decided_release_from_an_unknown_one(
    bus: Bus, gateway: Any, settings: Settings, channel: grpc.aio.Channel
) -> None:
    # Red-team probe: an app key of tenant `evil`, app `news` read tenant `default`'s BLOCK of `shop-v2-rc1`
    # (rules, observed values, a hint with the run id and SQL). Before: GetDecision checked no tenant or app.
    await put_decision(bus, decision("shop-v2-rc1", "FAIL"))  # bound to acme/shop, the channel's key
    kv = await bus.kv(bus.subjects.kv_gates)
    # A bad decision (unsigned) of acme/shop's: the owner is told so, anyone else learns nothing from it.
    await bind(bus, "shop-v2-rc2")
    await kv.put(token("shop-v2-rc2"), encode(GateDecided(release="shop-v2-rc2", decision="PASS", rules=[])))
    await bind(bus, "shop-v2-rc3")  # bound, never decided
    await kv.put(token("ghost-v1"), encode(decision("ghost-v1", "FAIL")))  # decided, never bound: nobody's

    owner = gates_pb2_grpc.GatesStub(channel)
    got = await owner.GetDecision(gates_pb2.GetDecisionRequest(release="shop-v2-rc1"), timeout=10)
    assert (got.release, got.decision, got.eval_run) == ("shop-v2-rc1", "BLOCK", "run-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await owner.GetDecision(gates_pb2.GetDecisionRequest(release="shop-v2-rc2"), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    unknown = await _not_found(owner, "shop-v2-rc9")

    store = KeyStore(settings.home)
    others = {"another tenant, same app": store.create("evil", "shop")[0],
              "another app, same tenant": store.create("acme", "news")[0],
              "the probe's": store.create("evil", "news")[0],
              "another tenant's admin": store.create("evil", "news", "admin")[0]}
    for who, key in others.items():
        async with grpc.aio.insecure_channel(gateway.endpoints["grpc"], interceptors=grpc_key(key)) as ch:
            stub = gates_pb2_grpc.GatesStub(ch)
            for release in ("shop-v2-rc1", "shop-v2-rc2", "shop-v2-rc3", "ghost-v1", "shop-v2-rc9"):
                assert await _not_found(stub, release) == unknown, (who, release)
    assert await _not_found(owner, "shop-v2-rc3") == unknown
    assert await _not_found(owner, "ghost-v1") == unknown  # whose is a decision of a name never bound? nobody's


async def test_a_watch_streams_only_the_decisions_of_the_keys_own_releases(
    bus: Bus, context: ServiceContext, gateway: Any, settings: Settings, channel: grpc.aio.Channel, keys: Bootstrap
) -> None:
    # Before: WatchDecisions streamed every tenant's and app's decisions to any key.
    await put_decision(bus, decision("shop-v2-rc1", "FAIL"))  # acme/shop's, decided before the watches start
    await bind(bus, "shop-v3")
    await bind(bus, "evil-v1", tenant="evil")  # evil/shop's
    await bind(bus, "news-v1", app="news")  # acme/news's
    # A binding that is no bundle at all (an operator may create a key by hand): a probe's `"x"` ended every
    # tenant's watch with an AttributeError, for good, since each reconnect read it again.
    await (await bus.kv(bus.subjects.kv_releases)).create(token("junk-v1"), b'"x"')
    await (await bus.kv(bus.subjects.kv_gates)).put(token("junk-v1"), encode(decision("junk-v1", "FAIL")))
    store = KeyStore(settings.home)
    evil, news = store.create("evil", "shop")[0], store.create("acme", "news")[0]
    stub = gates_pb2_grpc.GatesStub(channel)
    calls = {who: stub.WatchDecisions(gates_pb2.WatchRequest(), metadata=(("authorization", f"Bearer {key}"),))
             for who, key in (("acme/shop", keys.app_key), ("evil/shop", evil), ("acme/news", news))}
    for call in calls.values():
        await asyncio.wait_for(call.initial_metadata(), 10)

    async def releases(call: Any, n: int) -> list[str]:
        return [(await asyncio.wait_for(call.read(), 10)).release for _ in range(n)]

    assert await releases(calls["acme/shop"], 1) == ["shop-v2-rc1"]  # junk-v1's skipped, the watch goes on
    # A watch yields in the order decisions were stored, so the first one each watch reads after others' shows
    # it skipped those; acme/shop's last decision comes after everyone else's for the same reason.
    await gate_decided(context.bus, decision("ghost-v1"), "k-ghost")  # never bound: nobody's
    await gate_decided(context.bus, decision("shop-v3"), "k-shop")
    await gate_decided(context.bus, decision("evil-v1"), "k-evil")
    await gate_decided(context.bus, decision("news-v1"), "k-news")
    await gate_decided(context.bus, decision("shop-v2-rc1"), "k-shop-again")
    assert await releases(calls["evil/shop"], 1) == ["evil-v1"]
    assert await releases(calls["acme/news"], 1) == ["news-v1"]
    assert await releases(calls["acme/shop"], 2) == ["shop-v3", "shop-v2-rc1"]
    for call in calls.values():
        call.cancel()


async def test_two_tenants_sending_one_event_id_are_each_stored_and_billed_once(
    bus: Bus, store: Store, settings: Settings, channel: grpc.aio.Channel, gateway: Any,
    run_services: Callable[..., Any],
) -> None:
    # Events were stored once per id across all tenants: another tenant's event under an id it had seen (ids
    # travel in logs and traces) was dropped as a duplicate, by JetStream (the message id was a hash of the
    # ids alone) and by the sink, and the owner's was never stored nor billed.
    sink = (await run_services("sink", "cost"))["sink"].handlers
    other, _ = KeyStore(settings.home).create("globex", "shop")
    shared, later = "01900000-0000-7000-8000-00000000000a", "01900000-0000-7000-8000-00000000000b"

    when = Timestamp()
    when.FromDatetime(datetime.now(UTC))  # a re-sent event keeps its time

    def batch(*ids: str, tokens: int) -> ingest_pb2.InferenceBatch:
        return ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(
            id=i, app="shop", model="gpt-4o-mini", input_tokens=tokens, time=when) for i in ids])

    acme = ingest_pb2_grpc.IngestStub(channel)
    assert (await acme.Send(batch(shared, tokens=10), timeout=10)).accepted == 1
    async with grpc.aio.insecure_channel(gateway.endpoints["grpc"], interceptors=grpc_key(other)) as ch:
        assert (await ingest_pb2_grpc.IngestStub(ch).Send(batch(shared, tokens=20), timeout=10)).accepted == 1
    # The owner re-sends its event: alone (the same message id), then with a new one (another message id).
    assert (await acme.Send(batch(shared, tokens=10), timeout=10)).accepted == 1
    assert (await acme.Send(batch(shared, later, tokens=10), timeout=10)).accepted == 2

    def stored() -> bool:  # the last message's new event is stored and billed: every earlier one was handled
        return all(store.scalar(f"SELECT count() FROM {table} WHERE {column} = '{later}'") == 1
                   for table, column in (("inference_events", "id"), ("cost_ledger", "event_id")))
    await eventually(stored, [sink.events, sink.progress("cost_ledger")], what="the last event billed")
    query = "SELECT tenant, id, input_tokens FROM inference_events ORDER BY tenant, id"
    assert [tuple(r.values()) for r in store.rows(query)] == [
        ("acme", shared, 10), ("acme", later, 10), ("globex", shared, 20)]
    query = "SELECT tenant, event_id, input_tokens FROM cost_ledger ORDER BY tenant, event_id"
    assert [tuple(r.values()) for r in store.rows(query)] == [
        ("acme", shared, 10), ("acme", later, 10), ("globex", shared, 20)]


async def test_a_retried_send_without_a_time_is_still_the_same_event(
    store: Store, channel: grpc.aio.Channel, run_services: Callable[..., Any],
) -> None:
    # Before: an event sent with a UUIDv7 id and no time (as the proto invites) was stamped with each Send's
    # own time, so a retry after JetStream's 2-minute duplicate window was another event to the sink (it
    # finds a stored copy in the batch's time range): stored and billed twice. The time is now the id's.
    sink = (await run_services("sink", "cost"))["sink"].handlers
    resent, later = uuid7(), uuid7()

    def batch(*ids: str) -> ingest_pb2.InferenceBatch:
        return ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(
            id=i, app="shop", model="gpt-4o-mini", input_tokens=10) for i in ids])

    def count(event_id: str) -> tuple[int, int]:
        return tuple(store.scalar(f"SELECT count() FROM {table} WHERE {column} = '{event_id}'")  # type: ignore[return-value]
                     for table, column in (("inference_events", "id"), ("cost_ledger", "event_id")))

    stub = ingest_pb2_grpc.IngestStub(channel)
    assert (await stub.Send(batch(resent), timeout=10)).accepted == 1
    await eventually(lambda: count(resent) == (1, 1), [sink.events, sink.progress("cost_ledger")], what="billed")
    # The retry travels with a new event (another message id, so JetStream does not drop it): only the sink
    # can tell it was stored.
    assert (await stub.Send(batch(resent, later), timeout=10)).accepted == 2
    await eventually(lambda: count(later) == (1, 1), [sink.events, sink.progress("cost_ledger")], what="billed")
    assert count(resent) == (1, 1)
    assert store.scalar(f"SELECT toUnixTimestamp64Milli(time) FROM inference_events WHERE id = '{resent}'") == \
        int(uuid7_time(resent).timestamp() * 1000)  # type: ignore[union-attr]


async def test_malformed_ids_and_an_endless_user_hash_are_refused_alone_naming_the_field(
        bus: Bus, channel: grpc.aio.Channel) -> None:
    # All were accepted and stored: trace ids that no trace has, ids that break lines, a 100k "hash".
    bad = [
        ({"trace_id": "zz"}, "trace_id"), ({"trace_id": "0" * 32}, "trace_id"),
        ({"trace_id": "4BF92F3577B34DA6A3CE929D0E0E4736"}, "trace_id"), ({"trace_id": "4bf92f35"}, "trace_id"),
        ({"span_id": "00f067aa0ba902b7ff"}, "span_id"), ({"span_id": "0" * 16}, "span_id"),
        ({"id": "id with spaces"}, "id"), ({"id": "line\nbreak"}, "id"), ({"user_hash": "u" * 100_000}, "user_hash"),
    ]
    good = ingest_pb2.InferenceEvent(app="shop", model="kept", trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                                     span_id="00f067aa0ba902b7")
    batch = ingest_pb2.InferenceBatch(events=[*(ingest_pb2.InferenceEvent(app="shop", **f) for f, _ in bad), good])
    reply = await ingest_pb2_grpc.IngestStub(channel).Send(batch, timeout=10)
    assert (reply.accepted, reply.rejected) == (1, len(bad))
    for rejection, (_, field) in zip(reply.rejections, bad, strict=True):
        assert rejection.reason.endswith(f"at `$.{field}`"), rejection.reason
    stored = await stored_events(bus)
    assert [e.model for e in stored[bus.subjects.inference("shop", "acme")]] == ["kept"]


async def test_a_watch_ends_when_its_key_is_revoked(
    bus: Bus, context: ServiceContext, settings: Settings, channel: grpc.aio.Channel, keys: Bootstrap
) -> None:
    # Found by a probe: WatchDecisions checked the key once, when it opened; a key revoked (`keys revoke`: "the gRPC
    # API refuses it from its next call") went on receiving every new decision of its app, 11 minutes on.
    await put_decision(bus, decision("shop-v1"))
    store = KeyStore(settings.home)
    (doomed, doomed_rec), (idle, idle_rec) = store.create("acme", "shop"), store.create("acme", "shop")
    stub = gates_pb2_grpc.GatesStub(channel)
    calls = {who: stub.WatchDecisions(gates_pb2.WatchRequest(), metadata=(("authorization", f"Bearer {key}"),))
             for who, key in (("kept", keys.app_key), ("revoked", doomed), ("idle", idle))}
    for call in calls.values():
        assert (await asyncio.wait_for(call.read(), 10)).release == "shop-v1"

    async def ended(call: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 10)  # nothing more is read from it: it ends
        return err.value

    store.revoke(doomed_rec.id)
    # A decision made after the revocation: the live keys' watches get it, the revoked key's never does.
    await bind(bus, "shop-v2")
    await gate_decided(context.bus, decision("shop-v2", verdict="FAIL"), "k-shop-v2")
    for who in ("kept", "idle"):
        assert (await asyncio.wait_for(calls[who].read(), 10)).release == "shop-v2", who
    err = await ended(calls["revoked"])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
    assert f"apikey:{doomed_rec.id}" in err.details() and "unknown or revoked" in err.details(), err.details()
    # Revoked with no new decision at all: the watch ends too (within a second, the key looked at again).
    store.revoke(idle_rec.id)
    assert (await ended(calls["idle"])).code() == grpc.StatusCode.UNAUTHENTICATED
    # The live key's watch goes on.
    await bind(bus, "shop-v3")
    await gate_decided(context.bus, decision("shop-v3"), "k-shop-v3")
    assert (await asyncio.wait_for(calls["kept"].read(), 10)).release == "shop-v3"
    calls["kept"].cancel()


async def test_send_under_the_stacks_own_limits_stores_all_it_accepts_and_refuses_the_rest_at_once(
    context: ServiceContext, store: Store, keys: Bootstrap, run_services: Callable[..., Any],
) -> None:
    # Found by a probe (p56 F2): Send checked events against the default limits, not the stack's. With at most 100
    # events a message, a Send of 300 went out as one message, acknowledged (accepted: 300) and then dead-lettered
    # whole by every consumer; with a 7-day window, a 10-day-old event was accepted, then dead-lettered. Now what
    # Send acknowledges is within the limits its consumers apply: cut to 100 a message, the old event refused.
    context.settings = context.settings.replace(max_events_per_message=100, event_time_past_s=7 * 86400.0)
    svcs = await run_services("gateway", "sink", "cost")
    sink = svcs["sink"].handlers
    now, old = Timestamp(), Timestamp()
    now.FromDatetime(datetime.now(UTC))
    old.FromDatetime(datetime.now(UTC) - timedelta(days=10))

    def batch(*ids: str, when: Timestamp) -> ingest_pb2.InferenceBatch:
        return ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(
            id=i, app="shop", model="gpt-4o-mini", input_tokens=10, time=when) for i in ids])

    def billed() -> bool:
        return all(store.scalar(f"SELECT count() FROM {t}") == 300 for t in ("inference_events", "cost_ledger"))

    address = svcs["gateway"].endpoints["grpc"]
    async with grpc.aio.insecure_channel(address, interceptors=grpc_key(keys.app_key)) as ch:
        stub = ingest_pb2_grpc.IngestStub(ch)
        reply = await stub.Send(batch(*(str(uuid7()) for _ in range(300)), when=now), timeout=10)
        assert (reply.accepted, reply.rejected) == (300, 0)
        await eventually(billed, [sink.events, sink.progress("cost_ledger")], what="the 300 events stored and billed")
        stale = await stub.Send(batch(str(uuid7()), when=old), timeout=10)
    # Refused at once, in the consumers' words (before: accepted 1, then dead-lettered).
    assert (stale.accepted, stale.rejected) == (0, 1)
    assert "is more than 7 days before now" in stale.rejections[0].reason
    assert sink.dead_letters.count == 0


# Probe p62: what a call costs the process before and after its key is looked at, and how many events one Send takes.


async def test_a_call_without_a_key_is_refused_before_its_request_is_decoded(gateway: Any, keys: Bootstrap) -> None:
    # Found by a probe (p62 F1): grpc.aio decoded a request on the event loop the embedded router shares before any key
    # was looked at: a 4 MiB Send of empty events cost 0.36 s of the loop and ~840 MB, for an UNAUTHENTICATED. Bytes
    # that are no protobuf show the order: decoded first, they are INVALID_ARGUMENT; refused first, UNAUTHENTICATED.
    garbage = b"\xff\xff\xff\xff" * 2**20  # 4 MiB, the most a call carries
    async with grpc.aio.insecure_channel(gateway.endpoints["grpc"]) as ch:
        calls = {name: ch.unary_unary(f"/lockgate.v1.{name}", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b) for name in ("Ingest/Send", "Gates/GetDecision")}
        watch = ch.unary_stream("/lockgate.v1.Gates/WatchDecisions", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
        calls["Gates/WatchDecisions"] = lambda body, **kw: watch(body, **kw).read()
        for name, call in calls.items():
            for metadata in ((), (("authorization", "Bearer lg-wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(garbage[:4 * 2**20 - 64], metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata, err.value)
            with pytest.raises(grpc.aio.AioRpcError) as err:  # the same bytes with the key: decoded, and refused
                await call(garbage[:8], metadata=_auth(keys), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value)


async def test_refused_sends_leave_nothing_of_their_request_in_memory(gateway: Any) -> None:
    # Found by a probe (p62 F1, F3): each refused call's request (its bytes, and what was decoded of them) stayed in
    # memory: grpc.aio keeps the abort's error, whose traceback holds the frames that had the request, in a cycle only
    # a full garbage collection frees (lockgate makes them rare): 572 MB -> 5.6 GB after six no-key Sends. With the
    # collector off, nothing of a refused call may stay: forty 4 MiB calls kept about 180 MB (the allocator's own
    # keeping stays near 30 MB).
    body = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(prompt="x" * (4 * 2**20 - 64))]
                                     ).SerializeToString()
    async with grpc.aio.insecure_channel(gateway.endpoints["grpc"]) as ch:
        send = ch.unary_unary("/lockgate.v1.Ingest/Send", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)

        async def refused() -> None:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await send(body, metadata=(("authorization", "Bearer lg-wrong"),), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        grown = await rss_growth_mib(refused, 40)
    assert grown < 100, f"RSS grew {grown:.0f} MiB over forty refused 4 MiB calls"


async def test_a_send_of_more_events_than_a_message_takes_is_refused_before_any_is_looked_at(
        bus: Bus, channel: grpc.aio.Channel) -> None:
    # Found by a probe (p62 F2): one app key's Send of 1,000,000 empty events (2 MB) held the event loop 51 s, every
    # tenant's router with it. A Send now carries at most 5,000 events, counted on the wire before the batch is
    # parsed; refused whole, naming the bound.
    send = channel.unary_unary("/lockgate.v1.Ingest/Send", request_serializer=lambda b: b,
                               response_deserializer=ingest_pb2.IngestReply.FromString)
    for count in (5001, 1_000_000):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await send(b"\x0a\x00" * count, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "carries more than 5,000 events, the most one Send takes" in \
            err.value.details()
    assert await stored_events(bus) == {}


async def test_a_send_of_as_many_events_as_a_message_takes_is_stored_and_checked_off_the_event_loop(
        bus: Bus, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its 5,000 events were converted and encoded on the event loop (~100 us each): now in the server's threads,
    # while other calls are answered.
    import threading

    from lockgate.services.gateway import server

    converting, release = threading.Event(), threading.Event()
    released: list[bool] = []  # whether the hold ended by the test's release (not by its timeout)
    convert = server.event_from_proto

    def held(msg: Any, tenant: str, app: str) -> InferenceEvent:
        if msg.model == "held" and not converting.is_set():
            converting.set()
            # On the event loop (before), this froze the test too, so nothing released it before its timeout.
            released.append(release.wait(timeout=5))
        return convert(msg, tenant, app)

    monkeypatch.setattr(server, "event_from_proto", held)
    ids = [uuid7() for _ in range(5000)]
    batch = ingest_pb2.InferenceBatch(events=[ingest_pb2.InferenceEvent(id=i, model="held") for i in ids])
    assert len(batch.SerializeToString()) > 64 * 1024  # decoded in the server's threads too
    stub = ingest_pb2_grpc.IngestStub(channel)
    sent = asyncio.ensure_future(stub.Send(batch, timeout=30))
    assert await asyncio.to_thread(converting.wait, 10)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:  # answered while the batch is being converted
            await gates_pb2_grpc.GatesStub(channel).GetDecision(gates_pb2.GetDecisionRequest(release="nope"),
                                                                timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not sent.done()
    finally:
        release.set()
    reply = await sent
    assert released == [True], "the event loop was blocked while the batch was converted"
    assert (reply.accepted, reply.rejected) == (5000, 0)
    stored = await stored_events(bus)
    assert sorted(e.id for e in stored[bus.subjects.inference("shop", "acme")]) == sorted(ids)
