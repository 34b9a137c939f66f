"""The gates file on a real nats-server and chDB: the policy an app's releases must be gated by is the
gatekeeper's configuration, not whatever policy the operator who requests the eval names.

Before it, an operator could register `policy/lenient` (no real thresholds), run `lockgate eval run
--policy lenient.yaml`, get a signed PASS and roll the release out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import yaml
from click.testing import CliRunner, Result

from lockgate import artifacts
from lockgate.bus import Bus, Delivery
from lockgate.cli.gate import current_decision
from lockgate.cli.main import cli
from lockgate.codec import Codec, encode
from lockgate.config import Settings
from lockgate.contracts import EvalCompleted, GateDecided, GateReview
from lockgate.errors import ConfigError, NotFound, SignatureError
from lockgate.identity import sign_review
from lockgate.server.apikeys import bootstrap
from lockgate.server.runtime import Runtime
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper import domain, handlers
from lockgate.signing import Keyring, Signer, ensure_signer_trusted, revoke_person, trust_file_path, trust_key
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import (
    admin_headers,
    eventually,
    person,
    register_model_release,
    run_cli,
    sink_stored,
    store_decision,
    store_pass,
)
from tests.integration.test_gate_flow import audit, audited  # noqa: F401  (the gate audit subscription)

pytestmark = pytest.mark.timeout(90)
FIXTURES = Path(__file__).parent.parent / "fixtures"
RULES = [{"name": "latency", "metric": "latency_p95_ms", "op": "<=", "threshold": 2000}]
# Both pass a model that answers every case right; only strict would stop one that does not.
STRICT = {"name": "strict", "use_interval": False,
          "rules": [{"name": "accuracy", "metric": "exact_match", "op": ">=", "threshold": 0.9}, *RULES]}
LENIENT = {"name": "lenient", "use_interval": False, "rules": RULES}
# "No regression against the baseline" (the usual CI gate) and few errors. An app's first release has nothing to
# compare with, so a missing comparison passes that rule; a baseline pinned by the gates file makes leaving it
# out a BLOCK once the deployment serves a release. The margin fits the 20-case suite: 20 pairs that all agree
# bound the change to about +-0.09 (unseen discordant cases), so a margin of 0.02 could only be INCONCLUSIVE.
REL = {"name": "rel", "use_interval": False, "rules": [
    {"name": "no-regression", "metric": "exact_match", "relative": {"max_regression": 0.1}, "no_data": "pass"},
    {"name": "few-errors", "metric": "error_rate", "op": "<=", "threshold": 0.05}]}


def answers(wrong_every: int = 0) -> dict[str, str]:
    """Right answers to every case of the fixture suite (with `wrong_every` N, every Nth one left out)."""
    cases = [json.loads(line) for line in (FIXTURES / "suites" / "qa.jsonl").read_text().splitlines()]
    return {c["vars"]["question"]: c["expected"] for i, c in enumerate(cases) if not wrong_every or i % wrong_every}


@pytest.fixture
def trusted(settings: Settings) -> Keyring:
    """The gatekeeper's key in the trust file, as `lockgate up` writes it; the consumers' keyring."""
    ensure_signer_trusted(settings)
    return Keyring.from_settings(settings)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """The policy files an operator would pass to `eval run --policy` (each registers under its file name)."""
    out = {}
    for name, doc in (("strict", STRICT), ("lenient", LENIENT), ("rel", REL)):
        out[name] = str(tmp_path / f"{name}.yaml")
        Path(out[name]).write_text(yaml.safe_dump(doc))
    return out


def gates_file(tmp_path: Path, apps: dict[str, Any]) -> str:
    path = tmp_path / "gates.yaml"
    path.write_text(yaml.safe_dump({"apps": apps}))
    return str(path)


@contextlib.asynccontextmanager
async def gated(context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path,
                apps: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Sink, query, evaluator, gatekeeper and router with the gates file `apps`, and the simulator as the
    allow-list's `default` endpoint, where releases ship (model `good` answers every case, `bad` half)."""
    await artifacts.register_file(context.bus, "dataset", FIXTURES / "suites" / "qa.jsonl")
    models = {"good": ModelSpec(answers=answers(), latency_ms=2), "bad": ModelSpec(answers=answers(2), latency_ms=2)}
    async with SimServer(SimConfig(models=models)) as sim:
        # The releases ship to the allow-list's `default` endpoint, where the evaluator then calls them.
        context.settings = context.settings.replace(
            gates_file=gates_file(tmp_path, apps), stable_upstream=sim.url,
            canary_upstream="http://127.0.0.1:9/v1", deployment="chat")
        svcs = await run_services("sink", "query", "evaluator", "gatekeeper", "router")
        yield {"sim": sim.url, "router": svcs["router"], "sink": svcs["sink"].handlers, "gatekeeper": svcs["gatekeeper"]}


@pytest.fixture
async def stack(context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path,
                trusted: Keyring) -> AsyncIterator[dict[str, Any]]:
    """The stack with a gates file requiring policy strict for app shop (every test release's app), and r1
    passed as the stable release."""
    async with gated(context, run_services, tmp_path, {"shop": {"policy": "strict"}}) as svcs:
        # Other content each (a veto binds what a release serves, so one of r2's must not reach the stable r1).
        await register_model_release(context.bus, "r1", "good", temperature=0)
        await register_model_release(context.bus, "r2", "good")
        await store_pass(context.bus, "r1", context.settings)
        yield svcs


async def eval_run(settings: Settings, sim: str, release: str, policy: str, *more: str) -> Result:
    """`lockgate eval run` as an operator types it, on the fixture suite, waiting for the gate's decision
    (`more`: further options; with `--baseline` no --endpoint and --model: the release's model config says)."""
    where = ["--endpoint", sim, "--model", "good"] if sim else []
    args = ["--nats", settings.nats_url, "--prefix", settings.prefix, "--home", settings.home, "eval", "run",
            str(FIXTURES / "suites" / "qa.yaml"), "--candidate", release, *where,
            "--policy", policy, "--timeout", "60", "--json", *more]
    # In a thread: the CLI runs its own event loop. Its settings say where `default` is, as the stack's do: it
    # checks a URL against the release's endpoint before it requests the run.
    env = {"LOCKGATE_STABLE_UPSTREAM": sim} if sim else None
    return await asyncio.to_thread(CliRunner().invoke, cli, args, env=env, catch_exceptions=False)


async def review(settings: Settings, person: str, action: str, release: str, reason: str) -> Result:
    """`lockgate --as PERSON gate approve|reject RELEASE` as that person types it."""
    args = ["--nats", settings.nats_url, "--prefix", settings.prefix, "--home", settings.home, "--as", person,
            "gate", action, release, "--reason", reason, "--json"]
    return await asyncio.to_thread(CliRunner().invoke, cli, args, catch_exceptions=False)


async def canary(router: Any, release: str, stable: str = "r1") -> dict[str, Any]:
    """What the router does when asked to canary `release` (it admits only a verified PASS)."""
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http:
        body = {"stable_release": stable, "canary_release": release}
        async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
            return await resp.json()


