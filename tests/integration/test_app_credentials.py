"""Per-application NATS users, on the embedded runtime as `lockgate up` runs it: `lockgate app-credential
create` applies a user at once (the nats-server reloads), that user publishes its own tenant's and app's
events and nothing else, an event of another tenant or app on its subject is dead-lettered alone, and a
revoked user is refused. Before, the one `app` user published any tenant's events and read every decision."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from click.testing import CliRunner, Result

from lockgate import artifacts, credentials
from lockgate.bus import Bus
from lockgate.cli.main import cli
from lockgate.client import Client
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import GateDecided, InferenceEvent
from lockgate.credentials import NatsAuth, NotAllowed
from lockgate.errors import InvalidEvent, SignatureError
from lockgate.permissions import IDENTITIES
from lockgate.server.natsserver import NatsServer, env_password
from lockgate.server.runtime import Runtime
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.subjects import Subjects, token
from tests.helpers import gate_decided, run_cli

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "gateway", "gatekeeper"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def app_credential(runtime: Runtime, *args: str) -> Result:
    return await run_cli(runtime, "app-credential", *args)


class Errors(list[str]):
    """What nats-py reported on a connection, awaitable: the server's -ERR for a refused publish may come after
    the PONG that ends a flush."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def append(self, error: str) -> None:
        super().append(error)
        self._changed.set()

    async def refused(self, subject: str, timeout_s: float = 10.0) -> None:
        """Wait for the permissions violation of a publish to `subject` (nats-py lower-cases the error)."""
        expected = f'permissions violation for publish to "{subject}"'.lower()
        async with asyncio.timeout(timeout_s):
            while not any(expected in e.lower() for e in self):
                self._changed.clear()
                await self._changed.wait()


async def _connect(runtime: Runtime, user: str, password: str, errors: list[str], closed: Any = None) -> nats.NATS:
    async def on_error(exc: Exception) -> None:  # kept for asserts (nats-py would log a traceback otherwise)
        errors.append(str(exc))

    return await nats.connect(runtime.settings.nats_url, user=user, password=password, allow_reconnect=False,
                              max_reconnect_attempts=0, connect_timeout=5, error_cb=on_error,
                              inbox_prefix=f"_INBOX.{user}", closed_cb=closed)


