"""A signed document read from a file is refused, before any signature is believed, when a key repeats at any depth
(probe p20 F2, F7): `gate verify --file` and `attest verify` (and `verify`) exit 4 in one line naming the key and its
path. The signature covers what lockgate decodes, not the bytes: a reader keeping the first of two keys read another
document than the one lockgate verified."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner, Result

from lockgate.cli.main import cli
from lockgate.config import Settings
from lockgate.contracts import GateDecided, RuleResult
from lockgate.ids import canonical_json
from lockgate.provenance import attest
from lockgate.signing import Signer, trust_file_path, trust_key
from tests.helpers import person

pytestmark = pytest.mark.timeout(30)

def _invoke(home: Path, *args: str) -> Result:
    env = {"LOCKGATE_NATS_URL": "nats://127.0.0.1:1", "LOCKGATE_HOME": str(home), "LOCKGATE_ROLE": None,
           "LOCKGATE_TRUST_FILE": None}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def _block(gk: Signer) -> GateDecided:
    rule = RuleResult(rule="acc", metric="exact_match", op=">=", threshold=0.8, observed=0.41, verdict="FAIL")
    return gk.sign(GateDecided(release="v2-rc1", decision="BLOCK", rules=[rule], eval_run="run-1",
                               artifacts={"prompt/answer": "sha256:" + "b" * 64}))


def test_gate_verify_file_refuses_a_decision_file_with_a_second_decision_key(tmp_path: Path) -> None:
    # Before (probe p20 F7): the genuine BLOCK with `"decision": "PASS"` put in front of its own key printed "ok:
    # decision ... is signed by key ..." and exited 0 (msgspec keeps the last key, and the signature covers the
    # decoded decision, not the bytes); a reader keeping the first key (gjson, `grep -m1`) read PASS.
    settings, gk = Settings(home=str(tmp_path)), Signer.generate()
    trust_key(trust_file_path(settings), gk.public)
    genuine = msgspec.json.encode(_block(gk))
    (tmp_path / "genuine.json").write_bytes(genuine)
    (tmp_path / "dup.json").write_bytes(b'{"decision": "PASS", ' + genuine[1:])
    assert json.loads((tmp_path / "dup.json").read_bytes(), object_pairs_hook=lambda p: p[0][1]) == "PASS"

    genuine_ = _invoke(tmp_path, "gate", "verify", "--file", str(tmp_path / "genuine.json"))
    # Authentic: 0, or 5 where `gate verify` says an authentic BLOCK admits nothing (probe p20 F4); never 4.
    assert genuine_.exit_code in (0, 5) and "(v2-rc1: BLOCK" in genuine_.output, genuine_.output
    refused = _invoke(tmp_path, "gate", "verify", "--file", str(tmp_path / "dup.json"))
    assert refused.exit_code == 4, refused.output
    assert refused.stderr == (f'error: {tmp_path / "dup.json"} is refused: key "decision" is given twice (readers '
                              "differ on which one counts) - at `$.decision`\n")
    # At any depth: a rule's verdict given twice.
    nested = genuine.replace(b'"verdict":"FAIL"', b'"verdict":"PASS","verdict":"FAIL"')
    (tmp_path / "nested.json").write_bytes(nested)
    deep = _invoke(tmp_path, "gate", "verify", "--file", str(tmp_path / "nested.json"))
    assert deep.exit_code == 4 and "- at `$.rules[0].verdict`" in deep.stderr, deep.output


def _envelope_of(payload: bytes, who: Any) -> dict[str, Any]:
    return {"payloadType": attest.PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": who.key_id, "sig": who.sign(attest.pae(attest.PAYLOAD_TYPE, payload))}]}


def test_attest_verify_refuses_a_payload_or_envelope_with_a_key_given_twice(tmp_path: Path) -> None:
    # Before (probe p20 F2): an operator signed a payload holding `"subject"` twice, first the BLOCKed release's
    # bundle digest, last the genuine one: `attest verify` said "verified: decision PASS" (json.loads keeps the last),
    # while a reader keeping the first read a PASS attestation whose one subject is the BLOCKed release.
    settings, gk = Settings(home=str(tmp_path)), Signer.generate()
    trust_key(trust_file_path(settings), gk.public)
    ann = person(settings, "ann", "operator")
    artifacts_ = {"prompt/answer": "sha256:" + "a" * 64}
    bundle = {"release": "v2-rc2", "app": "shop", "tenant": "default", "parent": "", "artifacts": artifacts_}
    blocked = {**bundle, "release": "v2-rc1", "artifacts": {"prompt/answer": "sha256:" + "b" * 64}}
    decision = gk.sign(GateDecided(release="v2-rc2", decision="PASS", rules=[], eval_run="run-2", artifacts=artifacts_))
    stmt = attest.decision_statement(decision, bundle)
    genuine = canonical_json(stmt)
    other = json.dumps(attest.release_statement(blocked)["subject"]).encode()
    cases = {
        "genuine": genuine,
        "subject": b'{"subject":' + other + b"," + genuine[1:],
        "decision": genuine.replace(b'"decision":"PASS"', b'"decision":"BLOCK","decision":"PASS"'),
    }
    out = {}
    for name, payload in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(_envelope_of(payload, ann)))
        out[name] = _invoke(tmp_path, "attest", "verify", str(tmp_path / f"{name}.json"))
    assert out["genuine"].exit_code == 0 and "verified: decision PASS for v2-rc2" in out["genuine"].output
    assert out["subject"].exit_code == 4, out["subject"].output
    assert out["subject"].stderr == ('error: the payload is refused: key "subject" is given twice (readers differ on '
                                     "which one counts) - at `$.subject`\n")
    assert out["decision"].exit_code == 4, out["decision"].output
    assert "- at `$.predicate.decision.decision`" in out["decision"].stderr
    # The envelope itself: a second payload (unsigned) beside the signed one.
    env = json.dumps(_envelope_of(genuine, ann))
    (tmp_path / "env.json").write_text('{"payload": "e30=", ' + env[1:])
    refused = _invoke(tmp_path, "verify", str(tmp_path / "env.json"))
    assert refused.exit_code == 4 and 'is refused: key "payload" is given twice' in refused.stderr, refused.output
