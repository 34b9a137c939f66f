"""NATS identities on a real nats-server configured as the embedded one is: no credentials, no
connection; each identity publishes only its own facts, and a refused publish stores nothing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from lockgate import credentials
from lockgate.bus import MAX_LETTER_PAYLOAD, Bus, original_name
from lockgate.client import Client
from lockgate.config import Settings
from lockgate.contracts import EvalCompleted, GateDecided, GateReview, InferenceEvent
from lockgate.credentials import NotAllowed
from lockgate.errors import BusUnavailable
from lockgate.permissions import IDENTITIES, SERVICES, grant
from lockgate.server.natsserver import NatsServer, auth_config
from lockgate.server.registry import ServiceSet, available
from lockgate.server.runtime import Runtime
from lockgate.server.service import ServiceContext
from lockgate.subjects import Subjects

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def secured(tmp_path: Path, unique: str) -> AsyncIterator[tuple[NatsServer, Settings, Bus]]:
    """A nats-server with the users and permissions of this test's prefix, and an admin bus that
    declared the streams (as the embedded runtime does)."""
    settings = Settings(prefix=unique, home=str(tmp_path))
    config = auth_config(Subjects(unique), credentials.ensure(tmp_path))
    server = NatsServer(tmp_path / "nats", config=config)
    await server.start()
    settings = settings.replace(nats_url=server.url)
    admin = await _bus(settings, "admin")
    yield server, settings, admin
    await admin.close()
    server.stop()


async def _bus(settings: Settings, identity: str) -> Bus:
    bus = Bus(settings.nats_url, Subjects(settings.prefix), name=f"test-{identity}",
              auth=credentials.for_identity(settings, identity), manage_topology=identity == "admin")
    await bus.connect()
    return bus


async def _stored(admin: Bus, subject: str) -> int:
    info = await admin.js.stream_info(admin.subjects.streams["events"].name, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


def _decision(release: str) -> GateDecided:
    return GateDecided(release=release, decision="PASS", rules=[])


def test_credentials_are_private_files(tmp_path: Path) -> None:
    passwords = credentials.ensure(tmp_path)
    assert credentials.ensure(tmp_path) == passwords  # generated once, then kept
    assert (credentials.directory(tmp_path).stat().st_mode & 0o777) == 0o700
    for path in credentials.directory(tmp_path).iterdir():
        assert (path.stat().st_mode & 0o777) == 0o600, path
    assert "password" not in repr(credentials.for_identity(Settings(home=str(tmp_path)), "router"))


async def test_a_connection_without_credentials_is_refused(secured) -> None:
    server, settings, _ = secured
    with pytest.raises(nats.errors.Error):
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    with pytest.raises(NotAllowed, match="refused the credentials"):
        bad = Bus(server.url, Subjects(settings.prefix), auth=credentials.NatsAuth(user="router", password="guess"))
        await bad.connect()


@pytest.mark.parametrize(("subject", "event"), [
    (lambda s: s.gate_decided("shop-v2"), _decision("shop-v2")),
    (lambda s: s.eval_completed, EvalCompleted(run_id="r1", release="shop-v2", suite="sha256:x")),
    (lambda s: s.gate_review("shop-v2"), GateReview(release="shop-v2", action="approve", actor="me", reason="x")),
], ids=["GateDecided", "EvalCompleted", "GateReview"])
async def test_the_router_cannot_forge_gate_facts(secured, subject, event) -> None:
    _, settings, admin = secured
    router = await _bus(settings, "router")
    try:
        target = subject(router.subjects)
        with pytest.raises(NotAllowed, match="'router' may not publish"):
            await router.publish(target, event)
        assert await _stored(admin, target) == 0  # nothing reached the stream
        # the connection stays usable for what the router may do
        await router.publish(router.subjects.rollout("shop"), _decision("x"), msg_id="rollout-probe")
    finally:
        await router.close()


@pytest.mark.parametrize(("identity", "subject", "event"), [
    ("gatekeeper", lambda s: s.gate_decided("shop-v2"), _decision("shop-v2")),
    ("evaluator", lambda s: s.eval_completed, EvalCompleted(run_id="r1", release="shop-v2", suite="sha256:x")),
    ("approver", lambda s: s.gate_review("shop-v2"), GateReview(release="shop-v2", action="approve", actor="a",
                                                                  reason="ok")),
])
async def test_only_the_owner_publishes_each_fact(secured, identity, subject, event) -> None:
    _, settings, admin = secured
    owner = await _bus(settings, identity)
    try:
        await owner.publish(subject(owner.subjects), event)
        assert await _stored(admin, subject(owner.subjects)) == 1
    finally:
        await owner.close()


async def test_viewer_cannot_review_and_operator_cannot_decide(secured) -> None:
    _, settings, admin = secured
    for identity, subject in (("viewer", admin.subjects.gate_review("shop-v2")),
                              ("operator", admin.subjects.gate_decided("shop-v2"))):
        bus = await _bus(settings, identity)
        try:
            with pytest.raises(NotAllowed):
                await bus.publish(subject, GateReview(release="shop-v2", action="approve", actor="x", reason="x"))
            assert await _stored(admin, subject) == 0
        finally:
            await bus.close()


async def test_an_sdk_application_sends_inference_events_only(secured) -> None:
    from lockgate.services.gateway.relay import Relay

    _, settings, admin = secured
    app = credentials.for_identity(settings, "app")
    gateway = await _bus(settings, "gateway")
    relay = Relay(gateway)  # the SDK publishes on `ingest`, no stream's subject: the gateway's relay stores them
    await relay.start()
    try:
        async with Client(settings.nats_url, prefix=settings.prefix, app="shop", user=app.user,
                          password=app.password) as client:
            assert client.emit(InferenceEvent(app="shop"))
            await client.flush()
            assert client.sent == 1
    finally:
        await relay.stop()
        await gateway.close()
    info = await admin.js.stream_info(admin.subjects.streams["inference"].name)
    assert info.state.messages == 1
    bus = Bus(settings.nats_url, admin.subjects, auth=app, manage_topology=False)
    await bus.connect()
    try:
        for subject in (bus.subjects.gate_decided("shop-v2"), bus.subjects.inference("shop")):
            with pytest.raises(NotAllowed):
                await bus.publish(subject, _decision("shop-v2"))
    finally:
        await bus.close()


def _tls_files(where: Path) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1, written as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(name: str, key, issuer_name: str, issuer_key, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("lockgate test CA", ca_key, "lockgate test CA", ca_key, True)
    server = cert("127.0.0.1", server_key, "lockgate test CA", ca_key, False)
    paths = (where / "ca.pem", where / "server.pem", where / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return tuple(str(p) for p in paths)  # type: ignore[return-value]


async def test_tls_is_configurable_for_server_and_clients(tmp_path: Path, unique: str) -> None:
    ca, cert, key = _tls_files(tmp_path)
    config = auth_config(Subjects(unique), credentials.ensure(tmp_path), tls_cert=cert, tls_key=key)
    server = NatsServer(tmp_path / "nats", config=config, tls=True)
    await server.start()
    try:
        assert server.url.startswith("tls://")
        settings = Settings(prefix=unique, home=str(tmp_path), nats_url=server.url, tls_ca=ca)
        admin = await _bus(settings, "admin")  # verifies the server against the configured CA
        await admin.close()
        # without the CA the server's certificate is not trusted: no connection
        plain = credentials.for_identity(settings.replace(tls_ca=""), "admin").options()
        with pytest.raises((OSError, nats.errors.Error)):
            await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5,
                               **plain)
        with pytest.raises(BusUnavailable, match="TLS to NATS"):  # and the bus says so instead of retrying
            await _bus(settings.replace(tls_ca=""), "admin")
    finally:
        server.stop()


@pytest.mark.parametrize(("owner", "subject"), [
    # a run record the gatekeeper trusts, a release binding, and the facts the sink projects
    ("evaluator", lambda s: f"$KV.{s.kv_eval_runs}.r1"),
    ("lineage", lambda s: f"$KV.{s.kv_releases}.shop-v2"),
    ("gatekeeper", lambda s: s.gate_audit),
    ("evaluator", lambda s: s.eval_cases),
    ("lineage", lambda s: s.lineage_edges),
    ("lineage", lambda s: s.release_bound),
    ("cost", lambda s: s.cost_ledger),
], ids=["eval_runs", "releases", "gate_audit", "eval_cases", "lineage_edges", "bound_releases", "cost_ledger"])
async def test_the_router_cannot_forge_run_records_bindings_or_facts(secured, owner, subject) -> None:
    _, settings, admin = secured
    router, writer = await _bus(settings, "router"), await _bus(settings, owner)
    try:
        target = subject(router.subjects)
        with pytest.raises(NotAllowed, match="'router' may not publish"):
            await router.publish(target, b"{}", msg_id="forged")
        role = "ledger" if target == admin.subjects.cost_ledger else "facts"
        stream = f"KV_{target.split('.')[1]}" if target.startswith("$KV.") else admin.subjects.streams[role].name
        info = await admin.js.stream_info(stream)
        assert info.state.messages == 0  # nothing was stored
        await writer.publish(target, b"{}", msg_id="owned")  # the owner may
        assert (await admin.js.stream_info(stream)).state.messages == 1
    finally:
        await router.close()
        await writer.close()


async def test_only_the_sink_may_delete_a_message(secured) -> None:
    # Before: every consumer of a stream held STREAM.MSG.DELETE on it (for dead-lettered poison), so
    # the router could erase gate decisions from the events stream.
    _, settings, admin = secured
    stream = admin.subjects.streams["events"].name
    ack = await admin.publish(admin.subjects.gate_decided("shop-v2"), _decision("shop-v2"))
    for identity in IDENTITIES:
        if identity in ("sink", "admin"):
            continue
        bus = await _bus(settings, identity)
        try:
            with pytest.raises(NotAllowed, match=f"{identity!r} may not"):
                await bus.delete(stream, ack.seq)
        finally:
            await bus.close()
        assert await admin.stored(stream, ack.seq) is not None, identity
    sink = await _bus(settings, "sink")
    try:
        await sink.delete(stream, ack.seq)
    finally:
        await sink.close()
    assert await admin.stored(stream, ack.seq) is None


async def test_each_service_keeps_a_cut_letters_original_and_the_viewer_roles_read_it(secured) -> None:
    # A letter over 256 KiB is cut; its sender keeps the whole original in the originals bucket first, as itself.
    _, settings, admin = secured
    kept = {}
    for identity in SERVICES:
        payload = b"{" + identity.encode() * (MAX_LETTER_PAYLOAD // len(identity) + 1)
        bus = await _bus(settings, identity)
        try:
            await bus.dead_letter(identity, subject=admin.subjects.inference("shop"), payload=payload,
                                  reason="invalid event")
        finally:
            await bus.close()
        kept[original_name(payload)] = payload
    for role in ("viewer", "operator", "approver"):
        reader = await _bus(settings, role)
        try:
            assert {name: await reader.original(name) for name in kept} == kept, role
        finally:
            await reader.close()


async def test_the_router_cannot_rebind_delete_or_drain_the_sinks_durable(secured) -> None:
    # Before: reading a stream granted CONSUMER.CREATE/DURABLE.CREATE/MSG.NEXT/ACK for any consumer
    # name, so the router could replace the sink's durable (a new filter, a new start) or pull its messages.
    _, settings, admin = secured
    s, stream = admin.subjects, admin.subjects.streams["events"].name
    theirs = s.durable("sink", "artifacts")
    config = ConsumerConfig(name=theirs, durable_name=theirs, filter_subject=s.artifact_registered,
                            ack_policy=AckPolicy.EXPLICIT)
    sink, router = await _bus(settings, "sink"), await _bus(settings, "router")
    try:
        await sink.js.add_consumer(stream, config=config)
        await admin.publish(s.artifact_registered, b"{}", msg_id="artifact-1")
        js = router.nc.jetstream(timeout=2)  # a refused request is answered by no one: fail fast
        api = "$JS.API"
        attempts = [
            # nats-server 2.9+ named create (what nats-py sends), a wider filter to read everything
            (f"{api}.CONSUMER.CREATE.{stream}.{theirs}.{s.prefix}.>", lambda: js.add_consumer(
                stream, config=ConsumerConfig(name=theirs, durable_name=theirs, filter_subject=f"{s.prefix}.>"))),
            (f"{api}.CONSUMER.CREATE.{stream}.{theirs}",
             lambda: js.add_consumer(stream, config=ConsumerConfig(name=theirs, durable_name=theirs))),
            (f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{theirs}", lambda: js.add_consumer(  # the legacy subject
                stream, config=ConsumerConfig(durable_name=theirs, deliver_policy=DeliverPolicy.NEW))),
            (f"{api}.CONSUMER.CREATE.{stream}", lambda: router.nc.request(  # the legacy ephemeral subject
                f"{api}.CONSUMER.CREATE.{stream}", json.dumps({"stream_name": stream, "config": {
                    "name": theirs, "ack_policy": "explicit", "filter_subject": f"{s.prefix}.>"}}).encode(),
                timeout=2)),
            (f"{api}.CONSUMER.DELETE.{stream}.{theirs}", lambda: js.delete_consumer(stream, theirs)),
        ]
        for subject, attempt in attempts:
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await attempt()
            assert router.refused(subject) is not None, subject  # refused by the server, not just slow
        # Fetching from (and so acking away) the sink's messages is refused too.
        pull = await js.pull_subscribe_bind(durable=theirs, stream=stream)
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await pull.fetch(1, timeout=1)
        assert router.refused(f"{api}.CONSUMER.MSG.NEXT.{stream}.{theirs}") is not None
        info = await admin.js.consumer_info(stream, theirs)
        assert info.config.filter_subject == s.artifact_registered and info.num_pending == 1  # untouched
        # The router still creates, reads and acks its own durable.
        mine = s.durable("router", "gates")
        await router.js.add_consumer(stream, config=ConsumerConfig(name=mine, durable_name=mine,
                                                                   filter_subject=s.gate_decided_all))
        await admin.publish(s.gate_decided("shop-v2"), _decision("shop-v2"))
        (msg,) = await (await router.js.pull_subscribe_bind(durable=mine, stream=stream)).fetch(1, timeout=5)
        await msg.ack_sync()
        done = await admin.js.consumer_info(stream, mine)
        assert (done.num_pending, done.num_ack_pending) == (0, 0)
    finally:
        await sink.close()
        await router.close()


async def test_every_consumer_a_service_registers_is_in_its_grant(context: ServiceContext) -> None:
    # A durable left out of DURABLES could not start under auth: compare the table with the wiring.
    services = ServiceSet(context, available())
    for svc in services.services:
        granted = grant(context.bus.subjects, svc.name).publish
        for spec in svc.consumers:
            assert f"$JS.API.CONSUMER.CREATE.{spec.stream}.{spec.durable}.>" in granted, (svc.name, spec.durable)
            assert f"$JS.ACK.{spec.stream}.{spec.durable}.>" in granted, (svc.name, spec.durable)


async def test_a_poison_original_is_deleted_by_the_sink_and_a_forged_letter_deletes_nothing(
        settings: Settings) -> None:
    # Embedded as `lockgate up` runs it: the sink dead-letters an unreadable inference message (drift skips it);
    # the sink stores the letter and removes the original, which only it may do. A dead letter the
    # router forges about a gate decision is stored, but the decision is readable, so it stays.
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "drift"])
    await runtime.start()
    router = None
    try:
        assert runtime.ctx is not None and runtime.services is not None
        admin, s = runtime.ctx.bus, runtime.ctx.bus.subjects
        letters = runtime.services["sink"].handlers.dead_letters
        inference = s.streams["inference"].name
        poison = await admin.publish(s.inference("shop"), b"{not json sk_live_" + b"x" * 24, msg_id="poison")
        await letters.wait_for(1)
        assert await admin.stored(inference, poison.seq) is None
        events = s.streams["events"].name
        decision = await admin.publish(s.gate_decided("shop-v2"), _decision("shop-v2"))
        router = await _bus(runtime.settings, "router")
        seen = letters.count
        await router.dead_letter("router", subject=s.gate_decided("shop-v2"), payload=b"{", reason="invalid event",
                                 stream=events, stream_seq=decision.seq)
        await letters.wait_for(seen + 1)
        assert await admin.stored(events, decision.seq) is not None
    finally:
        if router is not None:
            await router.close()
        await runtime.stop()


async def test_the_otlp_receiver_publishes_spans_and_events_as_itself(secured) -> None:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    from lockgate.server.apikeys import bootstrap
    from lockgate.services.otlp.app import OtlpService
    from lockgate.telemetry import Telemetry

    _, settings, admin = secured
    key = bootstrap(settings.home, tenant="acme", app="shop").app_key
    bus = await _bus(settings, "otlp")
    otlp = OtlpService(ServiceContext(bus=bus, telemetry=Telemetry(),
                                      settings=settings.replace(otlp_grpc_port=0, otlp_http_port=0)))
    await otlp.start()
    try:
        request = trace_service_pb2.ExportTraceServiceRequest()
        span = request.resource_spans.add().scope_spans.add().spans.add(
            name="chat", trace_id=b"\x01" * 16, span_id=b"\x02" * 8, start_time_unix_nano=time.time_ns())
        span.end_time_unix_nano = span.start_time_unix_nano + 1000
        span.attributes.add(key="gen_ai.operation.name").value.string_value = "chat"
        reply = await otlp.receiver.export(otlp.receiver.authenticate({"x-api-key": key}), request)
        assert not reply.HasField("partial_success")
        with pytest.raises(NotAllowed):
            await bus.publish(bus.subjects.gate_decided("shop-v2"), _decision("shop-v2"))
    finally:
        await otlp.stop()
        await bus.close()
    for stream in ("telemetry", "inference"):
        assert (await admin.js.stream_info(admin.subjects.streams[stream].name)).state.messages == 1


async def test_the_gateway_reads_release_bindings_as_itself_and_binds_none(secured) -> None:
    # GetDecision answers a key only for a release of its tenant and app, which the binding says: the gateway
    # identity reads the releases bucket (a message get), and may not bind a name itself.
    import asyncio

    import grpc

    from lockgate import artifacts
    from lockgate.codec import encode
    from lockgate.server.apikeys import bootstrap
    from lockgate.services.gateway.server import GrpcServer
    from lockgate.signing import Signer, trust_file_path, trust_key
    from lockgate.subjects import token
    from lockgate.v1 import gates_pb2, gates_pb2_grpc
    from tests.helpers import grpc_key

    _, settings, admin = secured
    signer = Signer.generate()
    trust_key(trust_file_path(settings), signer.public)
    key = bootstrap(settings.home, tenant="acme", app="shop").app_key
    await artifacts.bind_release(admin, artifacts.release_bundle("shop-v2", "shop", {}, tenant="acme"))
    await (await admin.kv(admin.subjects.kv_gates)).put(token("shop-v2"), encode(signer.sign(_decision("shop-v2"))))
    bus = await _bus(settings, "gateway")
    server = GrpcServer(bus, port=0, settings=settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address, interceptors=grpc_key(key)) as ch:
            got = await gates_pb2_grpc.GatesStub(ch).GetDecision(gates_pb2.GetDecisionRequest(release="shop-v2"),
                                                                 timeout=10)
        assert (got.release, got.decision) == ("shop-v2", "PASS")
        kv = await bus.kv(bus.subjects.kv_releases)
        with pytest.raises(Exception):  # noqa: B017 - refused by the server (a permissions violation)
            await asyncio.wait_for(kv.create(token("shop-v3"), b"{}"), 5)
        assert bus.refused(f"$KV.{bus.subjects.kv_releases}.{token('shop-v3')}") is not None
    finally:
        await server.stop()
        await bus.close()
