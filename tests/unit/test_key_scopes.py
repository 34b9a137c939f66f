"""API keys scoped to deployments (pure: the key file in a temp home, the CLI through click's runner).

Before: a key was scoped to a tenant and app only, and any key could send traffic to every deployment."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.errors import ConfigError, NotFound
from lockgate.server.apikeys import ApiKey, AuthError, Forbidden, KeyStore, in_scope, owns_release, widens
from lockgate.services.router.admin import reads_router_wide, require_router_wide

# Nothing listens on port 1: the CLI's audit record of a key change says so at once instead of waiting.
NO_STACK = {"LOCKGATE_NATS_URL": "nats://127.0.0.1:1"}


@pytest.mark.parametrize(("scope", "deployment", "allowed"), [
    ((), "support", True),  # no scope: every deployment, as every key before scopes
    ((), "billing", True),
    (("support",), "support", True),
    (("support",), "billing", False),
    (("support", "billing"), "billing", True),
    (("support",), "support-eu", False),  # a name, not a prefix
    (("support",), "", False),
])
def test_the_scope_rule(scope: tuple[str, ...], deployment: str, allowed: bool) -> None:
    assert in_scope(scope, deployment) is allowed
    assert ApiKey(id="k", hash="h", tenant="acme", app="shop", deployments=scope).may_use(deployment) is allowed


@pytest.mark.parametrize(("before", "after", "widens_"), [
    (("a", "b"), ("a",), False),  # a narrowing: stays in force in an audit outage, as a revocation
    (("a",), ("a",), False),
    ((), ("a",), False),
    (("a",), (), True),  # lifted to every deployment: a grant, undone in an audit outage (probe p77 F3)
    (("a",), ("b",), True),  # another deployment: a grant of it, whatever it takes away
    (("a",), ("a", "b"), True),
    ((), (), False),
])
def test_which_rescoping_grants(before: tuple[str, ...], after: tuple[str, ...], widens_: bool) -> None:
    assert widens(before, after) is widens_


@pytest.mark.parametrize(("bundle", "owned"), [
    ({"release": "r", "tenant": "acme", "app": "shop"}, True),
    ({"release": "r", "tenant": "evil", "app": "shop"}, False),  # another tenant's app of the same name
    ({"release": "r", "tenant": "acme", "app": "news"}, False),  # another app of the tenant
    ({"release": "r", "tenant": "evil", "app": "news"}, False),
    (None, False),  # never bound: nobody's, whatever the gate decided under the name
    ({"release": "r", "app": "shop"}, False),  # lockgate writes a tenant into every binding: fail closed
    ({"release": "r", "tenant": "acme"}, False),
])
@pytest.mark.parametrize("role", ["app", "viewer", "admin"])
def test_a_key_reads_the_decisions_of_its_own_tenants_and_apps_releases_only(
        bundle: dict[str, str] | None, owned: bool, role: str) -> None:
    # Before: any key read every tenant's decisions over gRPC (GetDecision, WatchDecisions).
    key = ApiKey(id="k", hash="h", tenant="acme", app="shop", role=role)  # type: ignore[arg-type]
    assert owns_release(key, bundle) is owned


@pytest.mark.parametrize(("role", "sends"), [("app", True), ("admin", True), ("viewer", False), ("approver", False),
                                            ("operator", False)])
def test_only_an_app_or_admin_key_sends_traffic_events_and_spans(tmp_path: Path, role: str, sends: bool) -> None:
    # Before: every data-plane path took a key of any role (a viewer's chat served, its events billed).
    store = KeyStore(tmp_path)
    plain, rec = store.create("acme", "shop", role)
    assert store.authenticate(plain) == rec  # every role authenticates (reads, the admin API)
    if sends:
        assert store.authenticate_sender(plain) == rec
    else:
        with pytest.raises(Forbidden) as caught:
            store.authenticate_sender(plain)
        assert f"{rec.label} may not send" in caught.value.message and "requires role app" in caught.value.message
        assert plain not in caught.value.message
    with pytest.raises(AuthError):  # an unknown key is still 401, whatever the path
        store.authenticate_sender("lg-unknown")


def test_a_key_file_written_before_scopes_loads_with_every_deployment(tmp_path: Path) -> None:
    old = {"keys": [{"id": "a1", "hash": "0" * 64, "tenant": "acme", "app": "shop", "role": "app",
                     "created_at": 1.0, "revoked_at": 0.0, "description": ""}]}
    (tmp_path / "apikeys.json").write_text(json.dumps(old))
    (key,) = KeyStore(tmp_path).keys()
    assert key.deployments == () and key.scope == "every deployment" and key.may_use("anything")


def test_a_scope_is_stored_checked_and_read_back(tmp_path: Path) -> None:
    plain, rec = KeyStore(tmp_path).create("acme", "shop", deployments=["support", "billing", "support"])
    assert rec.deployments == ("support", "billing")  # each once, in the order given
    again = KeyStore(tmp_path).authenticate(plain)  # another process reading the file
    assert again.deployments == ("support", "billing") and again.scope == "support, billing"
    stored = msgspec.json.decode((tmp_path / "apikeys.json").read_bytes())
    assert stored["keys"][0]["deployments"] == ["support", "billing"]
    assert plain not in (tmp_path / "apikeys.json").read_text()


@pytest.mark.parametrize(("role", "deployments", "error"), [
    ("app", ["a b"], "invalid deployment 'a b' for an API key"),
    ("app", ["support", "*"], "invalid deployment '*' for an API key"),
    ("app", [""], "invalid deployment '' for an API key"),
    ("admin", ["support"], "an admin key acts on every deployment and takes no deployment scope"),
    ("operator", ["a b"], "invalid deployment 'a b' for an API key"),
])
def test_a_bad_scope_is_refused_and_no_key_is_made(tmp_path: Path, role: str, deployments: list[str],
                                                   error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        KeyStore(tmp_path).create("acme", "shop", role, deployments=deployments)
    assert KeyStore(tmp_path).keys() == []


def test_a_live_keys_scope_changes_and_applies_to_the_same_secret(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    plain, rec = store.create("acme", "shop", deployments=["support"])
    before, after = store.rescope(rec.id, ["billing"])
    assert (before.deployments, after.deployments) == (("support",), ("billing",))
    reader = KeyStore(tmp_path)
    assert reader.authenticate(plain).may_use("billing") and not reader.authenticate(plain).may_use("support")
    store.rescope(rec.id, [])
    assert KeyStore(tmp_path).authenticate(plain).scope == "every deployment"
    with pytest.raises(NotFound):
        store.rescope("nope", ["support"])
    store.revoke(rec.id)
    with pytest.raises(ConfigError, match="is revoked"):
        store.rescope(rec.id, ["support"])
    admin = store.create("acme", "ops", "admin")[1]
    with pytest.raises(ConfigError, match="takes no deployment scope"):
        store.rescope(admin.id, ["support"])
    operator = store.create("acme", "ops", "operator")[1]
    assert store.rescope(operator.id, ["support"])[1].deployments == ("support",)


def test_keys_create_list_and_scope_through_the_cli(tmp_path: Path) -> None:
    home = ["keys", "--home", str(tmp_path)]
    made = CliRunner().invoke(cli, [*home, "create", "--tenant", "acme", "--app", "shop", "--deployment", "support",
                                    "--deployment", "billing"], env=NO_STACK)
    assert made.exit_code == 0, made.output
    assert "may use support, billing" in made.output and made.output.splitlines()[-1].startswith("lg-")  # shown last, once recorded
    CliRunner().invoke(cli, [*home, "create", "--tenant", "acme", "--app", "batch"], env=NO_STACK)

    listed = json.loads(CliRunner().invoke(cli, [*home, "list", "--json"]).output)
    assert [(k["app"], k["deployments"]) for k in listed] == [("shop", ["support", "billing"]), ("batch", [])]
    table = CliRunner().invoke(cli, [*home, "list"], env={"COLUMNS": "200"}).output
    assert "support, billing" in table and "every deployment" in table

    key_id = listed[0]["id"]
    for args in ([], ["--deployment", "support", "--every-deployment"]):  # widening is asked for by name only
        refused = CliRunner().invoke(cli, [*home, "scope", key_id, *args], env=NO_STACK)
        assert refused.exit_code == 2 and "--every-deployment" in refused.output, refused.output
    narrowed = CliRunner().invoke(cli, [*home, "scope", key_id, "--deployment", "support"], env=NO_STACK)
    assert narrowed.exit_code == 0 and "may use support (was: support, billing)" in narrowed.output, narrowed.output
    lifted = CliRunner().invoke(cli, [*home, "scope", key_id, "--every-deployment"], env=NO_STACK)
    assert lifted.exit_code == 0 and "may use every deployment" in lifted.output, lifted.output

    bad = CliRunner().invoke(cli, [*home, "create", "--tenant", "acme", "--app", "x", "--deployment", "a b"],
                             env=NO_STACK)
    assert bad.exit_code == 2 and "invalid deployment 'a b'" in bad.output, bad.output
    assert len(KeyStore(tmp_path).keys()) == 2


def _key(tenant: str, role: str = "viewer", deployments: tuple[str, ...] = (), revoked: bool = False) -> ApiKey:
    return ApiKey(id=f"{tenant}-{role}", hash="h", tenant=tenant, app="a", role=role,  # type: ignore[arg-type]
                  deployments=deployments, revoked_at=1.0 if revoked else 0.0)


@pytest.mark.parametrize(("key", "others", "wide"), [
    (_key("acme", "admin"), [_key("default")], True),  # every tenant's, no deployment scope
    (_key("default"), [_key("default", "app"), _key("default", "operator")], True),  # the only tenant's, unscoped
    (_key("default", deployments=("chat",)), [], False),  # one deployment's
    (_key("acme"), [_key("default", "app")], False),  # probe p25: another tenant's viewer read all of them
    (_key("acme", deployments=("acme-web",)), [_key("default", "app")], False),
    (_key("default", "operator"), [_key("acme", "app", revoked=True)], False),  # its requests are in the counters
])
def test_a_key_reads_router_wide_metrics_only_when_it_reads_every_tenant_and_deployment(
        key: ApiKey, others: list[ApiKey], wide: bool) -> None:
    assert reads_router_wide(key, [key, *others]) is wide
    if not wide:
        with pytest.raises(Forbidden, match="may not read the router's metrics"):
            require_router_wide(key, [key, *others])
