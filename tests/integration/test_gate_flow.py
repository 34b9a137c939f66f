"""Gatekeeper (+ router) on a real nats-server and chDB: eval results published directly, signed decisions out."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import msgspec
import pytest
from click.testing import CliRunner

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.cli.gate import ReviewRefused, current_decision, not_admitted, request_review
from lockgate.cli.main import cli
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import (
    BaselineComparison,
    DeadLetter,
    EvalCompleted,
    EvalRequested,
    GateAudited,
    GateDecided,
    GateReview,
    MetricInterval,
    ReleaseBinding,
)
from lockgate.errors import NotFound, ReleaseConflict
from lockgate.evalruns import binding_of, record_request
from lockgate.identity import (
    Identity,
    create_identity,
    identities_dir,
    load_identity,
    sign_review,
    statement_bytes,
)
from lockgate.ids import canonical_json, uuid7
from lockgate.server.apikeys import bootstrap
from lockgate.server.health import HealthServer
from lockgate.server.registry import ServiceSet
from lockgate.server.service import ServiceContext
from lockgate.services.query.decisions import decisions
from lockgate.signing import (
    Keyring,
    Signer,
    ensure_signer_trusted,
    public_pem,
    retire_key,
    revoke_key,
    revoke_person,
    trust_file_path,
    trust_key,
)
from lockgate.store import Store
from lockgate.subjects import Subjects, token
from lockgate.telemetry import Telemetry
from lockgate.v1 import gates_pb2, gates_pb2_grpc
from tests.helpers import admin_headers, grpc_key, person, register_model_release, sink_stored, store_pass
from tests.integration.test_aliases import lockgate as lockgate_cli

pytestmark = pytest.mark.timeout(60)
decided: Codec[GateDecided] = Codec(GateDecided)

POLICY = {
    "name": "release", "version": "1",
    "rules": [
        {"name": "no-regression", "metric": "exact_match", "relative": {"max_regression": 0.02}},
        {"name": "accuracy", "metric": "exact_match", "op": ">=", "threshold": 0.8},
        {"name": "latency", "metric": "latency_p95_ms", "op": "<=", "threshold": 2000},
    ],
    "review": {"require_when": [{"artifact_changed": "prompt/*"}]},
}


@pytest.fixture(autouse=True)
def trusted(settings: Settings) -> Keyring:
    """The gatekeeper's key in the trust file, as `lockgate up` writes it; the consumers' keyring."""
    ensure_signer_trusted(settings)
    return Keyring.from_settings(settings)


@pytest.fixture
async def gates(bus: Bus) -> AsyncIterator[Any]:
    sub = await bus.nc.subscribe(bus.subjects.gate_decided_all)
    yield sub
    await sub.unsubscribe()


async def next_decision(sub: Any) -> GateDecided:
    return decided.decode((await sub.next_msg(timeout=20)).data)


def completed(release: str, policy: str, *, em: float, em_ci: tuple[float, float], diff: float,
              diff_ci: tuple[float, float], n: int, **extra: Any) -> EvalCompleted:
    cmp = BaselineComparison(metric="exact_match", candidate=0.9 + diff, baseline=0.9, diff=diff,
                             diff_low=diff_ci[0], diff_high=diff_ci[1], n_pairs=n, test="paired_bootstrap")
    return EvalCompleted(
        run_id=f"run-{release}", release=release, suite="sha256:suite", baseline="v1", policy=policy, n_cases=n,
        metrics={"exact_match": em, "latency_p95_ms": 120.0},
        intervals={"exact_match": MetricInterval(estimate=em, low=em_ci[0], high=em_ci[1], n=n)},
        comparisons={"exact_match": cmp}, **extra)


def request_of(done: EvalCompleted, **changes: Any) -> EvalRequested:
    """The request `done` answers (the gatekeeper refuses results for runs nobody requested)."""
    fields = {"run_id": done.run_id, "release": done.release, "suite": done.suite, "policy": done.policy,
              "baseline": done.baseline, "endpoint": "http://127.0.0.1:9/v1", **changes}
    return EvalRequested(**fields)


async def started_on(bus: Bus, release: str) -> ReleaseBinding:
    """The release's binding now, as the evaluator reads it when a run starts."""
    try:
        return binding_of(await artifacts.release_of(bus, release))
    except NotFound:
        return binding_of(None)


async def finish_eval(bus: Bus, done: EvalCompleted) -> None:
    """What the evaluator does for a run: record the accepted request, read the release's binding as the run
    starts (unless `done` says another), later publish its result."""
    await record_request(bus, request_of(done))
    if done.binding is None:
        done = msgspec.structs.replace(done, binding=await started_on(bus, done.release))
    await bus.publish(bus.subjects.eval_completed, done)


async def register_policy(bus: Bus, doc: dict = POLICY) -> str:
    return (await artifacts.register(bus, "policy", doc["name"], doc)).hash


async def prompt(bus: Bus, text: str) -> str:
    """The hash of a registered `prompt/system` artifact with `text`."""
    return (await artifacts.register(bus, "prompt", "system", text, media_type="text/plain")).hash


async def register_release(bus: Bus, release: str, system_prompt: str, *, author: Identity | None = None,
                           tenant: str = "default", **more: str) -> dict[str, str]:
    """Register `release` of `tenant` as `lockgate release create` does (the gatekeeper passes no other), holding a
    `prompt/system` with `system_prompt` (and `more` `kind/name` -> hash); returns its artifact map."""
    arts = {"prompt/system": await prompt(bus, system_prompt), **more}
    await artifacts.register_release(bus, release, "shop", arts, author=author, tenant=tenant)
    return arts


async def test_regression_is_blocked_naming_the_rule_and_the_decision_is_signed(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any, trusted: Keyring, settings: Settings
) -> None:
    policy = await register_policy(bus)
    svcs = await run_services("sink", "query", "gatekeeper")
    dataset = await artifacts.register(bus, "dataset", "qa", [{"input": "q", "expected": "a"}])
    arts = await register_release(bus, "v2", "p1", **{"dataset/qa": dataset.hash})
    await register_release(bus, "v1", "p1", **{"dataset/qa": dataset.hash})  # the baseline: same artifacts
    await store_pass(bus, "v1", settings)  # a baseline the gate allows
    done = completed("v2", policy, em=0.78, em_ci=(0.75, 0.81), diff=-0.12, diff_ci=(-0.15, -0.09), n=400,
                     artifacts=arts)
    await finish_eval(bus, done)
    d = await next_decision(gates)

    assert (d.decision, d.eval_run) == ("BLOCK", "run-v2")
    assert [(r.rule, r.verdict) for r in d.rules] == [
        ("no-regression", "FAIL"), ("accuracy", "INCONCLUSIVE"), ("latency", "PASS")]
    assert "no-regression: exact_match fell 0.12 below baseline (0.9 -> 0.78)" in d.reason
    assert d.rules[0].low == -0.15 and d.rules[0].baseline == 0.9 and "eval_cases" in d.rules[0].hint
    assert d.artifacts == {**arts, "eval_suite": "sha256:suite", "policy": policy}
    assert trusted.verify(d) == d.key_id
    await sink_stored(svcs["sink"].handlers, gate_decisions=1)
    [row] = decisions(store, "v2")
    assert (row["action"], row["decision"], row["signature"], row["key_id"]) == (
        "decided", "BLOCK", d.signature, d.key_id)


