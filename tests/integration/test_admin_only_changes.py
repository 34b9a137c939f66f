"""Who holds which API key and NATS credential is admin's to change, as whom the trust file names is: on the embedded
runtime as `lockgate up` runs it, `--role operator` is refused `keys create|scope|revoke` and `app-credential
create|revoke` in one line, before any file is touched, and admin still makes each change (probe p54 F2)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from lockgate import credentials
from lockgate.config import Settings
from lockgate.server.apikeys import FILE, KeyStore, bootstrap
from lockgate.server.runtime import Runtime
from tests.integration import test_cli_errors

lockgate, one_line = test_cli_errors.lockgate, test_cli_errors.one_line

pytestmark = pytest.mark.timeout(120)

KEYS = ("create, rescope or revoke API keys (which say who may call the router and the gRPC API, and as what)")
CREDENTIALS = "create or revoke application credentials (which say who may publish a tenant's events on the bus)"


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    """The embedded runtime as `lockgate up` runs it, with what records a change and reads the audit log."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "query", "gatekeeper"])
    await runtime.start()
    yield runtime
    await runtime.stop()


def _files(home: Path) -> dict[str, bytes]:
    """Every file a key or credential change writes, by path relative to the home."""
    files = [home / FILE, *(home / "credentials" / "apps").glob("*")]
    return {str(p.relative_to(home)): p.read_bytes() for p in files}


async def _audit_rows(stack: Runtime) -> int:
    """The rows of the audit log, once those up to the chain head are stored (`audit verify` waits for them)."""
    verified = await lockgate(stack, "audit", "verify", "--json")
    assert verified.exit_code == 0, verified.output
    return json.loads(verified.stdout)["rows"]


async def test_an_operator_may_not_change_keys_or_application_credentials(stack: Runtime) -> None:
    home = Path(stack.settings.home)
    await asyncio.to_thread(bootstrap, home, tenant="acme", app="shop")
    store = KeyStore(home)
    (admin,) = [k for k in store.keys() if k.role == "admin"]
    scoped = await lockgate(stack, "keys", "create", "--tenant", "acme", "--app", "shop", "--role", "operator",
                            "--deployment", "shop-web")
    assert scoped.exit_code == 0, scoped.output
    (operator_key,) = [k for k in store.keys() if k.role == "operator"]
    made = await lockgate(stack, "app-credential", "create", "--tenant", "acme", "--app", "shop")
    assert made.exit_code == 0, made.output
    before, rows = await asyncio.to_thread(_files, home), await _audit_rows(stack)

    changes = [
        (("keys", "create", "--tenant", "acme", "--app", "shop", "--role", "admin"), KEYS),  # before: an admin key
        (("keys", "create", "--tenant", "acme", "--app", "shop"), KEYS),
        (("keys", "scope", operator_key.id, "--every-deployment"), KEYS),  # before: its scope lifted
        (("keys", "revoke", admin.id), KEYS),  # before: the first admin's key revoked
        (("app-credential", "create", "--tenant", "acme", "--app", "other"), CREDENTIALS),
        (("app-credential", "create", "--rotate", "--tenant", "acme", "--app", "shop"), CREDENTIALS),
        (("app-credential", "revoke", "--tenant", "acme", "--app", "shop"), CREDENTIALS),
    ]
    for args, what in changes:
        refused = await lockgate(stack, "--role", "operator", *args)
        assert refused.exit_code == 5 and refused.stdout == "", (args, refused.output)
        assert one_line(refused) == f"error: role 'operator' may not {what}: use --role admin\n", args
    assert await asyncio.to_thread(_files, home) == before
    assert await _audit_rows(stack) == rows

    for args, _ in changes:  # admin makes each, recorded
        done = await lockgate(stack, *args)
        assert done.exit_code == 0, (args, done.output)
    keys = {k.id: k for k in store.keys()}
    assert keys[operator_key.id].deployments == () and keys[admin.id].revoked_at
    assert [k.role for k in keys.values()].count("admin") == 2  # the first admin's and the one made now
    assert credentials.app_path(home, "acme", "other").is_file()
    assert not credentials.app_path(home, "acme", "shop").exists()
    assert await _audit_rows(stack) == rows + len(changes)


async def test_the_operator_identity_may_not_have_the_runtime_reload_its_users(stack: Runtime) -> None:
    # `app-credential` was the operator's only use of the reload subject: the server refuses it the subject now.
    auth = credentials.for_identity(stack.settings, "operator")
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if "permissions violation for publish" in str(exc).lower():
            refused.set()

    nc = await nats.connect(stack.settings.nats_url, user=auth.user, password=auth.password, error_cb=on_error,
                            allow_reconnect=False, inbox_prefix=f"_INBOX.{auth.user}")
    try:
        await nc.publish(stack.ctx.bus.subjects.nats_reload, b"")
        await asyncio.wait_for(refused.wait(), 10)
    finally:
        await nc.close()
