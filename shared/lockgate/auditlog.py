"""Ask for an audit entry: the one call every producer makes (gatekeeper, router, CLI).

The entry goes to `<prefix>.audit.<identity>`, which NATS lets only that identity publish, so the
chainer (in the gatekeeper) records who sent it from the subject; it then appends the entry to the
hash-chained, signed audit log (lockgate.auditchain) that `lockgate audit verify` checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lockgate.contracts import AuditEntry, AuditKind
from lockgate.contracts.audit import ACTION_MAX, ACTOR_MAX, DETAILS_MAX, TARGET_MAX, TEXT_MAX
from lockgate.contracts.names import is_name
from lockgate.ids import uuid7


async def record(bus: Any, identity: str, *, kind: AuditKind, actor: str, target: str, action: str,
                 reason: str = "", details: Mapping[str, object] | None = None, tenant: str = "default",
                 entry_id: str | None = None, trace_id: str = "") -> AuditEntry:
    """Publish one entry as `identity` (deduplicated by `entry_id` when a retry repeats it); returns it. Texts
    longer than an entry holds are cut (marked), so the entry is always one the chainer can seal."""
    kept = {_cut(k, ACTION_MAX): _cut(str(v), TEXT_MAX) for k, v in (details or {}).items() if v not in (None, "")}
    entry = AuditEntry(id=entry_id or uuid7(), source=identity, tenant=tenant if is_name(tenant) else "default",
                       trace_id=trace_id, kind=kind, actor=_cut(actor, ACTOR_MAX), target=_cut(target, TARGET_MAX),
                       action=_cut(action, ACTION_MAX), reason=_cut(reason, TEXT_MAX),
                       details=dict(list(kept.items())[:DETAILS_MAX]))
    await bus.publish(bus.subjects.audit(identity), entry)
    return entry


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 12] + " [cut here]"