async def test_noisy_small_sample_is_inconclusive_and_needs_review(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any, settings: Settings
) -> None:
    # Documented choice: INCONCLUSIVE beyond limits.max_inconclusive (default 0) -> NEEDS_REVIEW, never PASS.
    policy = await register_policy(bus, {k: v for k, v in POLICY.items() if k != "review"})
    await run_services("query", "gatekeeper")
    await register_release(bus, "v3", "p3")
    await register_release(bus, "v1", "p1")
    await store_pass(bus, "v1", settings)  # the baseline
    await finish_eval(bus,
                      completed("v3", policy, em=0.85, em_ci=(0.6, 1.0), diff=-0.05, diff_ci=(-0.3, 0.2), n=10))
    d = await next_decision(gates)
    assert d.decision == "NEEDS_REVIEW"
    assert [(r.rule, r.verdict) for r in d.rules][:2] == [("no-regression", "INCONCLUSIVE"),
                                                           ("accuracy", "INCONCLUSIVE")]
    assert "2 rule(s) inconclusive" in d.reason and "increase the sample to about" in d.rules[1].hint


async def test_consecutive_errors_are_counted_from_the_audit_log(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any
) -> None:
    doc = {"name": "errs", "limits": {"max_consecutive_errors": 1},
           "rules": [{"name": "lift", "metric": "exact_match", "relative": {"min_change": 0.1, "mode": "relative"}}]}
    policy = await register_policy(bus, doc)
    svcs = await run_services("sink", "query", "gatekeeper")
    await register_release(bus, "v4", "p4")
    seen = []
    for i in range(2):
        zero = BaselineComparison(metric="exact_match", candidate=0.1, baseline=0.0, diff=0.1)
        await finish_eval(bus, EvalCompleted(
            run_id=f"e{i}", release="v4", suite="s", policy=policy, metrics={"exact_match": 0.1},
            comparisons={"exact_match": zero}))
        seen.append(await next_decision(gates))
        # the count comes from the audit log, so the next eval waits for the sink to store this decision
        await sink_stored(svcs["sink"].handlers, gate_decisions=i + 1)
    assert [d.decision for d in seen] == ["NEEDS_REVIEW", "BLOCK"]
    assert "2 consecutive errored decisions exceed max_consecutive_errors 1" in seen[1].reason


async def test_a_pass_whose_rules_judged_nothing_says_so_in_gate_explain_and_the_audit_log(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any, settings: Settings
) -> None:
    # Found by probe p40 (F3): with two rules that judged nothing under no_data: pass (a hard max_count whose scorer
    # the suite left out; a slices rule whose every slice was under min_cases, then a PASS), the signed reason read
    # "all 3 rules of policy 'strict' passed". A slices rule that tests no slice is NO_DATA now, and the reason
    # counts only the rules that passed.
    doc = {"name": "strict", "rules": [
        {"name": "accuracy", "metric": "exact_match", "op": ">=", "threshold": 0.8},
        {"name": "safety", "metric": "pii_free", "max_count": 0, "hard": True, "no_data": "pass"},
        {"name": "per-lang", "metric": "exact_match", "no_data": "pass",
         "slices": {"max_regression": 0.05, "min_cases": 20}}]}
    policy = await register_policy(bus, doc)
    svcs = await run_services("sink", "query", "gatekeeper")
    arts = await register_release(bus, "v-nd", "p-nd")
    await register_release(bus, "v1", "p1")
    await store_pass(bus, "v1", settings)  # the baseline
    done = completed("v-nd", policy, em=0.97, em_ci=(0.95, 0.985), diff=0.0, diff_ci=(-0.01, 0.01), n=400,
                     artifacts=arts)
    de = BaselineComparison(metric="exact_match[lang=de]", candidate=0.3, baseline=0.9, diff=-0.6, diff_low=-0.9,
                            diff_high=-0.3, n_pairs=19, test="paired_bootstrap")
    await finish_eval(bus, msgspec.structs.replace(done, comparisons={**done.comparisons,
                                                                     "exact_match[lang=de]": de}))
    d = await next_decision(gates)
    assert [(r.rule, r.verdict) for r in d.rules] == [("accuracy", "PASS"), ("safety", "NO_DATA"),
                                                      ("per-lang", "NO_DATA")]
    reason = ("1 of 3 rules of policy 'strict' passed; 2 rule(s) had no data (no_data: pass): safety: pii_free has "
              "no failure count (pii_free_failures); per-lang: no slice of exact_match was tested, under min_cases "
              "20: lang=de -0.6 (n=19)")
    assert (d.decision, d.reason) == ("PASS", reason)
    explained = await asyncio.to_thread(lockgate_cli, settings, "gate", "explain", "v-nd")
    assert explained.exit_code == 0, explained.output
    said = " ".join(explained.output.split())  # the console wraps long lines
    assert f"reason: {reason}" in said, explained.output
    assert "- per-lang could not be judged: no slice of exact_match was tested, under min_cases 20: lang=de -0.6 " \
           "(n=19)." in said, explained.output
    await sink_stored(svcs["sink"].handlers, gate_decisions=1)
    [row] = decisions(store, "v-nd")
    assert (row["decision"], row["reason"]) == ("PASS", reason)


@pytest.fixture
async def services(context: ServiceContext, run_services: Any) -> Any:
    # No traffic flows in these tests, so the upstreams are never called.
    context.settings = context.settings.replace(stable_upstream="http://127.0.0.1:9/v1",
                                                canary_upstream="http://127.0.0.1:9/v1", deployment="chat")
    svcs = await run_services("sink", "query", "gatekeeper", "router")
    # The releases rolled out below, each with its model config; the canaries change the system prompt.
    for release in ("v1", "v5", "v6", "v7"):
        text = "old" if release == "v1" else f"new-{release}"
        await register_model_release(context.bus, release,
                                     extra_artifacts={"prompt/system": await prompt(context.bus, text)})
    await store_pass(context.bus, "v1", context.settings)  # the stable the canaries start from passed its gate
    return svcs


@pytest.fixture
def router(services: Any) -> Any:
    return services["router"]


async def test_high_risk_change_waits_for_approval_and_router_holds(
    bus: Bus, store: Store, router: Any, services: Any, gates: Any, trusted: Keyring, settings: Settings
) -> None:
    policy = await register_policy(bus)
    good = completed("v5", policy, em=0.9, em_ci=(0.88, 0.92), diff=0.0, diff_ci=(-0.01, 0.01), n=2000,
                     artifacts=(await artifacts.release_of(bus, "v5"))["artifacts"])
    await finish_eval(bus, good)
    held = await next_decision(gates)
    assert held.decision == "NEEDS_REVIEW" and held.review_required == "artifact_changed prompt/*: prompt/system"
    assert [r.verdict for r in held.rules] == ["PASS", "PASS", "PASS"]

    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http:
        body = {"stable_release": "v1", "canary_release": "v5"}
        async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
            state = await resp.json()
    # The canary started after the decision was in KV: the router read and verified it, and held.
    assert (state["phase"], state["weight"]) == ("idle", 0.0)  # awaiting review takes no traffic

    ann = person(settings, "ann", "approver")
    approved = await request_review(bus, "v5", "approve", ann, "prompt diff reviewed", timeout_s=20)
    assert (approved.decision, approved.reviewed_by, approved.approvals) == ("PASS", "ann", ["ann"])
    assert "approved by ann" in approved.reason
    # The trust roots as they are now (`trusted` was read before ann was): an approval counts while its person does.
    assert Keyring.from_settings(settings).verify(approved) == held.key_id
    await router.rollouts.wait_for(lambda routes: routes["chat"].phase == "promoted", timeout=20)
    await sink_stored(services["sink"].handlers, gate_decisions=2)
    history = [(r["action"], r["decision"], r["actor"]) for r in decisions(store, "v5")]
    assert history == [("approved", "PASS", "ann"), ("decided", "NEEDS_REVIEW", "gatekeeper")]

    # A second approval has nothing pending: the CLI refuses it, and so does the gatekeeper.
    with pytest.raises(Exception, match="not NEEDS_REVIEW"):
        await request_review(bus, "v5", "approve", ann, "again", timeout_s=5)


