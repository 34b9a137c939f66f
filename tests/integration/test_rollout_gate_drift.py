"""Closed loop through the gate and the rollout history, on the real bus: a drift report over a policy's
drift rule becomes a signed BLOCK naming the feature and the router goes back to stable (the canary's report
against stable's while it has a stable arm, never the deployment's; the deployment's after a promotion); rollbacks and
`lockgate rollout undo --to` go to the last (or a named) known-good release."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import msgspec
import pytest
from click.testing import CliRunner

from lockgate import artifacts
from lockgate.cli.main import cli
from lockgate.codec import Codec
from lockgate.contracts import DriftReport, FeatureDrift, GateDecided
from lockgate.ids import uuid7
from lockgate.server.apikeys import Bootstrap, bootstrap
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper.domain import (
    Outcome,
    decision_id,
    judged_artifacts,
    standing_veto,
    under_veto,
    veto_key,
)
from lockgate.signing import Signer, Verifier, ensure_signer_trusted
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import gate_decided, judged, register_model_release, store_decision

pytestmark = pytest.mark.timeout(120)

SIM = SimConfig(models={"m": ModelSpec(default="hi")}, seed=3)
POLICY = {"name": "canary-drift", "rules": [{"metric": "score", "op": ">=", "threshold": 0.8}],
          "drift": [{"kind": "drift", "max_psi": 0.1, "features": ["output_tokens"]}]}
_decided: Codec[GateDecided] = Codec(GateDecided)


@pytest.fixture
async def stack(context: ServiceContext, run_services: Any) -> AsyncIterator[tuple[Any, Signer]]:
    signer = ensure_signer_trusted(context.settings)  # the key the gatekeeper service signs with
    async with SimServer(SIM) as stable, SimServer(SIM) as canary:
        for release in ("r1", "r2", "r3", "r4"):
            await register_model_release(context.bus, release, "m", "default" if release == "r1" else "canary")
        context.settings = context.settings.replace(stable_upstream=stable.url, canary_upstream=canary.url,
                                                    deployment="chat", app="shop")
        await _decide(context.bus, signer, "r1", "PASS", publish=False)
        services = await run_services("gatekeeper", "router")
        yield services["router"], signer


@pytest.fixture
def keys(context: ServiceContext) -> Bootstrap:
    return bootstrap(context.settings.home, tenant="acme", app="shop")


@pytest.fixture
async def http(keys: Bootstrap) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as s:
        yield s


async def _decide(bus: Any, signer: Signer, release: str, verdict: str, *, policy: str = "",
                  publish: bool = True) -> GateDecided:
    """A gatekeeper-signed decision made current in KV (and announced), as the gatekeeper's eval path does."""
    d = signer.sign(GateDecided(release=release, rules=[], decision=verdict, policy=policy,  # type: ignore[arg-type]
                                artifacts=await judged(bus, release)))
    await (gate_decided if publish else store_decision)(bus, d)
    return d


async def _canary(http: aiohttp.ClientSession, router: Any, signer: Signer, stable: str, canary: str,
                  policy: str = "", strategy: dict[str, Any] | None = None) -> None:
    body = {"stable_release": stable, "canary_release": canary,
            "strategy": strategy or {"steps": [50, 100], "interval_s": 3600}}
    async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
        assert resp.status == 200, await resp.text()
    await _decide(router.ctx.bus, signer, canary, "PASS", policy=policy)
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "progressing", timeout=10)
    await router.rollouts.flush()


async def _promote(http: aiohttp.ClientSession, router: Any) -> None:
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/promote") as resp:
        assert resp.status == 200, await resp.text()