async def test_an_app_credential_publishes_its_own_events_only_and_is_refused_once_revoked(stack: Runtime) -> None:
    created = await app_credential(stack, "create", "--tenant", "acme", "--app", "shop", "--json")
    assert created.exit_code == 0, created.output
    made = json.loads(created.output)
    assert made["applied"] is True and made["subject"] == stack.ctx.bus.subjects.ingest("shop", "acme")
    secret, mode = await asyncio.to_thread(lambda p: (json.loads(p.read_text()), p.stat().st_mode), Path(made["file"]))
    assert mode & 0o777 == 0o600
    sink = stack.services["sink"].handlers
    s = stack.ctx.bus.subjects

    # Applied without a restart: the SDK connects as that user and its events are stored.
    async with Client(stack.settings.nats_url, prefix=s.prefix, app="shop", tenant="acme", user=secret["user"],
                      password=secret["password"]) as client:
        client.emit(input_tokens=7)
        await client.flush()
        assert client.sent == 1
        # One client is one sender: another tenant's event is refused before it leaves.
        with pytest.raises(InvalidEvent, match="make a Client for each"):
            client.emit(InferenceEvent(app="shop", tenant="globex"))
    await sink.events.wait_for(1)

    errors = Errors()
    nc = await _connect(stack, secret["user"], secret["password"], errors)
    try:
        js = nc.jetstream()
        # Another tenant's subject, the router's served subject, a gate decision, and even its own inference
        # subject (a stream's: JetStream would acknowledge on any reply subject it named): refused by the server.
        for subject in (s.ingest("shop", "globex"), s.inference("shop", "acme"), s.inference("other", "acme"),
                        s.served("shop", "acme"), s.gate_decided("shop-v2")):
            with pytest.raises((TimeoutError, nats.errors.Error)):
                await js.publish(subject, b"{}", timeout=1)
        # Nor may it read decisions (another tenant's among them): no subscription on their announcements.
        await nc.subscribe(s.gate_decided_all)
        await nc.flush()
        # Its own subject, with one of its events and one claiming another tenant: that one alone is
        # dead-lettered, naming why; the other is stored.
        mine, forged = InferenceEvent(app="shop", tenant="acme"), InferenceEvent(app="shop", tenant="globex")
        await js.publish(s.ingest("shop", "acme"), encode([mine, forged]), timeout=5)
        await sink.events.wait_for(2)
        await sink.dead_letters.wait_for(1)
        # Found by a probe: JetStream acknowledged a publish on the reply subject the publisher named, unchecked,
        # so an application's user had the acknowledgement stored as any KV key's value (a budget counter reset,
        # a PASS, a route or the audit head erased). Its events go through the gateway's relay now, which answers
        # only on the sender's own inbox: a message naming another reply subject is dropped whole.
        gates = await stack.ctx.bus.kv(s.kv_gates)
        await gates.put("victim", b"signed decision")
        relay = stack.services["gateway"].relay
        await nc.publish(s.ingest("shop", "acme"), encode([InferenceEvent(app="shop", tenant="acme")]),
                         reply=f"$KV.{s.kv_gates}.victim")
        await nc.flush()
        await relay.refused.wait_for(1, 10)
        # Nor a JetStream API request, which it never needs: JetStream answers those on any reply subject too.
        await nc.publish("$JS.API.INFO", b"", reply=f"$KV.{s.kv_gates}.victim")
        await errors.refused("$JS.API.INFO")
        assert (await gates.get("victim")).value == b"signed decision"
    finally:
        await nc.close()
    violations = [e for e in errors if "permissions violation" in e.lower()]
    assert len(violations) >= 6, errors
    rows = stack.ctx.store.rows("SELECT tenant, app, count() AS n FROM inference_events GROUP BY tenant, app")
    assert rows == [{"tenant": "acme", "app": "shop", "n": 2}]  # the refused message's event was never relayed
    letter = stack.ctx.store.rows("SELECT reason, error FROM dead_letters")
    assert len(letter) == 1 and "tenant 'globex' and app 'shop' are not those of the subject" in letter[0]["error"]

    # A connection open while the credential is revoked is closed by the reload, not left publishing.
    gone = asyncio.Event()

    async def closed() -> None:
        gone.set()

    held = await _connect(stack, secret["user"], secret["password"], [], closed=closed)
    revoked = await app_credential(stack, "revoke", "--tenant", "acme", "--app", "shop")
    assert revoked.exit_code == 0 and "the running stack applied it" in revoked.output, revoked.output
    await asyncio.wait_for(gone.wait(), 10)
    assert held.is_closed
    with pytest.raises(nats.errors.Error):
        await _connect(stack, secret["user"], secret["password"], [])
    with pytest.raises(NotAllowed):
        await Client(stack.settings.nats_url, prefix=s.prefix, app="shop", tenant="acme", user=secret["user"],
                     password=secret["password"]).start()
    listed = await app_credential(stack, "list", "--json")
    assert json.loads(listed.output) == []


async def test_the_shared_app_user_publishes_through_the_relay_and_cannot_aim_an_acknowledgement(
        stack: Runtime) -> None:
    # Found by a probe: the shared `app` user (the SDK's default credential) published on `inference`, a stream's
    # subject, and JetStream acknowledged on whatever reply subject it named, unchecked: `{"stream":..,"seq":..}`
    # stored as any KV key's value (a gate decision, a route, the audit head erased, a budget counter reset).
    # It publishes on `ingest` now, any tenant's and app's, and the gateway's relay answers its own inbox only.
    s = stack.ctx.bus.subjects
    app = credentials.for_identity(stack.settings, "app")
    sink, relay = stack.services["sink"].handlers, stack.services["gateway"].relay
    gates = await stack.ctx.bus.kv(s.kv_gates)
    await gates.put("victim", b"signed decision")

    # The SDK with the shared credential: its events are relayed and stored, any tenant's.
    async with Client(stack.settings.nats_url, prefix=s.prefix, app="shop", tenant="acme", user=app.user,
                      password=app.password) as client:
        client.emit(input_tokens=7)
        await client.flush()
        assert client.sent == 1
    await sink.events.wait_for(1)
    await relay.relayed.wait_for(1, 10)  # through the relay, not on a stream's subject

    errors = Errors()
    nc = await _connect(stack, app.user, app.password, errors)
    try:
        # A stream's subject, the acknowledgement aimed at a KV key: refused by the server, nothing stored.
        await nc.publish(s.inference("shop", "acme"), encode([InferenceEvent(app="shop", tenant="acme")]),
                         reply=f"$KV.{s.kv_gates}.victim")
        await errors.refused(s.inference("shop", "acme"))
        # On `ingest`, a reply outside its inbox: dropped by the relay, never relayed.
        await nc.publish(s.ingest("shop", "globex"), encode([InferenceEvent(app="shop", tenant="globex")]),
                         reply=f"$KV.{s.kv_gates}.victim")
        await nc.flush()
        await relay.refused.wait_for(1, 10)
        assert (await gates.get("victim")).value == b"signed decision"
        # Its own inbox: relayed with its headers, so JetStream's duplicate check holds across the relay.
        js, data = nc.jetstream(), encode([InferenceEvent(app="shop", tenant="globex")])
        first = await js.publish(s.ingest("shop", "globex"), data, headers={"Nats-Msg-Id": "once"}, timeout=5)
        again = await js.publish(s.ingest("shop", "globex"), data, headers={"Nats-Msg-Id": "once"}, timeout=5)
        assert (bool(first.duplicate), again.duplicate, again.seq) == (False, True, first.seq)
    finally:
        await nc.close()
    await sink.events.wait_for(2)
    rows = stack.ctx.store.rows("SELECT tenant, app, count() AS n FROM inference_events GROUP BY tenant, app "
                                "ORDER BY tenant")
    assert rows == [{"tenant": "acme", "app": "shop", "n": 1}, {"tenant": "globex", "app": "shop", "n": 1}]


