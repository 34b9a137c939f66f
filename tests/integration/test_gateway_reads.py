"""The gateway's decision reads for applications' NATS users (services/gateway/reads.py), through a real
nats-server, the embedded runtime's gateway and the SDK. Found by a probe: the answer to a decisions read was one
message holding every decision (about 3 KB each), so past about 350 decided releases its publish failed and
`Client.decisions("")` yielded nothing; and the reads were answered one after the other in one callback, so one
app's burst of decisions reads (each one releases-bucket read per key of the gates bucket) held another tenant's
single read for seconds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from lockgate import artifacts, credentials, natsclient
from lockgate.client import Client, StaleDecision
from lockgate.codec import Codec, encode
from lockgate.config import Settings
from lockgate.contracts import DecisionsRead, GateDecided, RuleResult, StoredDecision
from lockgate.errors import BusUnavailable
from lockgate.server.runtime import Runtime
from lockgate.server.service import Progress
from lockgate.services.gateway import reads as gateway_reads
from lockgate.signing import Signer, trust_file_path, trust_key
from lockgate.subjects import token
from tests.helpers import aim_jetstream_reply

pytestmark = pytest.mark.timeout(120)

SIGNER = Signer.generate()
_answers: Codec[DecisionsRead] = Codec(DecisionsRead)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    # Two applications' own NATS users (made before the start: `up` applies the home's credentials).
    for tenant in ("acme", "globex"):
        await asyncio.to_thread(credentials.create_app, settings.home, tenant, "shop")
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["gateway"])
    await runtime.start()
    await asyncio.to_thread(trust_key, trust_file_path(runtime.settings), SIGNER.public)
    yield runtime
    await runtime.stop()


def _user(runtime: Runtime, tenant: str | None) -> dict[str, str]:
    """The shared `app` user's credential (tenant None), or that tenant's `shop` app's own."""
    if tenant is None:
        auth = credentials.for_identity(runtime.settings, "app")
        return {"user": auth.user or "app", "password": auth.password or ""}
    path = credentials.app_path(runtime.settings.home, tenant, "shop")
    return json.loads(path.read_text())


def _client(runtime: Runtime, tenant: str | None) -> Client:
    user = _user(runtime, tenant)
    return Client(runtime.settings.nats_url, prefix=runtime.settings.prefix, app="shop", tenant=tenant or "acme",
                  user=user["user"], password=user["password"], trust_file=str(trust_file_path(runtime.settings)))


async def _connect(runtime: Runtime, tenant: str | None) -> nats.NATS:
    user = _user(runtime, tenant)
    return await natsclient.connect(runtime.settings.nats_url, user=user["user"], password=user["password"],
                              allow_reconnect=False, inbox_prefix=f"_INBOX.{user['user']}")


def _signed(release: str) -> GateDecided:
    """A decision the size of a real one (about 3 KB in an answer): a few rules with their explanations."""
    rules = [RuleResult(rule=f"rule-{i}", metric="accuracy", op=">=", threshold=0.8, observed=0.9, verdict="PASS",
                        explanation=f"accuracy 0.9 on the suite's cases is at least 0.8 (rule {i}) " * 6)
             for i in range(4)]
    return SIGNER.sign(GateDecided(release=release, decision="PASS", rules=rules))


async def _decide(runtime: Runtime, *decisions: GateDecided) -> None:
    """What the gatekeeper stores (Records.announce): each signed decision under its release's key."""
    gates = await runtime.ctx.bus.kv(runtime.ctx.bus.subjects.kv_gates)
    for decision in decisions:
        await gates.put(token(decision.release), encode(decision))


async def _bind(runtime: Runtime, tenant: str, *releases: str) -> None:
    for release in releases:
        await artifacts.bind_release(runtime.ctx.bus, artifacts.release_bundle(release, "shop", {}, tenant=tenant))


async def _take(decisions: AsyncIterator[GateDecided], n: int) -> dict[str, GateDecided]:
    """The first `n` decisions a watch yields (its current ones), by release."""
    got = {}
    try:
        for _ in range(n):
            decision = await asyncio.wait_for(anext(decisions), 30)
            got[decision.release] = decision
    finally:
        await decisions.aclose()  # type: ignore[attr-defined]
    return got