def _report(comparison: str, **psi: float) -> DriftReport:
    """A report of served answers as the drift monitor publishes it, ending now, with these features' PSIs (and the
    monitor's own alarm on latency_ms alone: output_tokens stays under its threshold, so the router never acts
    on the report by itself, only on the gate's BLOCK)."""
    now = datetime.now(UTC)
    arms = {"release": "r2", "reference_release": "r1"} if comparison == "canary_vs_stable" else {}
    return DriftReport(served=True, deployment="chat", app="shop", window_start=now, window_end=now, reference_n=500,
                       current_n=500, drifted=False, source="lockgate-drift", comparison=comparison,  # type: ignore[arg-type]
                       features=[FeatureDrift(feature=f, psi=v, ks_stat=0.3, ks_pvalue=1e-4, reference_mean=12,
                                              current_mean=20, drifted=f == "latency_ms") for f, v in psi.items()],
                       reference_window_start=now, reference_window_end=now, **arms)


async def _blocked(bus: Any) -> GateDecided:
    return _decided.decode((await (await bus.kv(bus.subjects.kv_gates)).get(token("r2"))).value)


async def test_drift_over_the_policy_threshold_is_a_signed_block_naming_the_feature_and_rolls_back(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession) -> None:
    router, signer = stack
    bus = router.ctx.bus
    policy = await artifacts.register(bus, "policy", "canary-drift", POLICY)
    await _canary(http, router, signer, "r1", "r2", policy=policy.hash)
    # First the deployment's window against its past, far over the rule (the rule names no `compare`): while r2 has
    # a stable arm it is no evidence about r2. Found by a probe: it is mostly stable's traffic, and a client that
    # only asked other questions had a healthy canary BLOCKed on it, for good (PSI 9.68, mean 2 -> 10.64).
    deployment = _report("now_vs_reference", output_tokens=9.68)
    await bus.publish(bus.subjects.drift("chat"), deployment)
    # Then the canary's window against stable's. PSI 0.15: under the drift monitor's own threshold (the router alone
    # would not act), over the policy's 0.1. The gate takes reports one at a time, in order.
    report = _report("canary_vs_stable", output_tokens=0.15, latency_ms=0.5)
    await bus.publish(bus.subjects.drift("chat"), report)
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=30)
    route = router.rollouts.route("chat")
    assert route.weight == 0.0 and route.stable.release == "r1"
    assert route.reason.startswith("aborted r2: gate BLOCK: drift policy 'canary-drift' of deployment 'chat' "
                                   "(canary vs stable)"), route.reason
    assert "drift psi <= 0.1 on output_tokens: DRIFT in output_tokens (PSI 0.15" in route.reason
    assert "latency_ms" not in route.reason  # outside the rule's feature filter
    stored = await _blocked(bus)
    assert stored.id == decision_id(report.id, signer.id_salt), "BLOCKed on the deployment's report"
    assert (stored.decision, stored.policy, stored.key_id) == ("BLOCK", policy.hash, signer.key_id)
    await Verifier(bus, router.ctx.settings).verify(stored)  # signed by the trusted gatekeeper key
    # the drift rule, and the veto that holds a re-run of the eval of the same content for an approver
    assert [(r.verdict, r.metric) for r in stored.rules] == [("FAIL", "drift_psi:output_tokens"), ("FAIL", "review")]


def _moved(comparison: str, *moves: tuple[str, float, float, float, bool]) -> DriftReport:
    """A report as the drift monitor publishes it whose features (name, PSI, stable's mean or share, the canary's,
    the monitor's alarm) moved these ways."""
    report = _report(comparison)
    feats = [FeatureDrift(feature=f, psi=psi, ks_stat=0.3, ks_pvalue=1e-9, reference_mean=ref, current_mean=cur,
                          drifted=alarm) for f, psi, ref, cur, alarm in moves]
    return msgspec.structs.replace(report, features=feats, drifted=any(f.drifted for f in feats))


