"""Ed25519 decision signatures: round trip, tampering, unknown keys, key files."""

from __future__ import annotations

import asyncio
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from lockgate.config import Settings
from lockgate.contracts import GateDecided, RuleResult
from lockgate.errors import ConfigError, SignatureError
from lockgate.ids import canonical_json
from lockgate.signing import (
    Keyring,
    Signer,
    Verifier,
    canonical,
    default_key_path,
    gatekeeper_signer,
    public_pem,
    read_trust_file,
    retire_key,
    revoke_key,
    revoke_person,
    trust_file_path,
    trust_key,
    trust_person,
    undo_grant,
)

pytestmark = pytest.mark.timeout(10)


def decision() -> GateDecided:
    rule = RuleResult(rule="acc", metric="exact_match", op=">=", threshold=0.8, observed=0.91, verdict="PASS",
                      low=0.85, high=0.95)
    return GateDecided(release="v2", decision="PASS", rules=[rule], eval_run="run-1",
                       artifacts={"prompt/system": "sha256:abc"})


def test_round_trip_survives_the_wire() -> None:
    signer = Signer.generate()
    signed = signer.sign(decision())
    assert signed.key_id == signer.key_id and len(signer.key_id) == 16 and signed.signature
    wire = msgspec.json.decode(msgspec.json.encode(signed), type=GateDecided)
    assert Keyring([signer.public]).verify(wire) == signer.key_id
    assert canonical(signed) == canonical(msgspec.structs.replace(signed, signature="x"))


@pytest.mark.parametrize("change", [
    {"decision": "BLOCK"}, {"release": "v3"}, {"artifacts": {"prompt/system": "sha256:def"}},
    {"rules": []}, {"key_id": "0" * 16}, {"signature": "not base64!"}, {"signature": ""},
])
def test_tampering_fails(change: dict) -> None:
    signer = Signer.generate()
    tampered = msgspec.structs.replace(signer.sign(decision()), **change)
    with pytest.raises(SignatureError) as err:
        Keyring([signer.public]).verify(tampered)
    assert err.value.message.startswith("signature invalid:") and err.value.exit_code == 4


def test_unknown_key_is_rejected() -> None:
    signed = Signer.generate().sign(decision())
    with pytest.raises(SignatureError, match="unknown key id"):
        Keyring([Signer.generate().public]).verify(signed)


def test_key_file_is_created_private_and_reloaded(tmp_path: Path) -> None:
    path = default_key_path(Settings(home=str(tmp_path)))
    assert path == tmp_path / "keys" / "gatekeeper.pem"
    first = Signer.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Signer.load_or_create(path).key_id == first.key_id
    pub = tmp_path / "pub.pem"
    pub.write_bytes(public_pem(first.public))
    assert Keyring.from_pem_files([pub]).verify(first.sign(decision())) == first.key_id


def test_bad_key_files_are_config_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("nope")
    with pytest.raises(ConfigError, match="is not a PEM private key"):
        Signer.load_or_create(junk)
    with pytest.raises(ConfigError, match="not a PEM public key"):
        Keyring.from_pem_files([junk])


def test_trust_file_keys_rotation_and_revocation(tmp_path: Path) -> None:
    """Several keys are valid at once (rotation); a revoked id is refused even if listed again."""
    path = tmp_path / "trust.json"
    old, new = Signer.generate(), Signer.generate()
    trust_key(path, old.public)
    trust_key(path, new.public)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    d_old, d_new = (s.sign(GateDecided(release="r", decision="PASS", rules=[])) for s in (old, new))
    ring = Keyring.from_trust_file(path)
    assert (ring.verify(d_old), ring.verify(d_new)) == (old.key_id, new.key_id)
    revoke_key(path, old.key_id)
    ring = Keyring.from_trust_file(path)
    with pytest.raises(SignatureError, match="revoked key id"):
        ring.verify(d_old)
    assert ring.verify(d_new) == new.key_id
    with pytest.raises(ConfigError, match="revoked"):
        trust_key(path, old.public)


