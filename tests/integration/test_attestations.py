"""Attestations: a real gate decision exported as an in-toto Statement in a DSSE envelope verifies offline
(`lockgate attest verify`), and fails, with exit 4 and one line, when the payload, the decision inside it,
the release's artifacts (not exactly those the decision judged) or the signer (untrusted, or not an operator
or admin) is not what was attested; artifacts registered with a key carry its signature."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.errors import SignatureError
from lockgate.identity import Identity, create_identity
from lockgate.provenance import attest
from lockgate.provenance.trust import artifact_signer
from lockgate.signing import Signer, default_key_path, retire_key, trust_file_path, trust_key
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import person, sink_stored
from tests.integration.test_aliases import lockgate
from tests.integration.test_eval_gate import next_decision, qa_answers, register_qa, request, subscribe  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def _resign(env: dict[str, Any], stmt: dict[str, Any], who: Identity) -> dict[str, Any]:
    return attest.envelope(stmt, who)


async def test_a_real_decision_attestation_verifies_and_tampering_fails(
    bus: Bus, settings: Settings, run_services: Callable[..., Any], subscribe: Callable[[str], Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    ann = person(settings, "ann", "operator")
    # As `lockgate up` does: the gatekeeper's key is a trust root.
    trust_key(trust_file_path(settings), Signer.load_or_create(default_key_path(settings)).public)
    suite, policy = await register_qa(bus)
    prompt = await artifacts.register(bus, "prompt", "answer", {"template": "{question}"}, signer=ann)
    await artifacts.register_release(bus, "v-att", "shop", {"prompt/answer": prompt.hash})
    gates = await subscribe(bus.subjects.gate_decided_all)
    async with SimServer(SimConfig(models={"good": ModelSpec(answers=qa_answers(), latency_ms=1)})) as sim:
        svcs = await run_services("sink", "query", "lineage", "evaluator", "gatekeeper")
        await sink_stored(svcs["sink"].handlers, releases=1)
        await bus.publish(bus.subjects.eval_requested, request(release="v-att", suite=suite, endpoint=sim.url,
                                                               model="good", policy=policy))
        decision = await next_decision(gates)
        await sink_stored(svcs["sink"].handlers, eval_runs=1)  # the attestation quotes the stored run
    assert decision.decision == "PASS"

    async def cli(*args: str) -> Any:
        return await asyncio.to_thread(lockgate, settings, *args)

    out = tmp_path / "decision.intoto.json"
    made = await cli("--as", "ann", "attest", "decision", "v-att", "--out", str(out))
    assert made.exit_code == 0, made.output
    env = json.loads(out.read_text())
    stmt = json.loads(base64.b64decode(env["payload"]))
    assert stmt["_type"] == "https://in-toto.io/Statement/v1" and stmt["predicateType"] == attest.DECISION
    assert stmt["subject"][0]["name"] == "release:v-att" and len(stmt["subject"][0]["digest"]["sha256"]) == 64
    assert stmt["predicate"]["decision"]["id"] == decision.id
    evaluated = stmt["predicate"]["eval"]  # the run it judged, with the environment it ran in
    assert evaluated["run_id"] == decision.eval_run and evaluated["metrics"] and evaluated["environment"]["python"]
    ok = await cli("attest", "verify", str(out))
    assert ok.exit_code == 0 and "verified: decision PASS for v-att, attested by ann" in ok.output
    assert (await cli("verify", str(out))).exit_code == 0  # `lockgate verify` is the same check
    # What a pipeline reads (probe p20 F4, F5): that it admits, and when it was decided.
    said = json.loads((await cli("verify", str(out), "--json")).stdout)
    assert (said["decision"], said["admits"]) == ("PASS", True) and "not_admitted" not in said
    assert said["time"] == stmt["predicate"]["decision"]["time"]

    def write(name: str, doc: dict[str, Any]) -> str:
        (tmp_path / name).write_text(json.dumps(doc))
        return str(tmp_path / name)

    # The payload changed after signing: the envelope's signature no longer matches.
    flipped = {**stmt, "predicate": {**stmt["predicate"], "decision": {**stmt["predicate"]["decision"],
                                                                         "decision": "BLOCK"}}}
    altered = {**env, "payload": base64.b64encode(json.dumps(flipped).encode()).decode()}
    bad = await cli("attest", "verify", write("altered.json", altered))
    assert bad.exit_code == 4 and "envelope signature" in bad.output and len(bad.output.strip().splitlines()) == 1
    # Re-signed by a trusted person, the altered decision still fails: the gatekeeper did not sign it.
    resigned = await cli("attest", "verify", write("resigned.json", _resign(env, flipped, ann)))
    assert resigned.exit_code == 4 and "predicate decision" in resigned.output
    # The subject swapped for another release's digest.
    swapped = {**stmt, "subject": [{"name": "release:v-att", "digest": {"sha256": "0" * 64}}]}
    sub = await cli("attest", "verify", write("subject.json", _resign(env, swapped, ann)))
    assert sub.exit_code == 4 and "digest does not match" in sub.output
    # Signed by someone the trust file does not know.
    mallory = create_identity(settings, "mallory")
    stranger = await cli("attest", "verify", write("stranger.json", _resign(env, stmt, mallory)))
    assert stranger.exit_code == 4 and "no person's" in stranger.output
    junk = await cli("attest", "verify", write("junk.json", {"payloadType": "text/plain"}))
    assert junk.exit_code == 4 and len(junk.output.strip().splitlines()) == 1

    # Found by a probe: a genuine PASS with the judged artifact swapped for another (under another key), the
    # subject digest recomputed and the envelope signed again by a trusted person, verified ("decision PASS"),
    # and so did a bundle with no artifacts: only the keys both named were compared.
    other = await artifacts.register(bus, "prompt", "blocked", {"template": "never judged"})
    bundle = stmt["predicate"]["release"]
    for artifacts_ in ({"prompt/blocked": other.hash}, {}, {**bundle["artifacts"], "prompt/blocked": other.hash},
                       {"prompt/answer": other.hash}):
        forged_bundle = {**bundle, "artifacts": artifacts_}
        forged = {**stmt, "subject": [{"name": "release:v-att", "digest": {"sha256": attest.bundle_digest(forged_bundle)}}],
                  "predicate": {**stmt["predicate"], "release": forged_bundle}}
        refused = await cli("attest", "verify", write("forged.json", _resign(env, forged, ann)))
        assert refused.exit_code == 4 and "judged other content than the release holds" in refused.output, (
            artifacts_, refused.output)
        assert len(refused.output.strip().splitlines()) == 1
    # Found by a probe (p8 F3): a genuine PASS re-signed by a trusted operator with a second in-toto subject, the
    # bundle digest of a release the gate never passed, verified ("decision PASS"): only subject[0] was read, while
    # in-toto consumers (cosign, policy-controller) take a statement as said of every subject. Now the subject
    # list must be exactly the one lockgate makes: one subject, named for the bundle's release, its only digest
    # the bundle's sha256.
    blocked = {**bundle, "release": "v-blocked", "artifacts": {"prompt/blocked": other.hash}}
    genuine = stmt["subject"][0]
    subject_forgeries = {
        "extra subject": ([genuine, {"name": "release:v-blocked", "digest": {"sha256": attest.bundle_digest(blocked)}}],
                          "2 subjects"),
        "the same subject twice": ([genuine, genuine], "2 subjects"),
        "no subject": ([], "no subject"),
        "another name": ([{**genuine, "name": "release:v-blocked"}], "subject[0] is named 'release:v-blocked'"),
        "another digest beside it": ([{**genuine, "digest": {**genuine["digest"], "sha512": "0" * 128}}],
                                     "subject[0] digest has sha512"),
        "a field lockgate does not make": ([{**genuine, "uri": "oci://registry/v-blocked"}], "subject[0] has uri"),
    }
    for what, (subjects, said) in subject_forgeries.items():
        forged = {**stmt, "subject": subjects}
        refused = await cli("attest", "verify", write("subjects.json", _resign(env, forged, ann)))
        assert refused.exit_code == 4 and said in refused.output, (what, refused.output)
        assert len(refused.output.strip().splitlines()) == 1, (what, refused.output)
    # An approver (or viewer) is trusted, but may not attest: the envelope's signer alone vouches for a release
    # statement's bundle and a decision statement's eval summary, so it takes one who may make releases.
    pia = person(settings, "pia", "approver")
    approver = await cli("attest", "verify", write("approver.json", _resign(env, stmt, pia)))
    assert approver.exit_code == 4 and "it needs operator or admin" in approver.output, approver.output
    made_by_approver = await cli("--as", "pia", "attest", "decision", "v-att", "--out", str(tmp_path / "pia.json"))
    assert made_by_approver.exit_code == 4 and not (tmp_path / "pia.json").exists()

    # The gatekeeper's key rotated out (a successor trusted, the old one retired, not revoked): an attestation is a
    # record of what was decided, and one made before still verifies (before, exit 4: "a retired key admits nothing").
    trust_key(trust_file_path(settings), Signer.generate().public)
    retire_key(trust_file_path(settings), decision.key_id, until_seq=0)
    # Found by a probe (p20 F12): it exited 0 "decision PASS", nothing saying that it admits nothing now (the router
    # refuses it), so a pipeline's `lockgate verify FILE && deploy` shipped it. It exits 5, saying so; it is still
    # authentic (--authentic-only: 0).
    retired = f"a PASS signed by key {decision.key_id} (retired at "
    rotated = await cli("attest", "verify", str(out))
    assert rotated.exit_code == 5 and rotated.stdout == "", rotated.output
    assert rotated.stderr.startswith("error: decision PASS for v-att") and \
        f"authentic, but {retired}" in rotated.stderr and "admits nothing now; re-gate v-att" in rotated.stderr
    history = await cli("attest", "verify", str(out), "--authentic-only")
    assert history.exit_code == 0 and history.stdout.startswith("verified: decision PASS for v-att"), history.output
    assert f"(authentic, but {retired}" in history.stdout
    history = await cli("attest", "verify", str(out), "--authentic-only", "--json")
    said = json.loads(history.stdout)
    assert history.exit_code == 0 and said["admits"] is False and said["retired_at"], history.output
    assert said["not_admitted"].startswith(retired)

    release = await cli("--as", "ann", "attest", "release", "v-att", "--out", str(tmp_path / "release.json"))
    assert release.exit_code == 0
    verified = await cli("attest", "verify", str(tmp_path / "release.json"), "--json")
    # A release statement carries no decision: it admits nothing, so exit 5 unless only its authenticity is asked.
    said = json.loads(verified.stdout)
    assert verified.exit_code == 5 and said["release"] == "v-att" and said["admits"] is False, verified.output
    assert "carries no gate decision" in verified.stderr and len(verified.stderr.splitlines()) == 1
    assert (await cli("attest", "verify", str(tmp_path / "release.json"), "--authentic-only")).exit_code == 0
    # A release statement is held to the same subject list: it says what one release is made of.
    rel_env = json.loads((tmp_path / "release.json").read_text())
    rel_stmt = json.loads(base64.b64decode(rel_env["payload"]))
    extra = {**rel_stmt, "subject": [*rel_stmt["subject"], {"name": "release:v-blocked", "digest": {"sha256": "0" * 64}}]}
    refused = await cli("attest", "verify", write("release-extra.json", _resign(rel_env, extra, ann)))
    assert refused.exit_code == 4 and "2 subjects" in refused.output, refused.output

    # The artifact registered with ann's key names her; an altered registration does not verify.
    assert prompt.key_id == ann.key_id and artifact_signer(settings, prompt) == "ann"
    with pytest.raises(SignatureError):
        artifact_signer(settings, msgspec.structs.replace(prompt, name="other"))
