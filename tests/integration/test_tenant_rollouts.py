"""Two tenants with the same app name on one router and one gate, each with its own scoped keys: a key rolls out and
changes only its own tenant's releases, a deployment serves one tenant's releases, and a drift report of one
tenant's events never judges another tenant's release (in the gate, whose BLOCK applies to every deployment of
the release, nor in the router's own analysis and abort).

Found by a probe: bravo's operator key, scoped to bravo's own deployment, rolled acme's production release out
there as a canary (200: the router checked the deployment, never whose release it was, and app names are not
per tenant); bravo's own traffic then made a canary-versus-stable report naming acme's release, and the gate
signed a lasting BLOCK of it under acme's policy, which aborted acme's canary and marked its stable BLOCKed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
import pytest

from lockgate import artifacts
from lockgate.contracts import DriftReport, FeatureDrift, GateDecided
from lockgate.server.apikeys import Bootstrap, KeyStore, bootstrap
from lockgate.server.service import Progress, ServiceContext
from lockgate.signing import Signer, ensure_signer_trusted
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import judged, register_model_release

pytestmark = pytest.mark.timeout(90)

SIM = SimConfig(models={"m": ModelSpec(default="hi")}, seed=3)
# acme's policy: a canary whose answers drift against stable's is BLOCKed (what the probe had bravo trigger).
POLICY = {"name": "acme-policy", "rules": [{"metric": "score", "op": ">=", "threshold": 0.8}],
          "drift": [{"max_psi": 0.5, "features": ["output_tokens"], "compare": "canary_vs_stable"}]}
BASE = "/lockgate/v1/deployments"


@pytest.fixture
def keys(context: ServiceContext) -> Bootstrap:
    return bootstrap(context.settings.home, tenant="acme", app="support")


@pytest.fixture
async def stack(context: ServiceContext, run_services: Any, keys: Bootstrap) -> AsyncIterator[dict[str, Any]]:
    """The gatekeeper and a router. Tenant acme's releases acme-v1 (stable) and acme-v2, bravo's bravo-v1 and
    bravo-v2, all of app `support` and PASSed (acme's under acme's drift policy); acme-v1 serves `acme-chat` with
    acme-v2 canaried at 50%, bravo-v1 serves `bravo-chat`. Each tenant's operator key is scoped to its own
    deployments (bravo's also to `bravo-new`, which serves nothing yet)."""
    signer = ensure_signer_trusted(context.settings)  # the gatekeeper's key
    async with SimServer(SIM) as stable, SimServer(SIM) as canary:
        context.settings = context.settings.replace(stable_upstream=stable.url, canary_upstream=canary.url,
                                                    deployment="chat", app="support")
        bus = context.bus
        policy = await artifacts.register(bus, "policy", "acme-policy", POLICY)
        for tenant in ("acme", "bravo"):
            await register_model_release(bus, f"{tenant}-v1", "m", "default", app="support", tenant=tenant)
            await register_model_release(bus, f"{tenant}-v2", "m", "canary", app="support", tenant=tenant)
            for release in (f"{tenant}-v1", f"{tenant}-v2"):
                await _decide(bus, signer, release, policy.hash if tenant == "acme" else "")
        services = await run_services("gatekeeper", "router")
        router = services["router"]
        store = KeyStore(context.settings.home)
        acme, _ = store.create("acme", "support", "operator", deployments=["acme-chat"])
        bravo, bravo_rec = store.create("bravo", "support", "operator", deployments=["bravo-chat", "bravo-new"])
        assert await _call(router, acme, "PUT", "acme-chat", {"stable_release": "acme-v1"}) == 200
        assert await _call(router, acme, "PUT", "acme-chat", {
            "stable_release": "acme-v1", "canary_release": "acme-v2", "initial_weight": 50,
            "strategy": {"steps": [50, 100], "interval_s": 3600}}) == 200
        assert await _call(router, bravo, "PUT", "bravo-chat", {"stable_release": "bravo-v1"}) == 200
        await router.rollouts.flush()
        yield {"router": router, "gate": services["gatekeeper"].drift, "signer": signer, "policy": policy.hash,
               "acme": acme, "bravo": bravo, "bravo_rec": bravo_rec, "admin": keys.admin_key}


async def _decide(bus: Any, signer: Signer, release: str, policy: str) -> None:
    d = signer.sign(GateDecided(release=release, rules=[], decision="PASS", policy=policy, tenant=release.split("-")[0],
                                artifacts=await judged(bus, release)))
    await (await bus.kv(bus.subjects.kv_gates)).put(token(release), msgspec.json.encode(d))


async def _call(router: Any, key: str, method: str, deployment: str, body: Any = None, action: str = "",
                answer: dict[str, Any] | None = None) -> int:
    """The admin API's status for one call with `key` (its JSON body put in `answer`)."""
    url = f"{router.url}{BASE}/{deployment}" + (f"/{action}" if action else "")
    headers = {"Authorization": f"Bearer {key}"}
    if method == "PATCH":
        headers["Content-Type"] = "application/merge-patch+json"
    async with aiohttp.ClientSession(headers=headers) as http, http.request(
            method, url, data=None if body is None else msgspec.json.encode(body)) as resp:
        if answer is not None:
            answer.update(await resp.json())
        return resp.status


async def test_a_tenants_scoped_operator_key_cannot_roll_out_another_tenants_release_on_its_own_deployment(
        stack: dict[str, Any]) -> None:
    router, bravo = stack["router"], stack["bravo"]
    before = router.rollouts.route("bravo-chat")
    # The probe's two PUTs on bravo's own deployment, and every other way to put acme's release on it.
    attempts = {
        "first release": ("PUT", "bravo-new", {"stable_release": "acme-v1"}),
        "stable and canary": ("PUT", "bravo-chat", {"stable_release": "acme-v2", "canary_release": "acme-v1",
                                                    "initial_weight": 50}),
        "canary": ("PUT", "bravo-chat", {"stable_release": "bravo-v1", "canary_release": "acme-v1"}),
    }
    for what, (method, deployment, body) in attempts.items():
        err: dict[str, Any] = {}
        assert await _call(router, bravo, method, deployment, body, answer=err) == 403, what
        assert err["error"]["code"] == "release_not_in_scope", (what, err)
        message = err["error"]["message"]
        assert "is not a registered release of tenant 'bravo'" in message, message
        assert "a key of tenant 'bravo' rolls out only its own tenant's releases" in message, message
        assert "acme'" not in message.replace("'acme-v1'", "").replace("'acme-v2'", "")  # nor names its tenant
        assert "PASS" not in message  # nor says what acme's decision is
        # Nor is another tenant's release told from one nobody registered: before, 403 naming its tenant against
        # 400 "not registered", so a tenant's key could list another's release names.
        ghost: dict[str, Any] = {}
        unknown = {k: v.replace("acme-", "ghost-") if isinstance(v, str) else v for k, v in body.items()}
        assert await _call(router, bravo, method, deployment, unknown, answer=ghost) == 403, what
        assert ghost["error"]["message"] == message.replace("acme-", "ghost-"), (ghost, message)
    # A canary of bravo's own, then a PATCH swapping acme's release in.
    assert await _call(router, bravo, "PUT", "bravo-chat", {"stable_release": "bravo-v1",
                                                            "canary_release": "bravo-v2"}) == 200
    err = {}
    assert await _call(router, bravo, "PATCH", "bravo-chat", {"canary_release": "acme-v1"}, answer=err) == 403
    assert err["error"]["code"] == "release_not_in_scope", err
    route = router.rollouts.route("bravo-chat")
    assert (route.stable.release, route.canary and route.canary.release) == ("bravo-v1", "bravo-v2")
    assert (route.stable.tenant, route.canary and route.canary.tenant) == ("bravo", "bravo")
    assert before.stable.release == "bravo-v1" and router.rollouts.route("bravo-new").stable.release == ""
    assert router.rollouts.route("acme-chat").canary.release == "acme-v2"  # type: ignore[union-attr]


async def test_another_tenants_deployment_in_an_unscoped_keys_reach_is_not_its_to_change(
        stack: dict[str, Any]) -> None:
    router = stack["router"]
    # bravo's operator key without a scope reaches every deployment (README: scope the keys of tenants that share
    # a router): it may not change acme's route. (Nor read it: it reads as a deployment never configured, 404, where
    # it used to get acme's route whole, 200, with its release names, decision ids and reasons; see the next test.)
    unscoped, _ = KeyStore(router.ctx.settings.home).create("bravo", "support", "operator")
    read: dict[str, Any] = {}
    assert await _call(router, unscoped, "GET", "acme-chat", answer=read) == 404
    assert read["error"]["code"] == "deployment_not_found" and "acme-v" not in str(read), read
    changes = [("POST", None, "pause"), ("POST", None, "resume"), ("POST", {"step": 1, "canary": "acme-v2", "started_at": 1.0}, "approve"),
               ("POST", {"weight": 100}, "set-weight"), ("POST", None, "abort"), ("POST", None, "promote"),
               ("POST", None, "retry"), ("POST", None, "undo"), ("DELETE", None, "break-glass"),
               ("PATCH", {"weight": 100}, ""),
               ("PUT", {"stable_release": "acme-v1", "canary_release": "acme-v2"}, ""),
               ("PUT", {"stable_release": "bravo-v1", "canary_release": "bravo-v2"}, "")]
    for method, body, action in changes:
        err: dict[str, Any] = {}
        assert await _call(router, unscoped, method, "acme-chat", body, action, answer=err) == 404, (method, action)
        # A change is refused as a read is: as of a deployment never configured, so that the answer does not tell
        # that another tenant's deployment exists (a probe: 403 naming it, against 404 for a name nobody configured).
        assert err == read, (method, action, err)
        if method != "PUT":  # a PUT of a name nobody configured makes it (below)
            unknown: dict[str, Any] = {}
            assert await _call(router, unscoped, method, "never-configured", body, action, answer=unknown) == 404
            assert msgspec.json.encode(err) == msgspec.json.encode(unknown).replace(b"never-configured",
                                                                                     b"acme-chat"), (err, unknown)
    route = router.rollouts.route("acme-chat")
    assert (route.phase, route.weight, route.paused) == ("progressing", 50.0, False)
    # acme's own key changes it.
    assert await _call(router, stack["acme"], "POST", "acme-chat", None, "pause") == 200
    # The unscoped key still gives a new deployment its first release, and is still refused, naming the release, a
    # rollout of acme's release on it or on its own.
    assert await _call(router, unscoped, "PUT", "bravo-fresh", {"stable_release": "bravo-v1"}) == 200
    for deployment, body in (("bravo-fresh", {"stable_release": "bravo-v1", "canary_release": "acme-v2"}),
                             ("bravo-newer", {"stable_release": "acme-v1"})):
        err = {}
        assert await _call(router, unscoped, "PUT", deployment, body, answer=err) == 403, (deployment, err)
        assert err["error"]["code"] == "release_not_in_scope", err
        assert "is not a registered release of tenant 'bravo'" in err["error"]["message"], err


async def _read(router: Any, key: str, path: str, lines: int = 0, status: int = 200) -> Any:
    """The admin API's answer to a read (GET PREFIX + path) with `key`, of `status`: its JSON, or a watch's first
    `lines`."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http, http.get(
            f"{router.url}{BASE}{path}") as resp:
        assert resp.status == status, await resp.text()
        if not lines or status != 200:
            return await resp.json()
        return [msgspec.json.decode(await resp.content.readline()) for _ in range(lines)]


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_an_unscoped_key_reads_another_tenants_deployment_as_one_never_configured(
        stack: dict[str, Any], role: str) -> None:
    # Found by a probe: acme's unscoped viewer listed and read default's deployment (stable and canary release
    # names, their tenant, the decision id and the text of the drift abort): the tenant check ran on changes only.
    router = stack["router"]
    store = KeyStore(router.ctx.settings.home)
    bravo, _ = store.create("bravo", "support", role)  # no deployment scope: every deployment is in its reach
    acme, _ = store.create("acme", "support", role)
    # A name nobody configured: 404 (before, an invented idle route, 200).
    unknown = await _read(router, bravo, "/never-configured", status=404)
    assert unknown["error"]["code"] == "deployment_not_found", unknown

    def as_unknown(name: str) -> dict[str, Any]:
        """The answer for a name nobody configured, for `name`: the same body but for the name."""
        return msgspec.json.decode(msgspec.json.encode(unknown).replace(b"never-configured", name.encode()))

    # acme's deployment: not listed, read (route, watch, shadow comparison) exactly as a name nobody configured.
    # bravo's own is read as it is.
    assert [r["deployment"] for r in await _read(router, bravo, "")] == ["bravo-chat"]
    assert await _read(router, bravo, "/acme-chat", status=404) == as_unknown("acme-chat")
    assert await _read(router, bravo, "/acme-chat/watch", status=404) == as_unknown("acme-chat")
    # acme-chat's shadow comparison as a shadowing rollout's first events start it (its candidate named).
    router.rollouts.shadows.start("acme-chat", "acme-v2")
    assert (await _read(router, acme, "/acme-chat/shadow"))["candidate"] == "acme-v2"
    assert await _read(router, bravo, "/acme-chat/shadow", status=404) == as_unknown("acme-chat")
    assert await _read(router, bravo, "/never-configured/shadow", status=404) == unknown
    assert (await _read(router, bravo, "/bravo-chat"))["stable"]["release"] == "bravo-v1"
    # acme's own key of the same role reads its route whole.
    assert [r["deployment"] for r in await _read(router, acme, "")] == ["acme-chat"]
    mine = await _read(router, acme, "/acme-chat")
    assert (mine["stable"]["release"], mine["canary"]["release"], mine["weight"]) == ("acme-v1", "acme-v2", 50.0)
    assert await _read(router, acme, "/acme-chat/watch", lines=1) == [mine]
    # An admin key reads every route.
    assert [r["deployment"] for r in await _read(router, stack["admin"], "")] == ["acme-chat", "bravo-chat"]


async def _next_line(resp: aiohttp.ClientResponse) -> bytes:
    """A watch's next route line (keepalive lines skipped), or b"" once the router ended the watch."""
    line = b"\n"
    while line == b"\n":
        line = await asyncio.wait_for(resp.content.readline(), 10)
    return line


async def test_a_watch_ends_when_its_key_is_revoked_or_rescoped_away_from_the_deployment(
        stack: dict[str, Any]) -> None:
    # Found by a probe: the admin API checked a watch's key once, when it opened; a viewer key revoked (`keys revoke`:
    # "the router refuses it from its next call"), or rescoped to another deployment, went on receiving every step,
    # decision id and reason of the watched route, 11 minutes on.
    router = stack["router"]
    store = KeyStore(router.ctx.settings.home)
    made = {who: store.create("acme", "support", "viewer", deployments=scope)
            for who, scope in (("kept", ["acme-chat"]), ("revoked", []), ("rescoped", ["acme-chat"]),
                               ("idle", ["acme-chat"]))}
    async with aiohttp.ClientSession() as http:
        watches = {who: await http.get(f"{router.url}{BASE}/acme-chat/watch",
                                       headers={"Authorization": f"Bearer {key}"})
                   for who, (key, _) in made.items()}
        try:
            for who, resp in watches.items():
                assert resp.status == 200, (who, await resp.text())
                assert msgspec.json.decode(await _next_line(resp))["paused"] is False, who
            store.revoke(made["revoked"][1].id)
            store.rescope(made["rescoped"][1].id, ["acme-other"])
            # A change after: the live keys' watches get it, the revoked and rescoped keys' never do.
            assert await _call(router, stack["acme"], "POST", "acme-chat", {"reason": "probe"}, "pause") == 200
            for who in ("kept", "idle"):
                assert msgspec.json.decode(await _next_line(watches[who]))["paused"] is True, who
            for who in ("revoked", "rescoped"):
                assert await _next_line(watches[who]) == b"", who  # ended, nothing more sent
            # Revoked with no change at all: the watch ends too (within a second, the key looked at again).
            store.revoke(made["idle"][1].id)
            assert await _next_line(watches["idle"]) == b""
            # The next call of each is refused, saying why; the live key's watch goes on.
            assert (await _read(router, made["revoked"][0], "/acme-chat", status=401))["error"]["code"] == \
                "invalid_api_key"
            assert (await _read(router, made["rescoped"][0], "/acme-chat/watch", status=403))["error"]["code"] == \
                "deployment_not_in_scope"
            assert await _call(router, stack["acme"], "POST", "acme-chat", None, "resume") == 200
            assert msgspec.json.decode(await _next_line(watches["kept"]))["paused"] is False
        finally:
            for resp in watches.values():
                resp.close()


async def test_an_admin_key_rolls_out_any_tenants_release_but_never_two_tenants_on_one_deployment(
        stack: dict[str, Any]) -> None:
    router, admin = stack["router"], stack["admin"]
    assert await _call(router, admin, "PUT", "shared", {"stable_release": "acme-v1"}) == 200
    assert router.rollouts.route("shared").stable.tenant == "acme"
    for body in ({"stable_release": "acme-v1", "canary_release": "bravo-v2"},
                 {"stable_release": "bravo-v1", "canary_release": "bravo-v2"}):
        err: dict[str, Any] = {}
        assert await _call(router, admin, "PUT", "shared", body, answer=err) == 400, body
        assert "serves tenant 'acme''s releases (acme-v1): a deployment's releases are of one tenant" in \
            err["error"]["message"], err
    assert await _call(router, admin, "PUT", "bravo-chat", {"stable_release": "bravo-v1",
                                                            "canary_release": "bravo-v2"}) == 200
    err = {}
    assert await _call(router, admin, "PATCH", "bravo-chat", {"canary_release": "acme-v2"}, answer=err) == 409
    assert "a deployment's releases are of one tenant" in err["error"]["message"], err


def _report(tenant: str, deployment: str, release: str, reference: str) -> DriftReport:
    """A served canary-versus-stable report of `tenant`'s events naming `release`, far over acme's drift rule and
    the router's own alarm (answers 2 -> 11 tokens, as the probe's bravo asked them)."""
    now = datetime.now(UTC)
    feature = FeatureDrift(feature="output_tokens", psi=13.8, ks_stat=0.9, ks_pvalue=1e-9, reference_mean=2.0,
                           current_mean=11.0, drifted=True)
    return DriftReport(served=True, tenant=tenant, deployment=deployment, app="support", window_start=now,
                       window_end=now, reference_n=50, current_n=50, drifted=True, features=[feature],
                       comparison="canary_vs_stable", release=release, reference_release=reference,
                       source="lockgate-drift")


async def _current(router: Any, release: str) -> GateDecided:
    kv = await router.ctx.bus.kv(router.ctx.bus.subjects.kv_gates)
    return msgspec.json.decode((await kv.get(token(release))).value, type=GateDecided)


async def test_the_gate_judges_a_release_only_on_drift_reports_of_its_own_tenants_events(
        stack: dict[str, Any]) -> None:
    router, gate = stack["router"], stack["gate"]
    bus = router.ctx.bus
    # The router's own abort on a DRIFT report would take acme-v2 off too: counted, to see what it did.
    handled, on_drift = Progress(), router.rollouts.on_drift

    async def counted(report: DriftReport) -> None:
        await on_drift(report)
        await handled.bump()

    router.rollouts.on_drift = counted
    # bravo's events naming acme's canary (bravo's traffic through a deployment serving it: its own, before the
    # router refused that, or acme's, with an unscoped key); and acme's events on a deployment serving bravo's.
    foreign = [_report("bravo", "bravo-chat", "acme-v2", "acme-v1"), _report("bravo", "acme-chat", "acme-v2", "acme-v1"),
               _report("acme", "bravo-chat", "acme-v2", "bravo-v1")]
    for report in foreign:
        await bus.publish(bus.subjects.drift(report.deployment), report)
    await gate.ignored.wait_for(len(foreign), 30)
    await handled.wait_for(len(foreign), 30)
    assert (await _current(router, "acme-v2")).decision == "PASS"
    route = router.rollouts.route("acme-chat")
    assert (route.phase, route.weight, route.canary.release) == ("progressing", 50.0, "acme-v2"), route.reason  # type: ignore[union-attr]
    assert router.rollouts.evidence.drift("acme-chat", "acme-v2", 0.0) is None  # no evidence for its analysis

    # acme's own events on acme's deployment: the same report is judged, BLOCKed under acme's policy, and the
    # router takes the canary back.
    decided = await bus.nc.subscribe(bus.subjects.gate_decided("acme-v2"))
    own = _report("acme", "acme-chat", "acme-v2", "acme-v1")
    await bus.publish(bus.subjects.drift("acme-chat"), own)
    await decided.next_msg(timeout=30)
    await decided.unsubscribe()
    await router.rollouts.wait_for(lambda r: r["acme-chat"].phase == "aborted", timeout=30)
    blocked = await _current(router, "acme-v2")
    assert (blocked.decision, blocked.tenant, blocked.policy) == ("BLOCK", "acme", stack["policy"])
    assert "drift policy 'acme-policy' of deployment 'acme-chat'" in blocked.reason
    assert gate.ignored.count == len(foreign)
