"""Ed25519 signatures over gate decisions: a signer for the gatekeeper, a keyring for consumers."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lockgate.config import Settings
from lockgate.contracts import GateDecided
from lockgate.errors import BusUnavailable, ConfigError, SignatureError
from lockgate.ids import canonical_json

_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def canonical(decision: GateDecided) -> bytes:
    """The signed bytes: canonical JSON of the decision with an empty signature (key_id included)."""
    return canonical_json(msgspec.to_builtins(msgspec.structs.replace(decision, signature="")))


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex of sha256 over the raw 32-byte public key."""
    return hashlib.sha256(public.public_bytes(*_RAW)).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    """A public key as SubjectPublicKeyInfo PEM (what `--key` and trusted_keys read)."""
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def default_key_path(settings: Settings) -> Path:
    """settings.signing_key, or {home}/keys/gatekeeper.pem when it is empty."""
    return Path(settings.signing_key or Path(settings.home) / "keys" / "gatekeeper.pem")


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
    def load_or_create(cls, path: str | Path) -> Signer:
        """Load a PEM private key, or create one readable only by its owner (0600)."""
        p = Path(path)
        if p.exists():
            try:
                key = serialization.load_pem_private_key(p.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"signing key {p} is not an unencrypted PEM private key: {exc}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"signing key {p} is {type(key).__name__}, expected an Ed25519 key")
            return cls(key)
        signer = cls.generate()
        pem = signer._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            # O_EXCL: two processes racing to create the key must not silently overwrite each other.
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load_or_create(p)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return signer

    @property
    def public_raw(self) -> bytes:
        """The raw 32-byte public key (what the KV keyring stores)."""
        return self.public.public_bytes(*_RAW)

    def sign(self, decision: GateDecided) -> GateDecided:
        """The decision with this key's id and a base64 Ed25519 signature over `canonical`."""
        unsigned = msgspec.structs.replace(decision, key_id=self.key_id, signature="")
        sig = self._private.sign(canonical(unsigned))
        return msgspec.structs.replace(unsigned, signature=base64.b64encode(sig).decode())


class Keyring:
    """Trusted public keys by key id; `verify` raises SignatureError unless a decision checks out."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self.keys: dict[str, Ed25519PublicKey] = {}
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

    @classmethod
    def from_pem_files(cls, paths: Iterable[str | Path]) -> Keyring:
        """Keys from PEM public-key files (settings.trusted_keys, `--key`)."""
        ring = cls()
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
        return ring

    @classmethod
    async def from_kv(cls, bus: Any) -> Keyring:
        """Keys the gatekeeper(s) published in the KV bucket subjects.kv_keys."""
        ring = cls()
        try:
            kv = await bus.kv(bus.subjects.kv_keys)
            try:
                names = await kv.keys()
            except nats.js.errors.NoKeysError:
                return ring
            for name in names:
                entry = await kv.get(name)
                if entry.value:
                    ring.add(bytes(entry.value))
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read signing keys from KV {bus.subjects.kv_keys}: {exc!r}") from None
        return ring

    def verify(self, decision: GateDecided) -> str:
        """Check the signature; returns the key id or raises SignatureError with a one-line reason."""
        if not decision.signature:
            raise SignatureError(f"signature invalid: decision {decision.id} for {decision.release} is not signed")
        public = self.keys.get(decision.key_id)
        if public is None:
            known = ", ".join(sorted(self.keys)) or "none"
            raise SignatureError(f"signature invalid: decision {decision.id} was signed by unknown key id "
                                 f"{decision.key_id!r} (trusted: {known})")
        try:
            sig = base64.b64decode(decision.signature, validate=True)
            public.verify(sig, canonical(decision))
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureError(f"signature invalid: decision {decision.id} for {decision.release} does not "
                                 f"match its signature by key {decision.key_id} (altered after signing?)") from None
        return decision.key_id


async def publish_key(bus: Any, signer: Signer) -> None:
    """Announce a signer's public key in KV so consumers can verify its decisions."""
    try:
        kv = await bus.kv(bus.subjects.kv_keys)
        await kv.put(signer.key_id, signer.public_raw)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot publish signing key to KV {bus.subjects.kv_keys}: {exc!r}") from None


def trusted_paths(settings: Settings) -> list[str]:
    """settings.trusted_keys split into paths (comma-separated)."""
    return [p.strip() for p in settings.trusted_keys.split(",") if p.strip()]


class Verifier:
    """What a consumer uses: pinned PEM keys when configured, else the KV keyring (reloaded on a new key id)."""

    def __init__(self, bus: Any, settings: Settings) -> None:
        self.bus = bus
        paths = trusted_paths(settings)
        self.pinned = bool(paths)
        self.keyring = Keyring.from_pem_files(paths) if paths else Keyring()

    async def verify(self, decision: GateDecided) -> str:
        """Raise SignatureError unless the decision is signed by a trusted key; returns the key id."""
        # A key id not seen yet may belong to a gatekeeper that started after us: reload once.
        if not self.pinned and decision.key_id and decision.key_id not in self.keyring.keys:
            self.keyring = await Keyring.from_kv(self.bus)
        return self.keyring.verify(decision)