async def test_an_eval_under_a_laxer_policy_than_the_gates_file_requires_is_blocked(
    bus: Bus, settings: Settings, context: ServiceContext, stack: dict[str, Any], files: dict[str, str],
    trusted: Keyring
) -> None:
    lenient = await eval_run(settings, stack["sim"], "r2", files["lenient"])
    assert lenient.exit_code == 5, lenient.output  # the gate did not pass
    out = json.loads(lenient.output)["decision"]
    d = await current_decision(bus, "r2")
    assert (d.decision, d.id) == ("BLOCK", out["id"])
    assert trusted.verify(d) == d.key_id
    # Every rule of the policy the operator chose passed: only the requirement blocks.
    assert [(r.rule, r.verdict) for r in d.rules] == [("latency", "PASS"), ("required_policy", "FAIL")]
    lenient_hash = d.policy
    assert d.reason.startswith(
        f"release 'r2' of app 'shop' must be gated by policy strict (gates file {context.settings.gates_file}): "
        f"this eval used policy lenient={lenient_hash}; run it with `--policy strict.yaml`")
    state = await canary(stack["router"], "r2")
    assert (state["phase"], state["weight"]) == ("aborted", 0.0)  # the router sees the BLOCK, no PASS

    strict = await eval_run(settings, stack["sim"], "r2", files["strict"])
    assert strict.exit_code == 0, strict.output
    passed = await current_decision(bus, "r2")
    assert passed.decision == "PASS" and passed.policy != lenient_hash
    assert [(r.rule, r.verdict) for r in passed.rules] == [("accuracy", "PASS"), ("latency", "PASS")]
    assert trusted.verify(passed) == passed.key_id
    state = await canary(stack["router"], "r2")
    assert (state["phase"], state["canary"]["release"], state["admitted"]) == ("progressing", "r2", passed.id)




async def test_an_exact_pin_blocks_another_version_of_the_name_and_approvals_of_it_are_refused(
    bus: Bus, settings: Settings, context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path,
    audit: Any, trusted: Keyring,  # noqa: F811
) -> None:
    pinned = (await artifacts.register(bus, "policy", "strict", STRICT)).hash
    # Another version under the same name, with the same rules, plus review of every prompt change.
    other = (await artifacts.register(bus, "policy", "strict", {
        **STRICT, "review": {"require_when": [{"artifact_changed": "model_config/*"}]}})).hash
    path = gates_file(tmp_path, {"*": {"policy": f"strict={pinned}"}})
    arts = await register_model_release(bus, "r3", "good")
    # A NEEDS_REVIEW decided under `other` before the gates file pinned the version, by a trusted key.
    earlier = Signer.generate()
    trust_key(trust_file_path(settings), earlier.public)
    pending = earlier.sign(GateDecided(
        release="r3", decision="NEEDS_REVIEW", rules=[], policy=other, review_required="model_config/* changed",
        artifacts={**arts, "policy": other, "eval_suite": "sha256:suite"}))
    await (await bus.kv(bus.subjects.kv_gates)).put(token("r3"), msgspec.json.encode(pending))
    context.settings = context.settings.replace(gates_file=path)
    await run_services("sink", "query", "gatekeeper")
    ann = person(settings, "ann", "approver")

    await bus.publish(bus.subjects.gate_review("r3"), sign_review(ann, GateReview(
        release="r3", action="approve", actor="ann", reason="lgtm", decision_id=pending.id)))
    row = audited.decode((await audit.next_msg(timeout=20)).data)
    assert (row.action, row.actor) == ("refused", "ann")
    assert row.reason == (f"approve by ann refused: release 'r3' of app 'shop' must be gated by policy "
                          f"strict={pinned} (gates file {path}): this eval used policy strict={other}; run it with "
                          "`--policy FILE`, FILE holding exactly that content")
    assert (await current_decision(bus, "r3")) == pending  # still NEEDS_REVIEW, never PASS


async def test_an_invalid_gates_file_stops_the_gatekeeper_naming_the_file(
    context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path
) -> None:
    path = gates_file(tmp_path, {"shop": {"policy": "strict=sha256:abc"}})
    context.settings = context.settings.replace(gates_file=path)
    with pytest.raises(ConfigError, match=f"gates file {path} is invalid: policy 'strict=sha256:abc': .* - at "
                                          r"`\$.apps.shop.policy`"):
        await run_services("gatekeeper")


async def test_a_pass_decided_before_the_gates_file_required_its_policy_is_a_block_once_the_gatekeeper_starts(
    settings: Settings, tmp_path: Path, files: dict[str, str]
) -> None:
    # Found by probe p20 (F6): r-lax was PASSed under a lax policy while the gates file covered another app, and
    # promoted. The stack restarted with a gates file requiring policy strict for its app: `gate verify` still said
    # PASS, the router kept serving it and took it as a first release at 100%, though a new eval under the same
    # policy was a BLOCK. The file binds what admits now, as branch protection's required checks do.
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=answers(), latency_ms=2)})) as sim:
        base = settings.replace(nats_url="nats://127.0.0.1:0", stable_upstream=sim.url, deployment="chat",
                                gates_file=gates_file(tmp_path, {"support-bot": {"policy": "strict"}}))
        names = ["sink", "query", "evaluator", "gatekeeper", "router"]
        before = Runtime(base, services=names)
        await before.start()
        try:
            bus = before.ctx.bus  # the admin connection stands in for the operator registering
            await artifacts.register_file(bus, "dataset", FIXTURES / "suites" / "qa.jsonl")
            await register_model_release(bus, "r-ok", "good", temperature=0)
            await register_model_release(bus, "r-lax", "good")
            for release, policy in (("r-ok", "strict"), ("r-lax", "lenient")):
                ran = await run_cli(before, "--role", "operator", "eval", "run", str(FIXTURES / "suites" / "qa.yaml"),
                                    "--candidate", release, "--policy", files[policy], "--timeout", "60")
                assert ran.exit_code == 0, ran.output  # PASS: shop is not covered yet
            ok, lax = (await current_decision(bus, "r-ok")), (await current_decision(bus, "r-lax"))
            router = before.services["router"]
            assert (await rollout(router, {"stable_release": "r-ok"}))[0] == 200
            assert (await rollout(router, {"stable_release": "r-ok", "canary_release": "r-lax"}))[0] == 200
            status, promoted = await rollout(router, None, "/promote")
            assert (status, promoted["stable"]["release"]) == (200, "r-lax"), promoted
        finally:
            await before.stop()

        strict = gates_file(tmp_path, {"shop": {"policy": "strict"}})
        after = Runtime(base.replace(gates_file=strict), services=names)
        await after.start()
        try:
            bus, keyring = after.ctx.bus, Keyring.from_settings(after.settings)
            held = await current_decision(bus, "r-lax")
            assert held.decision == "BLOCK" and keyring.verify(held) == held.key_id
            assert (held.eval_run, held.policy, held.reviewed_by) == (lax.eval_run, lax.policy, "")
            assert [(r.rule, r.verdict) for r in held.rules] == [("latency", "PASS"), ("required_policy", "FAIL")]
            assert held.reason.startswith(
                f"release 'r-lax' of app 'shop' must be gated by policy strict (gates file {strict}): its PASS "
                f"(decision {lax.id}) was decided under policy lenient={lax.policy}; run it with `--policy "
                "strict.yaml`"), held.reason
            verified = await run_cli(after, "gate", "verify", "r-lax")
            # Authentic, and a BLOCK: exit 5, as for any decision that admits nothing.
            assert verified.exit_code == 5 and "(r-lax: BLOCK, decided " in verified.output, verified.output
            # The deployment serving it goes back to its known-good release; it is no first release either.
            router = after.services["router"]
            await router.rollouts.wait_for(lambda routes: routes["chat"].stable.release == "r-ok", timeout=20)
            assert router.rollouts.route("chat").decision_id == held.id
            refused = await run_cli(after, "rollout", "--router", router.url, "--api-key",
                                    bootstrap(after.settings.home).admin_key, "start", "web", "--stable", "r-lax")
            assert refused.exit_code == 4 and "409" in refused.output and "BLOCK" in refused.output, refused.output
            # A PASS under the policy the file requires keeps admitting; a second start changes nothing.
            assert await current_decision(bus, "r-ok") == ok
            assert await after.services["gatekeeper"].handlers.hold_to_gates_file() == 0
            assert await current_decision(bus, "r-lax") == held
            sink = after.services["sink"].handlers
            await eventually(lambda: after.ctx.store.scalar(
                "SELECT count() FROM gate_decisions WHERE id = {id:String} AND action = 'required'",
                {"id": held.id}) == 1, [sink.progress("gate_decisions")], what="the remade BLOCK audited")
        finally:
            await after.stop()