SIGNER = Signer.generate()


def _signed(release: str, decision: str = "PASS") -> GateDecided:
    return SIGNER.sign(GateDecided(release=release, decision=decision, rules=[]))


async def _decide(runtime: Runtime, decision: GateDecided) -> None:
    """What the gatekeeper does (Records.announce): the decision into KV, then announced."""
    await gate_decided(runtime.ctx.bus, decision, msg_id=f"{decision.id}")


async def test_the_shared_app_user_makes_no_jetstream_api_request_and_reads_decisions_through_the_gateway(
        stack: Runtime) -> None:
    # Found by a probe: JetStream answers an API request (STREAM.INFO, MSG.GET, DIRECT.GET, ...) on whatever reply
    # subject the requester names, unchecked. The shared `app` user read decisions and keys with such requests, so
    # a STREAM.INFO with reply `$KV.<bucket>.victim` stored the answer's JSON as that key's value (a decision, a
    # route, a budget counter, the audit head). It reads through the gateway now and may make no API request.
    s = stack.ctx.bus.subjects
    app = credentials.for_identity(stack.settings, "app")
    reads = stack.services["gateway"].reads
    gates = await stack.ctx.bus.kv(s.kv_gates)
    await gates.put("victim", b"signed decision")
    errors = Errors()
    nc = await _connect(stack, app.user, app.password, errors)
    try:
        for request in (f"$JS.API.STREAM.INFO.KV_{s.kv_gates}", f"$JS.API.STREAM.INFO.{s.streams['events'].name}",
                        f"$JS.API.STREAM.MSG.GET.KV_{s.kv_gates}"):
            await nc.publish(request, b"", reply=f"$KV.{s.kv_gates}.victim")
            await errors.refused(request)
        # The gateway's reads answer an application user's inbox only: a reply anywhere else is dropped.
        await nc.publish(s.read_decisions("shop", "acme", ""), b"", reply=f"$KV.{s.kv_gates}.victim")
        await nc.flush()
        await reads.refused.wait_for(1, 10)
        assert (await gates.get("victim")).value == b"signed decision"
    finally:
        await nc.close()

    # The SDK with the shared credential reads any tenant's signed decision, and follows new ones.
    await trust(stack)
    theirs = _signed("globex-v1")
    await _decide(stack, theirs)
    async with Client(stack.settings.nats_url, prefix=s.prefix, app="shop", tenant="acme", user=app.user,
                      password=app.password, trust_file=str(trust_file_path(stack.settings))) as client:
        assert await client.decision("globex-v1") == theirs
        assert await client.decision("unknown") is None
        decisions = client.decisions("globex-")
        assert await asyncio.wait_for(anext(decisions), 10) == theirs
        newer = _signed("globex-v2", "BLOCK")
        await _decide(stack, newer)
        assert await asyncio.wait_for(anext(decisions), 10) == newer
        await decisions.aclose()
        # Still verified here: a decision altered on its way (or in KV) is refused, whoever passed it on.
        await gates.put(token("globex-v3"), encode(msgspec.structs.replace(_signed("globex-v3", "BLOCK"),
                                                                           decision="PASS")))
        with pytest.raises(SignatureError, match="signature invalid"):
            await client.decision("globex-v3")