async def test_harmless_drift_never_blocks_a_canary_and_harmful_drift_still_does(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession) -> None:
    # Before (probe p61 F2): the README's own rule, or `max_psi: 0.2`, judged a feature whichever way it moved: a
    # canary serving its own model (`model:sim-good`, PSI 13.8) whose answers ended normally more often
    # (`finish_reason:stop` 0.698 -> 1.0) got a signed BLOCK and was rolled back on every deployment, while the
    # router's own abort ignored that report as harmless.
    router, signer = stack
    bus = router.ctx.bus
    rules = [{"max_psi": 0.1, "features": ["output_tokens", "finish_reason:*"]}, {"max_psi": 0.2}]
    policy = await artifacts.register(bus, "policy", "canary-drift", {**POLICY, "drift": rules})
    await _canary(http, router, signer, "r1", "r2", policy=policy.hash)
    better = _moved("canary_vs_stable", ("model:sim-good", 13.8, 0.0, 1.0, True),
                    ("finish_reason:stop", 1.83, 0.698, 1.0, True), ("error_type:timeout", 0.9, 0.1, 0.0, True),
                    ("latency_ms", 0.5, 300.0, 180.0, True))
    await bus.publish(bus.subjects.drift("chat"), better)
    # Then a report whose answers are cut off more often, under the monitor's alarm (the router alone would not
    # act on it): the gate takes reports in order, so a BLOCK on it shows the first one was judged and passed.
    worse = _moved("canary_vs_stable", ("model:sim-good", 13.8, 0.0, 1.0, True),
                   ("finish_reason:length", 0.15, 0.02, 0.1, False))
    await bus.publish(bus.subjects.drift("chat"), worse)
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=30)
    reason = router.rollouts.route("chat").reason
    assert "DRIFT in finish_reason:length (PSI 0.15, share 0.02 -> 0.1)" in reason, reason
    assert "model:" not in reason and "finish_reason:stop" not in reason
    stored = await _blocked(bus)
    assert stored.id == decision_id(worse.id, signer.id_salt), "BLOCKed on the harmless report"
    # `max_psi: 0.2` passes it: the model's PSI 13.8 is the rollout itself, and length's 0.15 is within 0.2
    assert [(r.verdict, r.metric) for r in stored.rules] == [
        ("FAIL", "drift_psi:finish_reason:length"), ("PASS", "drift_psi:finish_reason:length"), ("FAIL", "review")]


async def test_after_a_blue_green_promotion_the_deployments_report_is_judged_by_the_policy(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession) -> None:
    # The promoted release serves everyone: the deployment's window against its reference (restarted at the
    # promotion) is that release's own traffic, the one arm left, and the policy judges it.
    router, signer = stack
    bus = router.ctx.bus
    policy = await artifacts.register(bus, "policy", "canary-drift", POLICY)
    analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.01}], "min_sample": 100}
    await _canary(http, router, signer, "r1", "r2", policy=policy.hash,
                  strategy={"interval_s": 3600, "blue_green": {"post_promotion_analysis": analysis}})
    await _promote(http, router)
    await router.rollouts.flush()  # the gate reads the route (verifying since the promotion) from KV
    assert router.rollouts.route("chat").verifying
    report = _report("now_vs_reference", output_tokens=0.15)
    await bus.publish(bus.subjects.drift("chat"), report)
    await router.rollouts.wait_for(lambda r: r["chat"].stable.release == "r1", timeout=30)
    assert router.rollouts.route("chat").reason.startswith("rolled back r2: gate BLOCK after promotion")
    stored = await _blocked(bus)
    assert stored.id == decision_id(report.id, signer.id_salt) and stored.decision == "BLOCK"
    assert "drift policy 'canary-drift' of deployment 'chat' (now vs reference)" in stored.reason


