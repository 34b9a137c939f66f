"""Content changed after it was gated, on the real nats-server, evaluator, gatekeeper and router.

Before, the operator NATS identity (it registers artifacts and binds releases) could put other bytes under an
artifact's hash in the object store: a pinned strict policy then read as a lax one, and the same eval request got
a signed PASS; a PASSed release's model config served another model. It could also put another bundle over a
bound release name in the releases bucket (create-only was only the client's expected-sequence header), and the
router admitted the new content with the old PASS.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats.errors
import nats.js.errors
import pytest
import yaml
from nats.nuid import NUID

from lockgate import artifacts
from lockgate.bus import KEPT_BY_OPERATOR, Bus, original_name, topology
from lockgate.codec import Codec
from lockgate.contracts import EvalCompleted, EvalRequested, GateDecided
from lockgate.errors import ArtifactCorrupt
from lockgate.ids import canonical_json, uuid7
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer, ensure_signer_trusted
from lockgate.subjects import token
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import gate_decided, register_model_release, store_decision, store_pass
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_nats_auth import _bus, secured  # noqa: F401  (the fixture)
from tests.integration.test_required_gates import LENIENT, STRICT, answers, gates_file
from tests.integration.test_rollout_strategies import _releases

router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)
FIXTURES = Path(__file__).parent.parent / "fixtures"
DEPLOYMENT = "/lockgate/v1/deployments/chat"
_decided: Codec[GateDecided] = Codec(GateDecided)
_completed: Codec[EvalCompleted] = Codec(EvalCompleted)


async def _tamper(bus: Bus, digest: str, content: Any) -> None:
    """Other bytes under `digest`, put straight into the object store as any identity that may write it can."""
    await bus.put_object(bus.subjects.object_store, digest, canonical_json(content))


@pytest.fixture
async def gated(context: ServiceContext, run_services: Callable[..., Any],
                tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """Evaluator and gatekeeper with the gates file pinning policy strict by hash for app shop; release `poor`
    ships a model that answers every case wrong (strict blocks it, lenient would pass it)."""
    bus = context.bus
    ensure_signer_trusted(context.settings)
    dataset = (await artifacts.register_file(bus, "dataset", FIXTURES / "suites" / "qa.jsonl")).hash
    suite = (await artifacts.register(bus, "eval_suite", "qa",
                                      yaml.safe_load((FIXTURES / "suites" / "qa.yaml").read_text()))).hash
    strict = (await artifacts.register(bus, "policy", "strict", STRICT)).hash
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=answers()),
                                           "poor": ModelSpec(default="no idea")})) as sim:
        context.settings = context.settings.replace(
            gates_file=gates_file(tmp_path, {"shop": {"policy": f"strict={strict}"}}), stable_upstream=sim.url)
        await run_services("sink", "query", "evaluator", "gatekeeper")
        await register_model_release(bus, "poor", "poor")
        await register_model_release(bus, "good", "good")
        yield {"suite": suite, "dataset": dataset, "strict": strict, "sim": sim.url}


async def _next(sub: Any, codec: Any, wanted: Any) -> Any:
    """The next message on `sub` whose decoded value `wanted` accepts: the others are other runs'."""
    async with asyncio.timeout(60):
        while True:
            value = codec.decode((await sub.next_msg(timeout=60)).data)
            if wanted(value):
                return value


async def _gate(bus: Bus, release: str, suite: str, policy: str) -> tuple[EvalCompleted, GateDecided]:
    """Request an eval of `release` as an operator does, and wait for its run's result and decision."""
    run_id = uuid7()
    done, decided = bus.nc.subscribe(bus.subjects.eval_completed), bus.nc.subscribe(bus.subjects.gate_decided(release))
    completed_sub, decided_sub = await done, await decided
    try:
        await bus.publish(bus.subjects.eval_requested, EvalRequested(run_id=run_id, release=release, suite=suite,
                                                                     endpoint="", policy=policy))
        completed = await _next(completed_sub, _completed, lambda c: c.run_id == run_id)
        decision = await _next(decided_sub, _decided, lambda d: d.eval_run == run_id)
    finally:
        await completed_sub.unsubscribe()
        await decided_sub.unsubscribe()
    return completed, decision


