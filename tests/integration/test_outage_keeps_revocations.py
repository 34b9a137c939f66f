"""What takes access away stays taken away when the audit log cannot take entries, and what grants access is undone
and the undoing recorded; on the embedded runtime as `lockgate up` runs it, after `gate revoke` of the running
gatekeeper's leaked key (no gatekeeper holds a trusted key, so no entry is chained).

Before (probe p77): `app-credential revoke` and `--rotate` of a leaked credential were undone, and it kept connecting
(F2); `keys scope --every-deployment` failed but stayed in force, and `keys create`'s undoing was never recorded
(F3); a gatekeeper restarted on the revoked key was told to take it out of `revoked` (F4); and the next `up` made
a revoked first admin or app key again, with no audit row (F1)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import nats.errors
import pytest

from lockgate import credentials
from lockgate.codec import Codec
from lockgate.contracts import AuditRecord
from lockgate.errors import ConfigError
from lockgate.server.apikeys import KeyStore, bootstrap
from lockgate.server.runtime import Runtime
from lockgate.signing import Signer, trust_file_path
from tests.integration import test_audit_waits_for_chain

stack, lockgate, one_line = (
    test_audit_waits_for_chain.stack,
    test_audit_waits_for_chain.lockgate,
    test_audit_waits_for_chain.one_line,
)
rows: Codec[AuditRecord] = Codec(AuditRecord)

pytestmark = pytest.mark.timeout(120)


async def _connects(runtime: Runtime, cred: dict[str, str]) -> bool:
    """Whether a NATS user with this password is let in now."""

    async def quiet(exc: Exception) -> None:  # the refusal is the answer (nats-py would log a traceback)
        return None

    try:
        nc = await nats.connect(
            runtime.settings.nats_url,
            user=cred["user"],
            password=cred["password"],
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
            error_cb=quiet,
        )
    except (nats.errors.Error, OSError):
        return False
    await nc.close()
    return True


async def test_an_audit_outage_keeps_revocations_in_force_and_undoes_grants_on_the_record(
    stack: Runtime, tmp_path: Path
) -> None:
    home = Path(stack.settings.home)
    store = KeyStore(home)
    kid = stack.services["gatekeeper"].signer.key_id
    chained = await stack.ctx.bus.nc.subscribe(stack.ctx.bus.subjects.audit_records)
    made = await lockgate(
        stack,
        "keys",
        "create",
        "--tenant",
        "acme",
        "--app",
        "shop",
        "--deployment",
        "shop-web",
        "--deployment",
        "other",
    )
    assert made.exit_code == 0, made.output
    (key,) = store.keys()
    for app in ("leak", "rot"):
        cred = await lockgate(stack, "app-credential", "create", "--tenant", "acme", "--app", app)
        assert cred.exit_code == 0, cred.output
    leaked = {app: json.loads(credentials.app_path(home, "acme", app).read_text()) for app in ("leak", "rot")}
    assert all([await _connects(stack, c) for c in leaked.values()])

    # The running gatekeeper's key leaked: revoked, no row is chained from now on.
    assert (await lockgate(stack, "gate", "revoke", kid)).exit_code == 1

    # A leaked credential revoked stays revoked: refused from the reload on (before: put back, and it connected).
    revoked = await lockgate(stack, "app-credential", "revoke", "--tenant", "acme", "--app", "leak")
    said = one_line(revoked)
    assert revoked.exit_code == 1 and said.startswith("error: the audit entry (revoke nats-app:"), said
    assert said.endswith(
        "; the revocation of the credential of acme/leak is in force (the running stack applied "
        "it) but not in the audit log yet\n"
    ), said
    assert not credentials.app_path(home, "acme", "leak").exists()
    assert not await _connects(stack, leaked["leak"])
    # So does a rotation: the old password is refused, the new one in the file connects.
    rotated = await lockgate(
        stack, "app-credential", "create", "--tenant", "acme", "--app", "rot", "--rotate"
    )
    said = one_line(rotated)
    assert rotated.exit_code == 1 and "the rotation of the credential of acme/rot is in force" in said, said
    assert not await _connects(stack, leaked["rot"])
    assert await _connects(stack, json.loads(credentials.app_path(home, "acme", "rot").read_text()))

    # A widening of a key's scope is a grant: undone (before: exit 1, and in force).
    widened = await lockgate(stack, "keys", "scope", key.id, "--every-deployment")
    said = one_line(widened)
    assert widened.exit_code == 1 and said.endswith(
        f"; the widening of key {key.id} was not recorded in the audit "
        "log, so it was undone: it may use shop-web, other\n"
    ), said
    assert store.keys()[0].deployments == ("shop-web", "other")
    # A narrowing takes access away: in force, as a revocation.
    narrowed = await lockgate(stack, "keys", "scope", key.id, "--deployment", "other")
    assert narrowed.exit_code == 1 and f"key {key.id} (app for acme/shop) may use other" in narrowed.stdout, (
        narrowed.output
    )
    assert store.keys()[0].deployments == ("other",)
    # A key the log does not record is revoked, and that undoing is recorded after it.
    created = await lockgate(stack, "keys", "create", "--tenant", "acme", "--app", "shop")
    assert created.exit_code == 1 and "so it is revoked and was not shown" in one_line(created), (
        created.output
    )
    new = store.keys()[-1]
    assert new.revoked_at

    # A gatekeeper restarted on the revoked key is told to rotate it (before: to take it out of `revoked`).
    again = Runtime(stack.settings, services=["gatekeeper"], embedded_nats=False)
    with pytest.raises(ConfigError) as refused:
        await again.start()
    await again.stop()
    assert refused.value.message == (
        f"key {kid} is revoked in {trust_file_path(stack.settings)}: it signs nothing again; give the gatekeeper a "
        "new key (LOCKGATE_SIGNING_KEY, or move {home}/keys/gatekeeper.pem aside and `lockgate up` makes one)"
    )

    # Once a gatekeeper with a trusted key runs, each change is chained, with each undoing after its grant.
    Signer.load_or_create(tmp_path / "fresh.pem")
    replacement = Runtime(
        stack.settings.replace(signing_key=str(tmp_path / "fresh.pem")),
        services=["gatekeeper"],
        embedded_nats=False,
    )
    await replacement.start()
    try:
        seen: dict[int, tuple[str, str]] = {}
        async with asyncio.timeout(30):
            while len(seen) < 11:
                row = rows.decode((await chained.next_msg(timeout=None)).data)
                seen[row.seq] = (row.target, row.action)
    finally:
        await replacement.stop()
        await chained.unsubscribe()
    leak, rot = (f"nats-app:{credentials.app_user('acme', app)}" for app in ("leak", "rot"))
    assert sorted(seen[seq] for seq in range(4, 12)) == sorted(
        [
            (f"signing-key:{kid}", "revoke"),
            (leak, "revoke"),
            (rot, "rotate"),
            (f"apikey:{key.id}", "scope"),
            (f"apikey:{key.id}", "scope-undone"),
            (f"apikey:{key.id}", "scope"),
            (f"apikey:{new.id}", "create"),
            (f"apikey:{new.id}", "create-undone"),
        ]
    ), seen


async def test_up_never_makes_a_revoked_first_key_again(stack: Runtime) -> None:
    home = Path(stack.settings.home)
    first = await asyncio.to_thread(bootstrap, home)  # what `lockgate up` makes on a new home
    store = KeyStore(home)
    ids = {k.role: k.id for k in store.keys()}
    for key_id in ids.values():
        revoked = await lockgate(stack, "keys", "revoke", key_id)
        assert revoked.exit_code == 0, revoked.output

    # The next `up`: no key is made, and the banner says which stays revoked and how to make a new one.
    again = await asyncio.to_thread(bootstrap, home)
    assert (again.admin_key, again.app_key) == ("", "") and len(store.keys()) == 2, store.keys()
    assert again.withheld == tuple(
        f"the {who} key `up` made ({ids[role]}, in {file}) was revoked and stays so: make a new one with "
        f"`lockgate keys create --tenant default --app default --role {role}`"
        for who, role, file in (
            ("first admin", "admin", first.admin_file),
            ("demo app", "app", first.app_file),
        )
    )
    assert (
        await asyncio.to_thread(Path(first.admin_file).read_text) == f"{first.admin_key}\n"
    )  # left as it was

    # The demo, which sends with those keys, says so in one line before it starts.
    demo = await lockgate(stack, "demo", "--home", str(home))
    said = one_line(demo)
    assert demo.exit_code == 2 and said.startswith(
        f"error: the admin key in {first.admin_file} is revoked"
    ), said
