"""Consumer delivery subjects (nats-io/nats-server#8274) on a real nats-server with the real permissions: the
server does not check a consumer's delivery subject against its creator's publish rights, so an identity that
may create a consumer can have a stream's stored messages delivered onto any subject. The identities
applications and the CLI's readers hold create none: they read buckets by message get and follow decisions on
the announcement subject, and the SDK still reads and follows decisions that way."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from lockgate import artifacts, credentials
from lockgate.client import Client
from lockgate.contracts import GateDecided
from lockgate.credentials import NotAllowed
from lockgate.errors import NotFound
from lockgate.services.gateway.reads import Reads
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.subjects import Subjects
from tests.helpers import gate_decided
from tests.integration.test_nats_auth import _bus, secured  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(60)

SIGNER = Signer.generate()
API = "$JS.API"


def _bucket_stream(s: Subjects, bucket: str) -> tuple[str, str]:
    """The stream behind a bucket (`KV_x`, or `OBJ_x` for the object store) and its subjects."""
    if bucket == "object_store":
        return f"OBJ_{s.object_store}", f"$O.{s.object_store}.>"
    name = getattr(s, bucket)
    return f"KV_{name}", f"$KV.{name}.>"


def _attempts(js: Any, stream: str, filter_subject: str, deliver: str) -> dict[str, Any]:
    """Every form of consumer create (by API subject), each delivering the stream's stored messages to `deliver`."""
    def config(**kw: Any) -> ConsumerConfig:
        return ConsumerConfig(deliver_subject=deliver, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
                              **kw)
    return {
        f"{API}.CONSUMER.CREATE.{stream}": lambda: js.add_consumer(stream, config=config()),  # legacy ephemeral
        f"{API}.CONSUMER.CREATE.{stream}.probe": lambda: js.add_consumer(stream, config=config(name="probe")),
        f"{API}.CONSUMER.CREATE.{stream}.probe.{filter_subject}": lambda: js.add_consumer(
            stream, config=config(name="probe", filter_subject=filter_subject)),
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.probe": lambda: js.add_consumer(
            stream, config=config(durable_name="probe")),
    }


# Subscribers that would be handed the copies, as they subscribe: the query service's request subject (a queue
# subscription) and an exact served subject (the router's canary evidence, as a monitor could follow it).
VICTIMS = {"query": (lambda s: s.query, lambda s: s.query_group), "router": (lambda s: s.served("shop"), None)}


@pytest.mark.parametrize(("identity", "bucket", "victim"), [
    ("app", "kv_gates", "router"), ("app", "kv_gates", "query"), ("app", "kv_keys", "query"),  # an application's
    ("viewer", "kv_routes", "query"), ("viewer", "kv_audit", "query"), ("approver", "kv_gates", "query"),
    ("operator", "kv_gitops", "query"),
    ("operator", "object_store", "query"),  # `artifact register` writes it, `release create` and `deprecate` look up
])
async def test_a_reader_cannot_have_a_bucket_delivered_to_a_subscriber(
        secured: Any, identity: str, bucket: str, victim: str) -> None:  # noqa: F811
    # Before: reading a bucket granted ephemeral consumer creates on its stream (KV watch, keys, object reads), and
    # a consumer `app` made with the query subject as its delivery subject handed the query service every stored
    # value of the bucket as if it were a request.
    _, settings, admin = secured
    s = admin.subjects
    stream, filter_subject = _bucket_stream(s, bucket)
    if bucket == "object_store":
        await admin.put_object(s.object_store, "stored", b"stored value")
    else:
        await (await admin.kv(getattr(s, bucket))).put("stored", b"stored value")
    subject_of, queue_of = VICTIMS[victim]
    target = subject_of(s)
    reader, subscriber = await _bus(settings, identity), await _bus(settings, victim)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(msg: Any) -> None:
        received.put_nowait(msg.data)

    try:
        await subscriber.nc.subscribe(target, queue=queue_of(s) if queue_of else "", cb=on_message)
        await subscriber.nc.flush()
        js = reader.nc.jetstream(timeout=2)
        for subject, attempt in _attempts(js, stream, filter_subject, target).items():
            with pytest.raises(NotAllowed):  # refused by the server (a permissions violation), not just slow
                await reader._unless_refused(subject, attempt)
        assert (await admin.js.stream_info(stream)).state.consumer_count == 0
        # No consumer exists to deliver anything: the first message the subscriber sees is one really sent to it.
        await admin.nc.publish(target, b"sent")
        assert await asyncio.wait_for(received.get(), 10) == b"sent"
        assert received.empty()
    finally:
        await reader.close()
        await subscriber.close()