async def test_a_policy_altered_under_its_pinned_hash_blocks_instead_of_passing(
        context: ServiceContext, gated: dict[str, str]) -> None:
    bus = context.bus
    _, blocked = await _gate(bus, "poor", gated["suite"], gated["strict"])
    assert blocked.decision == "BLOCK" and blocked.policy == gated["strict"], blocked
    # The lenient policy's bytes under the pinned hash: the gates file is satisfied by the hash alone.
    await _tamper(bus, gated["strict"], LENIENT)
    completed, decision = await _gate(bus, "poor", gated["suite"], gated["strict"])
    assert completed.status == "completed"
    assert decision.decision == "BLOCK", decision
    assert f"policy {gated['strict']} is unusable: artifact {gated['strict']} is corrupt: the object store holds " \
           f"other bytes under its hash (their hash is {artifacts.content_hash(canonical_json(LENIENT))})" \
           in decision.reason, decision.reason


async def test_a_dataset_altered_under_its_hash_fails_the_eval_run(
        context: ServiceContext, gated: dict[str, str]) -> None:
    # The cases the suite pins, replaced by ones the poor model answers "right".
    await _tamper(context.bus, gated["dataset"], [{"id": "x", "vars": {"question": "?"}, "expected": "no idea"}])
    completed, decision = await _gate(context.bus, "poor", gated["suite"], gated["strict"])
    assert completed.status == "failed" and completed.n_cases == 0, completed
    assert f"artifact {gated['dataset']} is corrupt" in completed.error, completed.error
    assert decision.decision == "BLOCK", decision


