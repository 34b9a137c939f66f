"""The tamper-evident audit log (issue 7, item 6) on a stack run as `lockgate up` runs it, NATS auth on:
a decision, a review, manual rollout actions and a key change are chained and signed; `lockgate audit
verify` passes, then names the row an admin ClickHouse session altered or deleted; and an identity
cannot append entries in another's name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from lockgate import artifacts, auditlog, credentials
from lockgate.bus import Bus
from lockgate.cli.gate import request_review
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import AuditEntry, EvalCompleted, EvalRequested, GateDecided
from lockgate.credentials import NotAllowed
from lockgate.evalruns import record_request
from lockgate.retry import RetryPolicy
from lockgate.server.runtime import Runtime
from lockgate.signing import Signer
from lockgate.store import Store
from lockgate.subjects import token
from tests.helpers import (
    admin_headers,
    break_glass,
    eventually,
    person,
    register_model_release,
    run_cli,
    store_pass,
)

pytestmark = pytest.mark.timeout(180)

POLICY = {"name": "audit-policy", "version": "1",
          "rules": [{"name": "accuracy", "metric": "exact_match", "op": ">=", "threshold": 0.8}]}


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    """The embedded runtime with its own nats-server, a user per service, and the services the log needs."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", deployment="chat"),
                      services=["sink", "query", "gatekeeper", "router"])
    await runtime.start()
    yield runtime
    await runtime.stop()



async def as_identity(runtime: Runtime, identity: str) -> Bus:
    s = runtime.settings
    bus = Bus(s.nats_url, runtime.ctx.bus.subjects, name=f"test-{identity}",
              auth=credentials.for_identity(s, identity), manage_topology=False)
    await bus.connect()
    return bus


async def decide_one(runtime: Runtime) -> None:
    """A gate decision by the runtime's gatekeeper: shop-v2's BLOCK (its eval scored under the policy)."""
    bus = runtime.ctx.bus  # the admin connection stands in for the evaluator
    policy = (await artifacts.register(bus, "policy", POLICY["name"], POLICY)).hash
    done = EvalCompleted(run_id="run-audit", release="shop-v2", suite="sha256:suite", policy=policy, n_cases=50,
                         metrics={"exact_match": 0.5})
    await record_request(bus, EvalRequested(run_id=done.run_id, release=done.release, suite=done.suite,
                                            policy=policy, endpoint="http://127.0.0.1:9/v1"))
    decided = await bus.nc.subscribe(bus.subjects.gate_decided("shop-v2"))
    await bus.publish(bus.subjects.eval_completed, done)
    await decided.next_msg(timeout=30)
    await decided.unsubscribe()


async def produce_one_of_each(runtime: Runtime) -> None:
    """A gate decision, a human override (a review), a canary start, an abort and a break-glass override,
    and an API key created."""
    bus, s = runtime.ctx.bus, runtime.settings  # the admin connection stands in for the approver
    await decide_one(runtime)
    await request_review(bus, "shop-v2", "reject", person(s, "ann", "approver"), "not this week", timeout_s=30)

    for release in ("shop-v1", "shop-v3"):
        await register_model_release(bus, release)
    await store_pass(bus, "shop-v1", s)
    router = runtime.services["router"]
    async with aiohttp.ClientSession(headers=admin_headers(s.home)) as http:
        body = {"stable_release": "shop-v1", "canary_release": "shop-v3"}  # never gated: it waits at 0%
        async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
            assert resp.status == 200, await resp.text()
        async with http.post(f"{router.url}/lockgate/v1/deployments/chat/abort") as resp:
            assert resp.status == 200, await resp.text()
        # A break-glass override, signed by an admin person, gives the never-gated release traffic.
        glass = break_glass(s, "glass", "shop-v3", "canary", "incident 7", weight=20)
        body = {"stable_release": "shop-v1", "canary_release": "shop-v3", "initial_weight": 20, "break_glass": glass}
        async with http.put(f"{router.url}/lockgate/v1/deployments/glass", json=body) as resp:
            assert resp.status == 200, await resp.text()

    created = await run_cli(runtime, "keys", "create", "--tenant", "acme", "--app", "shop", "--role", "viewer")
    assert created.exit_code == 0, created.output


