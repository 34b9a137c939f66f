"""Provenance records kept in the append-only provenance stream: alias changes and artifact lifecycles.

Each record is signed by the person who made it (their key from `lockgate identity create`) and names
the digest of the record before it on the same subject, so the history of an alias (or an artifact's
lifecycle) is a signed hash chain: an edited, forged or reordered entry fails verification.
"""

from __future__ import annotations

from datetime import datetime

from lockgate.contracts.envelope import Event
from lockgate.contracts.names import Name


class _Signed(Event, frozen=True, kw_only=True):
    seq: int  # 1 for the first record on its subject
    prev_digest: str = ""  # sha256 of the record before it on the same subject ("" for the first)
    actor: str = ""  # the person's name (checked against the trust file's person for key_id)
    key_id: str = ""
    signature: str = ""  # base64 Ed25519 over the record with an empty signature
    reason: str = ""


class AliasChanged(_Signed, frozen=True, kw_only=True, tag="lockgate.alias.changed"):
    """An alias of an app (production, staging ...) now points to `release` (was `previous`)."""

    app: Name
    alias: Name
    release: Name
    previous: str = ""
    origin: str = ""  # where the change came from: `cli`, or `gitops <commit>`


class ArtifactLifecycle(_Signed, frozen=True, kw_only=True, tag="lockgate.artifact.lifecycle"):
    """An artifact version is deprecated (from `time`), replaced by `successor`, and unusable after `sunset`."""

    hash: str
    successor: str = ""
    sunset: datetime | None = None
