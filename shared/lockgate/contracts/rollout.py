"""Rollout state of a deployment, as the router applies it."""

from __future__ import annotations

from typing import Literal

from lockgate.contracts.envelope import Event
from lockgate.contracts.names import Name, OptName

Phase = Literal["idle", "progressing", "promoted", "aborted"]


class RolloutState(Event, frozen=True, kw_only=True, tag="lockgate.rollout.state"):
    """Weights after a change, and why the router made it."""

    deployment: Name
    stable_release: Name
    canary_release: OptName = ""
    canary_weight: float = 0.0
    phase: Phase = "idle"
    step: int = 0
    reason: str = ""
    decision_id: str = ""
    actor: str = ""  # the API key identity of an operator's change; "" when the router acted on evidence
