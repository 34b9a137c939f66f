"""Personal identities: a person's Ed25519 key, and how what people sign (reviews, break-glass overrides,
release authorship) is checked against the people of the trust file.

A NATS role (approver, admin) is shared by everyone who holds it, so it cannot say *who* approved. A
person's key can: the trust file binds a name and roles to one public key, and a consumer takes the
name from the key that verified the signature, never from the payload.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lockgate.config import Settings
from lockgate.contracts import ApplyRequest, GateDecided, GateReview
from lockgate.contracts.names import check_name
from lockgate.errors import ConfigError, InvalidName, NotFound, SignatureError
from lockgate.ids import canonical_json
from lockgate.signing import (
    REVIEWER_ROLES,
    Signer,
    out_of_scope,
    public_pem,
    read_trust_file,
    signed_approvals,
    trust_file_path,
    withdrawn,
)

PERSON_ROLES = ("operator", "approver", "admin")
APPLY_ROLES = ("operator", "admin")  # who may sign an apply: it changes what the stack holds, as an alias move does
# A signed break-glass statement is accepted this long after it was signed: long enough to paste it into
# a request, short enough that a copy found later cannot be replayed.
OVERRIDE_MAX_AGE_S = 600.0


class IdentityRefused(SignatureError):
    """A statement is not signed by a trusted, unrevoked person with the role it needs."""


class OutOfScope(IdentityRefused):
    """A statement genuinely signed by a trusted person with the role it needs, about a release of a tenant whose
    releases the trust file does not let them review."""

    def __init__(self, message: str, person: str) -> None:
        super().__init__(message)
        self.person = person  # their signature verified: the refusal names them, not "unverified"


def identities_dir(settings: Settings) -> Path:
    """Where personal keys live: {home}/identities (0700), one NAME.key (0600) and NAME.pub each."""
    return Path(settings.home) / "identities"


def check_identity_name(settings: Settings, name: str) -> str:
    """`name` if it may name an identity: the name grammar without "/", since it names the identity's files in
    identities_dir (before, probe p37, `identity create 'a/../../pwned'` wrote the private key to {home}/pwned.key)."""
    check_name(name, "identity")
    if "/" in name:
        raise InvalidName(f"invalid identity {name!r}: an identity's name has no / (it names its key files in "
                          f"{identities_dir(settings)})")
    return name


@dataclass(frozen=True)
class Identity:
    """A person's name (as the trust file will know it) and private key."""

    name: str
    signer: Signer

    @property
    def key_id(self) -> str:
        """The id of the person's public key (what the trust file lists)."""
        return self.signer.key_id

    def sign(self, data: bytes) -> str:
        """A base64 signature over `data`."""
        return self.signer.sign_bytes(data)


# A passphrase source: called only when a key is encrypted (or, creating one, to encrypt it).
Passphrase = Callable[[], bytes | None]


def create_identity(settings: Settings, name: str, passphrase: Passphrase | None = None) -> Identity:
    """Make NAME's key pair under the home (private 0600, encrypted with `passphrase()` when it gives one);
    ConfigError if NAME already has one."""
    check_identity_name(settings, name)
    folder = identities_dir(settings)
    path = folder / f"{name}.key"
    if path.exists():
        raise ConfigError(f"identity {name!r} already exists in {path}; its public key is {path.with_suffix('.pub')}")
    signer = Signer.load_or_create(path, passphrase)
    folder.chmod(0o700)
    path.with_suffix(".pub").write_bytes(public_pem(signer.public))
    return Identity(name, signer)


def load_identity(settings: Settings, name: str | None, passphrase: Passphrase | None = None) -> Identity:
    """NAME's identity (`--as` / LOCKGATE_IDENTITY), or the only one under the home when NAME is not given;
    `passphrase()` unlocks an encrypted key."""
    folder = identities_dir(settings)
    if not name:
        found = sorted(p.stem for p in folder.glob("*.key")) if folder.is_dir() else []
        if len(found) != 1:
            which = f"several ({', '.join(found)}): pick one with --as NAME or LOCKGATE_IDENTITY" if found else \
                f"none in {folder}: create one with `lockgate identity create NAME`, and have an admin trust it " \
                f"with `lockgate gate trust --person NAME --role approver {folder}/NAME.pub`"
            raise NotFound(f"no personal identity chosen; {which}")
        name = found[0]
    path = folder / f"{check_identity_name(settings, name)}.key"
    if not path.exists():
        raise NotFound(f"identity {name!r} has no key at {path} (`lockgate identity create {name}`)")
    return Identity(name, Signer.load_or_create(path, passphrase))


def _public(pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"a person's key in the trust file is {type(key).__name__}, expected Ed25519")
    return key