async def test_after_a_blue_green_promotion_only_reports_of_the_promoted_releases_traffic_act(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession) -> None:
    # Probe p69 F2: a report whose window ended after the promotion, but whose reference began before it (built on
    # the old windows, or on a reference the old release's late answers filled), compares the promoted release with
    # its predecessor: a steady release was rolled back (by the router, or BLOCKed by the gate) within seconds.
    router, signer = stack
    bus = router.ctx.bus
    policy = await artifacts.register(bus, "policy", "canary-drift", POLICY)
    analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.01}], "min_sample": 100}
    await _canary(http, router, signer, "r1", "r2", policy=policy.hash,
                  strategy={"interval_s": 3600, "blue_green": {"post_promotion_analysis": analysis}})
    await _promote(http, router)
    await router.rollouts.flush()
    promoted_at = datetime.fromtimestamp(router.rollouts.route("chat").promoted_at, UTC)
    before = promoted_at - timedelta(seconds=1)
    old = _report("now_vs_reference", output_tokens=0.15)  # the gate's policy BLOCKs on it ...
    moved = msgspec.structs.replace(old.features[0], drifted=True)  # ... and the router rolls back on this one
    stale = [msgspec.structs.replace(old, reference_window_start=before),
             msgspec.structs.replace(old, id=str(uuid7()), reference_window_start=None, reference_window_end=None),
             msgspec.structs.replace(old, id=str(uuid7()), reference_window_start=before, drifted=True,
                                     features=[moved])]
    decided = await bus.nc.subscribe(bus.subjects.gate_decided("r2"))
    for report in stale:
        await bus.publish(bus.subjects.drift("chat"), report)
    fresh = _report("now_vs_reference", output_tokens=0.15)
    await bus.publish(bus.subjects.drift("chat"), fresh)
    await router.rollouts.wait_for(lambda r: r["chat"].stable.release == "r1", timeout=30)
    assert router.rollouts.route("chat").reason.startswith("rolled back r2: gate BLOCK after promotion")
    # The gate's first decision since is the fresh report's: the stale ones, judged before it, decided nothing.
    first = _decided.decode((await decided.next_msg(timeout=10)).data)
    assert first.id == decision_id(fresh.id, signer.id_salt) and first.decision == "BLOCK"


async def test_block_after_promotion_and_undo_to_go_to_known_good_releases(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession, keys: Bootstrap) -> None:
    router, signer = stack
    bus = router.ctx.bus
    await _canary(http, router, signer, "r1", "r2")
    await _promote(http, router)
    await _canary(http, router, signer, "r2", "r3")
    await _promote(http, router)
    # r3 is BLOCKed after promotion (a later eval, drift or budget): back on r2, r3 leaves the history.
    await _decide(bus, signer, "r3", "BLOCK")
    await router.rollouts.wait_for(lambda r: r["chat"].stable.release == "r2", timeout=10)
    assert router.rollouts.route("chat").reason.startswith("rolled back r3: gate BLOCK after promotion")
    await router.rollouts.flush()

    s = router.ctx.settings
    base = ["--home", s.home, "--nats", s.nats_url, "--prefix", s.prefix, "--database", s.database,
            "rollout", "--router", router.url]

    async def run(*args: str) -> Any:
        return await asyncio.to_thread(CliRunner().invoke, cli, [*base, *args])

    never = await run("undo", "chat", "--to", "r4")
    assert never.exit_code == 4 and "'r4' was never fully promoted and healthy on 'chat'" in never.output
    blocked = await run("undo", "chat", "--to", "r3")
    assert blocked.exit_code == 4 and "'r3' was never fully promoted and healthy" in blocked.output
    await _decide(bus, signer, "r1", "BLOCK", publish=False)  # r1 BLOCKed since (the router has not seen it)
    now_blocked = await run("undo", "chat", "--to", "r1")
    assert now_blocked.exit_code == 4 and "'r1' is now BLOCKed by the gate" in now_blocked.output
    await _decide(bus, signer, "r1", "PASS", publish=False)
    undone = await run("undo", "chat", "--to", "r1", "--json")
    assert undone.exit_code == 0, undone.output
    body = msgspec.json.decode(undone.output)
    assert body["stable"]["release"] == "r1" and body["reason"].startswith("undone to known-good r1 by apikey:")
    assert router.rollouts.route("chat").stable.release == "r1"