async def test_decisions_past_one_message_are_all_delivered_page_by_page(stack: Runtime) -> None:
    s = stack.ctx.bus.subjects
    mine = [f"shop-{i:04d}" for i in range(400)]
    theirs = [f"globex-{i}" for i in range(3)]
    await _bind(stack, "acme", *mine)
    await _bind(stack, "globex", *theirs)
    signed = {release: _signed(release) for release in mine + theirs}
    await _decide(stack, *signed.values())
    # One answer holding them all is over the server's max_payload (their values go base64 encoded).
    assert sum(len(encode(d)) * 4 // 3 for d in signed.values()) > stack.ctx.bus.nc.max_payload

    # The shared user reads every tenant's: all of them, each as the gatekeeper signed it (verified by the SDK).
    async with _client(stack, None) as client:
        assert await _take(client.decisions(""), len(signed)) == signed
    # An application's own user reads its own releases': more than one message of them too, and no other's.
    async with _client(stack, "acme") as client:
        assert await _take(client.decisions(""), len(mine)) == {r: signed[r] for r in mine}

    # An SDK from before pages asks with no body and reads one answer: told so, not left to time out.
    nc = await _connect(stack, None)
    try:
        answer = _answers.decode((await nc.request(s.read_decisions("shop", "acme", ""), b"", timeout=10)).data)
    finally:
        await nc.close()
    assert answer.error == "unavailable" and "page by page" in answer.message and not answer.entries


async def test_a_value_no_message_carries_is_an_error_for_its_own_read_and_withheld_from_the_list(
        stack: Runtime) -> None:
    decided = _signed("shop-v1")
    await _decide(stack, decided)
    gates = await stack.ctx.bus.kv(stack.ctx.bus.subjects.kv_gates)
    await gates.put(token("huge"), b"x" * 800_000)  # base64 encoded in an answer: over 1 MiB
    async with _client(stack, None) as client:
        with pytest.raises(BusUnavailable, match="does not fit in one NATS message"):
            await client.decision("huge")
        # Every other decision is still listed: one such value (no decision the gatekeeper writes) ends no read.
        assert await _take(client.decisions(""), 1) == {"shop-v1": decided}


async def test_one_apps_burst_of_decisions_reads_does_not_hold_another_tenants_read(
        stack: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    s = stack.ctx.bus.subjects
    await _bind(stack, "globex", "globex-v1")
    await _decide(stack, _signed("globex-v1"))
    reads = stack.services["gateway"].reads
    # acme's reads are held in the store (a slow bucket, a big one) until the test lets them go, so whatever the
    # machine's speed they are outstanding while globex reads.
    let_go, held = asyncio.Event(), Progress()
    read = reads._read

    async def held_for_acme(kind: str, name: str, scope: Any, *args: Any) -> Any:
        if scope == ("acme", "shop"):
            await held.bump()
            await let_go.wait()
        return await read(kind, name, scope, *args)

    monkeypatch.setattr(reads, "_read", held_for_acme)

    burst, victim = await _connect(stack, "acme"), await _connect(stack, "globex")
    try:
        answered, answers = Progress(), []

        async def on_answer(msg: Any) -> None:
            answers.append(_answers.decode(msg.data))
            await answered.bump()

        await burst.subscribe("_INBOX.apps.acme.shop.burst.>", cb=on_answer)
        # One more than a reader may have in flight: the last is answered at once, unread.
        n = gateway_reads._QUEUED_PER_READER + 1
        for i in range(n):
            await burst.publish(s.read_decisions("shop", "acme", ""), b"", reply=f"_INBOX.apps.acme.shop.burst.{i}")
        await burst.flush()
        await held.wait_for(1, 10)

        # Another tenant's read is answered while acme's are all still outstanding.
        answer = _answers.decode((await victim.request(s.read_decision("shop", "globex", "globex-v1"), b"",
                                                       timeout=10)).data)
        assert [e.key for e in answer.entries] == [token("globex-v1")] and not answer.error
        await answered.wait_for(1, 10)
        assert answers[0].error == "unavailable" and "retry" in answers[0].message
        await held.wait_for(gateway_reads._PER_READER, 10)
        assert held.count == gateway_reads._PER_READER  # acme holds its share of the slots, no more
        assert answered.count == 1

        let_go.set()
        await answered.wait_for(n, 30)
        assert all(not a.error for a in answers[1:]) and len(answers) == n
    finally:
        await burst.close()
        await victim.close()


async def test_a_scoped_reader_reads_each_release_binding_once(stack: Runtime,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    s = stack.ctx.bus.subjects
    mine, theirs = [f"shop-{i}" for i in range(20)], [f"globex-{i}" for i in range(20)]
    await _bind(stack, "acme", *mine)
    await _bind(stack, "globex", *theirs)
    # A release key holding JetStream's own JSON (aimed there by an identity that may): no binding, refused.
    await aim_jetstream_reply(stack.ctx.bus.nc, s.streams["dlq"].name, s.dlq("readsprobe"), s.kv_releases,
                              token("rogue"), "ack")
    await _decide(stack, *(_signed(r) for r in [*mine, *theirs, "rogue"]))
    calls = []
    release_of = artifacts.release_of

    async def counted(bus: Any, release: str) -> Any:
        calls.append(release)
        return await release_of(bus, release)

    monkeypatch.setattr(artifacts, "release_of", counted)
    nc = await _connect(stack, "acme")
    try:
        for reading in ("first", "second"):
            calls.clear()
            answer = _answers.decode((await nc.request(s.read_decisions("shop", "acme", ""), b"{}", timeout=10)).data)
            assert sorted(e.key for e in answer.entries) == sorted(token(r) for r in mine), reading
            if reading == "first":
                assert len(calls) == len(mine) + len(theirs) + 1
        # Read once, a binding holds (the releases bucket is write-once); the unbound key is read, and refused, again.
        assert calls == ["rogue"]
    finally:
        await nc.close()


async def _as_gateway(runtime: Runtime, errors: list[str], seen: asyncio.Event) -> nats.NATS:
    """A second process holding the gateway's real NATS credential (probe p20 F11)."""
    auth = credentials.for_identity(runtime.settings, "gateway")

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())
        seen.set()

    return await natsclient.connect(runtime.settings.nats_url, user=auth.user, password=auth.password,
                              allow_reconnect=False, inbox_prefix=f"_INBOX.{auth.user}", error_cb=on_error)


async def test_the_gateways_credential_answers_reads_in_its_queue_group_only(stack: Runtime) -> None:
    # Found by a probe (p20 F11): a process holding the gateway's credential subscribed to every read outside the
    # gateway's queue group, so it was sent each read as well as a replica was, and its answer came first.
    s = stack.ctx.bus.subjects
    old = _signed("shop-v1")
    current = SIGNER.sign(GateDecided(release="shop-v1", decision="BLOCK", rules=[], reason="rejected by bob"))
    await _decide(stack, old, current)
    errors: list[str] = []
    refused = asyncio.Event()
    rogue = await _as_gateway(stack, errors, refused)
    try:
        stale = encode(DecisionsRead(entries=[StoredDecision(key=token("shop-v1"), revision=10**6, value=encode(old))]))

        async def answer(msg: Any) -> None:
            await msg.respond(stale)

        await rogue.subscribe(s.reads_all, cb=answer)
        await rogue.flush()
        await asyncio.wait_for(refused.wait(), 10)
        assert f'permissions violation for subscription to "{s.reads_all}"' in errors[0]
        async with _client(stack, None) as client:
            assert await client.decision("shop-v1") == current  # the gateway's answer, the only one sent
    finally:
        await rogue.close()


async def test_the_gateways_credential_relays_events_in_its_queue_group_only(stack: Runtime) -> None:
    # As the reads: outside the relays' queue group a second process holding the gateway's credential was sent every
    # application's events, and could acknowledge them itself and drop them.
    s = stack.ctx.bus.subjects
    errors: list[str] = []
    refused = asyncio.Event()
    rogue = await _as_gateway(stack, errors, refused)
    try:
        await rogue.subscribe(s.ingest_all)
        await rogue.flush()
        await asyncio.wait_for(refused.wait(), 10)
        assert f'permissions violation for subscription to "{s.ingest_all}"' in errors[0]
    finally:
        await rogue.close()


async def test_a_superseded_decision_handed_back_is_not_returned(stack: Runtime) -> None:
    # Found by a probe (p20 F11): a process with the gateway's credential answered reads with a release's old,
    # genuinely signed PASS after an approver's reject made its decision a BLOCK, and the SDK returned the PASS.
    s = stack.ctx.bus.subjects
    old = _signed("shop-v1")
    newer = SIGNER.sign(GateDecided(release="shop-v1", decision="BLOCK", rules=[], reason="rejected by bob"))
    other = _signed("shop-v2")
    assert old.time < newer.time
    await _decide(stack, old, newer, other)
    stale = StoredDecision(key=token("shop-v1"), revision=10**6, value=encode(old))
    marker = StoredDecision(key=token("shop-v2"), revision=10**6 + 1, value=encode(other))

    async def answer(msg: Any) -> None:
        request = s.read_request(msg.subject)
        assert request is not None
        await msg.respond(encode(DecisionsRead(entries=[stale] if request[2] == "decision" else [stale, marker])))

    async with _client(stack, None) as client:
        assert await client.decision("shop-v1") == newer  # read from the gateway: this client saw the BLOCK
        # The rogue joins the queue group (all it may do) and the gateway's replica leaves it, so every read is
        # the rogue's to answer, not a share of them.
        await stack.services["gateway"].reads.stop()
        errors: list[str] = []
        rogue = await _as_gateway(stack, errors, asyncio.Event())
        try:
            await rogue.subscribe(s.reads_all, queue=s.reads_group, cb=answer)
            await rogue.flush()
            with pytest.raises(StaleDecision, match="is older than decision"):
                await client.decision("shop-v1")
            # A watch skips it too (counted as refused), and yields what is not older than what it read before.
            assert await _take(client.decisions("shop-"), 1) == {"shop-v2": other}
            assert client.rejected_decisions == 1
            assert not errors
        finally:
            await rogue.close()