async def stored(runtime: Runtime, store: Store, n: int) -> None:
    sink = runtime.services["sink"].handlers
    await eventually(lambda: store.scalar("SELECT count() FROM audit_log") >= n, [sink.progress("audit_log")],
                     what=f"{n} audit rows stored")


def mutate(store: Store, sql: str) -> None:
    """What an attacker with an admin ClickHouse session does (synchronously, so the next read sees it)."""
    store.command(f"{sql} SETTINGS mutations_sync = 2")


async def test_verify_passes_then_names_the_altered_or_deleted_row(stack: Runtime, store: Store) -> None:
    await produce_one_of_each(stack)
    await stored(stack, store, 6)
    rows = store.rows("SELECT seq, producer, kind, actor, action, target FROM audit_log ORDER BY seq")
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    seen = {(r["producer"], r["kind"], r["action"], r["actor"]) for r in rows if not r["actor"].startswith("apikey:")}
    assert seen == {("gatekeeper", "decision", "decided", "gatekeeper"), ("gatekeeper", "override", "override", "ann"),
                    ("router", "break_glass", "canary", "boss"), ("admin", "key", "create", "admin")}
    by_key = {(r["producer"], r["kind"], r["action"], r["target"]) for r in rows if r["actor"].startswith("apikey:")}
    assert by_key == {("router", "rollout", "canary", "chat"), ("router", "rollout", "abort", "chat")}
    # The break-glass row holds the admin's whole statement, its signed weight included, to check it against.
    [glass] = store.rows("SELECT details FROM audit_log WHERE kind = 'break_glass'")
    assert (glass["details"]["override_weight"], glass["details"]["weight"]) == ("20.0", "20.0"), glass

    ok = await run_cli(stack, "audit", "verify")
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("ok: audit log intact: 6 rows (seq 1..6")
    report = json.loads((await run_cli(stack, "audit", "verify", "--json")).output)
    assert (report["ok"], report["rows"], report["head_seq"]) == (True, 6, 6)
    listed = json.loads((await run_cli(stack, "audit", "log", "--json")).output)
    assert [r["seq"] for r in listed] == [1, 2, 3, 4, 5, 6]

    original = store.scalar("SELECT reason FROM audit_log WHERE seq = 3")
    mutate(store, "ALTER TABLE audit_log UPDATE reason = 'nothing happened' WHERE seq = 3")
    altered = await run_cli(stack, "audit", "verify")
    assert altered.exit_code == 4
    assert altered.stderr.strip() == "error: audit log broken at seq 3: row altered (its content does not match " \
                                     "its hash)"
    mutate(store, f"ALTER TABLE audit_log UPDATE reason = '{original}' WHERE seq = 3")
    assert (await run_cli(stack, "audit", "verify")).exit_code == 0  # put back as it was: intact again

    mutate(store, "ALTER TABLE audit_log DELETE WHERE seq = 6")
    tail = await run_cli(stack, "audit", "verify")
    assert tail.exit_code == 4 and tail.stderr.startswith("error: audit log broken at seq 6: row missing at the tail")

    mutate(store, "ALTER TABLE audit_log DELETE WHERE seq = 2")
    gap = await run_cli(stack, "audit", "verify")
    assert gap.exit_code == 4
    assert gap.stderr.strip() == "error: audit log broken at seq 2: row missing (1 is followed by 3)"
    assert len(gap.stderr.splitlines()) == 1
    broken = json.loads((await run_cli(stack, "audit", "verify", "--json")).output)
    assert broken["ok"] is False and broken["broken"]["seq"] == 2