async def rollout(router: Any, body: dict[str, Any] | None, action: str = "") -> tuple[int, dict[str, Any]]:
    """PUT the deployment `chat` (`body`), or POST its `action` (`/promote`), with the admin key."""
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http:
        url = f"{router.url}/lockgate/v1/deployments/chat{action}"
        async with (http.put(url, json=body) if body is not None else http.post(url)) as resp:
            return resp.status, await resp.json()


# Whoever requests an eval chooses its baseline: the yardstick of a policy's relative rules.


async def test_a_release_the_gate_blocked_is_no_baseline_for_a_regression_rule(
    bus: Bus, settings: Settings, context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path,
    files: dict[str, str], trusted: Keyring
) -> None:
    # Before: the gate BLOCKed rb1 (half its answers wrong), and rb2, the same model, compared with rb1 "fell 0
    # below baseline (0.5 -> 0.5)" under the pinned policy: a signed PASS, and the router admitted it.
    async with gated(context, run_services, tmp_path, {"shop": {"policy": "rel"}}) as svcs:
        await register_model_release(bus, "r1", "good")
        for release in ("rb1", "rb2"):
            await register_model_release(bus, release, "bad")
        first = await eval_run(settings, "", "r1", files["rel"])
        assert first.exit_code == 0, first.output  # nothing to compare with yet
        await sink_stored(svcs["sink"], eval_runs=1)  # the next eval compares with r1's stored run
        worse = await eval_run(settings, "", "rb1", files["rel"], "--baseline", "r1")
        assert worse.exit_code == 5, worse.output
        blocked = await current_decision(bus, "rb1")
        assert blocked.decision == "BLOCK"
        assert "no-regression: exact_match fell 0.5 below baseline (1 -> 0.5)" in blocked.reason
        await sink_stored(svcs["sink"], eval_runs=2)

        fooled = await eval_run(settings, "", "rb2", files["rel"], "--baseline", "rb1")
        assert fooled.exit_code == 5, fooled.output
        d = await current_decision(bus, "rb2")
        assert d.decision == "BLOCK" and trusted.verify(d) == d.key_id
        assert [(r.rule, r.verdict) for r in d.rules] == [
            ("no-regression", "NO_DATA"), ("few-errors", "PASS"), ("baseline_allowed", "FAIL")]
        assert d.reason.startswith(f"baseline 'rb1' is not allowed by the gate: its current decision is BLOCK "
                                   f"({blocked.reason[:40]}")
        assert "run the eval with `--baseline` naming one" in d.reason
        state = await canary(svcs["router"], "rb2")
        assert (state["phase"], state["weight"]) == ("aborted", 0.0)  # the BLOCK: no PASS exists


async def test_a_measurement_of_the_baseline_is_not_the_run_a_candidate_is_compared_with(
    bus: Bus, settings: Settings, context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path,
    files: dict[str, str], trusted: Keyring
) -> None:
    # Before: the evaluator compared a candidate with the baseline's latest completed run of the suite, so any
    # operator's measurement of r1 (`eval run` without --policy) became the yardstick, which the gate then refused
    # as not the run r1's PASS judged: every candidate compared with r1 was BLOCKed (baseline_allowed) until r1
    # was gated again.
    async with gated(context, run_services, tmp_path, {"shop": {"policy": "rel"}}) as svcs:
        await register_model_release(bus, "r1", "good")
        await register_model_release(bus, "r2", "good", temperature=0)
        await register_model_release(bus, "rb1", "bad")
        first = await eval_run(settings, "", "r1", files["rel"])
        assert first.exit_code == 0, first.output
        passed = await current_decision(bus, "r1")
        assert passed.decision == "PASS"
        await sink_stored(svcs["sink"], eval_runs=1)
        args = ["--nats", settings.nats_url, "--prefix", settings.prefix, "--home", settings.home, "eval", "run",
                str(FIXTURES / "suites" / "qa.yaml"), "--candidate", "r1", "--timeout", "60", "--json"]
        measured = await asyncio.to_thread(CliRunner().invoke, cli, args, catch_exceptions=False)
        assert measured.exit_code == 0, measured.output
        assert "decision" not in json.loads(measured.output)  # a measurement: the gate decided nothing
        await sink_stored(svcs["sink"], eval_runs=2)  # r1's latest completed run of the suite is now the measurement

        good = await eval_run(settings, "", "r2", files["rel"], "--baseline", "r1")
        assert json.loads(good.output)["baseline_run"] == passed.eval_run, good.output
        assert good.exit_code == 0, good.output
        d = await current_decision(bus, "r2")
        assert d.decision == "PASS" and trusted.verify(d) == d.key_id
        assert [(r.rule, r.verdict) for r in d.rules] == [("no-regression", "PASS"), ("few-errors", "PASS")]

        # And it is a comparison: a worse candidate regresses against the run r1's PASS judged.
        worse = await eval_run(settings, "", "rb1", files["rel"], "--baseline", "r1")
        assert json.loads(worse.output)["baseline_run"] == passed.eval_run, worse.output
        assert worse.exit_code == 5, worse.output
        blocked = await current_decision(bus, "rb1")
        assert [r.rule for r in blocked.rules if r.verdict == "FAIL"] == ["no-regression"]
        assert "no-regression: exact_match fell 0.5 below baseline (1 -> 0.5)" in blocked.reason


async def test_a_gates_file_pins_the_baseline_to_the_deployments_known_good_release(
    bus: Bus, settings: Settings, context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path,
    files: dict[str, str], trusted: Keyring
) -> None:
    apps = {"shop": {"policy": "rel", "baseline": {"deployment": "chat"}}}
    async with gated(context, run_services, tmp_path, apps) as svcs:
        await register_model_release(bus, "r1", "good")
        await register_model_release(bus, "r2", "good")
        await register_model_release(bus, "rb1", "bad")
        first = await eval_run(settings, "", "r1", files["rel"])
        assert first.exit_code == 0, first.output  # chat serves nothing yet: nothing to compare with
        await sink_stored(svcs["sink"], eval_runs=1)
        async with aiohttp.ClientSession(headers=admin_headers(settings.home)) as http:
            async with http.put(f"{svcs['router'].url}/lockgate/v1/deployments/chat",
                                json={"stable_release": "r1"}) as resp:
                assert (await resp.json())["phase"] == "promoted"  # chat's first release: known-good

        # Leaving the baseline out (the relative rule would have no data, which it lets pass) is refused.
        omitted = await eval_run(settings, "", "rb1", files["rel"])
        assert omitted.exit_code == 5, omitted.output
        d = await current_decision(bus, "rb1")
        assert d.decision == "BLOCK" and [r.rule for r in d.rules if r.verdict == "FAIL"] == ["required_baseline"]
        assert d.reason.startswith(f"release 'rb1' of app 'shop' must be compared with the known-good release of "
                                   f"deployment 'chat' (gates file {context.settings.gates_file}), now 'r1': this "
                                   "eval compared with none; run it with `--baseline r1`")
        against = await eval_run(settings, "", "rb1", files["rel"], "--baseline", "r1")
        assert against.exit_code == 5, against.output
        d = await current_decision(bus, "rb1")
        assert [r.rule for r in d.rules if r.verdict == "FAIL"] == ["no-regression"]  # judged, and it regressed

        good = await eval_run(settings, "", "r2", files["rel"], "--baseline", "r1")
        assert good.exit_code == 0, good.output
        passed = await current_decision(bus, "r2")
        assert passed.decision == "PASS" and trusted.verify(passed) == passed.key_id
        state = await canary(svcs["router"], "r2")
        assert (state["phase"], state["admitted"]) == ("progressing", passed.id)