async def test_tampered_decision_fails_verify_and_router_dead_letters_it(
    bus: Bus, store: Store, router: Any, gates: Any, settings: Any, tmp_path: Path, trusted: Keyring
) -> None:
    policy = await register_policy(bus)
    await finish_eval(bus,
                      completed("v6", policy, em=0.5, em_ci=(0.45, 0.55), diff=-0.4, diff_ci=(-0.45, -0.35), n=500))
    genuine = await next_decision(gates)
    assert genuine.decision == "BLOCK"
    tampered = msgspec.structs.replace(genuine, decision="PASS")

    key = tmp_path / "gatekeeper.pub.pem"
    key.write_bytes(public_pem(trusted.keys[genuine.key_id]))
    good_file, bad_file = tmp_path / "good.json", tmp_path / "bad.json"
    good_file.write_bytes(msgspec.json.encode(genuine))
    bad_file.write_bytes(msgspec.json.encode(tampered))
    base = ["--nats", settings.nats_url, "--prefix", settings.prefix, "gate", "verify"]
    runner = CliRunner()

    def run_all(*commands: tuple[str, ...], trust: Path = trust_file_path(settings)) -> list[Any]:
        # One thread, one after another: CliRunner swaps the process-wide sys.stdout/stderr.
        env = {"LOCKGATE_TRUST_FILE": str(trust)}  # the stack's trust roots
        return [runner.invoke(cli, [*base, *args], catch_exceptions=False, env=env) for args in commands]

    offline = ("--file", str(good_file), "--key", str(key))
    ok, bad, stack, genuine_only, stack_only, as_json = await asyncio.to_thread(
        run_all, offline, ("--file", str(bad_file), "--key", str(key)), ("v6",), (*offline, "--authentic-only"),
        ("v6", "--authentic-only"), ("v6", "--json"))
    assert bad.exit_code == 4 and len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith("error: signature invalid") and "altered after signing" in bad.stderr
    # Found by a probe (p20 F4): a genuine BLOCK, saved or the stack's, exited 0 ("ok: ... (v6: BLOCK)"), and a
    # pipeline's `lockgate gate verify v6 && deploy` shipped it. An authentic decision that admits nothing exits 5
    # (as `eval run` of a gate that did not pass), saying what it is; --authentic-only asks only "is it genuine".
    said = f"decision {genuine.id} (v6: BLOCK, decided {genuine.time:%Y-%m-%d %H:%M:%S}Z) is signed by key " \
           f"{genuine.key_id}: authentic, but a BLOCK admits nothing"
    for refused in (ok, stack):
        assert refused.exit_code == 5, refused.output
        assert refused.stderr.startswith(f"error: {said}") and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert refused.stdout == ""
    for authentic in (genuine_only, stack_only):
        assert authentic.exit_code == 0, authentic.output
        assert authentic.stdout == f"ok: {said.replace(': authentic, but', ' (authentic, but')})\n"
    # --json: what a script reads, the decision's time (a consumer's freshness check: p20 F5) and whether it admits.
    assert as_json.exit_code == 5 and len(as_json.stderr.splitlines()) == 1, as_json.output
    doc = json.loads(as_json.stdout)
    assert (doc["release"], doc["decision"], doc["key_id"], doc["admits"]) == ("v6", "BLOCK", genuine.key_id, False)
    assert doc["not_admitted"] == "a BLOCK admits nothing" and doc["time"] == msgspec.json.decode(
        msgspec.json.encode(genuine))["time"]
    # p20 F13: offline without the trust file, nothing here knows a revoked key: said on stderr, one line.
    [blind] = await asyncio.to_thread(run_all, (*offline, "--authentic-only"), trust=tmp_path / "absent.json")
    assert blind.exit_code == 0 and blind.stdout.startswith("ok: "), blind.output
    [warned] = blind.stderr.splitlines()
    assert warned.startswith(f"warning: no trust file at {tmp_path / 'absent.json'}: revocations") and \
        "a revoked key's decision verifies" in warned
    # The stack's trust file is there: no warning.
    assert genuine_only.stderr == ""
    # Its attestation: `attest verify` (and `lockgate verify`) exit 5 alike; --authentic-only 0.
    person(settings, "ann", "operator")
    att = tmp_path / "v6.intoto.json"

    def attested() -> list[Any]:
        return [lockgate_cli(settings, *args) for args in (
            ("--as", "ann", "attest", "decision", "v6", "--out", str(att)), ("attest", "verify", str(att)),
            ("verify", str(att), "--json"), ("attest", "verify", str(att), "--authentic-only"))]

    made, verified, verified_json, verified_only = await asyncio.to_thread(attested)
    assert made.exit_code == 0, made.output
    said = f"decision BLOCK for v6, attested by ann; decision signed by key {genuine.key_id}, decided " \
           f"{genuine.time:%Y-%m-%d %H:%M:%S}Z"
    assert verified.exit_code == 5 and verified.stderr == f"error: {said}: authentic, but a BLOCK admits nothing " \
        "(--authentic-only checks only that it is genuine)\n", verified.output
    assert verified_json.exit_code == 5
    doc = json.loads(verified_json.stdout)
    assert (doc["decision"], doc["admits"], doc["not_admitted"]) == ("BLOCK", False, "a BLOCK admits nothing")
    assert doc["time"] == msgspec.json.decode(msgspec.json.encode(genuine))["time"]
    assert verified_only.exit_code == 0 and verified_only.stdout == \
        f"verified: {said} (authentic, but a BLOCK admits nothing)\n", verified_only.output

    dlq = await bus.nc.subscribe(bus.subjects.dlq("router"))
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http:
        body = {"stable_release": "v1", "canary_release": "v6", "initial_weight": 0}
        async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
            assert (await resp.json())["phase"] == "aborted"  # the genuine BLOCK from KV
        body["canary_release"] = "v7"
        async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
            assert (await resp.json())["phase"] == "idle"
    forged = msgspec.structs.replace(genuine, release="v7", decision="PASS")
    await bus.publish(bus.subjects.gate_decided("v7"), forged)
    letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=10)).data)
    await dlq.unsubscribe()
    assert letter.origin == "router" and letter.error.startswith("signature invalid")
    assert router.rollouts.route("chat").phase == "idle" and router.rollouts.route("chat").canary.release == "v7"
    explained = await asyncio.to_thread(runner.invoke, cli, ["--nats", settings.nats_url, "--prefix",
                                                             settings.prefix, "gate", "explain", "v6", "--json"])
    assert json.loads(explained.output)["decision"] == "BLOCK"
    assert (await current_decision(bus, "v6")) == genuine