async def test_an_identity_cannot_append_in_another_identitys_name(stack: Runtime, store: Store) -> None:
    forged = AuditEntry(kind="decision", actor="gatekeeper", target="shop-v2", action="decided",
                        reason="PASS, honestly", source="gatekeeper")
    router = await as_identity(stack, "router")
    viewer = await as_identity(stack, "viewer")
    try:
        # NATS refuses the publish: only the gatekeeper may ask on its subject, and a viewer on none.
        with pytest.raises(NotAllowed, match="'router' may not publish"):
            await router.publish(router.subjects.audit("gatekeeper"), forged)
        with pytest.raises(NotAllowed, match="'viewer' may not publish"):
            await viewer.publish(viewer.subjects.audit("viewer"), forged)
        # What the router may publish is recorded as the router's, whatever the payload claims.
        await router.publish(router.subjects.audit("router"), forged)
    finally:
        await router.close()
        await viewer.close()
    await stored(stack, store, 1)
    [row] = store.rows("SELECT seq, producer, actor, reason FROM audit_log")
    assert (row["seq"], row["producer"], row["actor"]) == (1, "router", "gatekeeper")
    assert (await run_cli(stack, "audit", "verify")).exit_code == 0


async def test_a_rotated_gatekeeper_key_is_retired_and_what_it_signed_still_verifies(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    # Before (r1 probe, finding 2): the README's rotation was `gate trust new.pem`, then `gate revoke OLD`, after
    # which `audit verify` of an untouched log said "broken at seq 1" for good, and every decision the old key had
    # signed stopped verifying: a rotation could not be told from a leak.
    base = settings.replace(nats_url="nats://127.0.0.1:0", deployment="chat")
    names = ["sink", "query", "gatekeeper", "router"]
    first = Runtime(base, services=names)
    await first.start()
    try:
        bus = first.ctx.bus
        old = first.services["gatekeeper"].signer
        await decide_one(first)  # shop-v2's BLOCK, by the gatekeeper on its old key
        for release in ("shop-v1", "shop-v4"):
            await register_model_release(bus, release)
        await store_pass(bus, "shop-v1", first.settings)
        # shop-v4's PASS, signed with the old key before its rotation (as the gatekeeper signs).
        arts = dict((await artifacts.release_of(bus, "shop-v4"))["artifacts"])
        kv = await bus.kv(bus.subjects.kv_gates)
        await kv.put(token("shop-v4"), encode(old.sign(GateDecided(release="shop-v4", decision="PASS", rules=[],
                                                                    artifacts=arts))))
        created = await run_cli(first, "keys", "create", "--tenant", "acme", "--app", "shop", "--role", "viewer")
        assert created.exit_code == 0, created.output
        await stored(first, store, 2)
    finally:
        await first.stop()

    # The rotation: the gatekeeper restarts on its new key (trusted in the home's trust file as it starts), and the
    # old key is retired once no gatekeeper holds it.
    new = Signer.load_or_create(tmp_path / "gatekeeper-2.pem")
    rotated = Runtime(base.replace(signing_key=str(tmp_path / "gatekeeper-2.pem")), services=names)
    await rotated.start()
    router = rotated.services["router"]

    async def canary(deployment: str) -> dict:
        async with aiohttp.ClientSession(headers=admin_headers(rotated.settings.home)) as http:
            body = {"stable_release": "shop-v1", "canary_release": "shop-v4"}
            async with http.put(f"{router.url}/lockgate/v1/deployments/{deployment}", json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

    try:
        before = await canary("pre")  # the old key still trusted: its PASS admits (an audited canary start, seq 3)
        assert (before["phase"], before["canary"]["release"]) == ("progressing", "shop-v4"), before
        await stored(rotated, store, 3)
        retired = await run_cli(rotated, "gate", "retire", old.key_id)
        assert retired.exit_code == 0, retired.output
        assert f"retired key {old.key_id}" in retired.output and "(audit rows up to seq 3)" in retired.output
        await stored(rotated, store, 4)  # the retirement's own row, chained by the new key
        ok = await run_cli(rotated, "audit", "verify")
        assert ok.exit_code == 0, ok.output
        assert ok.output.startswith("ok: audit log intact: 4 rows (seq 1..4") and \
            f"signed by key(s) {', '.join(sorted([old.key_id, new.key_id]))}" in ok.output
        # History: what it decided stays provable (--authentic-only), and the verdict says it admits nothing now.
        verified = await run_cli(rotated, "gate", "verify", "shop-v2", "--authentic-only")
        assert verified.exit_code == 0, verified.output
        assert f"is signed by key {old.key_id} (authentic, but a BLOCK admits nothing; it was signed by key " \
               f"{old.key_id} (retired at " in verified.output
        # Found by a probe (p20 F12): its PASS exited 0 ("ok", a note saying it admits nothing now), which a pipeline
        # admitting on the exit code read as "ship it". It exits 5, saying why.
        verified = await run_cli(rotated, "gate", "verify", "shop-v4")
        assert verified.exit_code == 5, verified.output
        assert f"authentic, but a PASS signed by key {old.key_id} (retired at " in verified.stderr and \
            "admits nothing now; re-gate shop-v4 to roll it out" in verified.stderr
        assert (await run_cli(rotated, "gate", "verify", "shop-v4", "--authentic-only")).exit_code == 0
        # Explained, it says so too (before: a plain PASS, found by a probe).
        explained = await run_cli(rotated, "gate", "explain", "shop-v2")
        assert explained.exit_code == 0, explained.output
        said = " ".join(explained.output.split())
        assert "admits nothing:" in said and f"signed by key id {old.key_id!r}, retired at" in said, explained.output

        # It admits nothing new: a canary resting on its PASS waits for the release to be gated again.
        after = await canary("chat")
        assert (after["phase"], after["weight"]) == ("idle", 0.0), after
        assert after["reason"] == "canary shop-v4 started at 0%; 0% until a verified gate decision allows it"

        # A leak: revoked, the old key's signatures prove nothing, but the new key's rows link over its rows (each
        # prev_hash fixes every row before it), so the log still verifies, and a row deleted is still named.
        revoked = await run_cli(rotated, "gate", "revoke", old.key_id)
        assert revoked.exit_code == 0, revoked.output
        await stored(rotated, store, 6)
        intact = await run_cli(rotated, "audit", "verify")
        assert intact.exit_code == 0, intact.output
        mutate(store, "DELETE FROM audit_log WHERE seq = 2")
        broken = await run_cli(rotated, "audit", "verify")
        assert broken.exit_code == 4
        assert broken.stderr.strip() == "error: audit log broken at seq 2: row missing (1 is followed by 3)"
    finally:
        await rotated.stop()


class _NotYet(Exception):
    """A readiness check that does not hold yet."""


async def test_junk_a_producer_floods_the_audit_queue_with_is_gone_once_the_chainer_read_it(
        stack: Runtime, store: Store) -> None:
    # Found by a probe: the operator identity filled the audit queue (LG_AUDIT, 128 MiB) with junk on its own audit
    # subject in about 2 s; the queue kept it for 30 days (limits retention), refused every later entry, and with
    # them every gate decision's announcement. Now an entry is kept only until the chainer has read it.
    operator = await as_identity(stack, "operator")
    try:
        for i in range(30):
            await operator.publish(operator.subjects.audit("operator"), b"\xff not an entry " * 4000, msg_id=f"junk-{i}")
        await auditlog.record(operator, "operator", kind="rollout", actor="ops", target="web", action="pause")
    finally:
        await operator.close()
    await stored(stack, store, 1)  # the entry after the junk is chained: the chainer has read the junk
    bus = stack.ctx.bus
    queue = bus.subjects.streams["audit"].name

    async def emptied() -> None:  # acknowledged, so dropped: the acknowledgements may trail the rows a little
        if (left := (await bus.js.stream_info(queue)).state.messages) != 0:
            raise _NotYet(f"{left} entries still in {queue}")

    await asyncio.wait_for(RetryPolicy(attempts=None, initial_s=0.05, max_s=0.5).call(
        emptied, retry_on=_NotYet, what="the audit queue emptied"), 30)
    [row] = store.rows("SELECT producer, action FROM audit_log")
    assert (row["producer"], row["action"]) == ("operator", "pause")