def _signed(release: str, decision: str = "PASS") -> GateDecided:
    return SIGNER.sign(GateDecided(release=release, decision=decision, rules=[]))


async def test_the_sdk_reads_and_follows_decisions_as_app_without_a_consumer(secured: Any) -> None:  # noqa: F811
    _, settings, admin = secured
    s = admin.subjects
    trust_key(trust_file_path(settings), SIGNER.public)
    gatekeeper = await _bus(settings, "gatekeeper")
    app = credentials.for_identity(settings, "app")
    before = _signed("shop-1")
    await gate_decided(gatekeeper, before, "k-before")
    gateway = await _bus(settings, "gateway")
    reads = Reads(gateway)  # the `app` user reads through the gateway: no JetStream API request of its own
    await reads.start()
    try:
        async with Client(settings.nats_url, prefix=settings.prefix, app="shop", user=app.user,
                          password=app.password, trust_file=str(trust_file_path(settings))) as client:
            assert await client.decision("shop-1") == before
            decisions = client.decisions("shop-")
            assert await asyncio.wait_for(anext(decisions), 10) == before  # current: made before the watch
            after = _signed("shop-2", "BLOCK")
            await gate_decided(gatekeeper, after, "k-after")
            assert await asyncio.wait_for(anext(decisions), 10) == after  # new: made once it was live
            # An announcement of a decision KV has since replaced yields nothing (no regression, no duplicate).
            newer = _signed("shop-1", "BLOCK")
            await gate_decided(gatekeeper, newer, "k-newer")
            assert await asyncio.wait_for(anext(decisions), 10) == newer
            await gatekeeper.publish(s.gate_decided("shop-1"), before, msg_id="k-stale")
            last = _signed("shop-3")
            await gate_decided(gatekeeper, last, "k-last")
            assert await asyncio.wait_for(anext(decisions), 10) == last
            assert (await admin.js.stream_info(f"KV_{s.kv_gates}")).state.consumer_count == 0
            await decisions.aclose()
    finally:
        await reads.stop()
        await gateway.close()
        await gatekeeper.close()


async def test_the_cli_roles_read_buckets_and_look_up_artifacts_without_a_consumer(
        secured: Any) -> None:  # noqa: F811
    # What `status`, `budget list`, `plan`, `audit verify` and `decisions` read, and what `artifact register`,
    # `release create` and `artifact deprecate` do with the object store, as the roles that run them.
    _, settings, admin = secured
    s = admin.subjects
    buckets = (s.kv_routes, s.kv_budgets, s.kv_gitops, s.kv_audit, s.kv_gates, s.kv_releases)
    for bucket in buckets:
        await (await admin.kv(bucket)).put("k1", b"v1")
    roles = [await _bus(settings, role) for role in ("viewer", "approver", "operator")]
    try:
        for bus in roles:
            for bucket in buckets:
                assert await bus.kv_entries(bucket) == {"k1": b"v1"}, (bus.auth.user, bucket)
        operator = roles[-1]
        registered = await artifacts.register(operator, "dataset", "cases", [{"q": "x"}])
        await artifacts.check_references(operator, {"dataset/cases": registered.hash})
        await artifacts.require(operator, registered.hash)
        with pytest.raises(NotFound):
            await artifacts.require(operator, "sha256:" + "0" * 64)
        for stream in (f"KV_{b}" for b in buckets):
            assert (await admin.js.stream_info(stream)).state.consumer_count == 0
        assert (await admin.js.stream_info(f"OBJ_{s.object_store}")).state.consumer_count == 0
    finally:
        for bus in roles:
            await bus.close()