async def _verified_admitting_nothing(bus: Bus, settings: Settings, pass_: GateDecided, why: str) -> None:
    """`gate verify` of `pass_`'s release exits 5 saying `why` (in one line, and as JSON), 0 with --authentic-only;
    and what `alias set` and `apply` warn with reads it alike."""
    release = pass_.release
    refused, as_json, authentic = [await asyncio.to_thread(lockgate_cli, settings, "gate", "verify", release, *args)
                                   for args in ((), ("--json",), ("--authentic-only",))]
    assert refused.exit_code == 5 and refused.stdout == "", refused.output
    assert refused.stderr.startswith(f"error: decision {pass_.id} ({release}: PASS") and \
        f"authentic, but {why}" in refused.stderr and len(refused.stderr.splitlines()) == 1, refused.stderr
    doc = json.loads(as_json.stdout)
    assert as_json.exit_code == 5 and (doc["admits"], doc["not_admitted"]) == (False, why), as_json.output
    assert authentic.exit_code == 0 and authentic.stdout.endswith(f"(authentic, but {why})\n"), authentic.output
    assert await not_admitted(bus, Keyring.from_settings(settings), release) == \
        f"{release}'s gate decision {pass_.id} is a PASS: {why}"


async def test_gate_verify_admits_no_pass_that_judged_other_content_than_its_release_name_holds(
    bus: Bus, settings: Settings
) -> None:
    # Found by probe p32 (F1), when a binding could expire and its name bind again to other content: the router
    # compares the content a PASS judged with the binding and refused it (409), while `gate verify` checked only the
    # signature and exited 0. A binding no longer expires (the next test), but `gate verify` compares them alike.
    judged_ = await artifacts.register(bus, "model_config", "p32-config", {"model": "m"})
    other = await artifacts.register(bus, "model_config", "p32-config", {"model": "never-judged"})
    await artifacts.register_release(bus, "v-p32", "shop", {"model_config/p32-config": other.hash})
    await store_pass(bus, "v-p32", settings, judged={"model_config/p32-config": judged_.hash})
    why = (f"the decision judged other content than the release holds (model_config/p32-config judged "
           f"{judged_.hash}, release holds {other.hash})")
    await _verified_admitting_nothing(bus, settings, await current_decision(bus, "v-p32"), why)


async def test_a_release_name_bound_to_expire_binds_nothing_so_nothing_is_decided_or_served_on_it(
    bus: Bus, router: Any, gates: Any, trusted: Keyring
) -> None:
    # Found by probe p33 (F1, F2): the releases bucket honours a message's own Nats-TTL (nats-server will not turn
    # that off on a bucket nats-py made), and an identity that may bind names (operator) bound one to expire. Its
    # eval under the lax policy of an app no gates file covers was a PASS; once the binding ran out, the name bound
    # again to the same content under the covered app (or in another tenant than a person's reject of it) and that
    # PASS admitted it: `gate verify` exit 0, rolled out at 100%. Now such a binding binds nothing, for every reader.
    config = await artifacts.register(bus, "model_config", "ttl-config", {"model": "m"})
    bundle = artifacts.release_bundle("v-ttl", "other", {"model_config/ttl-config": config.hash})
    await (await bus.kv(bus.subjects.kv_releases)).create(token("v-ttl"), canonical_json(bundle), msg_ttl=3600)
    why = "release 'v-ttl' is not registered (its binding was written to expire (Nats-TTL): a release name is " \
          "bound for good)"
    with pytest.raises(artifacts.TakenUnbound) as unbound:
        await artifacts.release_of(bus, "v-ttl")
    assert unbound.value.message == why
    # Registering it as `release create` does is refused, rather than taken for the same content already bound.
    with pytest.raises(ReleaseConflict, match=re.escape(why)):
        await artifacts.register_release(bus, "v-ttl", "other", {"model_config/ttl-config": config.hash})

    # The gate decides nothing on it, however good its eval: a BLOCK, as for a name never registered.
    policy = await register_policy(bus, {k: v for k, v in POLICY.items() if k != "review"})
    await finish_eval(bus, completed("v-ttl", policy, em=0.99, em_ci=(0.98, 1.0), diff=0.0, diff_ci=(-0.01, 0.01),
                                     n=2000))
    d = await next_decision(gates)
    assert (d.release, d.decision) == ("v-ttl", "BLOCK") and trusted.verify(d) == d.key_id
    assert [r.rule for r in d.rules if r.verdict == "FAIL"] == ["release_registered"]
    # Nor does the router roll it out.
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http:
        async with http.put(f"{router.url}/lockgate/v1/deployments/fresh", json={"stable_release": "v-ttl"}) as resp:
            answer = await resp.json()
    assert resp.status == 400 and answer["error"]["message"] == why, answer
    assert "fresh" not in router.rollouts.routes


async def test_gate_verify_admits_no_pass_whose_release_name_is_bound_to_nothing(
    bus: Bus, settings: Settings, router: Any
) -> None:
    # The router serves no release without a binding (a PASS for it admits nothing: `_about_bound_content`), while
    # `gate verify` found nothing to compare, exited 0 and said the PASS admits (probe p32, a binding that expired).
    config = await artifacts.register(bus, "model_config", "unbound-config", {"model": "m"})
    judged = {"model_config/unbound-config": config.hash}
    await store_pass(bus, "v-unbound", settings, judged=judged)
    pass_ = await current_decision(bus, "v-unbound")
    why = "its release name is bound to nothing now: release 'v-unbound' is not registered (`lockgate release " \
          "create`, or `apply`)"
    await _verified_admitting_nothing(bus, settings, pass_, why)
    # What the CLI says the router does: it rolls the release out nowhere.
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http:
        async with http.put(f"{router.url}/lockgate/v1/deployments/fresh",
                            json={"stable_release": "v-unbound"}) as resp:
            answer = await resp.json()
    assert resp.status == 400 and answer["error"]["message"] == "release 'v-unbound' is not registered (`lockgate " \
        "release create`, or `apply`)", answer
    assert "fresh" not in router.rollouts.routes
    # Bound to the content it judged, the PASS admits it: it is the binding that was missing.
    await artifacts.register_release(bus, "v-unbound", "shop", judged)
    again = await asyncio.to_thread(lockgate_cli, settings, "gate", "verify", "v-unbound")
    assert again.exit_code == 0 and again.stdout.startswith(f"ok: decision {pass_.id} (v-unbound: PASS"), again.output


