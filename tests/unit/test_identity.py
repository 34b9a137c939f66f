"""Personal identities: keys under the home, people in the trust file, and the statements they sign."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.config import Settings
from lockgate.contracts import GateReview
from lockgate.errors import ConfigError, NotFound
from lockgate.identity import (
    OVERRIDE_MAX_AGE_S,
    IdentityRefused,
    OutOfScope,
    apply_refusal,
    author_of,
    create_identity,
    load_identity,
    scope_refusal,
    sign_bundle,
    sign_override,
    sign_review,
    verify_override,
    verify_review,
)
from lockgate.signing import Signer, read_trust_file, revoke_person, trust_file_path, trust_key, trust_person

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=str(tmp_path))


def person(settings: Settings, name: str, *roles: str) -> object:
    ident = create_identity(settings, name)
    trust_person(trust_file_path(settings), name, ident.signer.public, roles)
    return ident


def review(**fields: object) -> GateReview:
    return GateReview(**{"release": "v2", "action": "approve", "actor": "", "reason": "read the diff",
                         "decision_id": "d1", **fields})


def test_identity_key_is_private_and_the_single_one_is_the_default(settings: Settings) -> None:
    ann = create_identity(settings, "ann")
    key = Path(settings.home) / "identities" / "ann.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.with_suffix(".pub").read_text().startswith("-----BEGIN")
    assert load_identity(settings, None).key_id == ann.key_id == load_identity(settings, "ann").key_id
    with pytest.raises(ConfigError, match="already exists"):
        create_identity(settings, "ann")
    create_identity(settings, "bob")
    with pytest.raises(NotFound, match="several"):
        load_identity(settings, None)
    with pytest.raises(NotFound, match="lockgate identity create zed"):
        load_identity(settings, "zed")


def test_a_signed_review_names_its_signer_and_survives_the_wire(settings: Settings) -> None:
    ann = person(settings, "ann", "approver")
    signed = sign_review(ann, review())
    wire = msgspec.json.decode(msgspec.json.encode(signed), type=GateReview)
    assert (wire.actor, verify_review(settings, wire)) == ("ann", "ann")


def test_refused_reviews_say_why(settings: Settings) -> None:
    ann = person(settings, "ann", "approver")
    ops = person(settings, "ops", "operator")
    stranger = create_identity(settings, "stranger")  # has a key, but nobody trusted it
    cases = {
        "is not signed by a person": review(actor="ann"),
        "no person's": sign_review(stranger, review()),
        r"who has role\(s\) operator; it needs approver or admin": sign_review(ops, review()),
        "altered after signing": msgspec.structs.replace(sign_review(ann, review()), action="reject"),
        # validly signed by ann, but the payload names bob: the claim is refused, not believed
        "claims actor 'bob' but is signed by ann": _signed_as(ann, review(actor="bob")),
    }
    for why, r in cases.items():
        with pytest.raises(IdentityRefused, match=why):
            verify_review(settings, r)
    revoke_person(trust_file_path(settings), "ann")
    with pytest.raises(IdentityRefused, match="ann's revoked key"):
        verify_review(settings, sign_review(ann, review()))


def test_a_review_counts_only_for_the_tenants_its_reviewer_is_scoped_to(settings: Settings) -> None:
    # Probe p25: a reviewer had no tenant, so tenant acme's approver approved and rejected tenant beta's releases.
    path = trust_file_path(settings)
    ann = create_identity(settings, "ann")
    trust_person(path, "ann", ann.signer.public, ["approver"], ["acme"])
    bob, boss = person(settings, "bob", "approver"), person(settings, "boss", "admin")
    assert verify_review(settings, sign_review(ann, review()), tenant="acme") == "ann"
    for action in ("approve", "reject"):
        signed = sign_review(ann, review(action=action))
        with pytest.raises(OutOfScope) as refused:
            verify_review(settings, signed, tenant="beta")
        assert refused.value.person == "ann" and refused.value.message == (
            f"{action} of v2 (review {signed.id}) is about a release of tenant beta, and ann reviews releases of "
            "tenant acme only, not of tenant beta: if ann should review it, an admin adds the tenant (`lockgate gate "
            "trust --person ann --role approver --tenant acme --tenant beta PUBLIC_KEY`)")
    assert scope_refusal(settings, ann, "beta") == "ann reviews releases of tenant acme only, not of tenant beta"
    assert scope_refusal(settings, ann, "acme") == ""
    # No tenants listed: every tenant's, as before tenants could be listed; an admin is never scoped.
    for ident in (bob, boss):
        assert verify_review(settings, sign_review(ident, review()), tenant="beta") == ident.name  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="an admin is not scoped to tenants"):
        trust_person(path, "boss", boss.signer.public, ["admin", "approver"], ["acme"])  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="add --role approver"):
        trust_person(path, "bob", bob.signer.public, ["operator"], ["acme"])  # type: ignore[attr-defined]
    # Re-trusting sets the tenants given: none widens ann to every tenant again.
    trust_person(path, "ann", ann.signer.public, ["approver"])
    assert verify_review(settings, sign_review(ann, review()), tenant="beta") == "ann"


def test_a_trust_file_without_tenants_reads_as_before_and_unscoped_people_are_written_without_them(
        settings: Settings) -> None:
    path = trust_file_path(settings)
    ann = create_identity(settings, "ann")
    trust_person(path, "ann", ann.signer.public, ["approver"])
    written = json.loads(path.read_text())
    assert set(written["people"]["ann"]) == {"key_id", "key", "roles"}  # an older lockgate reads it still
    trust_person(path, "ann", ann.signer.public, ["approver"], ["beta", "acme", "acme"])
    assert json.loads(path.read_text())["people"]["ann"]["tenants"] == ["acme", "beta"]
    assert read_trust_file(path).people["ann"].tenants == ["acme", "beta"]


def test_an_apply_signer_is_checked_as_the_recorder_checks_it_and_a_refusal_says_what_to_do(settings: Settings) -> None:
    # Found by probe p23 (F3): README's reviewer (an approver) signed every apply as the only identity under the home,
    # and the refusal named only a key id, or the roles, with nothing to do about it.
    alice = person(settings, "alice", "approver")
    stranger = create_identity(settings, "stranger")
    refused = apply_refusal(settings, alice, "/repo")  # type: ignore[arg-type]
    assert refused is not None and refused.message == (
        "apply of /repo is signed by alice, who has role(s) approver; it needs operator or admin: an admin trusts alice "
        "as operator too (`lockgate gate trust --person alice --role approver --role operator PUBLIC_KEY`)")
    unknown = apply_refusal(settings, stranger, "/repo")
    assert unknown is not None and unknown.message == (
        f"apply of /repo is signed by key {stranger.key_id!r}, which is no person's in {trust_file_path(settings)}: "
        "an admin trusts its holder with `lockgate gate trust --person NAME --role operator PUBLIC_KEY`")
    trust_person(trust_file_path(settings), "alice", alice.signer.public, ["approver", "operator"])  # type: ignore[attr-defined]
    assert apply_refusal(settings, alice, "/repo") is None  # type: ignore[arg-type]
    revoke_person(trust_file_path(settings), "alice")
    revoked = apply_refusal(settings, alice, "/repo")  # type: ignore[arg-type]
    assert revoked is not None and "alice needs a new identity" in revoked.message


def _signed_as(ident: object, r: GateReview) -> GateReview:
    """A review whose payload claims `r.actor` but is validly signed by `ident` (a lying client)."""
    from lockgate.identity import statement_bytes

    unsigned = msgspec.structs.replace(r, key_id=ident.key_id, signature="")  # type: ignore[attr-defined]
    return msgspec.structs.replace(unsigned, signature=ident.sign(statement_bytes(unsigned)))  # type: ignore[attr-defined]


def test_trust_file_people_rotate_and_never_share_a_key(settings: Settings) -> None:
    path = trust_file_path(settings)
    a1, a2, gk = Signer.generate(), Signer.generate(), Signer.generate()
    trust_person(path, "ann", a1.public, ["approver"])
    trust_person(path, "ann", a2.public, ["approver", "admin"])  # rotation replaces the key
    assert read_trust_file(path).people["ann"].key_id == a2.key_id
    with pytest.raises(ConfigError, match="already belongs to 'ann'"):
        trust_person(path, "bob", a2.public, ["approver"])
    trust_key(path, gk.public)
    with pytest.raises(ConfigError, match="decision-signing key"):
        trust_person(path, "cy", gk.public, ["admin"])
    revoke_person(path, "ann")
    with pytest.raises(ConfigError, match="revoked"):
        trust_person(path, "ann", a2.public, ["approver"])


def test_break_glass_needs_an_admin_signature_for_this_deployment_release_action_and_weight(settings: Settings) -> None:
    boss = person(settings, "boss", "admin")
    ann = person(settings, "ann", "approver")
    now = 1_800_000_000
    glass = sign_override(boss, deployment="chat", release="r2", action="promote", reason="incident 42", at=now)

    def check(**changes: object) -> str:
        args = {"deployment": "chat", "release": "r2", "action": "promote", "reason": glass["reason"],
                "at": glass["at"], "key_id": glass["key_id"], "signature": glass["signature"], "now": now + 5.0,
                **changes}
        return verify_override(settings, **args)  # type: ignore[arg-type]

    assert check() == "boss"
    for change, why in [({"deployment": "other"}, "altered"), ({"release": "r3"}, "altered"),
                        ({"action": "canary", "weight": 10.0}, "altered"), ({"reason": "changed"}, "altered"),
                        ({"weight": 100.0}, "altered"),
                        ({"now": now + OVERRIDE_MAX_AGE_S + 1}, "not within"), ({"signature": ""}, "not signed")]:
        with pytest.raises(IdentityRefused, match=why):
            check(**change)
    # A canary's statement covers the weight it names, and no other.
    canary = sign_override(boss, deployment="chat", release="r2", action="canary", reason="incident 42", at=now,
                           weight=10)
    assert check(action="canary", weight=10.0, signature=canary["signature"]) == "boss"
    unweighted = sign_override(boss, deployment="chat", release="r2", action="canary", reason="incident 42", at=now)
    with pytest.raises(IdentityRefused, match="names no weight"):
        check(action="canary", signature=unweighted["signature"])
    with pytest.raises(IdentityRefused, match="altered"):
        check(action="canary", weight=50.0, signature=canary["signature"])
    approver = sign_override(ann, deployment="chat", release="r2", action="promote", reason="incident", at=now)
    with pytest.raises(IdentityRefused, match="needs admin"):
        check(reason="incident", key_id=approver["key_id"], signature=approver["signature"])


def test_release_author_is_the_signer_of_the_bundle(settings: Settings) -> None:
    ann = person(settings, "ann", "operator")
    bundle = {"release": "r2", "app": "shop", "tenant": "default", "parent": "", "artifacts": {"a/b": "sha256:1"}}
    signed = sign_bundle(ann, bundle)
    assert author_of(settings, signed) == "ann" and author_of(settings, bundle) is None
    assert author_of(settings, {**signed, "artifacts": {"a/b": "sha256:2"}}) is None  # not what ann signed
    forged = {**signed, "author": {**signed["author"], "name": "bob"}}
    assert author_of(settings, forged) == "ann"  # the name comes from the key, never the payload
    revoke_person(trust_file_path(settings), "ann")
    assert author_of(settings, signed) == "ann"  # what she authored stays hers


def test_an_encrypted_personal_key_signs_only_with_its_passphrase(settings: Settings) -> None:
    # Before, a personal key was a plain file: whoever read {home}/identities/NAME.key signed as NAME.
    boss = create_identity(settings, "boss", lambda: b"correct horse")
    key = Path(settings.home) / "identities" / "boss.key"
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes() and stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="is encrypted: give its passphrase"):
        load_identity(settings, "boss")
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_identity(settings, "boss", lambda: b"battery staple")
    assert load_identity(settings, "boss", lambda: b"correct horse").key_id == boss.key_id


def test_the_cli_asks_an_encrypted_keys_passphrase_and_says_so_in_one_line(settings: Settings) -> None:
    env = {"LOCKGATE_HOME": settings.home, "LOCKGATE_IDENTITY_PASSPHRASE": "s3cret words"}
    made = CliRunner().invoke(cli, ["identity", "create", "boss", "--passphrase"], env=env)
    assert made.exit_code == 0 and "encrypted" in made.output, made.output
    sign = ["--as", "boss", "break-glass", "chat", "r2", "--action", "canary", "--weight", "10", "--reason", "incident 7"]
    locked = CliRunner().invoke(cli, sign, env={**env, "LOCKGATE_IDENTITY_PASSPHRASE": ""})
    assert locked.exit_code != 0 and "is encrypted: give its passphrase" in locked.output
    assert len(locked.output.strip().splitlines()) == 1 and "Traceback" not in locked.output
    wrong = CliRunner().invoke(cli, sign, env={**env, "LOCKGATE_IDENTITY_PASSPHRASE": "guess"})
    assert wrong.exit_code != 0 and "wrong passphrase" in wrong.output
    signed = CliRunner().invoke(cli, sign, env=env)
    assert signed.exit_code == 0 and json.loads(signed.output)["break_glass"]["signature"], signed.output


def test_identity_show_says_the_trust_files_view_as_json(settings: Settings) -> None:
    # Probe p23 F8: README says every query command takes --json; `identity show` did not.
    from lockgate.signing import trust_file_path, trust_person

    env = {"LOCKGATE_HOME": settings.home, "LOCKGATE_TRUST_FILE": str(trust_file_path(settings))}
    made = CliRunner().invoke(cli, ["identity", "create", "ann"], env=env)
    assert made.exit_code == 0, made.output
    unknown = CliRunner().invoke(cli, ["identity", "show", "--json"], env=env)
    assert unknown.exit_code == 0, unknown.output
    ann = load_identity(settings, "ann")
    assert json.loads(unknown.stdout) == {"name": "ann", "key_id": ann.key_id, "trust_file": env["LOCKGATE_TRUST_FILE"],
                                          "trusted": False, "revoked": False, "roles": [], "tenants": []}
    trust_person(trust_file_path(settings), "ann", ann.signer.public, roles=("approver",))
    known = json.loads(CliRunner().invoke(cli, ["identity", "show", "--json"], env=env).stdout)
    assert (known["trusted"], known["roles"], known["tenants"]) == (True, ["approver"], [])


def test_an_identity_name_with_a_slash_is_refused_in_one_line_and_no_key_is_written_or_read(settings: Settings) -> None:
    # Before (probe p37): `identity create 'a/../../pwned'` wrote the private key outside identities/, to
    # {home}/pwned.key, and `--as` such a name signed with whatever key file it led to.
    elsewhere = Path(settings.home) / "pwned.key"
    Signer.load_or_create(elsewhere)
    env, folder = {"LOCKGATE_HOME": settings.home}, Path(settings.home) / "identities"
    for args in (["identity", "create", "a/../../pwned"], ["--as", "a/../../pwned", "identity", "show"],
                 ["identity", "create", "team/alice"]):
        refused = CliRunner().invoke(cli, args, env=env)
        name = args[2] if args[0] == "identity" else args[1]
        assert (refused.exit_code, refused.output) == (2, f"error: invalid identity {name!r}: an identity's name has "
                                                          f"no / (it names its key files in {folder})\n"), refused.output
    assert sorted(p.name for p in Path(settings.home).rglob("*")) == ["pwned.key"]
    made = CliRunner().invoke(cli, ["identity", "create", "alice.b@x"], env=env)  # the rest of the grammar still is
    assert made.exit_code == 0 and (Path(settings.home) / "identities" / "alice.b@x.key").is_file(), made.output