async def test_a_block_of_a_release_undone_back_to_rolls_it_back(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession) -> None:
    # Probe p1: `undo --to r1` then `undo --to r2` (each allowed by a PASS then) left r2 both the stable and the
    # aborted canary; a later BLOCK of r2 was ignored as one of an aborted canary, and r2 kept 100% of traffic.
    router, signer = stack
    await _canary(http, router, signer, "r1", "r2")
    await _promote(http, router)
    for release in ("r1", "r2"):
        async with http.post(f"{router.url}/lockgate/v1/deployments/chat/undo", json={"to": release}) as resp:
            assert resp.status == 200, await resp.text()
    assert router.rollouts.route("chat").stable.release == "r2"
    await _decide(router.ctx.bus, signer, "r2", "BLOCK")
    await router.rollouts.wait_for(lambda r: r["chat"].stable.release == "r1", timeout=10)
    assert "gate BLOCK of known-good r2" in router.rollouts.route("chat").reason
    async with http.post(f"{router.url}/v1/chat/completions",
                         json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.status == 200 and resp.headers["x-lockgate-release"] == "r1"


async def test_block_after_promotion_skips_a_blue_green_release_whose_analysis_never_passed(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession) -> None:
    router, signer = stack
    analysis = {"metrics": [{"name": "error_rate", "max_increase": 0.01}], "min_sample": 100}
    await _canary(http, router, signer, "r1", "r2",
                  strategy={"interval_s": 3600, "blue_green": {"post_promotion_analysis": analysis}})
    await _promote(http, router)
    assert router.rollouts.route("chat").verifying  # r2 serves all traffic, not yet proved healthy
    # A new canary starts from r2 before its post-promotion analysis ended, and is promoted, then BLOCKed.
    await _canary(http, router, signer, "r2", "r3")
    await _promote(http, router)
    assert router.rollouts.route("chat").previous.release == "r2"  # type: ignore[union-attr]
    await _decide(router.ctx.bus, signer, "r3", "BLOCK")
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "aborted", timeout=10)
    route = router.rollouts.route("chat")
    assert (route.stable.release, route.weight) == ("r1", 0.0)
    assert route.reason.endswith("back on last known-good r1")
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/undo", json={"to": "r2"}) as resp:
        assert resp.status == 409
        assert "'r2' was never fully promoted and healthy on 'chat'" in (await resp.json())["error"]["message"]


async def test_undo_to_needs_the_releases_current_decision_to_allow_it(
        stack: tuple[Any, Signer], http: aiohttp.ClientSession) -> None:
    # r1 was known-good on chat before r2 was promoted. Since then the gate re-gated r1 (a drift, a new eval) and
    # it waits for a reviewer. Before: `undo --to r1` put it back to 100% (only a BLOCK was refused).
    router, signer = stack
    bus = router.ctx.bus
    await _canary(http, router, signer, "r1", "r2")
    await _promote(http, router)
    s = router.ctx.settings
    base = ["--home", s.home, "--nats", s.nats_url, "--prefix", s.prefix, "--database", s.database,
            "rollout", "--router", router.url]

    async def run(*args: str) -> Any:
        return await asyncio.to_thread(CliRunner().invoke, cli, [*base, *args])

    await _decide(bus, signer, "r1", "NEEDS_REVIEW", publish=False)
    review = await run("undo", "chat", "--to", "r1")
    assert review.exit_code == 4, review.output
    assert "'r1' is awaiting review (its current gate decision is NEEDS_REVIEW)" in review.output
    assert "lockgate gate approve r1" in review.output
    # No decision at all (gone from KV, or one that does not verify): fail closed, saying how to go on.
    await (await bus.kv(bus.subjects.kv_gates)).delete(token("r1"))
    none = await run("undo", "chat", "--to", "r1")
    assert none.exit_code == 4 and "'r1' has no verified gate decision now" in none.output, none.output
    assert "gate it again" in none.output
    assert router.rollouts.route("chat").stable.release == "r2"  # neither refusal moved traffic
    await _decide(bus, signer, "r1", "PASS", publish=False)  # approved: a PASS
    undone = await run("undo", "chat", "--to", "r1")
    assert undone.exit_code == 0, undone.output
    assert router.rollouts.route("chat").stable.release == "r1"