async def test_a_pass_resting_on_an_approval_admits_nothing_once_the_approvers_key_is_revoked(
    bus: Bus, router: Any, run_services: Callable[..., Any], gates: Any, settings: Settings
) -> None:
    # Before (probe p3, finding 2): after `gate revoke --person dave` (his key leaked), the PASS his approval alone
    # made of a NEEDS_REVIEW still verified (`gate verify` exit 0, gRPC PASS) and admitted a new rollout at 10%.
    policy = await register_policy(bus)
    await finish_eval(bus, completed("v5", policy, em=0.9, em_ci=(0.88, 0.92), diff=0.0, diff_ci=(-0.01, 0.01),
                                     n=2000, artifacts=(await artifacts.release_of(bus, "v5"))["artifacts"]))
    assert (await next_decision(gates)).decision == "NEEDS_REVIEW"
    dave = person(settings, "dave", "approver")
    approved = await request_review(bus, "v5", "approve", dave, "prompt diff reviewed", timeout_s=20)
    assert (approved.decision, approved.approvals, approved.approval_keys) == ("PASS", ["dave"], [dave.key_id])
    gateway = (await run_services("gateway"))["gateway"]
    app_key = bootstrap(settings.home, tenant="default", app="shop").app_key
    s = router.ctx.settings
    runner = CliRunner()

    def lockgate(*args: str) -> Any:
        return runner.invoke(cli, ["--home", s.home, "--nats", s.nats_url, "--prefix", s.prefix, *args])

    start = {"stable_release": "v1", "canary_release": "v5", "strategy": {"steps": [10, 50, 100], "interval_s": 3600}}
    deployment = f"{router.url}/lockgate/v1/deployments/chat"
    async with aiohttp.ClientSession(headers=admin_headers(s.home)) as http, \
            grpc.aio.insecure_channel(gateway.endpoints["grpc"], interceptors=grpc_key(app_key)) as channel:
        stub = gates_pb2_grpc.GatesStub(channel)
        assert (await stub.GetDecision(gates_pb2.GetDecisionRequest(release="v5"), timeout=10)).decision == "PASS"
        assert (await asyncio.to_thread(lockgate, "gate", "verify", "v5")).exit_code == 0
        person(settings, "ann", "operator")
        att = str(Path(s.home) / "v5.intoto.json")
        made = await asyncio.to_thread(lockgate, "--as", "ann", "attest", "decision", "v5", "--out", att)
        assert made.exit_code == 0, made.output
        admitted = await asyncio.to_thread(lockgate, "attest", "verify", att, "--json")
        assert admitted.exit_code == 0, admitted.output
        doc = json.loads(admitted.stdout)
        assert (doc["decision"], doc["admits"]) == ("PASS", True) and "not_admitted" not in doc
        assert doc["time"] == json.loads(msgspec.json.encode(approved))["time"]  # when it was decided (p20 F5)
        async with http.put(deployment, json=start) as resp:
            state = await resp.json()
        assert resp.status == 200 and (state["phase"], state["weight"]) == ("progressing", 10.0), state

        revoked = await asyncio.to_thread(lockgate, "gate", "revoke", "--person", "dave")
        assert revoked.exit_code == 0, revoked.output
        withdrawn = f"the approval by dave (key {dave.key_id}) no longer counts: dave's key {dave.key_id} is revoked"
        # The canary it admitted goes back to 0% at once, with nothing asking to raise it (before: it kept its 10%
        # until its next step, an hour later by default, or for good while paused).
        await router.rollouts.wait_for(lambda r: r["chat"].weight == 0.0, timeout=10)
        route = router.rollouts.route("chat")
        assert route.phase == "idle" and withdrawn in route.reason, route.reason
        assert f"canary v5 back to 0%: admitted by gate decision {approved.id}" in route.reason
        async with http.post(f"{deployment}/abort") as resp:
            assert resp.status == 200, await resp.text()
        async with http.put(deployment, json={**start, "strategy": None, "initial_weight": 10}) as resp:
            refused = await resp.json()
        assert resp.status == 409 and refused["error"]["code"] == "not_admitted", refused
        assert withdrawn in refused["error"]["message"] and "re-gate v5" in refused["error"]["message"]
        assert router.rollouts.route("chat").weight == 0.0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetDecision(gates_pb2.GetDecisionRequest(release="v5"), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and withdrawn in err.value.details()
        verified = await asyncio.to_thread(lockgate, "gate", "verify", "v5")
        assert verified.exit_code == 4 and withdrawn in verified.stderr, verified.output
        # Found by a probe (p20 F1): its attestation, made while the approval counted, still verified ("decision
        # PASS", exit 0) for a pipeline admitting on `lockgate verify FILE`. It is refused as `gate verify` refuses
        # the PASS, --authentic-only too: it is no longer what the gate allows.
        for args in (("attest", "verify", att), ("verify", att, "--authentic-only")):
            refused = await asyncio.to_thread(lockgate, *args)
            assert refused.exit_code == 4 and withdrawn in refused.stderr, refused.output
            assert len(refused.stderr.splitlines()) == 1


async def test_forged_eval_results_get_no_decision_and_are_dead_lettered(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any
) -> None:
    # Issue 7: a forged EvalCompleted published on the bus was signed PASS by the real gatekeeper.
    policy = await register_policy(bus)
    await register_release(bus, "v9", "p9")
    svcs = await run_services("sink", "query", "gatekeeper")
    dlq = await bus.nc.subscribe(bus.subjects.dlq("gatekeeper"))
    great = {"em": 0.99, "em_ci": (0.98, 1.0), "diff": 0.0, "diff_ci": (-0.01, 0.01), "n": 2000}

    unrequested = completed("v8", policy, **great)  # no evaluator ever accepted run-v8
    await bus.publish(bus.subjects.eval_completed, unrequested)
    other = completed("v9", policy, **great)  # a real request for v9, answered with v8-evil's result
    await record_request(bus, request_of(other))
    swapped = msgspec.structs.replace(other, release="v8-evil", id=uuid7())
    await bus.publish(bus.subjects.eval_completed, swapped)

    letters = [Codec(DeadLetter).decode((await dlq.next_msg(timeout=20)).data) for _ in range(2)]
    errors = {forged.id: next(lt.error for lt in letters if forged.id in lt.error) for forged in (unrequested, swapped)}
    assert "no evaluator recorded a request" in errors[unrequested.id]
    assert "release 'v8-evil' != requested 'v9'" in errors[swapped.id]
    assert {lt.origin for lt in letters} == {"gatekeeper"}
    # The genuine result for the requested run is still judged, and it is the only decision made.
    await bus.publish(bus.subjects.eval_completed, other)
    d = await next_decision(gates)
    assert (d.release, d.eval_run) == ("v9", "run-v9")
    await sink_stored(svcs["sink"].handlers, gate_decisions=1)
    assert [r["release"] for r in store.rows("SELECT release FROM gate_decisions")] == ["v9"]
    await dlq.unsubscribe()


async def test_an_unregistered_release_is_blocked_and_registering_it_later_does_not_admit_it(
    bus: Bus, router: Any, gates: Any, trusted: Keyring
) -> None:
    # Before: the gatekeeper signed a PASS for whatever release an eval named. Names bind once, so whoever
    # registered v15 afterwards had the router admit it on that PASS, whatever it held.
    policy = await register_policy(bus, {k: v for k, v in POLICY.items() if k != "review"})
    await finish_eval(bus, completed("v15", policy, em=0.99, em_ci=(0.98, 1.0), diff=0.0, diff_ci=(-0.01, 0.01),
                                     n=2000))
    d = await next_decision(gates)
    assert (d.release, d.decision) == ("v15", "BLOCK")
    assert d.reason.startswith("release 'v15' is not registered: register it with `lockgate release create` "
                               "(or apply) before gating it")
    assert [r.rule for r in d.rules if r.verdict == "FAIL"] == ["release_registered"]
    assert trusted.verify(d) == d.key_id
    assert (await current_decision(bus, "v15")) == d  # signed, in KV

    await register_model_release(bus, "v15")
    async with aiohttp.ClientSession(headers=admin_headers(router.ctx.settings.home)) as http:
        body = {"stable_release": "v1", "canary_release": "v15"}
        async with http.put(f"{router.url}/lockgate/v1/deployments/chat", json=body) as resp:
            state = await resp.json()
    assert (state["phase"], state["weight"]) == ("aborted", 0.0)  # the BLOCK from KV; no PASS exists
    assert (await current_decision(bus, "v15")) == d


async def test_a_result_about_other_than_the_release_as_bound_now_is_blocked_however_good(
    bus: Bus, run_services: Callable[..., Any], gates: Any, trusted: Keyring, settings: Settings
) -> None:
    # Before: the gate compared the release's binding with the artifacts the evaluator read when the run
    # finished. A run that started on a name bound to nothing (it called what its request named) was passed
    # once the name was registered during it, and nothing compared the model it called with the release's.
    policy = await register_policy(bus, {k: v for k, v in POLICY.items() if k != "review"})
    await run_services("sink", "query", "gatekeeper")
    arts = await register_model_release(bus, "v17", "m")  # ships model m at the allow-list's `default`
    await register_release(bus, "v1", "p1")
    await store_pass(bus, "v1", settings)  # the baseline
    bound = await started_on(bus, "v17")
    shipped = {"task": "call", "model": "m", "endpoint": "default"}
    results = {  # what an evaluator could say about a run of v17, every metric great
        "as bound": {"binding": bound, "environment": shipped},
        "registered during the run": {"binding": binding_of(None), "environment": shipped},
        "another model": {"binding": bound, "environment": {**shipped, "model": "strong"}},
        "another endpoint": {"binding": bound, "environment": {**shipped, "endpoint": "http://10.0.0.9/v1"}},
        "scored served events": {"binding": bound, "environment": {**shipped, "task": "recorded", "model": ""}},
        "not said (an older evaluator)": {"binding": None, "environment": shipped},
    }
    got = {}
    for i, (case, said) in enumerate(results.items()):
        done = msgspec.structs.replace(completed("v17", policy, em=0.99, em_ci=(0.98, 1.0), diff=0.0,
                                                 diff_ci=(-0.01, 0.01), n=2000, artifacts=arts),
                                       run_id=f"run-v17-{i}", **said)
        await record_request(bus, request_of(done))
        await bus.publish(bus.subjects.eval_completed, done)
        got[case] = await next_decision(gates)
        assert trusted.verify(got[case]) == got[case].key_id
    fails = {case: [(r.rule, r.hint) for r in d.rules if r.verdict == "FAIL"] for case, d in got.items()}
    assert {case: d.decision for case, d in got.items()} == {
        "as bound": "PASS", "registered during the run": "BLOCK", "another model": "BLOCK",
        "another endpoint": "BLOCK", "scored served events": "PASS", "not said (an older evaluator)": "BLOCK"}
    [(rule, hint)] = fails["registered during the run"]
    assert rule == "release_registered" and hint.startswith(
        f"release 'v17' was not registered when eval run run-v17-1 started and was registered during it (bundle "
        f"{bound.bundle})")
    config = arts["model_config/v17-config"]
    assert fails["another model"] == [("release_model", f"the eval called model 'strong', the release ships 'm' "
                                                        f"({config}): the gate judges what release 'v17' ships; run the "
                                                        "eval without --model and --endpoint")]
    assert [r for r, _ in fails["another endpoint"]] == ["release_model"]
    assert "endpoint 'http://10.0.0.9/v1', the release ships 'default'" in fails["another endpoint"][0][1]
    [(rule, hint)] = fails["not said (an older evaluator)"]
    assert rule == "release_binding" and "does not say which binding of release 'v17' it evaluated" in hint
    assert got["registered during the run"].reason.startswith("release 'v17' was not registered when eval run")


async def test_an_approval_never_passes_a_release_that_is_not_registered_or_holds_other_content(
    bus: Bus, run_services: Callable[..., Any], audit: Any, settings: Settings
) -> None:
    # A NEEDS_REVIEW decided before the gate checked registration, by a key the gatekeeper trusts.
    await run_services("sink", "query", "gatekeeper")
    earlier = Signer.generate()
    trust_key(trust_file_path(settings), earlier.public)
    pending = earlier.sign(GateDecided(
        release="v16", decision="NEEDS_REVIEW", rules=[], review_required="artifact_changed prompt/*: prompt/system",
        artifacts={"prompt/system": await prompt(bus, "the prompt that was judged")}))
    await (await bus.kv(bus.subjects.kv_gates)).put(token("v16"), msgspec.json.encode(pending))
    ann = person(settings, "ann", "approver")

    async def approve() -> GateAudited:
        await bus.publish(bus.subjects.gate_review("v16"), sign_review(ann, GateReview(
            release="v16", action="approve", actor="ann", reason="lgtm", decision_id=pending.id)))
        return await next_refusal(audit)

    assert "release 'v16' is not registered" in (await approve()).reason
    await register_release(bus, "v16", "another prompt, registered afterwards")
    row = await approve()
    assert "other artifacts than release 'v16' is registered with (prompt/system judged" in row.reason
    assert row.actor == "ann"
    assert (await current_decision(bus, "v16")) == pending  # still NEEDS_REVIEW, never PASS


# Reviews are signed by people (issue 7: "`lockgate gate approve --actor` is free text, and anyone on the
# bus can publish a review").

audited: Codec[GateAudited] = Codec(GateAudited)


@pytest.fixture
async def audit(bus: Bus) -> AsyncIterator[Any]:
    sub = await bus.nc.subscribe(bus.subjects.gate_audit)
    yield sub
    await sub.unsubscribe()


async def next_refusal(sub: Any) -> GateAudited:
    while True:
        row = audited.decode((await sub.next_msg(timeout=20)).data)
        if row.action == "refused":
            return row


async def held_for_review(bus: Bus, settings: Settings, gates: Any, release: str, review: dict | None = None,
                          author: Identity | None = None, tenant: str = "default") -> GateDecided:
    """Register `release` of `tenant` (signed by `author` if given), gate it under a policy whose prompt change needs
    review (`review` adds to that section) against baseline v1 (PASSed), and return the NEEDS_REVIEW decision."""
    policy = await register_policy(bus, {**POLICY, "review": {**POLICY["review"], **(review or {})}})
    await register_release(bus, "v1", "old")
    await store_pass(bus, "v1", settings)
    arts = await register_release(bus, release, f"new-{release}", author=author, tenant=tenant)
    await finish_eval(bus, completed(release, policy, em=0.9, em_ci=(0.88, 0.92), diff=0.0, diff_ci=(-0.01, 0.01),
                                     n=2000, artifacts=arts))
    held = await next_decision(gates)
    while held.release != release:  # decisions about earlier releases of the test may still arrive
        held = await next_decision(gates)
    assert held.decision == "NEEDS_REVIEW"
    return held


async def test_unsigned_or_forged_reviews_on_the_bus_are_refused_and_dead_lettered(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any, audit: Any, settings: Settings
) -> None:
    svcs = await run_services("sink", "query", "gatekeeper")
    held = await held_for_review(bus, settings, gates, "v10")
    dlq = await bus.nc.subscribe(bus.subjects.dlq("gatekeeper"))
    ann = person(settings, "ann", "approver")
    ops = person(settings, "ops", "operator")
    stranger = create_identity(settings, "stranger")  # a key nobody trusted

    def base() -> GateReview:  # each its own event id: JetStream drops a repeated one
        return GateReview(release="v10", action="approve", actor="ann", reason="lgtm", decision_id=held.id)

    forged = {
        "not signed by a person": base(),  # anyone on the bus, claiming to be ann: before, this was PASS
        "no person's": sign_review(stranger, base()),
        "it needs approver or admin": sign_review(ops, base()),
        "altered after signing": msgspec.structs.replace(sign_review(ann, base()), reason="lgtm, and the next"),
        # a real approver, validly signing a review that names someone else
        "claims actor 'ann' but is signed by bob": _lying(person(settings, "bob", "approver"), base()),
    }
    for why, review in forged.items():
        await bus.publish(bus.subjects.gate_review("v10"), review)
        row = await next_refusal(audit)
        letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=20)).data)
        assert why in row.reason and why in letter.error, (why, row.reason, letter.error)
        assert row.actor == "unverified" and letter.origin == "gatekeeper"
    assert (await current_decision(bus, "v10")) == held  # still NEEDS_REVIEW, nothing re-signed
    await dlq.unsubscribe()

    approved = await request_review(bus, "v10", "approve", ann, "prompt diff read", timeout_s=20)
    assert (approved.decision, approved.reviewed_by) == ("PASS", "ann")
    await sink_stored(svcs["sink"].handlers, gate_decisions=7)
    history = [(r["action"], r["actor"]) for r in decisions(store, "v10")]
    assert history[0] == ("approved", "ann") and history.count(("refused", "unverified")) == 5


