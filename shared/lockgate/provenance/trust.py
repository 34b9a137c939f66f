"""Who signed a provenance record: the trust file's person for its key, with a role that may make it."""

from __future__ import annotations

from collections.abc import Callable

from lockgate import artifacts
from lockgate.config import Settings
from lockgate.contracts import ArtifactRegistered
from lockgate.identity import verify_person
from lockgate.provenance.chain import Record, describe, signed_bytes

# Moving an alias or sunsetting an artifact changes what serves: an operator's or an admin's call.
ROLES = ("operator", "admin")


def verifier(settings: Settings, *, allow_revoked: bool = True) -> Callable[[Record], str]:
    """`verify(record)` -> the signer's name, or SignatureError. History reads allow a key revoked since
    (its past records stay readable and still name their signer); new records are checked without."""

    def verify(record: Record) -> str:
        return verify_person(settings, record.key_id, record.signature, signed_bytes(record), roles=ROLES,
                             what=describe(record), allow_revoked=allow_revoked)

    return verify


def artifact_signer(settings: Settings, event: ArtifactRegistered) -> str:
    """The trusted person who signed an artifact registration (any role), or SignatureError."""
    return verify_person(settings, event.key_id, event.signature, artifacts.signed_bytes(event), roles=(),
                         what=f"artifact {event.kind}/{event.name} {event.hash[:19]}", allow_revoked=True)