def test_a_retired_key_verifies_what_it_signed_before_as_history_and_admits_nothing(tmp_path: Path) -> None:
    """A rotation: the old key's decisions up to its retirement verify as history (`gate verify`, a baseline), none
    admits (the router, the SDK, `eval run`), and one it signed after its retirement is refused even as history."""
    path = tmp_path / "trust.json"
    old, new = Signer.generate(), Signer.generate()
    trust_key(path, old.public)
    with pytest.raises(ConfigError, match="the only decision key trusted"):
        retire_key(path, old.key_id, until_seq=0)
    trust_key(path, new.public)
    before = old.sign(GateDecided(release="r", decision="PASS", rules=[], time=datetime(2026, 1, 1, tzinfo=UTC)))
    at = datetime(2026, 2, 1, tzinfo=UTC)
    retired = retire_key(path, old.key_id, until_seq=7, at=at)
    assert (retired.at, retired.until_seq) == (at, 7)
    ring = Keyring.from_trust_file(path)
    assert old.key_id not in ring.keys and ring.why_untrusted(old.key_id) == (
        f"key {old.key_id} was retired at 2026-02-01 00:00:00Z in {path}")
    assert ring.verify(before, history=True) == old.key_id
    with pytest.raises(SignatureError) as err:
        ring.verify(before)
    assert err.value.message == (f"decision {before.id} for r was signed by key id {old.key_id!r}, retired at "
                                 "2026-02-01 00:00:00Z: a retired key admits nothing; re-gate r (run its eval again)")
    after = old.sign(GateDecided(release="r", decision="PASS", rules=[], time=at + timedelta(seconds=1)))
    with pytest.raises(SignatureError, match="after its retirement at 2026-02-01 00:00:00Z"):
        ring.verify(after, history=True)
    with pytest.raises(SignatureError, match="altered after signing"):
        ring.verify(msgspec.structs.replace(before, decision="BLOCK"), history=True)
    # Retired again (rows chained while it was retired): only the seq grows, the time stays.
    assert retire_key(path, old.key_id, until_seq=9).until_seq == 9
    assert retire_key(path, old.key_id, until_seq=3).until_seq == 9
    assert Keyring.from_trust_file(path).retired[old.key_id][1:] == (at, 9)
    # Never trusted again (a gatekeeper still holding it is given a new key), nor taken as a person's.
    with pytest.raises(ConfigError, match="was retired"):
        trust_key(path, old.public)
    # Found leaked later, it is revoked: nothing it signed counts any more.
    revoke_key(path, old.key_id)
    ring = Keyring.from_trust_file(path)
    assert old.key_id not in ring.retired
    with pytest.raises(SignatureError, match="revoked key id"):
        ring.verify(before, history=True)
    with pytest.raises(ConfigError, match="is revoked"):
        retire_key(path, old.key_id, until_seq=0)


def test_cli_trust_and_revoke_edit_the_trust_file(tmp_path: Path) -> None:
    """`lockgate gate trust KEY` and `gate revoke ID`: how an operator rotates and revokes keys."""
    from click.testing import CliRunner

    from lockgate.cli.main import cli

    signer = Signer.load_or_create(tmp_path / "gatekeeper.pem")
    # Nothing listens on port 1: with no stack, the change is made and said to be outside the audit log.
    env = {"LOCKGATE_TRUST_FILE": str(tmp_path / "trust.json"), "LOCKGATE_NATS_URL": "nats://127.0.0.1:1"}
    runner = CliRunner()
    added = runner.invoke(cli, ["gate", "trust", str(tmp_path / "gatekeeper.pem")], env=env)
    assert added.exit_code == 0 and f"trusted key {signer.key_id}" in added.output, added.output
    assert "this change is not in the audit log" in added.output
    assert signer.key_id in Keyring.from_trust_file(tmp_path / "trust.json").keys
    listed = runner.invoke(cli, ["gate", "keys"], env=env)
    assert listed.exit_code == 0 and f"# key id {signer.key_id}" in listed.output
    # Probe p23 F8: README says every query command takes --json; `gate keys` did not.
    as_json = runner.invoke(cli, ["gate", "keys", "--json"], env=env)
    assert as_json.exit_code == 0, as_json.output
    assert [(k["key_id"], k["pem"]) for k in json.loads(as_json.stdout)] == [
        (signer.key_id, public_pem(signer.public).decode())]
    # A mistyped id: refused in one line naming the trusted keys (before, "revoked key nope", exit 0, while the
    # leaked key stayed trusted).
    typo = runner.invoke(cli, ["gate", "revoke", "nope"], env=env)
    assert typo.exit_code != 0 and "'nope' is no decision key of the trust roots" in typo.output, typo.output
    assert signer.key_id in typo.output and len(typo.output.strip().splitlines()) == 1
    assert Keyring.from_trust_file(tmp_path / "trust.json").revoked == set()
    gone = runner.invoke(cli, ["gate", "revoke", signer.key_id], env=env)
    assert gone.exit_code == 0
    assert Keyring.from_trust_file(tmp_path / "trust.json").revoked == {signer.key_id}
    again = runner.invoke(cli, ["gate", "revoke", signer.key_id], env=env)  # revoked already: still says so
    assert again.exit_code == 0, again.output