def _lying(ident: Identity, review: GateReview) -> GateReview:
    """Validly signed by `ident`, but with `review.actor` (someone else) inside the signed bytes."""
    unsigned = msgspec.structs.replace(review, key_id=ident.key_id, signature="")
    return msgspec.structs.replace(unsigned, signature=ident.sign(statement_bytes(unsigned)))


async def test_two_distinct_approvers_are_needed_and_the_same_one_twice_does_not_pass(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any, audit: Any, settings: Settings
) -> None:
    await run_services("sink", "query", "gatekeeper")
    await held_for_review(bus, settings, gates, "v11", {"approvals": 2})
    ann, bob = person(settings, "ann", "approver"), person(settings, "bob", "admin")

    first = await request_review(bus, "v11", "approve", ann, "looks fine", timeout_s=20)
    assert (first.decision, first.approvals) == ("NEEDS_REVIEW", ["ann"]) and "1 of 2" in first.reason
    assert Keyring.from_settings(settings).verify(first) == first.key_id  # re-signed by the gatekeeper
    # ann again, straight on the bus (the CLI refuses it before sending): counted once, so refused
    await bus.publish(bus.subjects.gate_review("v11"), sign_review(ann, GateReview(
        release="v11", action="approve", actor="ann", reason="really fine", decision_id=first.id)))
    assert "ann already approved" in (await next_refusal(audit)).reason
    assert (await current_decision(bus, "v11")) == first
    with pytest.raises(ReviewRefused, match="ann already approved"):
        await request_review(bus, "v11", "approve", ann, "really fine", timeout_s=5)

    second = await request_review(bus, "v11", "approve", bob, "agreed", timeout_s=20)
    assert (second.decision, second.approvals, second.reviewed_by) == ("PASS", ["ann", "bob"], "bob")


