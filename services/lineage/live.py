"""Live OpenLineage (pure): which RunEvents one bus event means as it happens, and the bookkeeping that keeps
a run's START before its end.

An eval run STARTs when it is requested and ends (COMPLETE or FAIL) with its result; a gate decision and a
release registration are instantaneous (COMPLETE); a rollout attempt STARTs when it begins and ends on promotion
or abort (a route change after that is instantaneous). The events are the same functions' as `lockgate lineage export`, so a run has one runId and one
job name whether it was posted live or exported later.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import msgspec

from lockgate.contracts import EvalCompleted, EvalRequested, GateDecided, ReleaseRegistered, RolloutState
from lockgate.provenance import openlineage as ol

LiveEvent = EvalRequested | EvalCompleted | GateDecided | ReleaseRegistered | RolloutState


class Names(msgspec.Struct, kw_only=True):
    """What the live events name beyond the bus event: artifacts (hash -> kind and name), the release's
    artifact versions (`kind/name` -> hash), and the run's inputs (suite, dataset)."""

    artifacts: dict[str, dict[str, str]] = {}
    release_artifacts: dict[str, str] = {}
    inputs: list[str] = []


def _row(event: msgspec.Struct) -> dict[str, Any]:
    return msgspec.structs.asdict(event)


def _action(event: GateDecided) -> str:
    # The audit action the gatekeeper records with the decision (the export's runId is derived from it); a
    # human veto ("override") reads as "rejected" here, the only case where live and export runIds differ.
    if not event.reviewed_by:
        return "decided"
    return "rejected" if event.decision == "BLOCK" else "approved"


def run_events(event: LiveEvent, names: Names, namespace: str) -> list[dict[str, Any]]:
    """The RunEvents one bus event means, in the order they are to be sent."""
    release = {"artifacts": names.release_artifacts}
    match event:
        case EvalRequested():
            row = {"run_id": event.run_id, "release": event.release, "suite": event.suite, "time": event.time}
            return [ol.eval_start_event(row, names.inputs, release, names.artifacts, namespace)]
        case EvalCompleted():
            row = _row(event)
            return [ol.eval_event(row, names.inputs, {"artifacts": dict(event.artifacts) or names.release_artifacts},
                                  names.artifacts, namespace)]
        case GateDecided():
            row = {**_row(event), "action": _action(event), "actor": event.reviewed_by or "gatekeeper"}
            return [ol.decision_event(row, None, names.artifacts, namespace)]
        case ReleaseRegistered():
            return [ol.release_event({**_row(event), "event_id": event.id}, names.artifacts, namespace)]
        case RolloutState():
            return [ol.rollout_event(_row(event), namespace)]
    return []


class RunTracker:
    """Which runs were STARTed and which ended, for the last `capacity` runs: an end whose START was never
    sent (the lineage recorder was down when the run began) gets one first, a START that arrives after
    its run's end (consumers are independent) is not sent, and nothing is sent for a run after its end."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._state: OrderedDict[str, str] = OrderedDict()

    def _mark(self, run_id: str, state: str) -> None:
        self._state[run_id] = state
        self._state.move_to_end(run_id)
        while len(self._state) > self.capacity:
            self._state.popitem(last=False)

    def knows(self, run_id: str) -> bool:
        """Whether this run's START or end was sent (or passed over) lately."""
        return run_id in self._state

    def order(self, events: list[dict[str, Any]], start_of: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The events to send: `start_of[runId]` is the START to send before an end that had none."""
        out = []
        for ev in events:
            run_id, kind = ev["run"]["runId"], ev["eventType"]
            seen = self._state.get(run_id)
            if kind == "START":
                if seen is None:
                    self._mark(run_id, "started")
                    out.append(ev)
                continue
            if seen == "ended":
                # Its end went out already: the same end again (a release announced twice, two consumers naming one
                # release, probe p29 F7) would be a second COMPLETE of one run, anything else an event after its end.
                continue
            if kind in ("COMPLETE", "FAIL", "ABORT"):
                if seen is None and run_id in start_of:
                    out.append(start_of[run_id])
                self._mark(run_id, "ended")
            out.append(ev)
        return out