def test_undo_grant_takes_back_that_grant_only(tmp_path: Path) -> None:
    """What `gate trust` does when the audit log does not take the grant: that entry as it was, the rest kept."""
    path = tmp_path / "trust.json"
    key, alice, other = Signer.generate(), Signer.generate(), Signer.generate()
    trust_key(path, key.public)
    undo_grant(path, None, kid=key.key_id)
    assert not path.exists()  # the grant made the file: it is gone again
    trust_person(path, "alice", alice.public, ["approver"])
    before = read_trust_file(path)
    trust_person(path, "alice", other.public, ["admin"])  # a rotation, then a revocation made meanwhile
    revoke_person(path, "alice")
    undo_grant(path, before, person="alice")
    now = read_trust_file(path)
    assert now.people == before.people and now.revoked == [other.key_id]
    trust_key(path, key.public)
    undo_grant(path, before, kid=key.key_id)
    assert key.key_id not in read_trust_file(path).keys


def test_a_decision_is_signed_with_its_free_text_scrubbed_of_secrets() -> None:
    # Before (probe p10, F6): a BLOCK's reason quoted the eval's error whole, a URL's password included, and the
    # signed decision carried it into KV, the audit log and the route's reason, where no later scrub may change it.
    pw = "Pw9xKq2mZt7LrV4n"
    url = f"http://evaluser:{pw}@127.0.0.1:9000/v1"
    rule = msgspec.structs.replace(decision().rules[0], hint=f"called {url}", explanation=f"token {pw}Zz")
    signer = Signer.generate()
    signed = signer.sign(msgspec.structs.replace(decision(), reason=f"eval run r1 failed: asks for {url}",
                                                 rules=[rule]))
    assert pw not in msgspec.json.encode(signed).decode()
    assert signed.reason == "eval run r1 failed: asks for http://evaluser:[REDACTED]@127.0.0.1:9000/v1"
    assert (signed.rules[0].hint, signed.rules[0].explanation) == (
        "called http://evaluser:[REDACTED]@127.0.0.1:9000/v1", "token [REDACTED]")
    assert Keyring([signer.public]).verify(signed) == signer.key_id  # what is signed is what is stored
    given = decision()
    plain = signer.sign(given)  # nothing to scrub: signed as given
    assert msgspec.structs.replace(plain, key_id="", signature="") == given


def test_a_decision_signed_before_approvals_existed_still_verifies() -> None:
    # The bytes an older gatekeeper signed had no `approvals` (nor `approval_keys`, nor `seq`) field at all.
    signer = Signer.generate()
    d = msgspec.structs.replace(decision(), key_id=signer.key_id)
    old = msgspec.to_builtins(d)
    old.pop("approvals")
    old.pop("approval_keys")
    old.pop("seq")
    signed = msgspec.structs.replace(d, signature=signer.sign_bytes(canonical_json({**old, "signature": ""})))
    assert Keyring([signer.public]).verify(signed) == signer.key_id
    # once set, approvals and their keys are signed: stripping or changing them breaks the signature
    approved = signer.sign(msgspec.structs.replace(d, approvals=["ann", "bob"], approval_keys=["k1", "k2"]))
    for tampered in (msgspec.structs.replace(approved, approvals=[]), msgspec.structs.replace(approved, approvals=["ann"]),
                     msgspec.structs.replace(approved, approval_keys=["k1", "k3"])):
        with pytest.raises(SignatureError):
            Keyring([signer.public]).verify(tampered)