async def test_the_author_cannot_approve_their_own_release_when_the_policy_forbids_it(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any, audit: Any, settings: Settings
) -> None:
    await run_services("sink", "query", "gatekeeper")
    ann, bob = person(settings, "ann", "approver", "operator"), person(settings, "bob", "approver")
    await held_for_review(bus, settings, gates, "v12", {"forbid_self_approval": True}, author=ann)
    assert (await artifacts.release_of(bus, "v12"))["author"]["name"] == "ann"

    with pytest.raises(ReviewRefused, match="ann is the author of v12, and the policy forbids self-approval"):
        await request_review(bus, "v12", "approve", ann, "my own change is fine", timeout_s=20)
    row = await next_refusal(audit)
    assert row.actor == "ann" and "ann is the author of v12, and the policy forbids self-approval" in row.reason
    approved = await request_review(bus, "v12", "approve", bob, "reviewed ann's change", timeout_s=20)
    assert (approved.decision, approved.approvals) == ("PASS", ["bob"])

    # A release with no signed author cannot be told apart from its reviewer: nobody may approve it.
    await held_for_review(bus, settings, gates, "v13", {"forbid_self_approval": True})
    with pytest.raises(ReviewRefused, match="author of v13 is unknown"):
        await request_review(bus, "v13", "approve", bob, "lgtm", timeout_s=20)
    assert "author of v13 is unknown" in (await next_refusal(audit)).reason


async def test_a_revoked_person_cannot_approve(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any, audit: Any, settings: Settings
) -> None:
    await run_services("sink", "query", "gatekeeper")
    held = await held_for_review(bus, settings, gates, "v14")
    ann = person(settings, "ann", "approver")
    revoke_person(trust_file_path(settings), "ann")
    with pytest.raises(ReviewRefused, match="ann's revoked key"):
        await request_review(bus, "v14", "approve", ann, "lgtm", timeout_s=20)
    row = await next_refusal(audit)
    assert row.actor == "unverified" and "ann's revoked key" in row.reason
    assert (await current_decision(bus, "v14")) == held


async def test_an_approval_by_a_key_revoked_since_no_longer_counts(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any, audit: Any, settings: Settings
) -> None:
    # Before: mallory's (stolen) key approved, an admin revoked it, and one honest approver then completed the
    # two-person rule: "PASS (approved by mallory, bob)". Revoking a key also takes back what it approved.
    await run_services("sink", "query", "gatekeeper")
    await held_for_review(bus, settings, gates, "v15", {"approvals": 2})
    mallory, bob, carol = (person(settings, "mallory", "approver"), person(settings, "bob", "approver"),
                           person(settings, "carol", "approver"))
    first = await request_review(bus, "v15", "approve", mallory, "fine", timeout_s=20)
    assert (first.decision, first.approvals, first.approval_keys) == ("NEEDS_REVIEW", ["mallory"], [mallory.key_id])
    revoke_person(trust_file_path(settings), "mallory")

    second = await request_review(bus, "v15", "approve", bob, "agreed", timeout_s=20)
    assert (second.decision, second.approvals) == ("NEEDS_REVIEW", ["bob"]) and "1 of 2" in second.reason
    assert f"the approval by mallory's key {mallory.key_id} is revoked, no longer counts" in second.reason
    assert Keyring.from_settings(settings).verify(second) == second.key_id
    third = await request_review(bus, "v15", "approve", carol, "agreed too", timeout_s=20)
    assert (third.decision, third.approvals, third.approval_keys) == ("PASS", ["bob", "carol"],
                                                                      [bob.key_id, carol.key_id])


