"""What an eval run evaluated against what its release holds when the gate decides (adapter: reads the
release's model config; the comparisons are domain.binding_rules and domain.called_rules)."""

from __future__ import annotations

from typing import Any

from lockgate import shipped
from lockgate.bus import Bus
from lockgate.contracts import EvalCompleted, RuleResult
from lockgate.errors import ConfigError, NotFound
from lockgate.evalruns import binding_of
from lockgate.services.gatekeeper import domain

__all__ = ["evaluated_rules"]


async def evaluated_rules(bus: Bus, done: EvalCompleted, bundle: dict[str, Any] | None) -> tuple[RuleResult, ...]:
    """FAIL rules when `done` evaluated other than what its release is bound to now (`bundle`, None: not
    registered): another binding when the run started, or another model or endpoint than the release's model
    config ships. BusUnavailable (retried) when the config cannot be read."""
    rules = domain.binding_rules(done.release, done.run_id, done.binding, binding_of(bundle))
    if bundle is None or done.environment.get("task") != "call":
        return rules
    try:
        ships = await shipped.of_release(bus, done.release)
    except (NotFound, ConfigError):
        # No single usable model config: the router serves no such release, and there is nothing to compare.
        return rules
    return (*rules, *domain.called_rules(done.release, ships.model, ships.endpoint, ships.config, done.environment))