def verify_person(settings: Settings, key_id: str, signature: str, data: bytes, *, roles: Iterable[str],
                  what: str, allow_revoked: bool = False, tenant: str | None = None) -> str:
    """The name of the trusted person whose key signed `data`, or IdentityRefused saying why not; with `tenant`
    (a review of that tenant's release), OutOfScope if the trust file scopes them to other tenants.

    The trust file is read on every call: statements by people are rare, and a revocation must apply at once.
    """
    roles = tuple(roles)
    path = trust_file_path(settings)
    if not signature or not key_id:
        raise IdentityRefused(f"{what} is not signed by a person: sign it with a personal identity "
                              "(`lockgate identity create NAME`, trusted by an admin with `lockgate gate trust --person`)")
    trust = read_trust_file(path)
    name, person = next(((n, p) for n, p in trust.people.items() if p.key_id == key_id), ("", None))
    # Each refusal says what would make such a statement count: a key id alone tells its holder nothing to do.
    if person is None:
        raise IdentityRefused(f"{what} is signed by key {key_id!r}, which is no person's in {path}: an admin trusts "
                              f"its holder with `lockgate gate trust --person NAME --role {(roles or ('approver',))[0]} "
                              "PUBLIC_KEY`")
    if key_id in trust.revoked and not allow_revoked:
        raise IdentityRefused(f"{what} is signed by {name}'s revoked key {key_id} (a revoked key is never trusted "
                              f"again: {name} needs a new identity, `lockgate identity create`, trusted by an admin)")
    if roles and not set(roles) & set(person.roles):
        # `gate trust --person` sets the roles and tenants it is given: the command keeps the person's own (an
        # admin is never scoped, so a person made one loses their tenants).
        tenants = person.tenants if roles[0] != "admin" else []
        flags = " ".join([*(f"--role {r}" for r in (*person.roles, roles[0])), *(f"--tenant {t}" for t in tenants)])
        raise IdentityRefused(f"{what} is signed by {name}, who has role(s) {', '.join(person.roles) or 'none'}; "
                              f"it needs {' or '.join(roles)}: an admin trusts {name} as {roles[0]} too "
                              f"(`lockgate gate trust --person {name} {flags} PUBLIC_KEY`)")
    try:
        _public(person.key).verify(base64.b64decode(signature, validate=True), data)
    except (InvalidSignature, binascii.Error, ValueError):
        raise IdentityRefused(f"{what} does not match its signature by {name}'s key {key_id} "
                              "(altered after signing, or signed by someone else?)") from None
    if tenant is not None and (why := out_of_scope(name, person, tenant)):
        flags = " ".join([*(f"--role {r}" for r in person.roles), *(f"--tenant {t}" for t in (*person.tenants,
                                                                                                 tenant))])
        raise OutOfScope(f"{what} is about a release of tenant {tenant}, and {why}: if {name} should review it, an "
                         f"admin adds the tenant (`lockgate gate trust --person {name} {flags} PUBLIC_KEY`)", name)
    return name


# Statements a person signs whole (an apply, a review)


def statement_bytes(statement: Any) -> bytes:
    """What a person signs of a statement (an ApplyRequest, a GateReview): the whole of it but its signature."""
    return canonical_json(msgspec.to_builtins(msgspec.structs.replace(statement, signature="")))


def _signed(identity: Identity, statement: Any, signer_field: str) -> Any:
    """`statement` as `identity`: its name in `signer_field`, its key id, and its signature over the rest."""
    unsigned = msgspec.structs.replace(statement, **{signer_field: identity.name}, key_id=identity.key_id,
                                       signature="")
    return msgspec.structs.replace(unsigned, signature=identity.sign(statement_bytes(unsigned)))


def sign_apply(identity: Identity, request: ApplyRequest) -> ApplyRequest:
    """The apply as `identity`: its name as `applied_by`, its key id, and its signature."""
    return _signed(identity, request, "applied_by")  # type: ignore[no-any-return]


def verify_apply(settings: Settings, request: ApplyRequest) -> str:
    """The operator's (or admin's) name that signed the apply; IdentityRefused if it names a person who did
    not sign it."""
    what = f"apply of {request.directory}"
    name = verify_person(settings, request.key_id, request.signature, statement_bytes(request),
                         roles=APPLY_ROLES, what=what)
    if request.applied_by != name:
        raise IdentityRefused(f"{what} claims applied_by {request.applied_by!r} but is signed by {name}")
    return name


def apply_refusal(settings: Settings, identity: Identity, directory: str) -> IdentityRefused | None:
    """Why the lineage recorder would refuse an apply of `directory` signed by `identity`, by the trust file now; None
    if it would take it.

    The recorder's own check (verify_apply) of an apply of nothing so signed: `lockgate apply` asks it before it binds
    anything, since a release bound for an apply that is then refused stays bound (a release name binds once)."""
    try:
        verify_apply(settings, sign_apply(identity, ApplyRequest(directory=directory)))
    except IdentityRefused as exc:
        return exc
    return None


# Reviews


def sign_review(identity: Identity, review: GateReview) -> GateReview:
    """The review as `identity`: its name as actor, its key id, and its signature."""
    return _signed(identity, review, "actor")  # type: ignore[no-any-return]