async def test_a_reviewer_scoped_to_a_tenant_reviews_only_that_tenants_releases(
    bus: Bus, store: Store, run_services: Callable[..., Any], gates: Any, audit: Any, settings: Settings
) -> None:
    # Probe p25: reviewers had no tenant. An approver trusted for tenant acme rejected tenant beta's release (a signed
    # BLOCK), and could as well approve beta's NEEDS_REVIEW into a PASS that admits it to beta's deployments.
    await run_services("sink", "query", "gatekeeper")
    beta = await held_for_review(bus, settings, gates, "beta-r1", tenant="beta")
    assert beta.tenant == "beta"
    create_identity(settings, "ann")
    trusted = await asyncio.to_thread(lockgate_cli, settings, "gate", "trust", "--person", "ann", "--role", "approver",
                                      "--tenant", "acme", str(identities_dir(settings) / "ann.pub"))
    assert trusted.exit_code == 0 and "trusted ann (approver; reviews tenant acme only) with key" in trusted.stdout, \
        trusted.output
    ann = load_identity(settings, "ann")
    why = "ann reviews releases of tenant acme only, not of tenant beta"
    # She can see her scope (`identity show`, as table and JSON).
    shown = await asyncio.to_thread(lockgate_cli, settings, "--as", "ann", "identity", "show")
    assert "as approver, reviewing tenant acme only" in shown.stdout, shown.output
    shown = await asyncio.to_thread(lockgate_cli, settings, "--as", "ann", "identity", "show", "--json")
    assert json.loads(shown.stdout)["tenants"] == ["acme"], shown.output

    # `gate approve|reject` says so at once, in one line, and sends nothing.
    for action in ("approve", "reject"):
        refused = await asyncio.to_thread(lockgate_cli, settings, "--as", "ann", "gate", action, "beta-r1", "--reason",
                                          "looks fine", "--timeout", "5")
        assert refused.exit_code == 4 and refused.stderr == (
            f"error: cannot {action} beta-r1: it is a release of tenant beta, and {why} (an admin adds the tenant with "
            "`lockgate gate trust --person ... --tenant beta`)\n"), refused.output
    # Straight on the bus (a CLI reading another trust file, or none), naming the tenant it is scoped to: the
    # gatekeeper goes by the tenant of the decision reviewed, refuses it (audit row naming ann) and dead-letters it.
    dlq = await bus.nc.subscribe(bus.subjects.dlq("gatekeeper"))
    for action in ("approve", "reject"):
        await bus.publish(bus.subjects.gate_review("beta-r1"), sign_review(ann, GateReview(
            release="beta-r1", action=action, actor="ann", reason="looks fine", decision_id=beta.id, tenant="acme")))
        row = await next_refusal(audit)
        letter = Codec(DeadLetter).decode((await dlq.next_msg(timeout=20)).data)
        assert row.actor == "ann" and row.reason.startswith(f"{action} by ann refused: {action} of beta-r1 "), row.reason
        assert f"is about a release of tenant beta, and {why}" in row.reason and why in letter.error, letter.error
    await dlq.unsubscribe()
    assert (await current_decision(bus, "beta-r1")) == beta  # still NEEDS_REVIEW, nothing re-signed

    # Her own tenant's release she reviews.
    await held_for_review(bus, settings, gates, "acme-r1", tenant="acme")
    approved = await asyncio.to_thread(lockgate_cli, settings, "--as", "ann", "gate", "approve", "acme-r1", "--reason",
                                       "prompt diff read", "--timeout", "20", "--json")
    assert approved.exit_code == 0, approved.output
    assert (json.loads(approved.stdout)["decision"], json.loads(approved.stdout)["reviewed_by"]) == ("PASS", "ann")

    # A person listing no tenants reviews every tenant's, as every trust file before did.
    bob = person(settings, "bob", "approver")
    passed = await request_review(bus, "beta-r1", "approve", bob, "read it", timeout_s=20, settings=settings)
    assert (passed.decision, passed.approvals, passed.tenant) == ("PASS", ["bob"], "beta")
    assert (await asyncio.to_thread(lockgate_cli, settings, "gate", "verify", "beta-r1")).exit_code == 0
    # Scoped to acme since, bob's approval no longer counts for beta's PASS: it admits nothing.
    rescoped = await asyncio.to_thread(lockgate_cli, settings, "gate", "trust", "--person", "bob", "--role", "approver",
                                       "--tenant", "acme", str(identities_dir(settings) / "bob.pub"))
    assert rescoped.exit_code == 0, rescoped.output
    verified = await asyncio.to_thread(lockgate_cli, settings, "gate", "verify", "beta-r1")
    assert verified.exit_code == 4 and (f"the approval by bob (key {bob.key_id}) no longer counts: bob reviews "
                                        "releases of tenant acme only, not of tenant beta") in verified.stderr, \
        verified.output


async def test_a_decision_is_recorded_under_its_releases_tenant_whoever_asked_for_the_eval(
    bus: Bus, run_services: Callable[..., Any], gates: Any, settings: Settings
) -> None:
    # Before: under the eval request's tenant: `lockgate eval run` names none, so acme's decisions were stored as
    # tenant default, outside acme's row policy and inside default's.
    policy = await register_policy(bus, {k: v for k, v in POLICY.items() if k != "review"})
    await run_services("sink", "query", "gatekeeper")
    arts = await register_model_release(bus, "acme-r2", "m", tenant="acme")
    await register_release(bus, "v1", "p1")
    await store_pass(bus, "v1", settings)
    done = msgspec.structs.replace(completed("acme-r2", policy, em=0.99, em_ci=(0.98, 1.0), diff=0.0,
                                             diff_ci=(-0.01, 0.01), n=2000, artifacts=arts),
                                   run_id="run-acme-r2", binding=await started_on(bus, "acme-r2"),
                                   environment={"task": "call", "model": "m", "endpoint": "default"})
    assert done.tenant == "default"
    await record_request(bus, request_of(done))
    await bus.publish(bus.subjects.eval_completed, done)
    decided = await next_decision(gates)
    assert (decided.release, decided.decision, decided.tenant) == ("acme-r2", "PASS", "acme")


@asynccontextmanager
async def gatekeeper_process(context: ServiceContext, settings: Settings) -> AsyncIterator[ServiceSet]:
    """A gatekeeper replica as a process of its own (its own bus), with `settings` (its signing key); stopped and
    disconnected at exit, so nothing more is delivered to it."""
    own = Bus(settings.nats_url, Subjects(settings.prefix), name="gatekeeper-replica")
    await own.connect()
    replica = ServiceSet(ServiceContext(bus=own, store=context.store, telemetry=Telemetry(), settings=settings),
                         ["gatekeeper"])
    try:
        await replica.start()
        yield replica
    finally:
        await replica.stop()
        await own.close()


@pytest.mark.parametrize("distrust", ["revoke", "retire"])
async def test_a_gatekeeper_whose_key_is_revoked_or_retired_signs_nothing_and_a_trusted_replica_decides(
    bus: Bus, context: ServiceContext, run_services: Callable[..., Any], gates: Any, settings: Settings,
    tmp_path: Path, distrust: str
) -> None:
    # Before (r1 probe, finding 3): a gatekeeper whose key was revoked kept consuming and signing; the router refused
    # what it signed, so the evals, approvals and rejects it took were lost (an approval used up, a reject that
    # never blocked).
    policy = await register_policy(bus)
    await run_services("sink", "query")
    await register_release(bus, "v1", "p1")
    await store_pass(bus, "v1", settings)  # the baseline
    arts = await register_release(bus, "v18", "p18")
    fresh = Signer.load_or_create(tmp_path / "fresh.pem")  # the key it is rotated to, trusted first
    trust_key(trust_file_path(settings), fresh.public)
    async with gatekeeper_process(context, settings) as stale:
        kid = stale["gatekeeper"].signer.key_id
        if distrust == "revoke":
            revoke_key(trust_file_path(settings), kid)
        else:
            retire_key(trust_file_path(settings), kid, until_seq=0)
        await finish_eval(bus, completed("v18", policy, em=0.9, em_ci=(0.88, 0.92), diff=0.0, diff_ci=(-0.01, 0.01),
                                         n=2000, artifacts=arts))
        await stale["gatekeeper"].handlers.own.refused.wait_for(1)  # handed the result, it signed nothing
        health = HealthServer(lambda: [stale.ctx.bus], "127.0.0.1", 0, problems=stale.problems)
        url = await health.start()
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as resp:
                code, ready = resp.status, await resp.json()
        finally:
            await health.stop()
        assert code == 503 and ready["status"] == "not ready", ready
        [problem] = ready["problems"]
        said = "is revoked" if distrust == "revoke" else "was retired"
        assert problem.startswith(f"gatekeeper: this gatekeeper's signing key is not trusted: key {kid} {said}"), problem
    # The result was left for a replica whose key is trusted, which decides it: nothing was lost.
    async with gatekeeper_process(context, settings.replace(signing_key=str(tmp_path / "fresh.pem"))):
        d = await next_decision(gates)
        assert (d.release, d.eval_run, d.key_id) == ("v18", "run-v18", fresh.key_id)
        assert Keyring.from_settings(settings).verify(d) == fresh.key_id
        assert await current_decision(bus, "v18") == d
