"""`lockgate gate trust|revoke|retire` when the running stack's audit log does not take the change, on the embedded
runtime as `lockgate up` runs it. A grant of trust is recorded or undone; a revocation or retirement (a safety
action) stays in force, and the command says it is unrecorded and how to record it. Before, `gate trust` wrote the
trust file, then failed on the audit row: the key stayed trusted and no audit row said so."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import AuditEntry
from lockgate.server.runtime import Runtime
from lockgate.signing import Keyring, Signer, read_trust_file, trust_file_path, trust_key, trust_person
from tests.integration import test_cli_errors

stack = test_cli_errors.stack  # the embedded runtime as `lockgate up` runs it, and the CLI against it
lockgate, one_line = test_cli_errors.lockgate, test_cli_errors.one_line

pytestmark = pytest.mark.timeout(90)


async def refuse_audit_entries(runtime: Runtime) -> None:
    """The audit log's stream gone: the stack still answers, but every audit entry fails from here on."""
    bus = runtime.ctx.bus
    await bus.js.delete_stream(bus.subjects.streams["audit"].name)


async def test_a_grant_of_trust_the_audit_log_does_not_take_is_undone(stack: Runtime, tmp_path: Path) -> None:
    path = trust_file_path(stack.settings)
    alice, bob, spare = (Signer.load_or_create(tmp_path / f"{n}.pem") for n in ("alice", "bob", "spare"))
    # Recorded while the audit log takes entries.
    trusted = await lockgate(stack, "gate", "trust", "--person", "alice", "--role", "approver",
                             str(tmp_path / "alice.pem"))
    assert trusted.exit_code == 0 and f"trusted alice (approver) with key {alice.key_id}" in trusted.output, \
        trusted.output
    # A role that may not record the change is refused before the trust file is touched.
    before = await asyncio.to_thread(path.read_bytes)
    viewer = await lockgate(stack, "--role", "viewer", "gate", "trust", "--person", "bob", "--role", "admin",
                            str(tmp_path / "bob.pem"))
    assert viewer.exit_code == 5 and "role 'viewer' may not trust a key or a person" in one_line(viewer), viewer.output
    # Probe p3: an operator, who may record in the audit log, trusted a person as approver, whose approval then
    # turned a NEEDS_REVIEW into a PASS. Only admin says whom lockgate trusts.
    operator = await lockgate(stack, "--role", "operator", "gate", "trust", "--person", "bob", "--role", "approver",
                              str(tmp_path / "bob.pem"))
    assert operator.exit_code == 5 and one_line(operator) == (
        "error: role 'operator' may not trust a key or a person (whose decisions and reviews then count): use "
        "--role admin\n"), operator.output
    assert (await lockgate(stack, "--role", "operator", "gate", "trust", str(tmp_path / "spare.pem"))).exit_code == 5
    assert await asyncio.to_thread(path.read_bytes) == before

    await refuse_audit_entries(stack)
    bob_admin = await lockgate(stack, "gate", "trust", "--person", "bob", "--role", "admin", str(tmp_path / "bob.pem"))
    said = one_line(bob_admin)
    assert bob_admin.exit_code == 1 and said.startswith("error: JetStream did not acknowledge publish to "), said
    assert said.endswith(f"; the trust of bob (key {bob.key_id}) was not recorded in the audit log, so it was "
                         f"undone: bob is not in {path}\n"), said
    assert "trusted bob" not in bob_admin.stdout
    # A new key for alice (a rotation): her old key and role are back.
    rotated = await lockgate(stack, "gate", "trust", "--person", "alice", "--role", "admin", str(tmp_path / "bob.pem"))
    assert rotated.exit_code == 1 and one_line(rotated).endswith(f"undone: alice is as before in {path}\n")
    signing = await lockgate(stack, "gate", "trust", str(tmp_path / "spare.pem"))
    assert signing.exit_code == 1 and one_line(signing).endswith(
        f"; the trust of key {spare.key_id} was not recorded in the audit log, so it was undone: key {spare.key_id} "
        f"is not trusted in {path}\n"), signing.output
    assert await asyncio.to_thread(path.read_bytes) == before
    ring = Keyring.from_trust_file(path)
    assert spare.key_id not in ring.keys and set(ring.people) == {"alice"}
    assert (ring.people["alice"].key_id, ring.people["alice"].roles) == (alice.key_id, ["approver"])

    # The server refusing the role's credentials (a home without them) undoes it alike.
    stranger = {"LOCKGATE_HOME": str(tmp_path / "elsewhere"), "LOCKGATE_TRUST_FILE": str(path)}
    refused = await lockgate(stack, "gate", "trust", str(tmp_path / "spare.pem"), **stranger)
    assert refused.exit_code == 5 and "refused role 'admin'" in one_line(refused), refused.output
    assert one_line(refused).endswith(f"undone: key {spare.key_id} is not trusted in {path}\n")
    assert await asyncio.to_thread(path.read_bytes) == before