async def test_a_release_whose_model_config_was_altered_is_not_admitted(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # `same` was gated (PASS naming its bundle); its model config's bytes now name the bad model.
    bus = router.ctx.bus
    config = (await artifacts.release_of(bus, "same"))["artifacts"]["model_config/same-config"]
    await store_pass(bus, "same", router.ctx.settings)
    await _tamper(bus, config, {"model": "bad", "endpoint": "canary"})
    for method, url, body in (("PUT", f"{DEPLOYMENT}", {"stable_release": "r1", "canary_release": "same",
                                                        "initial_weight": 50}),
                              ("PUT", "/lockgate/v1/deployments/fresh", {"stable_release": "same"})):
        async with http.request(method, f"{router.url}{url}", json=body) as resp:
            answer = await resp.json()
        assert resp.status == 400, answer
        assert (f"model config of release 'same': artifact {config} is corrupt: the object store holds other bytes "
                "under its hash") in answer["error"]["message"], answer
    assert "fresh" not in router.rollouts.routes and "chat" not in router.rollouts.routes


async def test_a_pass_for_other_content_than_the_release_holds_admits_nothing(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # A PASS for `bad` that judged another model config (`same`'s): what a PASS of the content a release name
    # held before it was rebound looks like. Signed by a trusted key, current in the gates bucket, and announced.
    bus = router.ctx.bus
    other = await artifacts.release_of(bus, "same")
    stale = signer.sign(GateDecided(release="bad", rules=[], decision="PASS",
                                    artifacts={"model_config/bad-config": other["artifacts"]["model_config/same-config"],
                                               "policy": "sha256:p"}))
    await store_decision(bus, stale)

    async with http.put(f"{router.url}/lockgate/v1/deployments/fresh", json={"stable_release": "bad"}) as resp:
        answer = await resp.json()
    assert resp.status == 409 and answer["error"]["code"] == "not_admitted", answer  # no first release
    body = {"stable_release": "r1", "canary_release": "bad", "initial_weight": 50}
    async with http.put(f"{router.url}{DEPLOYMENT}", json=body) as resp:
        answer = await resp.json()
    assert resp.status == 409 and answer["error"]["code"] == "not_admitted", answer  # no weight at start
    async with http.put(f"{router.url}{DEPLOYMENT}", json={**body, "initial_weight": 0,
                                                           "strategy": {"steps": [50, 100], "interval_s": 3600}}) as resp:
        assert resp.status == 200, await resp.text()
    # As announced on the bus: what the router's gate handler calls once the signature verifies.
    await router.rollouts.on_decision(stale)
    route = router.rollouts.route("chat")
    assert (route.canary.release, route.weight, route.phase, route.admitted) == ("bad", 0.0, "idle", ""), route
    assert set(await _releases(http, router, 40)) == {"r1"}  # nobody is served `bad`

    # A PASS naming what `bad` holds admits it: only the content was wrong.
    bound = (await artifacts.release_of(bus, "bad"))["artifacts"]
    await gate_decided(bus, signer.sign(GateDecided(
        release="bad", rules=[], decision="PASS", artifacts={**bound, "policy": "sha256:p"})))
    await router.rollouts.wait_for(lambda r: r["chat"].phase == "progressing", timeout=10)


async def test_the_operator_cannot_rebind_delete_or_purge_a_bound_release(secured) -> None:  # noqa: F811
    _, settings, admin = secured
    operator = await _bus(settings, "operator")
    try:
        config = await artifacts.register(operator, "model_config", "c", {"model": "good"})
        other = await artifacts.register(operator, "model_config", "c", {"model": "bad"})
        await artifacts.register_release(operator, "rb1", "shop", {"model_config/c": config.hash})
        kv = await operator.kv(operator.subjects.kv_releases)
        bound = (await kv.get(token("rb1"))).value
        rebound = canonical_json(artifacts.release_bundle("rb1", "shop", {"model_config/c": other.hash}))
        for attempt in (lambda: kv.put(token("rb1"), rebound), lambda: kv.delete(token("rb1")),
                        lambda: kv.purge(token("rb1")), lambda: kv.update(token("rb1"), rebound, last=1)):
            with pytest.raises(nats.js.errors.APIError):
                await attempt()
        assert (await kv.get(token("rb1"))).value == bound
        assert (await artifacts.release_of(admin, "rb1"))["artifacts"] == {"model_config/c": config.hash}
        # Binding the same content again is still accepted; other content is a ReleaseConflict; a new name binds.
        await artifacts.register_release(operator, "rb1", "shop", {"model_config/c": config.hash})
        await artifacts.register_release(operator, "rb2", "shop", {"model_config/c": other.hash})
    finally:
        await operator.close()


async def test_bytes_the_operator_puts_under_a_hash_are_refused_and_registering_again_repairs_them(
        secured) -> None:  # noqa: F811
    _, settings, admin = secured
    operator = await _bus(settings, "operator")
    try:
        strict = await artifacts.register(operator, "policy", "strict", STRICT)
        await _tamper(operator, strict.hash, LENIENT)  # the operator may still write the store
        with pytest.raises(ArtifactCorrupt, match=f"artifact {strict.hash} is corrupt: the object store holds other "
                                                  "bytes under its hash"):
            await artifacts.load_structured(admin, strict.hash)
        await artifacts.register(operator, "policy", "strict", STRICT)
        assert await artifacts.load_structured(admin, strict.hash) == STRICT
    finally:
        await operator.close()


async def _unpurgeable(bucket: str, writer: Bus, *others: Bus) -> None:
    """Object bucket `bucket` can be emptied by none of these identities: its purge is refused them, and the
    `writer`'s rollup header (which nats-server honours on any subject its sender may publish to: `all` on a chunk
    subject emptied the store as a purge does, probe p33 F4) is refused by the store (bus.UNPURGED)."""
    stream = f"OBJ_{bucket}"
    for bus in (writer, *others):
        js = bus.nc.jetstream(timeout=1)  # a refused request is answered by no one: fail fast
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.purge_stream(stream)
        assert bus.refused(f"$JS.API.STREAM.PURGE.{stream}") is not None, bus.name
    with pytest.raises(nats.js.errors.APIError, match="rollup not permitted"):
        await writer.js.publish(f"$O.{bucket}.C.x", b"", headers={"Nats-Rollup": "all"})


async def test_no_identity_may_purge_the_artifact_store_and_registering_needs_no_purge(secured) -> None:  # noqa: F811
    # Before (probe p33 F4): the operator's purge of the artifact store without a filter was answered `purged: 22`,
    # every tenant's artifacts gone; evals then failed and the router refused new releases. Its writers had the
    # purge for nats-py's put, which purges the chunks an object's earlier version had.
    _, settings, admin = secured
    operator = await _bus(settings, "operator")
    try:
        strict = await artifacts.register(operator, "policy", "strict", STRICT)
        await _unpurgeable(operator.subjects.object_store, operator, admin)
        assert await artifacts.load_structured(admin, strict.hash) == STRICT
        await artifacts.require(operator, strict.hash)
        # Registering still works with the operator's credential, the same content again included, and repairing
        # altered bytes: none of it asks for a purge.
        operator.denied.clear()
        await artifacts.register(operator, "policy", "strict", STRICT)
        lenient = await artifacts.register(operator, "policy", "lenient", LENIENT)
        await _tamper(operator, lenient.hash, STRICT)
        await artifacts.register(operator, "policy", "lenient", LENIENT)
        assert operator.denied == []
        assert await artifacts.load_structured(admin, lenient.hash) == LENIENT
        assert await artifacts.load_structured(admin, strict.hash) == STRICT
    finally:
        await operator.close()


async def test_no_service_may_purge_the_dead_letter_originals_and_keeping_one_needs_no_purge(secured) -> None:  # noqa: F811
    # Alike for the cut dead letters' whole originals, which every service writes: before, each service identity held
    # the purge (for nats-py's put) and the rollup, either of which emptied every service's originals.
    _, settings, admin = secured
    sink = await _bus(settings, "sink")
    try:
        body = b"\xff" * 1000
        name = original_name(body)
        assert await sink.keep_original(name, body) == ""
        await _unpurgeable(sink.subjects.object_dead_letters, sink)
        # Kept again (another delivery), and repaired once altered: no purge asked for, the bytes read whole.
        sink.denied.clear()
        assert await sink.keep_original(name, body) == ""
        await sink.put_object(sink.subjects.object_dead_letters, name, b"altered")
        assert await sink.keep_original(name, body) == "" and sink.denied == []
        assert await admin.original(name) == body
    finally:
        await sink.close()


async def test_an_artifact_store_made_before_takes_lockgates_puts_and_topology_apply_makes_it_unpurged(
        secured) -> None:  # noqa: F811
    # A home whose store nats-py made (purges and rollups allowed): lockgate's puts work there as they are, and
    # admin's `topology apply` (an update) then refuses them.
    _, settings, admin = secured
    stream = f"OBJ_{admin.subjects.object_store}"
    await admin.js.delete_stream(stream)
    await admin.js.create_object_store(admin.subjects.object_store)
    operator = await _bus(settings, "operator")
    try:
        strict = await artifacts.register(operator, "policy", "strict", STRICT)
        await artifacts.register(operator, "policy", "strict", STRICT)
        assert operator.denied == []
        assert await admin.ensure_topology(update=True) == [f"{stream} (allow_rollup_hdrs, deny_purge)"]
        config = (await admin.js.stream_info(stream)).config
        assert config.deny_purge and not config.allow_rollup_hdrs
        with pytest.raises(nats.js.errors.APIError, match="rollup not permitted"):
            await operator.js.publish(f"$O.{operator.subjects.object_store}.C.x", b"", headers={"Nats-Rollup": "all"})
        assert await artifacts.load_structured(admin, strict.hash) == STRICT
    finally:
        await operator.close()


async def test_a_releases_bucket_made_before_is_left_named_and_made_write_once_by_the_servers_operator(
        bus: Bus) -> None:
    # A deployment whose bucket was created as a plain KV (history 1, any put accepted) before the write-once rule.
    name = bus.subjects.kv_releases
    stream = f"KV_{name}"
    await bus.js.delete_key_value(name)
    old = await bus.js.create_key_value(bucket=name, history=1)
    await old.create(token("r0"), b"{}")
    await old.put(token("r0"), b'{"release": "r0"}')  # accepted then
    # No lockgate identity may change its configuration (permissions.kept), admin included: the topology leaves it
    # and names it (before, probe p32, admin's update could as well lift the rule or age every binding out).
    assert await bus.ensure_topology(update=True) == []
    assert bus.topology_differs == [
        f"{stream} (allow_rollup_hdrs, deny_purge, discard_new_per_subject): {KEPT_BY_OPERATOR}"]
    # The server's operator applies lockgate's configuration with nats-server's own tools (`nats stream edit`),
    # as this open server lets anyone.
    await bus.js.update_stream(next(cfg for cfg, _ in topology(bus.subjects, 1) if cfg.name == stream))
    kv = await bus.kv(name)
    with pytest.raises(nats.errors.Error):
        await kv.put(token("r0"), b"{}")
    assert (await kv.get(token("r0"))).value == b'{"release": "r0"}'
    assert await bus.ensure_topology() == [] and bus.topology_differs == []  # nothing left to change


async def _claim(bus: Bus, bucket: str, name: str, sha256_hex: str, junk: bytes = b'{"poisoned": true}') -> None:
    """Other bytes under `name` whose metadata claims the digest of the content `sha256_hex` names (the digest is
    computable from the hash alone): new chunks, then a metadata record pointing at them, published straight on the
    store's subjects as any identity that may write it can."""
    nuid = NUID().next().decode()
    await bus.js.publish(f"$O.{bucket}.C.{nuid}", junk)
    info = {"name": name, "bucket": bucket, "nuid": nuid, "size": len(junk), "chunks": 1,
            "mtime": "2026-01-01T00:00:00+00:00", "options": {"max_chunk_size": 131072},
            "digest": "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(sha256_hex)).decode()}
    await bus.js.publish(f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}",
                         json.dumps(info).encode())


async def test_registering_again_repairs_bytes_whose_metadata_claims_the_real_digest(secured) -> None:  # noqa: F811
    # Before (probe p82 F1): registering again skipped its put when the stored metadata's digest matched the
    # content's, which the operator identity can write over any bytes: the artifact stayed unreadable for good.
    _, settings, admin = secured
    operator = await _bus(settings, "operator")
    try:
        strict = await artifacts.register(operator, "policy", "strict", STRICT)
        await _claim(operator, operator.subjects.object_store, strict.hash, strict.hash[7:])
        with pytest.raises(ArtifactCorrupt, match=f"artifact {strict.hash} is corrupt"):
            await artifacts.load_structured(admin, strict.hash)
        await artifacts.register(operator, "policy", "strict", STRICT)
        assert await artifacts.load_structured(admin, strict.hash) == STRICT
    finally:
        await operator.close()


async def test_bytes_that_are_not_an_artifacts_content_are_not_reported_present(secured) -> None:  # noqa: F811
    # Before (probe p82 F1), `require` (a deprecation's check) and `check_references` (a release's, before its name
    # binds for good) read the metadata alone: an artifact no reader can use passed for present.
    _, settings, _ = secured
    operator = await _bus(settings, "operator")
    try:
        strict = await artifacts.register(operator, "policy", "strict", STRICT)
        await _claim(operator, operator.subjects.object_store, strict.hash, strict.hash[7:])
        with pytest.raises(ArtifactCorrupt, match=f"artifact {strict.hash} is corrupt"):
            await artifacts.require(operator, strict.hash)
        with pytest.raises(ArtifactCorrupt, match=f"release artifact policy/strict: artifact {strict.hash} is corrupt"):
            await artifacts.check_references(operator, {"policy/strict": strict.hash})
        await artifacts.register(operator, "policy", "strict", STRICT)
        await artifacts.require(operator, strict.hash)
        await artifacts.check_references(operator, {"policy/strict": strict.hash})
    finally:
        await operator.close()


async def test_a_hash_claimed_before_its_content_is_registered_is_repaired_by_registering_it(
        secured) -> None:  # noqa: F811
    # The pre-emptive variant: a hash known before its owner registers the content (a file in their Git folder).
    # Before, their registration "succeeded" over the claim, and `release create` bound the name to unreadable content.
    _, settings, admin = secured
    operator = await _bus(settings, "operator")
    try:
        config = {"model": "good", "endpoint": "stable"}
        digest = artifacts.content_hash(canonical_json(config))
        await _claim(operator, operator.subjects.object_store, digest, digest[7:], b"[]")
        assert (await artifacts.register(operator, "model_config", "c", config)).hash == digest
        await artifacts.register_release(operator, "pre1", "shop", {"model_config/c": digest})
        bound = (await artifacts.release_of(admin, "pre1"))["artifacts"]["model_config/c"]
        assert await artifacts.load_structured(admin, bound) == config
    finally:
        await operator.close()


async def test_keeping_an_original_again_repairs_bytes_whose_metadata_claims_the_real_digest(
        secured) -> None:  # noqa: F811
    # `Bus.keep_original` skipped its put on the metadata's word alike, and the sink deleted a cut letter's message
    # (the one other copy of its bytes) on the same word (`kept_original`).
    _, settings, admin = secured
    sink = await _bus(settings, "sink")
    try:
        body = b"\xfe" * 1000
        name = original_name(body)
        await _claim(sink, sink.subjects.object_dead_letters, name, name.rpartition(".")[2])
        assert not await sink.kept_original(name)
        assert await sink.keep_original(name, body) == ""
        assert await admin.original(name) == body
        assert await sink.kept_original(name)
    finally:
        await sink.close()