def test_a_decisions_seq_is_signed_and_one_without_it_signs_the_bytes_of_before() -> None:
    # Subscribers order a release's decisions by seq (decisionwatch.Newest): whoever passes a decision on must not be
    # able to raise it (an old PASS made newer than the BLOCK after it) or strip it.
    signer = Signer.generate()
    ordered = signer.sign(msgspec.structs.replace(decision(), seq=7))
    assert b'"seq":7' in canonical(ordered)
    assert Keyring([signer.public]).verify(ordered) == signer.key_id
    for seq in (8, 0):
        with pytest.raises(SignatureError, match="signature invalid"):
            Keyring([signer.public]).verify(msgspec.structs.replace(ordered, seq=seq))
    assert b'"seq"' not in canonical(decision())  # seq 0: the bytes a gatekeeper of before signed


def test_an_explicit_signing_key_must_exist_never_made_per_process(tmp_path: Path) -> None:
    # k8s mounts one key for every gatekeeper replica; a missing mount used to mean a fresh key per pod.
    missing = tmp_path / "secret" / "gatekeeper.pem"
    with pytest.raises(ConfigError, match="LOCKGATE_SIGNING_KEY"):
        gatekeeper_signer(Settings(home=str(tmp_path), signing_key=str(missing)))
    assert not missing.exists()
    home_key = gatekeeper_signer(Settings(home=str(tmp_path)))  # the home's key: made once, then kept
    assert gatekeeper_signer(Settings(home=str(tmp_path))).key_id == home_key.key_id
    shared = gatekeeper_signer(Settings(home=str(tmp_path / "other"), signing_key=str(default_key_path(
        Settings(home=str(tmp_path))))))
    assert shared.key_id == home_key.key_id


def test_a_verifier_stops_trusting_a_key_as_soon_as_the_trust_file_revokes_it(tmp_path: Path) -> None:
    # What a router asks before raising a canary a decision of that key admitted earlier.
    settings = Settings(home=str(tmp_path))
    signer = Signer.generate()
    trust_key(trust_file_path(settings), signer.public)
    verifier = Verifier(None, settings)
    assert verifier.trusts(signer.key_id) and not verifier.trusts("0" * 16)
    revoke_key(trust_file_path(settings), signer.key_id)
    assert not verifier.trusts(signer.key_id)


def test_gate_verify_with_a_key_file_still_honours_the_trust_files_revocations_and_retirements(tmp_path: Path) -> None:
    # Before (probe p3, finding 5): `gate verify --key PEM` replaced the trust roots with the PEM, so a decision
    # signed by a revoked (leaked) key, or by a retired one after its retirement, printed "ok" and exited 0.
    from click.testing import CliRunner

    from lockgate.cli.main import cli

    settings = Settings(home=str(tmp_path))
    leaked, retired, current = Signer.generate(), Signer.generate(), Signer.generate()
    for s in (leaked, retired, current):
        trust_key(trust_file_path(settings), s.public)
    revoke_key(trust_file_path(settings), leaked.key_id)
    retire_key(trust_file_path(settings), retired.key_id, until_seq=0,
               at=datetime.now(UTC) - timedelta(hours=1))
    env = {"LOCKGATE_TRUST_FILE": str(trust_file_path(settings)), "LOCKGATE_NATS_URL": "nats://127.0.0.1:1"}
    runner = CliRunner()

    def verify(signer: Signer) -> object:
        (tmp_path / "d.json").write_bytes(msgspec.json.encode(signer.sign(decision())))
        (tmp_path / "k.pem").write_bytes(public_pem(signer.public))
        return runner.invoke(cli, ["gate", "verify", "--file", str(tmp_path / "d.json"), "--key",
                                   str(tmp_path / "k.pem")], env=env)

    refused = verify(leaked)
    assert refused.exit_code == 4 and f"revoked key id {leaked.key_id!r}" in refused.stderr, refused.output
    after = verify(retired)
    assert after.exit_code == 4 and "after its retirement" in after.stderr, after.output
    ok = verify(current)
    assert ok.exit_code == 0 and f"signed by key {current.key_id}" in ok.output, ok.output