async def trust(runtime: Runtime) -> None:
    await asyncio.to_thread(trust_key, trust_file_path(runtime.settings), SIGNER.public)


async def test_an_app_credential_reads_and_follows_its_own_releases_decisions_only(stack: Runtime) -> None:
    # Before, a per-application user could read no decision over NATS at all (only over gRPC with an API key):
    # it reads its own tenant's and app's releases' through the gateway now, by their binding as gRPC does.
    created = await app_credential(stack, "create", "--tenant", "acme", "--app", "shop", "--json")
    assert created.exit_code == 0, created.output
    secret = json.loads(await asyncio.to_thread(Path(json.loads(created.output)["file"]).read_text))
    bus, s = stack.ctx.bus, stack.ctx.bus.subjects
    await trust(stack)
    for release, tenant, app in (("shop-v1", "acme", "shop"), ("shop-v2", "acme", "shop"),
                                 ("globex-v1", "globex", "shop"), ("other-v1", "acme", "other")):
        await artifacts.bind_release(bus, artifacts.release_bundle(release, app, {}, tenant=tenant))
    mine, theirs, other = _signed("shop-v1"), _signed("globex-v1"), _signed("other-v1")
    for d in (mine, theirs, other):
        await _decide(stack, d)
    reads = stack.services["gateway"].reads
    async with Client(stack.settings.nats_url, prefix=s.prefix, app="shop", tenant="acme", user=secret["user"],
                      password=secret["password"], trust_file=str(trust_file_path(stack.settings))) as client:
        assert await client.decision("shop-v1") == mine
        # Another tenant's release, or another app's: as one never decided.
        assert await client.decision("globex-v1") is None
        assert await client.decision("other-v1") is None
        decisions = client.decisions()
        assert await asyncio.wait_for(anext(decisions), 10) == mine  # the current one of its own, alone
        await _decide(stack, _signed("globex-v1", "BLOCK"))  # another tenant's: never yielded to it
        newer = _signed("shop-v2", "BLOCK")
        await _decide(stack, newer)
        assert await asyncio.wait_for(anext(decisions), 10) == newer
        await decisions.aclose()

    errors = Errors()
    nc = await _connect(stack, secret["user"], secret["password"], errors)
    try:
        # Another tenant's reads subject, and `gate.decided`, which carries every tenant's decisions whole: refused.
        await nc.publish(s.read_decision("shop", "globex", "globex-v1"), b"", reply=f"_INBOX.{secret['user']}.x")
        await errors.refused(s.read_decision("shop", "globex", "globex-v1"))
        await nc.subscribe(s.gate_decided_all)
        await nc.subscribe(s.app_decided_of("shop", "globex"))
        await nc.flush()
        # Its own reads subject with the answer aimed at the shared user's inbox (every release) or a KV key:
        # no answer it can read, and none stored.
        refused = reads.refused.count
        await nc.publish(s.read_decisions("shop", "acme", ""), b"", reply=f"$KV.{s.kv_gates}.victim")
        await nc.flush()
        await reads.refused.wait_for(refused + 1, 10)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await (await bus.kv(s.kv_gates)).get("victim")
    finally:
        await nc.close()
    violations = [e for e in errors if "permissions violation" in e.lower()]
    assert len(violations) >= 3, errors


async def test_cli_errors_are_one_line(stack: Runtime) -> None:
    # Found by a probe: one hand-edited file whose tenant is a lone surrogate stopped every reload (and `lockgate
    # up`): a revoked user could still connect. A file that does not read is skipped, the others applied.
    apps = Path(stack.settings.home) / "credentials" / "apps"
    await asyncio.to_thread(apps.mkdir, exist_ok=True)
    await asyncio.to_thread((apps / "zz-bad.json").write_text,
                            '{"user": "x", "password": "p", "tenant": "\\ud800", "app": "a"}')
    made = await app_credential(stack, "create", "--tenant", "acme", "--app", "shop")
    assert made.exit_code == 0 and "the running stack applied it" in made.output, made.output
    again = await app_credential(stack, "create", "--tenant", "acme", "--app", "shop")
    assert again.exit_code != 0 and "has a NATS credential already" in again.output and "Traceback" not in again.output
    bad = await app_credential(stack, "create", "--tenant", "acme", "--app", "no spaces")
    assert bad.exit_code != 0 and "invalid app" in bad.output
    missing = await app_credential(stack, "revoke", "--tenant", "acme", "--app", "nope")
    assert missing.exit_code != 0 and "has no NATS credential" in missing.output