async def test_a_drift_block_keeps_a_persons_standing_veto(stack: tuple[Any, Signer]) -> None:
    # r2 is held for review under carol's veto (a re-run of its eval after her reject), and a late report about its
    # canary arrives. Without the veto on the drift BLOCK, the next eval of the same content found a gatekeeper
    # BLOCK, not a person's, and was judged afresh: a PASS over her reject.
    router, signer = stack
    bus = router.ctx.bus
    policy = await artifacts.register(bus, "policy", "canary-drift", POLICY)
    arts = await judged(bus, "r2")
    rejected = GateDecided(id="d-carol", release="r2", decision="BLOCK", rules=[], reviewed_by="carol",
                           reason="override: rejected by carol: tone regressed", artifacts=arts)
    veto = standing_veto(rejected, judged_artifacts(arts))
    assert veto is not None
    held = signer.sign(GateDecided(release="r2", rules=[veto], decision="NEEDS_REVIEW", policy=policy.hash,
                                   artifacts=arts))
    await (await bus.kv(bus.subjects.kv_gates)).put(token("r2"), msgspec.json.encode(held))
    decisions = await bus.nc.subscribe(bus.subjects.gate_decided("r2"))
    await bus.publish(bus.subjects.drift("chat"), _report("canary_vs_stable", output_tokens=0.15))
    blocked = _decided.decode((await decisions.next_msg(timeout=30)).data)
    await decisions.unsubscribe()
    assert blocked.decision == "BLOCK" and [r.metric for r in blocked.rules] == ["drift_psi:output_tokens", "review"]
    assert standing_veto(blocked, judged_artifacts(arts)) == veto  # the next eval of r2 stays held


async def test_a_drift_block_stands_over_a_rerun_of_the_eval_of_the_same_content(stack: tuple[Any, Signer]) -> None:
    # Before: a drift BLOCK (production traffic drifted) was replaced by the PASS of any re-run of r2's eval, and the
    # router admitted r2 again. The BLOCK now binds the content it judged, as a person's reject does.
    router, signer = stack
    bus = router.ctx.bus
    policy = await artifacts.register(bus, "policy", "canary-drift", POLICY)
    arts = await judged(bus, "r2")
    passed = signer.sign(GateDecided(release="r2", rules=[], decision="PASS", policy=policy.hash, artifacts=arts))
    await (await bus.kv(bus.subjects.kv_gates)).put(token("r2"), msgspec.json.encode(passed))
    decisions = await bus.nc.subscribe(bus.subjects.gate_decided("r2"))
    await bus.publish(bus.subjects.drift("chat"), _report("canary_vs_stable", output_tokens=0.15))
    blocked = _decided.decode((await decisions.next_msg(timeout=30)).data)
    await decisions.unsubscribe()
    assert blocked.decision == "BLOCK"
    veto = standing_veto(blocked, judged_artifacts(arts))
    assert veto is not None and "was BLOCKed on live evidence (drift report" in veto.hint, blocked.rules
    # What the next eval of the same content gets: held for an approver, never a PASS over the drift.
    rerun = under_veto(Outcome("PASS", (), "all rules passed"), veto)
    assert rerun.decision == "NEEDS_REVIEW" and veto.hint in rerun.review_required
    assert standing_veto(blocked, {**judged_artifacts(arts), "prompt/other": "sha256:new"}) is None  # new content
    # It binds the content under any release name of its tenant (probe p3): recorded by the tenant and the content's
    # digest, which an eval of the same artifact versions registered under a new name consults.
    kept = await (await bus.kv(bus.subjects.kv_vetoes)).get(veto_key(blocked.tenant, arts))
    assert _decided.decode(kept.value).id == blocked.id