def test_a_pass_by_approval_admits_nothing_once_an_approval_it_needed_is_withdrawn(tmp_path: Path) -> None:
    from lockgate.signing import ApprovalWithdrawn, revoke_person, trust_person

    settings, gk = Settings(home=str(tmp_path)), Signer.generate()
    trust_key(trust_file_path(settings), gk.public)
    ann, bob = Signer.generate(), Signer.generate()
    trust_person(trust_file_path(settings), "ann", ann.public, ["approver"])
    trust_person(trust_file_path(settings), "bob", bob.public, ["approver"])
    approved = gk.sign(msgspec.structs.replace(decision(), reviewed_by="bob", approvals=["ann", "bob"],
                                               approval_keys=[ann.key_id, bob.key_id]))
    pending = gk.sign(msgspec.structs.replace(approved, decision="NEEDS_REVIEW"))
    verifier = Verifier(None, settings)
    assert Keyring.from_settings(settings).verify(approved) == gk.key_id

    revoke_person(trust_file_path(settings), "bob")
    for check in (Keyring.from_settings(settings).verify, lambda d: asyncio.run(verifier.verify(d))):  # what consumers hold
        with pytest.raises(ApprovalWithdrawn) as refused:
            check(approved)
        assert f"the approval by bob (key {bob.key_id}) no longer counts: bob's key {bob.key_id} is revoked" \
            in refused.value.message and "re-gate v2" in refused.value.message
    # As history it is still what the gatekeeper decided; a pending decision admits nothing anyway.
    assert Keyring.from_settings(settings).verify(approved, history=True) == gk.key_id
    assert Keyring.from_settings(settings).verify(pending) == gk.key_id
    # A person losing the reviewer role withdraws their approval too; pinned keys alone know no people.
    trust_person(trust_file_path(settings), "ann", ann.public, ["operator"])
    with pytest.raises(ApprovalWithdrawn, match="ann no longer has role approver or admin"):
        Keyring.from_settings(settings).verify(approved)
    assert Keyring([gk.public]).verify(approved) == gk.key_id


@pytest.mark.parametrize(("roles", "tenants", "tenant", "counts"), [
    (["approver"], [], "beta", True),  # no tenants: every tenant's (trust files from before tenants were listed)
    (["approver"], ["acme"], "acme", True),
    (["approver"], ["acme", "gamma"], "gamma", True),
    (["approver"], ["acme"], "beta", False),
    (["approver"], ["acme"], "default", False),
    (["approver", "admin"], ["acme"], "beta", True),  # an admin is never scoped (a hand-edited list changes nothing)
])
def test_a_reviewer_scoped_to_tenants_counts_for_those_tenants_only(roles: list[str], tenants: list[str], tenant: str,
                                                                     counts: bool) -> None:
    from lockgate.signing import Person, out_of_scope, withdrawn

    ann = Person(key_id="k1", key="", roles=roles, tenants=tenants)
    why = out_of_scope("ann", ann, tenant)
    assert (why == "") is counts
    assert withdrawn({"ann": ann}, set(), [("ann", "k1")], tenant=tenant) == ({} if counts else {"ann": why})
    assert withdrawn({"ann": ann}, set(), [("ann", "k1")]) == {}  # no release's tenant to judge by: not judged


def test_a_pass_approved_by_a_reviewer_of_another_tenant_admits_nothing(tmp_path: Path) -> None:
    # Probe p25: scoping is judged where approvals are judged, so a PASS of tenant beta resting on the approval of
    # an approver scoped to acme (made before the scope, or by a gatekeeper that did not check it) admits nothing.
    from lockgate.signing import ApprovalWithdrawn

    settings, gk, ann = Settings(home=str(tmp_path)), Signer.generate(), Signer.generate()
    trust_key(trust_file_path(settings), gk.public)
    trust_person(trust_file_path(settings), "ann", ann.public, ["approver"])
    approved = {t: gk.sign(msgspec.structs.replace(decision(), tenant=t, reviewed_by="ann", approvals=["ann"],
                                                   approval_keys=[ann.key_id])) for t in ("acme", "beta")}
    for d in approved.values():
        assert Keyring.from_settings(settings).verify(d) == gk.key_id
    trust_person(trust_file_path(settings), "ann", ann.public, ["approver"], ["acme"])
    assert Keyring.from_settings(settings).verify(approved["acme"]) == gk.key_id
    with pytest.raises(ApprovalWithdrawn, match=f"the approval by ann \\(key {ann.key_id}\\) no longer counts: ann "
                                                "reviews releases of tenant acme only, not of tenant beta"):
        Keyring.from_settings(settings).verify_record(approved["beta"])