async def test_an_eval_that_compared_no_run_of_the_pinned_baseline_is_refused(
    bus: Bus, settings: Settings, context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path,
    files: dict[str, str], trusted: Keyring
) -> None:
    # Before: naming the pinned baseline r1 met the pin, but on a suite r1 was never gated on the evaluator found no
    # run of r1 to compare with, the regression rule had no data, which `no_data: pass` let through: the half-wrong
    # rb1 got a signed PASS (as if it had left the baseline out, which the pin refuses).
    apps = {"shop": {"policy": "rel", "baseline": {"deployment": "chat"}}}
    other = tmp_path / "other.yaml"  # the fixture suite's dataset, one scorer: another suite
    doc = yaml.safe_load((FIXTURES / "suites" / "qa.yaml").read_text())
    other.write_text(yaml.safe_dump({**doc, "name": "qa-other", "scorers": ["exact_match"]}))
    async with gated(context, run_services, tmp_path, apps) as svcs:
        await register_model_release(bus, "r1", "good")
        await register_model_release(bus, "rb1", "bad")
        assert (await eval_run(settings, "", "r1", files["rel"])).exit_code == 0
        async with aiohttp.ClientSession(headers=admin_headers(settings.home)) as http:
            async with http.put(f"{svcs['router'].url}/lockgate/v1/deployments/chat",
                                json={"stable_release": "r1"}) as resp:
                assert (await resp.json())["phase"] == "promoted"

        args = ["--nats", settings.nats_url, "--prefix", settings.prefix, "--home", settings.home, "eval", "run",
                str(other), "--candidate", "rb1", "--baseline", "r1", "--policy", files["rel"], "--timeout", "60",
                "--json"]
        fooled = await asyncio.to_thread(CliRunner().invoke, cli, args, catch_exceptions=False)
        assert fooled.exit_code == 5, fooled.output
        assert json.loads(fooled.output)["baseline_run"] == ""  # nothing compared
        d = await current_decision(bus, "rb1")
        assert d.decision == "BLOCK" and trusted.verify(d) == d.key_id
        assert [(r.rule, r.verdict) for r in d.rules] == [
            ("no-regression", "NO_DATA"), ("few-errors", "PASS"), ("baseline_allowed", "FAIL")]
        passed = await current_decision(bus, "r1")
        assert d.reason.startswith(f"this eval compared with no run of baseline 'r1', but its PASS (decision "
                                   f"{passed.id}) judged run {passed.eval_run}: run the eval again once that run "
                                   "is stored, or gate 'r1' on this suite first"), d.reason
        state = await canary(svcs["router"], "rb1")
        assert (state["phase"], state["weight"]) == ("aborted", 0.0)


async def first_release(router: Any, deployment: str, release: str) -> tuple[int, dict[str, Any]]:
    """PUT `deployment` with `release` as its first (stable) release, as `lockgate rollout start` does."""
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http:
        async with http.put(f"{router.url}/lockgate/v1/deployments/{deployment}",
                            json={"stable_release": release}) as resp:
            return resp.status, await resp.json()


async def gate_verify(settings: Settings, release: str) -> Result:
    """`lockgate gate verify RELEASE` as an operator types it."""
    args = ["--nats", settings.nats_url, "--prefix", settings.prefix, "--home", settings.home, "gate", "verify",
            release]
    return await asyncio.to_thread(CliRunner().invoke, cli, args, catch_exceptions=False)


@pytest.mark.parametrize("pinned", [False, True], ids=["named", "pinned"])
async def test_a_pass_measured_against_a_baseline_a_person_rejects_since_admits_no_more(
    bus: Bus, settings: Settings, context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path,
    files: dict[str, str], trusted: Keyring, pinned: bool
) -> None:
    # Found by probe p85 (F1): r2 PASSed "no regression against r1", then carol rejected r1. The gate refused r1 as a
    # yardstick from then on (an eval of r2's very content against it BLOCKed on baseline_allowed), but r2's PASS,
    # whose only evidence on the regression rule was the comparison with r1, kept admitting: `gate verify r2` exit 0,
    # a first release of r2 served at 100%, across restarts; so with the gates file pinning the baseline too.
    apps: dict[str, Any] = {"shop": {"policy": "rel"}}
    if pinned:
        apps["shop"]["baseline"] = {"deployment": "base"}
    async with gated(context, run_services, tmp_path, apps) as svcs:
        router = svcs["router"]
        await register_model_release(bus, "r0", "good", temperature=0.5)
        await store_pass(bus, "r0", settings)
        await register_model_release(bus, "r1", "good")
        await register_model_release(bus, "r2", "good", temperature=0)
        assert (await eval_run(settings, "", "r1", files["rel"])).exit_code == 0  # nothing to compare with yet
        await sink_stored(svcs["sink"], eval_runs=1)
        if pinned:
            assert (await first_release(router, "base", "r1"))[1]["phase"] == "promoted"  # base's known-good
        good = await eval_run(settings, "", "r2", files["rel"], "--baseline", "r1")
        assert good.exit_code == 0, good.output
        passed = await current_decision(bus, "r2")
        assert (passed.decision, passed.baseline) == ("PASS", "r1")
        assert (await canary(router, "r2", stable="r0"))["admitted"] == passed.id

        person(settings, "carol", "approver")
        rejected = await review(settings, "carol", "reject", "r1", "half its answers are wrong")
        assert rejected.exit_code == 0, rejected.output
        veto = json.loads(rejected.output)
        # The reach-back runs before the reject is announced (Records.finish), which `gate reject` waited for.
        held = await current_decision(bus, "r2")
        assert held.decision == "BLOCK" and trusted.verify(held) == held.key_id
        assert [(r.rule, r.verdict) for r in held.rules] == [
            ("no-regression", "PASS"), ("few-errors", "PASS"), ("baseline_allowed", "FAIL")]
        assert held.reason.startswith(f"baseline 'r1' is not allowed by the gate: its current decision is BLOCK, "
                                      f"rejected by carol ({veto['reason'][:30]}"), held.reason
        assert "run the eval with `--baseline` naming one" in held.reason
        assert (held.eval_run, held.baseline, held.policy, held.reviewed_by, held.approvals) == (
            passed.eval_run, "r1", passed.policy, "", [])
        verified = await gate_verify(settings, "r2")
        assert verified.exit_code == 5 and "(r2: BLOCK, decided " in verified.output, verified.output
        await router.rollouts.wait_for(lambda routes: routes["chat"].decision_id == held.id, timeout=20)
        route = router.rollouts.route("chat")
        assert (route.stable.release, route.canary.release, route.phase, route.weight) == ("r0", "r2", "aborted", 0.0)
        status, body = await first_release(router, "web", "r2")
        assert status == 409 and "BLOCK" in json.dumps(body), body
        await eventually(lambda: context.store.scalar(
            "SELECT count() FROM gate_decisions WHERE id = {id:String} AND action = 'baseline'",
            {"id": held.id}) == 1, [svcs["sink"].progress("gate_decisions")], what="the remade BLOCK audited")


