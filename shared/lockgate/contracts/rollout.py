"""Rollout state of a deployment, as the router applies it."""

from __future__ import annotations

from typing import Literal

import msgspec

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
    # The rollout attempt this change is part of, named as the admin API names it (the route's `started_at`, unix
    # seconds): a start, a retry and a canary release replaced by PATCH each begin one, and its promotion or abort
    # ends it. 0 for a change that is part of none: a first release, or any change after the attempt ended (the
    # rollback of a promoted release). `began`: this change began it. OpenLineage makes each attempt one run.
    started_at: float = 0.0
    began: bool = False
    # While `phase` is promoted: when the router promoted `stable_release` (unix seconds; 0 for a route promoted
    # before it was kept). Every later announcement of the same promotion (a BLOCK of an old release, an analysis's
    # progress deadline) repeats it, so the drift monitor restarts its reference once per promotion, not per message.
    promoted_at: float = 0.0


AnalysisPhase = Literal["Successful", "Failed", "Inconclusive", "Error"]
AnalysisTemplate = Literal["canary", "pre-promotion", "post-promotion"]


class AnalysisMetric(msgspec.Struct, frozen=True, kw_only=True):
    """One metric of one analysis measurement: each variant's value against the threshold its condition set."""

    name: str  # e.g. error_rate, latency_p95, score:pii_free
    verdict: str  # SUCCESSFUL, FAILED, INCONCLUSIVE or WAITING
    condition: str  # the spec's limits, e.g. "<= stable + 0.01 and <= 0.05"
    canary: float | None = None
    stable: float | None = None
    threshold: float | None = None
    bound: float | None = None  # the canary's confidence bound compared with the threshold
    canary_n: int = 0
    stable_n: int = 0
    dry_run: bool = False
    why: str = ""


class AnalysisRun(Event, frozen=True, kw_only=True, tag="lockgate.rollout.analysis"):
    """One analysis measurement of a rollout and what the rollout did with it, signed by the router.

    `release` is the release judged (the canary; after a blue-green promotion the new stable) and
    `baseline` the one it was compared with. `phase` is the measurement's (Argo's phases); `outcome` what
    the rollout did: held, advanced, paused, aborted, promoted, rolled back or verified. Counts are the
    analysis status after this measurement. `signature` is Ed25519 by `key_id` over `lockgate.analysisruns.
    content`: a stored row changed afterwards no longer verifies.
    """

    deployment: Name
    release: Name
    baseline: OptName = ""
    template: AnalysisTemplate = "canary"
    step: int = 0
    look: int = 0
    phase: AnalysisPhase
    outcome: str = "held"
    successes: int = 0
    failures: int = 0
    inconclusives: int = 0
    successes_needed: int = 1  # successful measurements a step needs (Argo's count)
    failure_limit: int = 0
    inconclusive_limit: int = 0
    canary_n: int = 0
    stable_n: int = 0
    dry_run: bool = False  # some metric is measured in dry run (never acts)
    metrics: list[AnalysisMetric] = []
    error: str = ""  # phase Error: why the measurement could not be taken
    key_id: str = ""
    signature: str = ""
    # Appended: the features the `drift` metrics found drifted (their `why` says by how much); signed only
    # when not empty, so records made before it existed still verify.
    drifted_features: list[str] = []
