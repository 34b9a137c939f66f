"""Ask for an audit entry: the one call every producer makes (gatekeeper, router, CLI).

The entry goes to `<prefix>.audit.<identity>`, which NATS lets only that identity publish, so the
chainer (in the gatekeeper) records who sent it from the subject; it then appends the entry to the
hash-chained, signed audit log (lockgate.auditchain) that `lockgate audit verify` checks.

A row cannot be changed once chained (every later link would break), so what a producer passes is scrubbed of
secrets here, once, before it is published: a reason quotes what others wrote (a gate decision's reason quoted an
eval's error naming a URL with its password, probe p10).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lockgate.contracts import AuditEntry, AuditKind
from lockgate.contracts.audit import ACTION_MAX, ACTOR_MAX, DETAILS_MAX, TARGET_MAX, TEXT_MAX
from lockgate.contracts.names import is_name
from lockgate.ids import uuid7
from lockgate.redact import scrub_secrets


async def record(bus: Any, identity: str, *, kind: AuditKind, actor: str, target: str, action: str,
                 reason: str = "", details: Mapping[str, object] | None = None, tenant: str = "default",
                 entry_id: str | None = None, trace_id: str = "") -> AuditEntry:
    """Publish one entry as `identity` (deduplicated by `entry_id` when a retry repeats it); returns it. Texts
    longer than an entry holds are cut (marked), so the entry is always one the chainer can seal; the reason and
    the details' values are scrubbed of secrets before (a cut could leave part of one the scrub no longer sees)."""
    kept = {_cut(k, ACTION_MAX): _cut(scrub_secrets(str(v)), TEXT_MAX)
            for k, v in (details or {}).items() if v not in (None, "")}
    entry = AuditEntry(id=entry_id or uuid7(), source=identity, tenant=tenant if is_name(tenant) else "default",
                       trace_id=trace_id, kind=kind, actor=_cut(actor, ACTOR_MAX), target=_cut(target, TARGET_MAX),
                       action=_cut(action, ACTION_MAX), reason=_cut(scrub_secrets(reason), TEXT_MAX),
                       details=dict(list(kept.items())[:DETAILS_MAX]))
    await bus.publish(bus.subjects.audit(identity), entry)
    return entry


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 12] + " [cut here]"
