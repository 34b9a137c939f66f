"""Signed analysis records (AnalysisRun): the bytes signed, the router's key, and checking a stored row.

The router signs each record with a key of its own (`{home}/keys/router.pem`, created 0600 once),
not the gatekeeper's: a router must never be able to sign gate decisions (README, threat model). Its
public key is written next to it (`router.pub.pem`); readers trust that file and the trust file's keys.
The signature covers every field but itself, times in UTC to the microsecond as ClickHouse stores
them, so a record read back from the store verifies exactly when no column was changed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from lockgate.config import Settings
from lockgate.contracts import AnalysisRun
from lockgate.errors import ConfigError, SignatureError
from lockgate.ids import canonical_json
from lockgate.signing import Keyring, Signer, load_public_key, public_pem

# Transport fields: not part of what the router measured.
_UNSIGNED = ("signature", "trace_id", "span_id", "source", "schema_version")
# Fields appended since the first signed records: signed only when set, so older records verify unchanged.
_APPENDED = ("drifted_features",)


def _iso(t: datetime) -> str:
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def content(run: AnalysisRun) -> bytes:
    """The signed bytes: canonical JSON of the record without its signature and transport fields."""
    fields = msgspec.to_builtins(run)
    for name in _UNSIGNED:
        fields.pop(name, None)
    for name in _APPENDED:
        if not fields.get(name):
            fields.pop(name, None)
    fields["time"] = _iso(run.time)
    return canonical_json(fields)


def sign(run: AnalysisRun, signer: Signer) -> AnalysisRun:
    """The record with the signer's key id and signature."""
    unsigned = msgspec.structs.replace(run, key_id=signer.key_id, signature="")
    return msgspec.structs.replace(unsigned, signature=signer.sign_bytes(content(unsigned)))


def verify(run: AnalysisRun, keyring: Keyring) -> str:
    """The key id that signed the record, or SignatureError saying why it does not verify."""
    return keyring.verify_bytes(run.key_id, content(run), run.signature,
                                f"analysis record {run.id} of {run.deployment}")


def from_row(row: dict[str, Any]) -> AnalysisRun:
    """A stored row (a dict from the query service) as an AnalysisRun; ValueError if unreadable."""
    row = dict(row)
    if isinstance(row.get("metrics"), str):  # nested Structs are stored as JSON text
        row["metrics"] = msgspec.json.decode(row["metrics"])
    if isinstance(row.get("time"), str):
        row["time"] = row["time"].replace(" ", "T")
    try:
        run = msgspec.convert(row, AnalysisRun, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
    t = run.time
    return msgspec.structs.replace(run, time=t.replace(tzinfo=UTC) if t.tzinfo is None else t)


def _paths(settings: Settings) -> tuple[Path, Path]:
    keys = Path(settings.home) / "keys"
    return keys / "router.pem", keys / "router.pub.pem"


def router_signer(settings: Settings) -> Signer:
    """The router's own signing key (shared by the replicas of one home), its public key written beside it."""
    private, public = _paths(settings)
    signer = Signer.load_or_create(private)
    pem = public_pem(signer.public)
    if not public.exists() or public.read_bytes() != pem:
        tmp = public.with_name(f".{public.name}.tmp")
        tmp.write_bytes(pem)
        tmp.replace(public)
    return signer


def keyring(settings: Settings) -> Keyring:
    """What analysis records are checked against: the router's public key (if this home has one) and the
    trust file's keys."""
    ring = Keyring.from_settings(settings)
    _, public = _paths(settings)
    if public.exists():
        try:
            ring = ring.merge(Keyring([load_public_key(public)], source=str(public)))
        except ConfigError as exc:
            raise SignatureError(f"router key {public} is unreadable: {exc.message}") from None
    return ring
