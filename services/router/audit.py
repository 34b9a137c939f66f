"""What the audit log records of a manual rollout action taken through the admin API."""

from __future__ import annotations

from typing import Any

from lockgate import auditlog
from lockgate.server.apikeys import ApiKey
from lockgate.services.router.domain import Override, Route


async def record_action(bus: Any, key: ApiKey, action: str, route: Route, override: Override | None) -> None:
    """Append one audit entry for an admin action (canary, promote, abort, clear-override) that took effect:
    who (the API key's label, never the key), on which deployment, and the route it left."""
    kind = "break_glass" if override is not None or action == "clear-override" else "rollout"
    await auditlog.record(
        bus, "router", kind=kind, actor=key.label, target=route.deployment, action=action,
        reason=override.reason if override is not None else route.reason, tenant=key.tenant,
        details={"stable": route.stable.release, "canary": route.canary.release if route.canary else "",
                 "weight": route.weight, "phase": route.phase, "override": override.action if override else ""})
