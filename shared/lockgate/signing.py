"""Ed25519 signatures over gate decisions: a signer for the gatekeeper, a keyring for consumers."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import nats.errors
import nats.js.errors
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lockgate import filelock
from lockgate.config import Settings
from lockgate.contracts import GateDecided
from lockgate.errors import BusUnavailable, ConfigError, SignatureError
from lockgate.ids import canonical_json
from lockgate.redact import scrub_secrets

_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


# Fields appended to GateDecided after decisions were first signed: signed only when set, so a decision
# signed before a field existed still verifies after an upgrade (its canonical bytes are unchanged).
_SIGNED_WHEN_SET = ("approvals", "approval_keys", "seq")

# The roles whose signed review counts (identity checks reviews; a keyring judges the approvals a PASS rests on).
REVIEWER_ROLES = ("approver", "admin")


def canonical(decision: GateDecided) -> bytes:
    """The signed bytes: canonical JSON of the decision with an empty signature (key_id included)."""
    fields = msgspec.to_builtins(msgspec.structs.replace(decision, signature=""))
    for name in _SIGNED_WHEN_SET:
        if not fields.get(name):
            fields.pop(name, None)
    return canonical_json(fields)


def _scrubbed(decision: GateDecided) -> GateDecided:
    """`decision` with secrets masked in its free text. Every decision is signed here, and a signed one is copied
    whole (KV, the audit log, a route's reason a tenant's viewer key reads) and cannot be changed after: a reason
    quotes what others wrote (an eval's error naming a URL with its password, probe p10), so it is scrubbed once,
    here, before it is signed."""
    rules = [msgspec.structs.replace(r, hint=scrub_secrets(r.hint), explanation=scrub_secrets(r.explanation))
             for r in decision.rules]
    reason = scrub_secrets(decision.reason)
    if reason == decision.reason and rules == decision.rules:
        return decision
    return msgspec.structs.replace(decision, reason=reason, rules=rules)


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex of sha256 over the raw 32-byte public key."""
    return hashlib.sha256(public.public_bytes(*_RAW)).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    """A public key as SubjectPublicKeyInfo PEM (what `--key` and trusted_keys read)."""
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def default_key_path(settings: Settings) -> Path:
    """settings.signing_key, or {home}/keys/gatekeeper.pem when it is empty."""
    return Path(settings.signing_key or Path(settings.home) / "keys" / "gatekeeper.pem")


def gatekeeper_signer(settings: Settings) -> Signer:
    """The key that signs decisions. An explicit LOCKGATE_SIGNING_KEY (k8s: a mounted Secret) must exist:
    creating one there would give each pod its own key, which no trust file lists. Without it the key
    lives under the home, created once (0600) and kept."""
    if settings.signing_key:
        if not Path(settings.signing_key).is_file():
            raise ConfigError(f"signing key {settings.signing_key} (LOCKGATE_SIGNING_KEY) does not exist: mount the "
                              "key every gatekeeper shares (deploy/k8s: the lockgate-signing Secret), or unset it "
                              "to keep one under the home")
        return Signer.load_or_create(settings.signing_key)
    return Signer.load_or_create(default_key_path(settings))


class Signer:
    """Holds the gatekeeper's private key and signs decisions."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def generate(cls) -> Signer:
        """A fresh in-memory key (tests, one-off tools)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path, passphrase: Callable[[], bytes | None] | None = None) -> Signer:
        """Load a PEM private key, or create one readable only by its owner (0600). `passphrase()` is asked
        only for a key that is encrypted (loading) or to encrypt a new one (creating: None leaves it plain)."""
        p = Path(path)
        if p.exists():
            data = p.read_bytes()
            secret = None
            if b"ENCRYPTED" in data[:64]:
                secret = passphrase() if passphrase is not None else None
                if not secret:
                    raise ConfigError(f"private key {p} is encrypted: give its passphrase "
                                      "(LOCKGATE_IDENTITY_PASSPHRASE, or at the prompt)")
            try:
                key = serialization.load_pem_private_key(data, password=secret)
            except (ValueError, TypeError) as exc:
                if secret:
                    raise ConfigError(f"private key {p}: wrong passphrase, or not a PEM private key") from None
                raise ConfigError(f"signing key {p} is not a PEM private key: {exc}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"signing key {p} is {type(key).__name__}, expected an Ed25519 key")
            return cls(key)
        signer = cls.generate()
        secret = passphrase() if passphrase is not None else None
        encryption = serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
        pem = signer._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            # O_EXCL: two processes racing to create the key must not silently overwrite each other.
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load_or_create(p, passphrase)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return signer

    @property
    def public_raw(self) -> bytes:
        """The raw 32-byte public key (what the KV keyring stores)."""
        return self.public.public_bytes(*_RAW)

    @functools.cached_property
    def id_salt(self) -> str:
        """A secret only this key's holders can compute, the same on every replica (Ed25519 signing is
        deterministic): mixed into ids derived from others' events, so no other identity can predict them,
        publish first under them and have JetStream drop ours as duplicates of theirs."""
        return self.sign_bytes(b"lockgate: the salt of ids derived by the gatekeeper")

    def sign_bytes(self, data: bytes) -> str:
        """A base64 Ed25519 signature over `data` (a person's review, override or release statement)."""
        return base64.b64encode(self._private.sign(data)).decode()

    def sign(self, decision: GateDecided) -> GateDecided:
        """The decision with this key's id and a base64 Ed25519 signature over `canonical`, its free text (reason,
        each rule's hint and explanation) scrubbed of secrets first."""
        unsigned = msgspec.structs.replace(_scrubbed(decision), key_id=self.key_id, signature="")
        sig = self._private.sign(canonical(unsigned))
        return msgspec.structs.replace(unsigned, signature=base64.b64encode(sig).decode())


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _when(t: datetime) -> str:
    return f"{_utc(t):%Y-%m-%d %H:%M:%S}Z"


class RetiredKey(NamedTuple):
    """A decision key rotated out (`gate retire`): what it signed before its retirement stays verifiable as
    history (decisions up to `at`, audit rows up to seq `until_seq`), but it admits nothing and signs nothing new."""

    public: Ed25519PublicKey
    at: datetime
    until_seq: int


def signed_approvals(decision: GateDecided) -> list[tuple[str, str]]:
    """Each approval of a decision with the key id it was signed with ("" for one decided before those were kept)."""
    keys = decision.approval_keys if len(decision.approval_keys) == len(decision.approvals) else \
        [""] * len(decision.approvals)
    return list(zip(decision.approvals, keys, strict=True))


def out_of_scope(name: str, person: Person, tenant: str) -> str:
    """Why `name`'s review of a release of `tenant` does not count ("" when it does): the trust file scopes them to
    other tenants' releases. A person listing no tenants reviews every tenant's (trust files from before tenants
    could be listed mean that), and so does an admin, whom no list scopes."""
    if not person.tenants or tenant in person.tenants or "admin" in person.roles:
        return ""
    plural = "s" if len(person.tenants) > 1 else ""
    return f"{name} reviews releases of tenant{plural} {', '.join(person.tenants)} only, not of tenant {tenant}"


def withdrawn(people: Mapping[str, Person], revoked: Collection[str],
              approvals: Iterable[tuple[str, str]], roles: Collection[str] = REVIEWER_ROLES,
              tenant: str | None = None) -> dict[str, str]:
    """Of (name, key id) statements by people (approvals; an override, with `roles` admin), those that no longer
    count by the trust roots `people` and `revoked`, with why: the person is gone, lost every role of `roles`, the
    key is revoked or no longer theirs, or (approvals of a release of `tenant`) the person no longer reviews that
    tenant's releases. A key id of "" (a decision from before key ids were kept) is judged by the person's current
    key."""
    out: dict[str, str] = {}
    for name, kid in approvals:
        person = people.get(name)
        if person is None:
            out[name] = f"{name} is no longer a trusted person"
        elif kid and kid != person.key_id:
            out[name] = f"{name}'s key {kid} that signed it is no longer theirs"
        elif (kid or person.key_id) in revoked:
            out[name] = f"{name}'s key {kid or person.key_id} is revoked"
        elif not set(roles) & set(person.roles):
            out[name] = f"{name} no longer has role {' or '.join(roles)}"
        elif tenant is not None and (why := out_of_scope(name, person, tenant)):
            out[name] = why
    return out


class ApprovalWithdrawn(SignatureError):
    """A PASS that rests on approvals some of which no longer count (a revoked key, a person gone or without the
    reviewer role): its signature is sound, but it admits nothing."""


class Keyring:
    """Trusted public keys by key id, revoked ids and retired keys, and the people of the trust file (None: not
    known, no trust file); `verify` raises SignatureError unless a decision checks out."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = (), revoked: Iterable[str] = (), source: str = "",
                 retired: Mapping[str, RetiredKey] | None = None,
                 people: Mapping[str, Person] | None = None) -> None:
        self.keys: dict[str, Ed25519PublicKey] = {}
        self.revoked: set[str] = set(revoked)
        self.retired: dict[str, RetiredKey] = dict(retired or {})
        self.people: dict[str, Person] | None = None if people is None else dict(people)
        self.source = source  # where the keys came from, named in refusals
        for k in keys:
            self.add(k)

    def add(self, public: Ed25519PublicKey | bytes) -> str:
        """Trust a key (object or raw 32 bytes); returns its id."""
        if isinstance(public, bytes):
            try:
                public = Ed25519PublicKey.from_public_bytes(public)
            except ValueError as exc:
                raise SignatureError(f"not a raw Ed25519 public key: {exc}") from None
        kid = key_id(public)
        self.keys[kid] = public
        return kid

    def merge(self, other: Keyring) -> Keyring:
        """A keyring trusting both rings' keys and honouring both rings' revocations and retirements."""
        people = None if self.people is None and other.people is None else {**(self.people or {}),
                                                                             **(other.people or {})}
        ring = Keyring(revoked=self.revoked | other.revoked, retired={**self.retired, **other.retired},
                       source=" + ".join(s for s in (self.source, other.source) if s), people=people)
        ring.keys = {**self.keys, **other.keys}
        return ring

    @classmethod
    def from_pem_files(cls, paths: Iterable[str | Path]) -> Keyring:
        """Keys from PEM public-key files (settings.trusted_keys, `--key`)."""
        ring = cls()
        names = []
        for path in paths:
            p = Path(path)
            try:
                key = serialization.load_pem_public_key(p.read_bytes())
            except OSError as exc:
                raise ConfigError(f"trusted key {p} cannot be read: {exc.strerror}") from None
            except ValueError as exc:
                raise ConfigError(f"trusted key {p} is not a PEM public key: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"trusted key {p} is {type(key).__name__}, expected Ed25519")
            ring.add(key)
            names.append(str(p))
        ring.source = ", ".join(names)
        return ring

    @classmethod
    def from_trust_file(cls, path: str | Path) -> Keyring:
        """Keys of a trust file (`{"keys": {id: PEM}, "revoked": [id], "retired": {id: ...}}`); empty if the file
        does not exist."""
        p = Path(path)
        try:
            data = msgspec.json.decode(p.read_bytes(), type=TrustFile)
        except FileNotFoundError:
            return cls(source=f"{p} (missing: `lockgate up` writes it; or set LOCKGATE_HOME / LOCKGATE_TRUST_FILE)")
        except OSError as exc:
            raise ConfigError(f"trust file {p} cannot be read: {exc.strerror}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f'trust file {p} is not {{"keys": {{id: PEM}}, "revoked": [id]}}: {exc}') from None
        ring = cls(revoked=data.revoked, source=str(p), people=data.people)
        for kid, pem in data.keys.items():
            ring.add(_listed_key(p, kid, pem))
        for kid, retirement in data.retired.items():
            ring.retired[kid] = RetiredKey(_listed_key(p, kid, retirement.key), _utc(retirement.at),
                                           retirement.until_seq)
        return ring

    @classmethod
    def from_settings(cls, settings: Settings, pinned: Iterable[str | Path] = ()) -> Keyring:
        """The configured trust roots: the trust file plus settings.trusted_keys PEM files, plus `pinned` PEM files
        (a command's `--key`): these add trust, never take the trust file's revocations or retirements away."""
        ring = cls.from_trust_file(trust_file_path(settings))
        paths = [*trusted_paths(settings), *pinned]
        return ring.merge(cls.from_pem_files(paths)) if paths else ring

    def why_untrusted(self, kid: str) -> str:
        """Why key `kid` may not sign anything anyone acts on now ("" when it may): revoked, retired or unknown."""
        if kid in self.revoked:
            return f"key {kid} is revoked in {self.source or 'the trust roots'}"
        if kid in self.retired:
            return f"key {kid} was retired at {_when(self.retired[kid].at)} in {self.source or 'the trust roots'}"
        if kid not in self.keys:
            return f"key {kid} is not in the trust roots ({self.source or 'none configured'})"
        return ""

    def verify(self, decision: GateDecided, *, history: bool = False) -> str:
        """Check the signature; returns the key id or raises SignatureError with a one-line reason.

        A decision signed by a retired key admits nothing (the router, the SDK, attestations: re-gate the
        release); with `history` it verifies as what was decided, if it was signed before the retirement. Nor
        does a PASS whose approvals no longer all count (`check_approvals`); as history it is still what the
        gatekeeper decided."""
        if not decision.signature:
            raise SignatureError(f"signature invalid: decision {decision.id} for {decision.release} is not signed")
        what = f"decision {decision.id} for {decision.release}"
        if decision.key_id in self.revoked:
            raise SignatureError(f"signature invalid: {what} was signed by revoked key id {decision.key_id!r}")
        retired = self.retired.get(decision.key_id)
        if retired is not None and not history:
            raise SignatureError(f"{what} was signed by key id {decision.key_id!r}, retired at {_when(retired.at)}: "
                                 f"a retired key admits nothing; re-gate {decision.release} (run its eval again)")
        if retired is not None and _utc(decision.time) > retired.at:
            raise SignatureError(f"signature invalid: {what} was signed by retired key id {decision.key_id!r} after "
                                 f"its retirement at {_when(retired.at)}")
        public = retired.public if retired is not None else self.keys.get(decision.key_id)
        if public is None:
            known = ", ".join(sorted(self.keys)) or "none"
            raise SignatureError(f"signature invalid: decision {decision.id} was signed by unknown key id "
                                 f"{decision.key_id!r} (trusted: {known}; from {self.source or 'no trust roots'})")
        try:
            sig = base64.b64decode(decision.signature, validate=True)
            public.verify(sig, canonical(decision))
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureError(f"signature invalid: {what} does not match its signature by key {decision.key_id} "
                                 "(altered after signing?)") from None
        if not history:
            self.check_approvals(decision)
        return decision.key_id

    def verify_record(self, decision: GateDecided) -> str:
        """What a saved decision (a file, an attestation, the stack's) must pass to be called authentic (`gate verify`,
        `attest verify`): `verify` as history, so a key retired since still proves what it decided, and
        `check_approvals`, so a PASS whose approvals no longer all count fails. Returns the key id. Before (probe
        p20 F1), `attest verify` skipped the approvals and accepted a PASS `gate verify` refused."""
        kid = self.verify(decision, history=True)
        self.check_approvals(decision)
        return kid

    def not_admitting(self, decision: GateDecided) -> str:
        """Why a decision that passed `verify_record` admits nothing now ("" when it admits its release): it is no
        PASS, or a key retired since signed it. Exactly what `verify` refuses of it besides, said for a verifier
        whose exit code a pipeline reads as "may this ship"."""
        retired = self.retired.get(decision.key_id)
        signed = "" if retired is None else (f"signed by key {decision.key_id} (retired at {_when(retired.at)}, after "
                                             "it signed it)")
        if decision.decision != "PASS":
            return f"a {decision.decision} admits nothing" + (f"; it was {signed}" if signed else "")
        if signed:
            return f"a PASS {signed} admits nothing now; re-gate {decision.release} to roll it out"
        return ""

    def check_approvals(self, decision: GateDecided) -> None:
        """ApprovalWithdrawn if `decision` is a PASS resting on approvals and one of them no longer counts by the
        people and revocations of this ring (none known, no trust file: not judged).

        A review makes a NEEDS_REVIEW a PASS the moment its distinct approvals reach the number its policy
        requires, so each approval it lists was needed: with one withdrawn, the PASS has fewer than required."""
        if decision.decision != "PASS" or not decision.approvals or self.people is None:
            return
        approvals = signed_approvals(decision)
        gone = withdrawn(self.people, self.revoked, approvals, tenant=decision.tenant)
        if not gone:
            return
        keys = dict(approvals)
        which = "; ".join(f"the approval by {name} (key {keys[name] or 'unrecorded'}) no longer counts: {why}"
                          for name, why in gone.items())
        raise ApprovalWithdrawn(
            f"decision {decision.id} for {decision.release} is a PASS by approval ({len(decision.approvals)} needed: "
            f"{', '.join(decision.approvals)}), and {which}: it admits nothing; re-gate {decision.release} (run its "
            "eval again) and have an approver whose key still counts approve the new decision")

    def verify_bytes(self, kid: str, data: bytes, signature: str, what: str, *, audit_seq: int | None = None) -> str:
        """Check a signature over `data` by key `kid`; returns the key id or raises SignatureError naming `what`.

        A retired key verifies only the audit log's rows up to the seq it was retired at (`audit_seq` is the
        row's); a revoked key nothing, and that is said apart from an altered row: a revoked key counts as
        leaked, so nothing it signed can be told from a forgery."""
        if not signature:
            raise SignatureError(f"signature invalid: {what} is not signed")
        if kid in self.revoked:
            raise SignatureError(f"{what} was signed by revoked key id {kid!r} (revoked keys count as leaked: "
                                 "nothing they signed is believed)")
        retired = self.retired.get(kid)
        if retired is not None and (audit_seq is None or audit_seq > retired.until_seq):
            upto = f" (it signed the audit log up to seq {retired.until_seq})" if audit_seq is not None else ""
            raise SignatureError(f"{what} was signed by retired key id {kid!r} after its retirement at "
                                 f"{_when(retired.at)}{upto}")
        public = retired.public if retired is not None else self.keys.get(kid)
        if public is None:
            known = ", ".join(sorted(self.keys)) or "none"
            raise SignatureError(f"signature invalid: {what} was signed by unknown key id {kid!r} "
                                 f"(trusted: {known}; from {self.source or 'no trust roots'})")
        try:
            public.verify(base64.b64decode(signature, validate=True), data)
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureError(f"signature invalid: {what} does not match its signature by key {kid}") from None
        return kid


def _listed_key(path: Path, kid: str, pem: str) -> Ed25519PublicKey:
    """The Ed25519 key a trust file lists under `kid` (ConfigError if it is not one, or has another id)."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ConfigError(f"trust file {path}: key {kid!r} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"trust file {path}: key {kid!r} is {type(key).__name__}, expected Ed25519")
    if key_id(key) != kid:
        raise ConfigError(f"trust file {path}: key listed as {kid!r} has id {key_id(key)!r}")
    return key


class Person(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A person the trust file knows: their public key (one at a time; re-trusting rotates it), roles, and the
    tenants whose releases they review (none: every tenant's; `out_of_scope`).

    Empty fields are left out when written: a reader older than `tenants` refuses only a file scoping someone."""

    key_id: str
    key: str  # PEM public key
    roles: list[str] = []
    tenants: list[str] = []


class Retirement(msgspec.Struct, forbid_unknown_fields=True):
    """A decision key rotated out (`gate retire`): its PEM, when, and the audit chain's head seq then."""

    key: str  # PEM public key: what it signed before is still checked against it
    at: datetime
    until_seq: int = 0


class TrustFile(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The trust roots on disk: key id -> PEM public key (several, for rotation), revoked key ids (leaked), retired
    keys (rotated out), and the people whose signed reviews and break-glass overrides count (name -> key, roles and
    the tenants they review).

    Empty fields are left out when written: a reader older than `retired` refuses the file only once a key is
    retired, not after any change."""

    keys: dict[str, str] = {}
    revoked: list[str] = []
    people: dict[str, Person] = {}
    retired: dict[str, Retirement] = {}


def trust_file_path(settings: Settings) -> Path:
    """settings.trust_file (LOCKGATE_TRUST_FILE), or {home}/trust.json when it is empty."""
    return Path(settings.trust_file or Path(settings.home) / "trust.json")


def _write_trust_file(path: Path, data: TrustFile) -> None:
    """Replace the trust file with `data`; the caller holds `filelock.locked(path)` since it read what it changed."""
    filelock.replace(path, msgspec.json.format(msgspec.json.encode(data)) + b"\n")


def read_trust_file(path: Path) -> TrustFile:
    """The trust file's content (empty if it does not exist); ConfigError if malformed."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=TrustFile)
    except FileNotFoundError:
        return TrustFile()
    except msgspec.DecodeError as exc:
        raise ConfigError(f"trust file {path} is malformed: {exc}") from None


def trust_key(path: str | Path, public: Ed25519PublicKey) -> str:
    """Add a public key to a trust file (created 0600 if missing); returns its id. Revoked ids stay refused."""
    p = Path(path)
    with filelock.locked(p):
        data = read_trust_file(p)
        kid = key_id(public)
        if kid in data.revoked:
            # Revoked because it leaked: a gatekeeper holding it (`lockgate up` trusts the home's key) needs a key of
            # its own, the rotation step, never the leaked key trusted again (before, probe p77 F4, this said to
            # take it out of `revoked`).
            raise ConfigError(f"key {kid} is revoked in {p}: it signs nothing again; give the gatekeeper a new key "
                              "(LOCKGATE_SIGNING_KEY, or move {home}/keys/gatekeeper.pem aside and `lockgate up` "
                              "makes one)")
        if kid in data.retired:
            # Trusted again it would sign new decisions and audit rows past its retirement; a gatekeeper holding it
            # (`lockgate up` trusts the home's key) needs a key of its own.
            raise ConfigError(f"key {kid} was retired in {p}: it signs nothing new; give the gatekeeper a new key "
                              "(LOCKGATE_SIGNING_KEY, or move {home}/keys/gatekeeper.pem aside and `lockgate up` "
                              "makes one)")
        if data.keys.get(kid) != public_pem(public).decode():
            data.keys[kid] = public_pem(public).decode()
            _write_trust_file(p, data)
        return kid


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key of a PEM file holding a public key or an (unencrypted) private key."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"key {p} cannot be read: {exc.strerror}") from None
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"key {p} is neither a PEM public key nor an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"key {p} is {type(key).__name__}, expected Ed25519")
    return key


def trust_person(path: str | Path, name: str, public: Ed25519PublicKey, roles: Iterable[str],
                 tenants: Iterable[str] = ()) -> str:
    """Trust `name`'s key with `roles` in a trust file, reviewing the releases of `tenants` only (none: every
    tenant's); returns the key id. A new key for a known name replaces (rotates) the old one, and the roles and
    tenants given replace theirs; a revoked key, or one already held by another person, is refused."""
    p = Path(path)
    roles, tenants = sorted(set(roles)), sorted(set(tenants))
    if tenants and "admin" in roles:
        # An admin reviews and overrides for every tenant: a list would read as a scope it does not have.
        raise ConfigError(f"an admin is not scoped to tenants: trust {name} as approver with --tenant, or as admin "
                          "without it")
    if tenants and "approver" not in roles:
        raise ConfigError(f"--tenant scopes the releases a person reviews, and {name} would not review: add "
                          "--role approver")
    with filelock.locked(p):
        data = read_trust_file(p)
        kid = key_id(public)
        if kid in data.revoked:
            raise ConfigError(f"key {kid} is revoked in {p}; {name} needs a new identity (`lockgate identity create`)")
        if kid in data.keys or kid in data.retired:
            raise ConfigError(f"key {kid} is a decision-signing key in {p}; a person needs a key of their own")
        holder = next((n for n, person in data.people.items() if person.key_id == kid and n != name), None)
        if holder is not None:
            raise ConfigError(f"key {kid} already belongs to {holder!r} in {p}; one key speaks for one person")
        data.people[name] = Person(key_id=kid, key=public_pem(public).decode(), roles=roles, tenants=tenants)
        _write_trust_file(p, data)
        return kid


def undo_grant(path: str | Path, before: TrustFile | None, *, kid: str = "", person: str = "") -> None:
    """Take back a `trust_key` of `kid` (or a `trust_person` of `person`) that the audit log did not record: that one
    entry is put back as the trust file `before` held it (None: there was no file), so whatever else changed since
    stays (a revocation made meanwhile above all); a file the grant created is removed if it holds nothing else."""
    p = Path(path)
    with filelock.locked(p):
        data = read_trust_file(p)
        entries: dict[str, Any] = data.people if person else data.keys
        key = person or kid
        had = ((before.people if person else before.keys).get(key)) if before is not None else None
        if entries.get(key) == had:
            return
        if had is None:
            entries.pop(key, None)
        else:
            entries[key] = had
        if before is None and data == TrustFile():
            p.unlink(missing_ok=True)
            return
        _write_trust_file(p, data)


def revoke_person(path: str | Path, name: str) -> str:
    """Revoke a person's key (kept listed, so what they signed still names them); returns the key id."""
    p = Path(path)
    with filelock.locked(p):
        data = read_trust_file(p)
        person = data.people.get(name)
        if person is None:
            known = ", ".join(sorted(data.people)) or "none"
            raise ConfigError(f"{name!r} is not a person in {p} (people: {known})")
        if person.key_id not in data.revoked:
            data.revoked.append(person.key_id)
            _write_trust_file(p, data)
        return person.key_id


def revoke_key(path: str | Path, kid: str) -> None:
    """Revoke a key id in a trust file (it leaked): everything it signed is refused from the next verification on,
    the audit rows it signed included. A retired key found leaked later is revoked alike."""
    p = Path(path)
    with filelock.locked(p):
        data = read_trust_file(p)
        data.keys.pop(kid, None)
        data.retired.pop(kid, None)
        if kid not in data.revoked:
            data.revoked.append(kid)
        _write_trust_file(p, data)


def retire_key(path: str | Path, kid: str, *, until_seq: int, at: datetime | None = None) -> Retirement:
    """Retire a trusted decision key (a rotation, not a leak): what it signed up to now (`at`; the audit chain's
    rows up to `until_seq`) still verifies as history, but it admits and signs nothing new. Retiring it again
    only raises `until_seq` (rows chained while it was being retired). Returns the retirement recorded."""
    p = Path(path)
    with filelock.locked(p):
        data = read_trust_file(p)
        if kid in data.retired:
            was = data.retired[kid]
            if until_seq > was.until_seq:
                data.retired[kid] = was = msgspec.structs.replace(was, until_seq=until_seq)
                _write_trust_file(p, data)
            return was
        if kid in data.revoked:
            raise ConfigError(f"key {kid} is revoked in {p} (leaked): what it signed is refused for good, not retired")
        if kid not in data.keys:
            known = ", ".join(sorted(data.keys)) or "none"
            raise ConfigError(f"key {kid} is not a trusted decision key in {p} (trusted: {known})")
        if len(data.keys) == 1:
            raise ConfigError(f"key {kid} is the only decision key trusted in {p}: trust its successor first "
                              "(`lockgate gate trust new.pem`) and give the gatekeepers that key")
        retirement = Retirement(key=data.keys.pop(kid), at=_utc(at or datetime.now(UTC)), until_seq=until_seq)
        data.retired[kid] = retirement
        _write_trust_file(p, data)
        return retirement


def ensure_signer_trusted(settings: Settings) -> Signer:
    """The gatekeeper's persistent key (created 0600 under the home if missing), trusted in the trust file.

    What `lockgate up` does for an embedded stack before the services start; a distributed deployment
    ships the trust file (or LOCKGATE_TRUSTED_KEYS) as configuration instead.
    """
    signer = gatekeeper_signer(settings)
    trust_key(trust_file_path(settings), signer.public)
    return signer


async def publish_key(bus: Any, signer: Signer) -> None:
    """Copy a signer's public key into the KV bucket, for information only: no consumer trusts it from there."""
    try:
        kv = await bus.kv(bus.subjects.kv_keys)
        await kv.put(signer.key_id, signer.public_raw)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot publish signing key to KV {bus.subjects.kv_keys}: {exc!r}") from None


def trusted_paths(settings: Settings) -> list[str]:
    """settings.trusted_keys split into paths (comma-separated)."""
    return [p.strip() for p in settings.trusted_keys.split(",") if p.strip()]


# How often a holder of verified decisions (a decision watch, a router's admitted canaries) looks whether the trust
# roots changed (`Verifier.roots`: a stat of the trust file, which nothing announces): a revocation acts within it.
TRUST_CHECK_S = 1.0


class Verifier:
    """What a consumer uses: the configured trust roots (trust file + pinned PEMs), never keys from the bus."""

    def __init__(self, bus: Any, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings
        self._stamp = self._mtime()
        self.keyring = self._load()

    def _load(self) -> Keyring:
        return Keyring.from_settings(self.settings)

    async def verify(self, decision: GateDecided, *, history: bool = False) -> str:
        """Raise SignatureError unless the decision is signed by a trusted, unrevoked key (with `history`, or by
        a key retired after it signed: Keyring.verify); returns the key id."""
        # The trust file may have changed (a rotation, a revocation, `lockgate up` writing it after we
        # started): re-read the local configuration, never the bus, before refusing or accepting.
        ring = self.roots()
        if decision.key_id not in ring.keys or decision.key_id in ring.revoked:
            ring = self.keyring = self._load()  # a pinned key file written since, which no stamp follows
        return ring.verify(decision, history=history)

    def trusts(self, kid: str) -> bool:
        """True if key `kid` is trusted and neither revoked nor retired by the trust roots as they are now (the
        trust file is read again if it changed): what a key signed earlier counts only while this holds."""
        return not self.why_untrusted(kid)

    def why_untrusted(self, kid: str) -> str:
        """Why key `kid` may not sign anything acted on, by the trust roots as they are now ("" when it may)."""
        return self.roots().why_untrusted(kid)

    def roots(self) -> Keyring:
        """The trust roots as they are now: the trust file is read again if it changed, into a new Keyring (so a
        holder of the last one can tell, by identity, that what it verified must be verified again)."""
        stamp = self._mtime()
        if stamp != self._stamp:
            # Stamped only once read: a trust file caught malformed (a hand edit) raises ConfigError here, and is
            # read again at the next call, not taken as read.
            self.keyring = self._load()
            self._stamp = stamp
        return self.keyring

    def _mtime(self) -> tuple[int, int, int]:
        # The inode too: the trust file is replaced whole (os.replace), and two writes within one tick of the
        # file system's coarse clock leave the same mtime (a revocation right after a trust went unseen).
        try:
            st = trust_file_path(self.settings).stat()
        except OSError:
            return 0, 0, 0
        return st.st_mtime_ns, st.st_ino, st.st_size