async def test_a_deployed_server_takes_an_applications_user_from_nats_config(
        tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # `lockgate nats-config --app acme shop`: the user reads its password from the server's environment, like
    # every identity's, and may publish its own tenant's and app's events only.
    out = CliRunner().invoke(cli, ["nats-config", "--app", "acme", "shop"], env={"LOCKGATE_PREFIX": unique})
    assert out.exit_code == 0, out.output
    user = "apps.acme.shop"
    passwords = {i: "p" + secrets.token_hex(16) for i in (*IDENTITIES, user)}
    for identity, password in passwords.items():
        monkeypatch.setenv(env_password(identity), password)
    assert env_password(user) == "LOCKGATE_NATS_PASSWORD_APPS_ACME_SHOP"
    server = NatsServer(tmp_path / "nats", config=out.output)
    await server.start()
    try:
        admin = Bus(server.url, Subjects(unique), auth=NatsAuth(user="admin", password=passwords["admin"]))
        await admin.connect()
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(server.url, user=user, password=passwords[user], allow_reconnect=False,
                                error_cb=on_error, inbox_prefix=f"_INBOX.{user}")
        try:
            s = admin.subjects
            own = await admin.nc.subscribe(s.ingest("shop", "acme"))  # where the gateway's relay would take them
            await admin.nc.flush()
            # Sent again until it arrives (core NATS is at most once: a loaded machine missed it within 10 s twice,
            # CI once and a full local run once); a refusal would never arrive, so the assertion still tells.
            for _ in range(6):
                await nc.publish(s.ingest("shop", "acme"), b"[]")
                await nc.flush(timeout=10)
                with contextlib.suppress(nats.errors.TimeoutError):
                    got = await own.next_msg(timeout=5)
                    break
            else:
                got = None
            assert got is not None and got.data == b"[]", errors
            for subject in (s.ingest("shop", "globex"), s.inference("shop", "acme")):
                with pytest.raises((TimeoutError, nats.errors.Error)):
                    await nc.jetstream().publish(subject, b"[]", timeout=1)
        finally:
            await nc.close()
            await admin.close()
        assert any("permissions violation" in e.lower() for e in errors), errors
    finally:
        server.stop()
    clash = CliRunner().invoke(cli, ["nats-config", "--app", "a-b", "c", "--app", "a_b", "c"])
    assert clash.exit_code != 0 and "LOCKGATE_NATS_PASSWORD_APPS_A_B_C" in clash.output


async def test_an_app_credential_cannot_take_another_tenants_message_ids(stack: Runtime) -> None:
    # Found by a probe: the relay passed the sender's Nats-Msg-Id on as it was, and JetStream's duplicate check
    # spans the stream, so a tenant that sent its own event first under the id of another tenant's next batch (the
    # SDK's is a hash of the events' tenant, app and ids, which may be predictable) had that batch acknowledged as
    # a duplicate and never stored, billed or dead-lettered.
    users = {}
    for tenant, app in (("evil", "x"), ("acme", "shop")):
        made = await app_credential(stack, "create", "--tenant", tenant, "--app", app, "--json")
        assert made.exit_code == 0, made.output
        users[tenant] = json.loads(await asyncio.to_thread(Path(json.loads(made.output)["file"]).read_text))
    s, sink = stack.ctx.bus.subjects, stack.services["sink"].handlers
    victim = [InferenceEvent(app="shop", tenant="acme", id="order-42")]
    msg_id = "predictable-batch-id"
    acks = []
    for tenant, app, events in (("evil", "x", [InferenceEvent(app="x", tenant="evil", id="junk")]),
                                ("acme", "shop", victim)):
        nc = await _connect(stack, users[tenant]["user"], users[tenant]["password"], [])
        try:
            acks.append(await nc.jetstream().publish(s.ingest(app, tenant), encode(events), timeout=5,
                                                     headers={"Nats-Msg-Id": msg_id, "Nats-Expected-Stream": "nope"}))
        finally:
            await nc.close()
    assert [a.duplicate for a in acks] == [None, None] and acks[0].seq != acks[1].seq
    await sink.rows.wait_for(2)
    rows = stack.ctx.store.rows("SELECT tenant, id, msg_id FROM inference_events ORDER BY tenant")
    assert rows == [{"tenant": "acme", "id": "order-42", "msg_id": f"{token('acme')}.{token('shop')}.{msg_id}"},
                    {"tenant": "evil", "id": "junk", "msg_id": f"{token('evil')}.{token('x')}.{msg_id}"}]