def verify_review(settings: Settings, review: GateReview, *, tenant: str | None = None) -> str:
    """The approver's (or admin's) name that signed the review; IdentityRefused if none did, or if it
    claims another actor than the signer; OutOfScope if the release reviewed is of `tenant` (the stored
    decision's, never the review's own claim) and the trust file scopes the signer to other tenants."""
    what = f"{review.action} of {review.release} (review {review.id})"
    name = verify_person(settings, review.key_id, review.signature, statement_bytes(review), roles=REVIEWER_ROLES,
                         what=what, tenant=tenant)
    if review.actor and review.actor != name:
        raise IdentityRefused(f"{what} claims actor {review.actor!r} but is signed by {name}")
    return name


def withdrawn_approvals(settings: Settings, decision: GateDecided | None) -> dict[str, str]:
    """Of the approvals `decision` lists, those that no longer count by the trust file now, with why
    (signing.withdrawn; a keyring applies the same to the approvals a PASS rests on)."""
    if decision is None or not decision.approvals:
        return {}
    trust = read_trust_file(trust_file_path(settings))
    return withdrawn(trust.people, set(trust.revoked), signed_approvals(decision), tenant=decision.tenant)


def scope_refusal(settings: Settings, identity: Identity, tenant: str) -> str:
    """Why the trust file here does not let `identity` review a release of `tenant` ("" when it does, or does not
    know them: the gatekeeper then refuses the review for that): what `gate approve|reject` says at once, where it
    would otherwise wait for a decision that never comes."""
    trust = read_trust_file(trust_file_path(settings))
    name, person = next(((n, p) for n, p in trust.people.items() if p.key_id == identity.key_id), ("", None))
    return "" if person is None else out_of_scope(name, person, tenant)


# Break-glass overrides


def override_bytes(*, deployment: str, release: str, action: str, reason: str, at: int, key_id: str,
                   weight: float | None) -> bytes:
    """What an admin signs to override admission: which deployment, release and action, the most traffic a
    canary may take by it (percent; None for a promote, which gives it all), why, and when."""
    return canonical_json({"deployment": deployment, "release": release, "action": action, "reason": reason,
                           "at": at, "key_id": key_id, "weight": None if weight is None else float(weight)})


def sign_override(identity: Identity, *, deployment: str, release: str, action: str, reason: str,
                  at: int, weight: float | None = None) -> dict[str, Any]:
    """The `break_glass` object of an admin API request, signed by `identity`."""
    sig = identity.sign(override_bytes(deployment=deployment, release=release, action=action, reason=reason,
                                       at=at, key_id=identity.key_id, weight=weight))
    return {"reason": reason, "at": at, "key_id": identity.key_id, "signature": sig} | (
        {"weight": weight} if weight is not None else {})


def verify_override(settings: Settings, *, deployment: str, release: str, action: str, reason: str, at: int,
                    key_id: str, signature: str, now: float, weight: float | None = None) -> str:
    """The admin's name that signed this override for exactly this deployment, release, action and weight,
    recently."""
    what = f"break-glass {action} of {release or 'nothing'} on {deployment}"
    name = verify_person(settings, key_id, signature, override_bytes(
        deployment=deployment, release=release, action=action, reason=reason, at=at, key_id=key_id, weight=weight),
        roles=("admin",), what=what)
    if action == "canary" and weight is None:
        # The admin decides how much traffic goes to a release no gate allowed, not whoever holds an admin API key.
        raise IdentityRefused(f"{what} names no weight: a canary's statement says how much traffic it covers; sign "
                              "one with `lockgate break-glass ... --action canary --weight PERCENT`")
    if not now - OVERRIDE_MAX_AGE_S <= at <= now + 60:  # a little clock skew, never a stale copy
        raise IdentityRefused(f"{what} was signed at {at:.0f}, not within {OVERRIDE_MAX_AGE_S:.0f}s of now "
                              f"({now:.0f}): sign a fresh one with `lockgate break-glass`")
    return name


# Release authorship


def bundle_content(bundle: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle without its author: what makes two registrations of a name the same release."""
    return {k: v for k, v in bundle.items() if k != "author"}


def sign_bundle(identity: Identity, bundle: Mapping[str, Any]) -> dict[str, Any]:
    """The release bundle with its author: the name, key id and signature over the rest of the bundle."""
    content = bundle_content(bundle)
    return {**content, "author": {"name": identity.name, "key_id": identity.key_id,
                                  "signature": identity.sign(canonical_json(content))}}


def author_of(settings: Settings, bundle: Mapping[str, Any]) -> str | None:
    """The trusted person who signed the release bundle (even with a since-revoked key), or None if unknown."""
    author = bundle.get("author")
    if not isinstance(author, dict):
        return None
    try:
        return verify_person(settings, str(author.get("key_id", "")), str(author.get("signature", "")),
                             canonical_json(bundle_content(bundle)), roles=(), what="release author",
                             allow_revoked=True)
    except IdentityRefused:
        return None
