"""A key change from the CLI counts as recorded only once the chainer has appended its row, and an entry queued while
no gatekeeper holds a trusted key is chained once one does; on the embedded runtime as `lockgate up` runs it (NATS
with every identity's permissions).

Before (probe p5, findings 3 and 6): `gate revoke` of the running gatekeeper's own key (the answer to a leak) and a
`gate trust --person mallory --role admin` after it exited 0 once JetStream took their entries, but no gatekeeper
could sign them: each was dead-lettered "retries exhausted" seconds later, so the trust file said mallory was an
admin and no audit row ever did. And the sink failed every such letter on a permissions violation (it may delete
from the audit queue but could not read it), adding a letter of its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lockgate import credentials
from lockgate.cli import audit
from lockgate.cli.main import cli
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import AuditRecord
from lockgate.retry import RetryPolicy
from lockgate.server.apikeys import KeyStore
from lockgate.server.runtime import Runtime
from lockgate.signing import Keyring, Signer, trust_file_path

pytestmark = pytest.mark.timeout(120)
rows: Codec[AuditRecord] = Codec(AuditRecord)


@pytest.fixture
async def stack(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Runtime]:
    # Only the timing is the test's: a command gives up sooner, and a refused entry comes back sooner, so an entry
    # is refused past the edge's max_deliver (8) within a second instead of about a minute.
    monkeypatch.setattr(audit, "CHAINED_WITHIN_S", 3.0)
    monkeypatch.setattr("lockgate.bus.NACK_BACKOFF", RetryPolicy(initial_s=0.01, max_s=0.05))
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "query", "gatekeeper"])
    await runtime.start()
    yield runtime
    await runtime.stop()


async def lockgate(runtime: Runtime, *args: str) -> Result:
    """The CLI as a user runs it against the stack (in a thread: the stack answers on this loop)."""
    s = runtime.settings
    env = {"LOCKGATE_HOME": s.home, "LOCKGATE_NATS_URL": s.nats_url, "LOCKGATE_PREFIX": s.prefix,
           "LOCKGATE_ROLE": None, "LOCKGATE_NATS_USER": None, "LOCKGATE_NATS_PASSWORD": None,
           "LOCKGATE_TRUST_FILE": None}
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env, catch_exceptions=False)


def one_line(result: Result) -> str:
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1, result.output
    return result.stderr


async def test_a_change_no_gatekeeper_can_chain_fails_and_is_chained_once_one_can(
        stack: Runtime, tmp_path: Path) -> None:
    path = trust_file_path(stack.settings)
    gatekeeper = stack.services["gatekeeper"]
    kid = gatekeeper.signer.key_id
    alice, mallory = (Signer.load_or_create(tmp_path / f"{n}.pem") for n in ("alice", "mallory"))
    chained = await stack.ctx.bus.nc.subscribe(stack.ctx.bus.subjects.audit_records)

    # Chained at once while the gatekeeper's key is trusted: exit 0 means the row is appended.
    trusted = await lockgate(stack, "gate", "trust", "--person", "alice", "--role", "approver",
                             str(tmp_path / "alice.pem"))
    assert trusted.exit_code == 0 and f"trusted alice (approver) with key {alice.key_id}" in trusted.output, \
        trusted.output
    first = rows.decode((await chained.next_msg(timeout=5)).data)
    assert (first.target, first.action, first.producer) == ("person:alice", "trust", "admin")

    # The running gatekeeper's key leaked: revoked, it signs nothing, so no row is appended any more.
    revoked = await lockgate(stack, "gate", "revoke", kid)
    said = one_line(revoked)
    assert revoked.exit_code == 1 and f"revoked key {kid}" in revoked.stdout, revoked.output
    assert said.startswith(f"error: the audit entry (revoke signing-key:{kid}) is queued but was not chained into "
                           "the audit log within 3s: no gatekeeper with a trusted signing key is chaining"), said
    assert said.endswith(f"; the revocation of key {kid} in {path} is in force but not in the audit log\n"), said
    assert kid in Keyring.from_trust_file(path).revoked

    # A grant it cannot record is undone (before: exit 0, and mallory an admin with no audit row).
    grant = await lockgate(stack, "gate", "trust", "--person", "mallory", "--role", "admin",
                           str(tmp_path / "mallory.pem"))
    said = one_line(grant)
    assert grant.exit_code == 1 and "trusted mallory" not in grant.stdout, grant.output
    assert said.startswith("error: the audit entry (trust person:mallory) is queued but was not chained"), said
    assert said.endswith(f"; the trust of mallory (key {mallory.key_id}) was not recorded in the audit log, so it "
                         f"was undone: mallory is not in {path}\n"), said
    assert "mallory" not in Keyring.from_trust_file(path).people
    # So is an application's credential, its undoing queued after it as a grant's.
    cred = await lockgate(stack, "app-credential", "create", "--tenant", "acme", "--app", "shop")
    said = one_line(cred)
    assert cred.exit_code == 1 and said.startswith("error: the audit entry (create nats-app:"), said
    assert said.endswith(": nothing changed\n"), said
    assert not credentials.app_path(stack.settings.home, "acme", "shop").exists()
    # And an API key: revoked, never shown (before: printed, and working with no row; probe p6).
    key = await lockgate(stack, "keys", "create", "--tenant", "acme", "--app", "shop", "--role", "admin")
    said = one_line(key)
    assert key.exit_code == 1 and said.startswith("error: the audit entry (create apikey:"), said
    assert "so it is revoked and was not shown" in said and "lg-" not in key.stdout, key.output
    assert all(k.revoked_at for k in KeyStore(stack.settings.home).keys() if k.tenant == "acme")

    # Its entries are refused as often as the edge's max_deliver (8) allows each of the three: before, each was then
    # dead-lettered "retries exhausted", and no gatekeeper ever chained it ...
    await gatekeeper.handlers.own.refused.wait_for(3 * 8, timeout_s=30)
    # ... and wait for a gatekeeper with a trusted key: one restarted on a new key (trusted as `lockgate up` trusts
    # its own) chains them, the undoing of mallory's grant too.
    Signer.load_or_create(tmp_path / "fresh.pem")
    fresh = stack.settings.replace(signing_key=str(tmp_path / "fresh.pem"))
    replacement = Runtime(fresh, services=["gatekeeper"], embedded_nats=False)
    await replacement.start()
    try:
        seen: dict[int, tuple[str, str]] = {}  # by seq: a row is published again at times (the sink keeps one)
        async with asyncio.timeout(15):
            while not {2, 3, 4, 5, 6, 7, 8} <= seen.keys():
                row = rows.decode((await chained.next_msg(timeout=None)).data)
                seen[row.seq] = (row.target, row.action)
        # Each once (redelivered entries come back in no fixed order, so neither do their rows); the API key's
        # revocation too, after its creation (before, probe p77 F3, the log showed the key created, never revoked).
        app_user = f"nats-app:{credentials.app_user('acme', 'shop')}"
        key = next(v[0] for v in seen.values() if v[0].startswith("apikey:"))
        assert sorted(seen[seq] for seq in (2, 3, 4, 5, 6, 7, 8)) == [(key, "create"), (key, "create-undone"),
                                                                (app_user, "create"), (app_user, "create-undone"),
                                                                ("person:mallory", "trust"),
                                                                ("person:mallory", "trust-undone"),
                                                                (f"signing-key:{kid}", "revoke")], seen
        verified = await lockgate(stack, "audit", "verify")
        assert verified.exit_code == 0 and "ok: audit log intact: 8 rows" in verified.output, verified.output
        # And a change made now is chained at once again.
        again = await lockgate(stack, "gate", "trust", "--person", "mallory", "--role", "approver",
                               str(tmp_path / "mallory.pem"))
        assert again.exit_code == 0, again.output
        # The operator role waits for its row alike (it may read the rows as they are chained): a revocation, the
        # change to the trust file it may make.
        revoked = await lockgate(stack, "--role", "operator", "gate", "revoke", "--person", "mallory")
        assert revoked.exit_code == 0, revoked.output
    finally:
        await replacement.stop()
        await chained.unsubscribe()


async def test_a_dead_lettered_audit_entry_is_one_letter_not_two(stack: Runtime) -> None:
    bus = stack.ctx.bus  # the embedded runtime's admin identity, which may ask for entries as anyone
    # An unreadable entry: the chainer letters it, and the sink, once the letter is stored, deletes the original.
    await bus.publish(bus.subjects.audit("operator"), b"{junk")
    sink = stack.services["sink"]
    await sink.handlers.dead_letters.wait_for(1)  # a letter stored (before: only the sink's own letter ever was)
    listed = await lockgate(stack, "dlq", "--json")
    assert listed.exit_code == 0, listed.output
    letters = [(d["origin"], d["reason"]) for d in json.loads(listed.stdout)]
    assert letters == [("gatekeeper", "invalid event")], letters
