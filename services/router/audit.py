"""What the audit log records of a manual rollout action taken through the admin API."""

from __future__ import annotations

from typing import Any

from lockgate import auditlog
from lockgate.errors import Retryable
from lockgate.server.apikeys import ApiKey
from lockgate.services.router.domain import Override, Route
from lockgate.services.router.rollouts import Unpersisted


async def record_action(bus: Any, key: ApiKey, action: str, route: Route, override: Override | None) -> None:
    """Append one audit entry for an admin action (canary, first-release, promote, abort, pause, resume, set-weight,
    clear-override) that took effect:
    who (the person who signed a break-glass, else the API key's label, never the key), on which deployment,
    and the route it left."""
    kind = "break_glass" if override is not None or action == "clear-override" else "rollout"
    details: dict[str, object] = {"stable": route.stable.release, "canary": route.canary.release if route.canary else "",
                                  "weight": route.weight, "phase": route.phase, "api_key": key.label}
    if override is not None:  # the admin's signed statement, so the row can be checked against it
        details |= {"override": override.action, "override_key_id": override.key_id,
                    "override_signature": override.signature, "override_at": override.at}
        if override.action == "canary":  # signed as well
            details["override_weight"] = override.weight
    try:
        await auditlog.record(
            bus, "router", kind=kind, actor=override.actor if override is not None else key.label,
            target=route.deployment, action=action, reason=override.reason if override is not None else route.reason,
            tenant=key.tenant, details=details)
    except Retryable as exc:  # the action took effect: never answered "not applied" (actions.refusal)
        raise Unpersisted(f"applied and persisted; its audit entry is not recorded: {exc.message}") from None