async def test_a_revocation_or_retirement_the_audit_log_does_not_take_stays_in_force(
        stack: Runtime, tmp_path: Path) -> None:
    path = trust_file_path(stack.settings)
    alice, leaked, old, new = (Signer.load_or_create(tmp_path / f"{n}.pem") for n in ("alice", "leaked", "old", "new"))
    await asyncio.to_thread(trust_person, path, "alice", alice.public, ["approver"])
    for signer in (leaked, old, new):
        await asyncio.to_thread(trust_key, path, signer.public)

    # A role that may not record it: revoked all the same (a leak waits for nobody), said unrecorded at once.
    viewer = await lockgate(stack, "--role", "viewer", "gate", "revoke", leaked.key_id)
    said = one_line(viewer)
    assert viewer.exit_code == 5 and said.startswith("error: role 'viewer' may not change the trust file"), said
    assert said.endswith(f"; the revocation of key {leaked.key_id} in {path} is in force but not in the audit log: "
                         f"record it with `lockgate gate revoke {leaked.key_id}` once the audit log takes entries\n")
    assert leaked.key_id in Keyring.from_trust_file(path).revoked

    await refuse_audit_entries(stack)
    person = await lockgate(stack, "gate", "revoke", "--person", "alice")
    assert person.exit_code == 1 and f"revoked alice's key {alice.key_id}" in person.stdout, person.output
    assert one_line(person).endswith(
        f"; the revocation of alice's key {alice.key_id} in {path} is in force but not in the audit log: record it "
        "with `lockgate gate revoke --person alice` once the audit log takes entries\n"), person.output
    retired = await lockgate(stack, "gate", "retire", old.key_id)
    assert retired.exit_code == 1 and one_line(retired).endswith(
        f"; the retirement of key {old.key_id} in {path} is in force but not in the audit log: record it with "
        f"`lockgate gate retire {old.key_id}` once the audit log takes entries\n"), retired.output
    data = await asyncio.to_thread(read_trust_file, path)
    assert {alice.key_id, leaked.key_id} <= set(data.revoked) and set(data.retired) == {old.key_id}
    assert old.key_id not in data.keys and new.key_id in data.keys


async def test_a_grant_stopped_by_sigterm_before_its_row_is_chained_is_undone(settings: Settings,
                                                                              tmp_path: Path) -> None:
    # Probe p6: `timeout`, a cancelled CI job or a service stop sends SIGTERM, which killed the command between the
    # trust file and its audit row: the person stayed trusted (and broke glass) with no row. No gatekeeper runs
    # here, so the command is still waiting for its row when it is stopped.
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink"])
    await runtime.start()
    try:
        s, bus = runtime.settings, runtime.ctx.bus
        entries = await bus.nc.subscribe(bus.subjects.audit("admin"))
        pem = tmp_path / "eve.pem"
        Signer.load_or_create(pem)
        env = {**os.environ, "LOCKGATE_HOME": s.home, "LOCKGATE_NATS_URL": s.nats_url, "LOCKGATE_PREFIX": s.prefix}
        for name in ("LOCKGATE_ROLE", "LOCKGATE_NATS_USER", "LOCKGATE_NATS_PASSWORD", "LOCKGATE_TRUST_FILE"):
            env.pop(name, None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lockgate.cli", "gate", "trust", "--person", "eve", "--role", "admin", str(pem),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        sent = Codec(AuditEntry).decode((await entries.next_msg(timeout=30)).data)
        assert (sent.target, sent.action) == ("person:eve", "trust")
        assert "eve" in read_trust_file(trust_file_path(s)).people  # written, its row not chained yet
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 130, err
        assert "eve" not in read_trust_file(trust_file_path(s)).people
        assert "so it was undone" in err.decode()
        undone = Codec(AuditEntry).decode((await entries.next_msg(timeout=10)).data)  # chained after the grant's
        while undone.id == sent.id:  # the grant's publish retried under load: JetStream stores it once, not here
            undone = Codec(AuditEntry).decode((await entries.next_msg(timeout=10)).data)
        assert (undone.target, undone.action) == ("person:eve", "trust-undone")
        await entries.unsubscribe()
    finally:
        await runtime.stop()