async def test_a_pass_judged_while_its_baseline_was_rejected_is_remade_once_stored(
    bus: Bus, settings: Settings, context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path,
    files: dict[str, str], trusted: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    # r2's eval read its baseline r1 allowed (a PASS), then carol's reject of r1 was stored and its pass over what was
    # measured against r1 listed the decisions before r2's PASS was stored: the PASS is judged again once stored.
    async with gated(context, run_services, tmp_path, {"shop": {"policy": "rel"}}) as svcs:
        await register_model_release(bus, "r1", "good")
        await register_model_release(bus, "r2", "good", temperature=0)
        assert (await eval_run(settings, "", "r1", files["rel"])).exit_code == 0
        await sink_stored(svcs["sink"], eval_runs=1)
        person(settings, "carol", "approver")
        rejected: list[Result] = []
        judge = handlers.evaluated_rules

        async def reject_meanwhile(*args: Any) -> Any:  # after r2's eval read its baseline, before it stores
            if args[1].release == "r2" and not rejected:
                rejected.append(await review(settings, "carol", "reject", "r1", "half its answers are wrong"))
            return await judge(*args)

        monkeypatch.setattr(handlers, "evaluated_rules", reject_meanwhile)
        rerun = await eval_run(settings, "", "r2", files["rel"], "--baseline", "r1")
        assert rejected and rejected[0].exit_code == 0, rejected and rejected[0].output
        assert rerun.exit_code == 5, rerun.output  # what its run shows is the decision that stands
        held = await current_decision(bus, "r2")
        assert held.decision == "BLOCK" and trusted.verify(held) == held.key_id
        assert held.eval_run == json.loads(rerun.output)["run_id"]
        assert [r.rule for r in held.rules if r.verdict == "FAIL"] == ["baseline_allowed"]
        assert held.reason.startswith("baseline 'r1' is not allowed by the gate: its current decision is BLOCK, "
                                      "rejected by carol"), held.reason


async def test_a_gatekeeper_that_starts_remakes_the_passes_measured_against_a_release_no_longer_allowed(
    bus: Bus, settings: Settings, run_services: Callable[..., Any], trusted: Keyring
) -> None:
    # A baseline rejected before a gatekeeper that reaches back ran (or while one stopped mid-pass): r2 PASSed
    # against r1, r3 against r2, r4 against r1 under a policy judging no comparison, and r1 is a person's BLOCK.
    rel = (await artifacts.register(bus, "policy", "rel", REL)).hash
    absolute = (await artifacts.register(bus, "policy", "absolute", {**REL, "rules": REL["rules"][1:]})).hash
    earlier = Signer.generate()  # the gatekeeper of before
    trust_key(trust_file_path(settings), earlier.public)
    decided = {}
    for release, decision, baseline, policy in (("r1", "BLOCK", "", rel), ("r2", "PASS", "r1", rel),
                                                ("r3", "PASS", "r2", rel), ("r4", "PASS", "r1", absolute)):
        arts = await register_model_release(bus, release, "good", temperature=int(release[1]) / 10)
        decided[release] = earlier.sign(GateDecided(
            release=release, decision=decision, rules=[], baseline=baseline, policy=policy, eval_run=f"run-{release}",
            reason="half its answers are wrong" if decision == "BLOCK" else "all 2 rules of policy 'rel' passed",
            reviewed_by="carol" if decision == "BLOCK" else "", artifacts={**arts, "policy": policy}))
        await store_decision(bus, decided[release])

    svcs = await run_services("sink", "query", "gatekeeper")
    assert svcs["gatekeeper"].problems() == []
    for release, baseline in (("r2", "r1"), ("r3", "r2")):  # r3's baseline is withdrawn by r2's remaking
        held = await current_decision(bus, release)
        assert held.decision == "BLOCK" and trusted.verify(held) == held.key_id, (release, held.reason)
        assert held.eval_run == f"run-{release}" and [r.rule for r in held.rules] == ["baseline_allowed"]
        assert held.reason.startswith(f"baseline {baseline!r} is not allowed by the gate: its current decision is "
                                      "BLOCK"), held.reason
    assert await current_decision(bus, "r4") == decided["r4"]  # it judged nothing on the comparison
    assert await svcs["gatekeeper"].handlers.measured.sweep() == 0  # a second start remakes none


# A person's reject binds the content it rejected.


async def _rejected_by_carol(settings: Settings, stack: dict[str, Any], files: dict[str, str],
                             release: str = "r2") -> dict[str, Any]:
    """`release` PASSed under the strict policy, then rejected by carol (approvers carol and ann trusted): her veto."""
    assert (await eval_run(settings, stack["sim"], release, files["strict"])).exit_code == 0
    person(settings, "carol", "approver")
    person(settings, "ann", "approver")
    rejected = await review(settings, "carol", "reject", release, "tone regressed: do not ship")
    assert rejected.exit_code == 0, rejected.output
    return dict(json.loads(rejected.output))


async def test_a_persons_reject_stands_over_a_rerun_of_the_eval_until_an_approver_approves(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring
) -> None:
    # Before: carol rejected r2 (a signed BLOCK), any operator re-ran the eval of the unchanged release, the
    # gatekeeper signed a new PASS over the veto and the router admitted it.
    veto = await _rejected_by_carol(settings, stack, files)
    assert (veto["decision"], veto["reviewed_by"]) == ("BLOCK", "carol")

    for _ in range(2):  # a re-run, and a re-run of that: the veto is carried on
        rerun = await eval_run(settings, stack["sim"], "r2", files["strict"])
        assert rerun.exit_code == 5, rerun.output  # held for review, not passed
        held = await current_decision(bus, "r2")
        assert held.decision == "NEEDS_REVIEW" and trusted.verify(held) == held.key_id
        assert [(r.rule, r.verdict) for r in held.rules] == [("accuracy", "PASS"), ("latency", "PASS"),
                                                             ("vetoed", "FAIL")]
        assert held.reason.startswith(f"release 'r2' was rejected by carol (decision {veto['id']}: override: "
                                      "rejected by carol: tone regressed: do not ship")
        state = await canary(stack["router"], "r2")
        assert (state["phase"], state["weight"]) == ("idle", 0.0)  # awaiting review takes no traffic

    # An approver's approval, not an operator's re-run, lifts it.
    approved = await review(settings, "ann", "approve", "r2", "tone checked again: fine")
    assert approved.exit_code == 0, approved.output
    lifted = await current_decision(bus, "r2")
    assert (lifted.decision, lifted.approvals) == ("PASS", ["ann"]) and lifted.rules[-1].verdict == "PASS"
    await stack["router"].rollouts.wait_for(lambda routes: routes["chat"].admitted == lifted.id, timeout=20)



async def test_a_persons_reject_binds_the_content_under_any_release_name(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring
) -> None:
    # Found by probe p3: carol rejected r2, an operator registered r2's very artifact versions as r2-clone, ran its
    # eval under the required policy and got a signed PASS with no veto, and the router served it to everyone.
    veto = await _rejected_by_carol(settings, stack, files)
    binding = await artifacts.release_of(bus, "r2")
    await artifacts.register_release(bus, "r2-clone", "shop", binding["artifacts"])

    rerun = await eval_run(settings, stack["sim"], "r2-clone", files["strict"])
    assert rerun.exit_code == 5, rerun.output  # held for review, not passed
    held = await current_decision(bus, "r2-clone")
    assert held.decision == "NEEDS_REVIEW" and trusted.verify(held) == held.key_id
    assert [(r.rule, r.verdict) for r in held.rules] == [("accuracy", "PASS"), ("latency", "PASS"), ("vetoed", "FAIL")]
    assert held.reason.startswith(f"release 'r2' was rejected by carol (decision {veto['id']}: override: "
                                  "rejected by carol: tone regressed: do not ship")
    state = await canary(stack["router"], "r2-clone")
    assert (state["phase"], state["weight"]) == ("idle", 0.0)

    # A release differing in one artifact is other content: judged afresh.
    config = await artifacts.register(bus, "model_config", "r2-config",
                                      {"model": "good", "endpoint": "default", "temperature": 0})
    await artifacts.register_release(bus, "r3", "shop", {"model_config/r2-config": config.hash})
    assert binding["artifacts"].keys() == {"model_config/r2-config"} and binding["artifacts"] != {
        "model_config/r2-config": config.hash}
    fresh = await eval_run(settings, stack["sim"], "r3", files["strict"])
    assert fresh.exit_code == 0, fresh.output
    assert (await current_decision(bus, "r3")).decision == "PASS"

    # An approver's approval of the held decision lifts the veto for the content: a third name is then judged afresh.
    approved = await review(settings, "ann", "approve", "r2-clone", "tone checked again: fine")
    assert approved.exit_code == 0, approved.output
    await artifacts.register_release(bus, "r2-again", "shop", binding["artifacts"])
    assert (await eval_run(settings, stack["sim"], "r2-again", files["strict"])).exit_code == 0
    assert (await current_decision(bus, "r2-again")).decision == "PASS"


async def test_a_persons_reject_reaches_a_name_of_the_same_content_passed_before_it(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring
) -> None:
    # Before: r2's very artifact versions were registered and PASSed as r2-clone, which took canary traffic; carol
    # then rejected r2, and r2-clone kept its PASS and its traffic until someone rejected it too.
    binding = await artifacts.release_of(bus, "r2")
    await artifacts.register_release(bus, "r2-clone", "shop", binding["artifacts"])
    assert (await eval_run(settings, stack["sim"], "r2-clone", files["strict"])).exit_code == 0
    passed = await current_decision(bus, "r2-clone")
    state = await canary(stack["router"], "r2-clone")
    assert (state["phase"], state["admitted"]) == ("progressing", passed.id), state

    veto = await _rejected_by_carol(settings, stack, files)
    held = await current_decision(bus, "r2-clone")
    assert held.decision == "NEEDS_REVIEW" and trusted.verify(held) == held.key_id
    assert [(r.rule, r.verdict) for r in held.rules] == [("accuracy", "PASS"), ("latency", "PASS"), ("vetoed", "FAIL")]
    assert held.reason.startswith(f"release 'r2' was rejected by carol (decision {veto['id']}: override: ")
    assert held.eval_run == passed.eval_run and held.approvals == []
    rollouts = stack["router"].rollouts
    await rollouts.wait_for(lambda routes: routes["chat"].decision_id == held.id, timeout=20)
    route = rollouts.route("chat")
    assert (route.canary.release, route.weight, route.admitted) == ("r2-clone", 0.0, "")

    # It is judged as a re-run of its eval would be now, and an approver's approval lifts it.
    assert (await eval_run(settings, stack["sim"], "r2-clone", files["strict"])).exit_code == 5
    assert (await review(settings, "ann", "approve", "r2-clone", "tone checked again: fine")).exit_code == 0
    assert (await current_decision(bus, "r2-clone")).decision == "PASS"


async def test_a_forged_entry_of_the_vetoed_content_is_never_signed_by_the_veto_reach_back(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring
) -> None:
    # Probe p28: r2's genuine PASS copied into the gates bucket under another release (a service credential may write
    # there; its signature then fails, and every reader refuses it). Carol's reject of r2 reached back over the
    # content's names, found the copy and signed it with the gatekeeper's real key: an authentic NEEDS_REVIEW of a
    # release the gatekeeper never judged, citing r2's eval run.
    assert (await eval_run(settings, stack["sim"], "r2", files["strict"])).exit_code == 0
    passed = await current_decision(bus, "r2")
    gates = await bus.kv(bus.subjects.kv_gates)
    forged = msgspec.structs.replace(passed, release="r2-forged")
    await gates.put("r2-forged", encode(forged))
    with pytest.raises(SignatureError):
        trusted.verify(forged)

    await _rejected_by_carol(settings, stack, files)
    assert (await current_decision(bus, "r2")).decision == "BLOCK"
    assert await current_decision(bus, "r2-forged") == forged  # left as it is: still no trusted key's


async def test_a_persons_reject_reaching_the_serving_stable_rolls_it_back_whatever_its_canary_slot_holds(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring
) -> None:
    # Found by probe p14: r2 was promoted from r1, an operator then put r3 on as a canary (0%, not gated), and carol
    # rejected r2-clone, r2's very content. The reach-back remade r2 NEEDS_REVIEW, but with r3 in the canary slot the
    # router took it for a known-good release not serving, waiting for its reviewers: r2 kept 100% of traffic for
    # good. README says a promoted stable under a veto goes back to its known-good release.
    router = stack["router"]
    assert (await eval_run(settings, stack["sim"], "r2", files["strict"])).exit_code == 0
    assert (await canary(router, "r2"))["phase"] == "progressing"
    async with aiohttp.ClientSession(headers=admin_headers(settings.home)) as http:
        async with http.post(f"{router.url}/lockgate/v1/deployments/chat/promote") as resp:
            assert resp.status == 200, await resp.text()
    await register_model_release(bus, "r3", "good", temperature=0.5)
    state = await canary(router, "r3", stable="r2")
    assert (state["stable"]["release"], state["phase"], state["weight"]) == ("r2", "idle", 0.0), state

    await artifacts.register_release(bus, "r2-clone", "shop", (await artifacts.release_of(bus, "r2"))["artifacts"])
    await _rejected_by_carol(settings, stack, files, "r2-clone")
    held = await current_decision(bus, "r2")
    assert held.decision == "NEEDS_REVIEW" and trusted.verify(held) == held.key_id
    await router.rollouts.wait_for(lambda routes: routes["chat"].stable.release == "r1", timeout=20)
    route = router.rollouts.route("chat")
    assert (route.phase, route.weight, route.decision_id) == ("aborted", 0.0, held.id), route.reason
    assert route.reason.startswith("rolled back r2: gate NEEDS_REVIEW of known-good r2: ")
    assert [t.release for t in route.good] == ["r1"]


async def test_a_persons_reject_binds_what_the_release_serves_whatever_its_artifacts_are_named(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring
) -> None:
    # Found by probe p7: after a person's reject, the same bytes bound under another artifact name
    # (`prompt/shop-answer-x`), or the same release without its `policy/*` artifact (the gates file pins the eval's
    # policy anyway), got a signed PASS and canary traffic; a name of them PASSed before the reject kept its PASS.
    # The content's digest hashed the artifacts' labels and every artifact listed, served or not.
    [(label, config)] = (await artifacts.release_of(bus, "r2"))["artifacts"].items()
    policy = await artifacts.register_file(bus, "policy", files["strict"])
    await artifacts.register_release(bus, "r2-listed", "shop", {label: config, "policy/strict": policy.hash})
    await artifacts.register_release(bus, "r2-before", "shop", {"model_config/r2-config-y": config})
    assert (await eval_run(settings, stack["sim"], "r2-before", files["strict"])).exit_code == 0

    veto = await _rejected_by_carol(settings, stack, files, "r2-listed")
    why = f"release 'r2-listed' was rejected by carol (decision {veto['id']}: override: rejected by carol: "
    reached = await current_decision(bus, "r2-before")  # relabelled, PASSed before it: reached back
    assert reached.decision == "NEEDS_REVIEW" and reached.reason.startswith(why), reached.reason
    await artifacts.register_release(bus, "r2-renamed", "shop", {"model_config/r2-config-x": config,
                                                                "policy/strict": policy.hash})
    for release in ("r2-renamed", "r2"):  # relabelled; r2 is r2-listed without its policy artifact
        rerun = await eval_run(settings, stack["sim"], release, files["strict"])
        assert rerun.exit_code == 5, rerun.output  # held for review, not passed
        held = await current_decision(bus, release)
        assert held.decision == "NEEDS_REVIEW" and trusted.verify(held) == held.key_id
        assert [(r.rule, r.verdict) for r in held.rules][-1] == ("vetoed", "FAIL")
        assert held.reason.startswith(why), held.reason
        state = await canary(stack["router"], release)
        assert (state["phase"], state["weight"]) == ("idle", 0.0)


async def test_a_persons_reject_binds_its_own_tenants_names_of_the_content_only(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring
) -> None:
    # Found by probe p7: carol rejected tenant acme's acme-r2, which holds the content of tenant default's r2 (PASSed,
    # on canary): r2 was remade NEEDS_REVIEW naming acme-r2 and carol's reason, and the router took it out of
    # traffic. Tenants are isolated: one tenant's review neither holds nor names another tenant's release.
    arts = (await artifacts.release_of(bus, "r2"))["artifacts"]
    await artifacts.register_release(bus, "acme-r2", "shop", arts, tenant="acme")
    assert (await eval_run(settings, stack["sim"], "r2", files["strict"])).exit_code == 0
    passed = await current_decision(bus, "r2")
    assert (await canary(stack["router"], "r2"))["phase"] == "progressing"

    veto = await _rejected_by_carol(settings, stack, files, "acme-r2")
    assert (veto["decision"], veto["tenant"]) == ("BLOCK", "acme")
    # The reach-back runs before the reject is announced (Records.finish), which `gate reject` waited for.
    assert await current_decision(bus, "r2") == passed
    assert stack["router"].rollouts.route("chat").admitted == passed.id
    # A new eval of the content in tenant default is judged afresh; one in tenant acme stays under the reject.
    await artifacts.register_release(bus, "r2-again", "shop", arts)
    assert (await eval_run(settings, stack["sim"], "r2-again", files["strict"])).exit_code == 0
    again = await current_decision(bus, "r2-again")
    assert again.decision == "PASS" and "acme" not in again.reason and "carol" not in again.reason
    await artifacts.register_release(bus, "acme-r2-again", "shop", arts, tenant="acme")
    assert (await eval_run(settings, stack["sim"], "acme-r2-again", files["strict"])).exit_code == 5
    assert (await current_decision(bus, "acme-r2-again")).reason.startswith("release 'acme-r2' was rejected by carol")


async def test_a_veto_recorded_under_the_content_key_of_before_still_holds(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring
) -> None:
    # A gatekeeper of before recorded vetoes under the digest of the labelled artifact set, every tenant's alike: an
    # upgrade must not lose them. Read when the content's key is not written; an approval records under that key.
    veto = await _rejected_by_carol(settings, stack, files)
    arts = (await artifacts.release_of(bus, "r2"))["artifacts"]
    kv = await bus.kv(bus.subjects.kv_vetoes)
    key = domain.veto_key("default", arts)
    before = hashlib.sha256("\n".join(f"{k}={v}" for k, v in sorted(arts.items())).encode()).hexdigest()
    await kv.put(before, (await kv.get(key)).value)
    await kv.purge(key)

    await artifacts.register_release(bus, "r2-clone", "shop", arts)
    assert (await eval_run(settings, stack["sim"], "r2-clone", files["strict"])).exit_code == 5
    held = await current_decision(bus, "r2-clone")
    assert held.decision == "NEEDS_REVIEW" and held.reason.startswith(
        f"release 'r2' was rejected by carol (decision {veto['id']}: "), held.reason
    # Tenant default's veto is not tenant acme's, under the key of before either.
    await artifacts.register_release(bus, "acme-r2", "shop", arts, tenant="acme")
    assert (await eval_run(settings, stack["sim"], "acme-r2", files["strict"])).exit_code == 0

    assert (await review(settings, "ann", "approve", "r2-clone", "tone checked again: fine")).exit_code == 0
    lifted = await current_decision(bus, "r2-clone")
    assert lifted.decision == "PASS" and Codec(GateDecided).decode((await kv.get(key)).value).id == lifted.id
    await artifacts.register_release(bus, "r2-again", "shop", arts)
    assert (await eval_run(settings, stack["sim"], "r2-again", files["strict"])).exit_code == 0


async def test_a_pass_judged_before_a_persons_reject_landed_is_judged_again_under_it(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: carol's reject was stored while the gatekeeper was judging a re-run of r2's eval, and the PASS it
    # made without seeing the reject was stored over it: the veto was gone and the router admitted r2.
    assert (await eval_run(settings, stack["sim"], "r2", files["strict"])).exit_code == 0
    person(settings, "carol", "approver")
    rejected: list[Result] = []
    judge = handlers.evaluated_rules

    async def reject_meanwhile(*args: Any) -> Any:  # a step of the judgement, after what is stored was read
        if not rejected:
            rejected.append(await review(settings, "carol", "reject", "r2", "tone regressed: do not ship"))
        return await judge(*args)

    monkeypatch.setattr(handlers, "evaluated_rules", reject_meanwhile)
    rerun = await eval_run(settings, stack["sim"], "r2", files["strict"])
    assert rejected and rejected[0].exit_code == 0, rejected and rejected[0].output
    assert json.loads(rejected[0].output)["decision"] == "BLOCK"
    assert rerun.exit_code == 5, rerun.output  # judged again, under the veto: held for review
    # What the CLI shows is its run's decision, not carol's reject announced while it waited.
    assert (json.loads(rerun.output)["decision"]["decision"], json.loads(rerun.output)["decision"]["eval_run"]) == \
        ("NEEDS_REVIEW", json.loads(rerun.output)["run_id"])
    held = await current_decision(bus, "r2")
    assert held.decision == "NEEDS_REVIEW" and trusted.verify(held) == held.key_id
    assert [r.rule for r in held.rules if r.verdict == "FAIL"] == ["vetoed"]
    assert "rejected by carol" in held.reason
    state = await canary(stack["router"], "r2")
    assert (state["phase"], state["weight"]) == ("idle", 0.0)


async def test_a_pass_of_another_name_stored_as_a_reject_reached_back_ends_under_it(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by code reading (probe fs): r2-clone's eval read no veto of its content (r2's PASS), then carol's reject
    # of r2 was stored, recorded for the content, and its pass over the content's names listed them before r2-clone's
    # PASS was stored. The PASS, judged without the veto and stored after the pass, kept its signed PASS.
    assert (await eval_run(settings, stack["sim"], "r2", files["strict"])).exit_code == 0
    await artifacts.register_release(bus, "r2-clone", "shop", (await artifacts.release_of(bus, "r2"))["artifacts"])
    person(settings, "carol", "approver")
    rejected: list[Result] = []
    judge = handlers.evaluated_rules

    async def reject_meanwhile(*args: Any) -> Any:  # after r2-clone's eval read the content's veto, before it stores
        if args[1].release == "r2-clone" and not rejected:
            rejected.append(await review(settings, "carol", "reject", "r2", "tone regressed: do not ship"))
        return await judge(*args)

    monkeypatch.setattr(handlers, "evaluated_rules", reject_meanwhile)
    rerun = await eval_run(settings, stack["sim"], "r2-clone", files["strict"])
    # The reject was stored and announced (its pass over the names done) before r2-clone's decision was stored.
    assert rejected and rejected[0].exit_code == 0, rejected and rejected[0].output
    veto = json.loads(rejected[0].output)
    assert rerun.exit_code == 5, rerun.output  # held for review: what its run shows is the decision that stands
    held = await current_decision(bus, "r2-clone")
    assert held.decision == "NEEDS_REVIEW" and trusted.verify(held) == held.key_id
    assert held.eval_run == json.loads(rerun.output)["run_id"]
    assert [(r.rule, r.verdict) for r in held.rules] == [("accuracy", "PASS"), ("latency", "PASS"), ("vetoed", "FAIL")]
    assert held.reason.startswith(f"release 'r2' was rejected by carol (decision {veto['id']}: "), held.reason
    state = await canary(stack["router"], "r2-clone")
    assert (state["phase"], state["weight"]) == ("idle", 0.0)


async def test_a_lift_by_an_approval_that_no_longer_counts_reaches_back_as_the_veto_it_lifted(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring
) -> None:
    # Found by code reading (probe fs): ann's approval of r2-clone lifted carol's veto of the content, and r2-again
    # was then judged afresh (a clean PASS). Once ann's key is revoked her lift counts for nothing: an eval of any
    # name of the content is held again. The reach-back read the lift without asking whether its approvals still
    # count: ann's approval recorded again (its message redelivered, or her revocation landing while it was being
    # recorded) left r2-again's PASS, which rests on no approval, serving the content carol rejected.
    await _rejected_by_carol(settings, stack, files)
    arts = (await artifacts.release_of(bus, "r2"))["artifacts"]
    await artifacts.register_release(bus, "r2-clone", "shop", arts)
    assert (await eval_run(settings, stack["sim"], "r2-clone", files["strict"])).exit_code == 5
    assert (await review(settings, "ann", "approve", "r2-clone", "tone checked again: fine")).exit_code == 0
    lifted = await current_decision(bus, "r2-clone")
    await artifacts.register_release(bus, "r2-again", "shop", arts)
    assert (await eval_run(settings, stack["sim"], "r2-again", files["strict"])).exit_code == 0
    fresh = await current_decision(bus, "r2-again")
    assert (lifted.decision, fresh.decision) == ("PASS", "PASS")
    reviews = [Codec(GateReview).decode(data) async for _, _, data in bus.stored_since(
        bus.subjects.streams["events"].name, bus.subjects.gate_review("r2-clone"), 0)]
    (approval,) = [r for r in reviews if r.action == "approve"]

    async def recorded_again() -> None:
        await stack["gatekeeper"].handlers.on_review(approval, Delivery(
            subject=bus.subjects.gate_review("r2-clone"), msg_id=approval.id, headers={}, deliveries=2, stream_seq=0))

    await recorded_again()  # while ann's approval counts, it stands: nothing changes
    assert (await current_decision(bus, "r2-clone"), await current_decision(bus, "r2-again")) == (lifted, fresh)

    revoke_person(trust_file_path(settings), "ann")
    await recorded_again()
    for release in ("r2-again", "r2-clone"):
        held = await current_decision(bus, release)
        assert held.decision == "NEEDS_REVIEW" and trusted.verify(held) == held.key_id, (release, held.reason)
        assert held.reason.startswith("the veto on release 'r2-clone' was lifted by approvals that no longer count "
                                      "(ann"), held.reason
        assert held.eval_run == {"r2-again": fresh, "r2-clone": lifted}[release].eval_run and held.approvals == []
    state = await canary(stack["router"], "r2-again")
    assert (state["phase"], state["weight"]) == ("idle", 0.0)


async def test_a_veto_recorded_under_the_content_key_of_before_binds_relabelled_names_once_read(
    bus: Bus, context: ServiceContext, run_services: Callable[..., Any], tmp_path: Path, settings: Settings,
    files: dict[str, str], trusted: Keyring
) -> None:
    # Found by code reading (probe fs): a veto an older gatekeeper recorded under the key of before (the artifacts'
    # labels) was found only through a name of those very labels. A name of the same content under another label,
    # gated before the upgrade, kept its PASS, and one registered after it got a signed PASS, until a name of the
    # veto's own labels was judged again.
    await register_model_release(bus, "r1", "good", temperature=0)
    await store_pass(bus, "r1", settings)
    arts = await register_model_release(bus, "r2", "good")
    [(label, config)] = arts.items()
    gatekeeper = ensure_signer_trusted(settings)
    veto = gatekeeper.sign(GateDecided(
        release="r2", decision="BLOCK", rules=[], artifacts=arts, reason="override: rejected by carol: tone regressed",
        reviewed_by="carol", tenant="default", source="gatekeeper"))
    kv = await bus.kv(bus.subjects.kv_vetoes)
    await kv.put(domain.legacy_veto_key(arts), encode(veto))
    await artifacts.register_release(bus, "r2-before", "shop", {"model_config/r2-config-x": config})
    await store_pass(bus, "r2-before", settings)  # gated before the veto, by a gatekeeper that did not reach back
    passed = await current_decision(bus, "r2-before")

    async with gated(context, run_services, tmp_path, {"shop": {"policy": "strict"}}) as stack:
        why = f"release 'r2' was rejected by carol (decision {veto.id}: override: rejected by carol: tone regressed"
        reached = await current_decision(bus, "r2-before")
        assert reached.decision == "NEEDS_REVIEW" and trusted.verify(reached) == reached.key_id
        assert reached.reason.startswith(why) and reached.eval_run == passed.eval_run, reached.reason
        assert Codec(GateDecided).decode((await kv.get(domain.veto_key("default", arts))).value).id in {
            veto.id, reached.id}  # recorded under the content's key
        await artifacts.register_release(bus, "r2-renamed", "shop", {"model_config/r2-config-y": config})
        rerun = await eval_run(settings, stack["sim"], "r2-renamed", files["strict"])
        assert rerun.exit_code == 5, rerun.output
        held = await current_decision(bus, "r2-renamed")
        assert held.decision == "NEEDS_REVIEW" and held.reason.startswith(why), held.reason
        assert label not in held.artifacts


async def test_eval_run_names_an_unregistered_release_or_a_bad_name_before_anything_runs(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str]
) -> None:
    # Before: a release nobody registered ran, and the evaluator refused it as "EvalRequested.endpoint is empty"
    # (blaming the endpoint) while a BLOCK of the unbound name was signed and audited; a bad name was a ValueError
    # traceback raised after the suite, dataset and policy were stored.
    for release, wanted in (("nope", "release 'nope' is not registered"), ("bad name", "invalid release 'bad name'")):
        refused = await eval_run(settings, "", release, files["strict"])
        said, answered = refused.output.strip().splitlines()  # the line on stderr, and (--json) on stdout
        assert refused.exit_code == 2 and said.startswith("error: ") and wanted in said, refused.output
        assert json.loads(answered) == {"error": said.removeprefix("error: "), "exit_code": 2}
    with pytest.raises(NotFound):  # nothing ran, so nothing was decided
        await current_decision(bus, "nope")


async def test_an_eval_result_redelivered_after_its_decision_was_reviewed_is_not_judged_again(
    bus: Bus, settings: Settings, stack: dict[str, Any], files: dict[str, str], trusted: Keyring
) -> None:
    # Found by a probe: a result redelivered after its decision was stored and then rejected (the gatekeeper stopped
    # before its ack) was judged again and stored over the reject, under the decision id the audit log and the
    # announcements had already taken for the first decision (their copies dropped as duplicates).
    passed = await eval_run(settings, stack["sim"], "r2", files["strict"])
    assert passed.exit_code == 0, passed.output
    run_id = json.loads(passed.output)["run_id"]
    person(settings, "carol", "approver")
    assert (await review(settings, "carol", "reject", "r2", "tone regressed")).exit_code == 0
    rejected = await current_decision(bus, "r2")
    results = [Codec(EvalCompleted).decode(data) async for _, _, data in bus.stored_since(
        bus.subjects.streams["events"].name, bus.subjects.eval_completed, 0)]
    (done,) = [r for r in results if r.run_id == run_id]
    await stack["gatekeeper"].handlers.on_eval_completed(done, Delivery(
        subject=bus.subjects.eval_completed, msg_id=done.id, headers={}, deliveries=2, stream_seq=0))
    assert await current_decision(bus, "r2") == rejected  # the reject stands, as stored and audited