def test_a_verified_record_says_whether_it_admits_and_withdrawn_approvals_fail_it(tmp_path: Path) -> None:
    """What `gate verify` and `attest verify` apply (probe p20 F1, F4, F12): `verify_record` is authentic as history
    with its approvals still counting; `not_admitting` is "" exactly for a PASS `verify` admits, else why not."""
    from lockgate.signing import ApprovalWithdrawn

    path = tmp_path / "trust.json"
    gk, old, ann = Signer.generate(), Signer.generate(), Signer.generate()
    trust_key(path, gk.public)
    trust_key(path, old.public)
    trust_person(path, "ann", ann.public, ["approver"])
    passed = gk.sign(decision())
    approved = gk.sign(msgspec.structs.replace(decision(), approvals=["ann"], approval_keys=[ann.key_id]))
    before = old.sign(msgspec.structs.replace(decision(), time=datetime(2026, 1, 1, tzinfo=UTC)))
    retire_key(path, old.key_id, until_seq=0, at=datetime(2026, 2, 1, tzinfo=UTC))
    ring = Keyring.from_trust_file(path)
    for d in (passed, approved):
        assert ring.verify_record(d) == gk.key_id and ring.not_admitting(d) == "" and ring.verify(d) == gk.key_id
    for verdict in ("BLOCK", "NEEDS_REVIEW"):
        held = gk.sign(msgspec.structs.replace(decision(), decision=verdict))
        assert ring.verify_record(held) == gk.key_id and ring.not_admitting(held) == f"a {verdict} admits nothing"
    assert ring.verify_record(before) == old.key_id
    assert ring.not_admitting(before) == (f"a PASS signed by key {old.key_id} (retired at 2026-02-01 00:00:00Z, after "
                                          "it signed it) admits nothing now; re-gate v2 to roll it out")
    with pytest.raises(SignatureError, match="retired key admits nothing"):
        ring.verify(before)  # what the router holds: the same verdict
    blocked = old.sign(msgspec.structs.replace(decision(), decision="BLOCK", time=datetime(2026, 1, 1, tzinfo=UTC)))
    assert ring.not_admitting(blocked) == (f"a BLOCK admits nothing; it was signed by key {old.key_id} (retired at "
                                           "2026-02-01 00:00:00Z, after it signed it)")
    revoke_person(path, "ann")
    ring = Keyring.from_trust_file(path)
    with pytest.raises(ApprovalWithdrawn, match="the approval by ann"):
        ring.verify_record(approved)  # before (p20 F1), `attest verify`'s history check took it
    assert ring.verify(approved, history=True) == gk.key_id  # the gatekeeper's own reading of its history


def test_gate_verify_offline_without_the_trust_file_says_it_knows_no_revocation(tmp_path: Path) -> None:
    # Found by a probe (p20 F13): README's offline form `gate verify --file D --key gatekeeper.pem`, on a machine
    # without the trust file, said "ok" for a revoked key's decision and nowhere that it could not know.
    from click.testing import CliRunner

    from lockgate.cli.main import cli

    settings = Settings(home=str(tmp_path))
    leaked = Signer.generate()
    trust_key(trust_file_path(settings), leaked.public)
    revoke_key(trust_file_path(settings), leaked.key_id)
    (tmp_path / "d.json").write_bytes(msgspec.json.encode(leaked.sign(decision())))
    (tmp_path / "k.pem").write_bytes(public_pem(leaked.public))
    runner = CliRunner()

    def verify(trust: Path) -> object:
        return runner.invoke(cli, ["gate", "verify", "--file", str(tmp_path / "d.json"), "--key", str(tmp_path / "k.pem")],
                             env={"LOCKGATE_TRUST_FILE": str(trust), "LOCKGATE_NATS_URL": "nats://127.0.0.1:1"})

    known = verify(trust_file_path(settings))
    assert known.exit_code == 4 and "revoked key id" in known.stderr, known.output
    blind = verify(tmp_path / "elsewhere" / "trust.json")  # a CI runner without the operator's home
    assert blind.exit_code == 0 and blind.stdout.startswith("ok: decision "), blind.output
    assert blind.stderr == (f"warning: no trust file at {tmp_path / 'elsewhere' / 'trust.json'}: revocations, "
                            "retirements and approvers are unknown here, so a revoked key's decision verifies; give "
                            "this machine the trust file (LOCKGATE_TRUST_FILE)\n")
