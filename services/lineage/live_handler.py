"""The lineage recorder's live OpenLineage emission (on when `openlineage_url` is set): each eval request,
eval result, gate decision, release and rollout change becomes RunEvents POSTed by the HTTP transport.

The consumer only hands the bus event to a bounded batcher (never waits, never raises); the batcher's one
flush at a time maps events in order to RunEvents for the HTTP transport. Names are looked up there, best
effort (the suite from the object store, artifact names through the query service): a lookup that fails
names the dataset by its hash instead.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from lockgate import artifacts
from lockgate.batcher import Batcher
from lockgate.contracts import EvalCompleted, EvalRequested, GateDecided, ReleaseRegistered
from lockgate.errors import LockgateError
from lockgate.provenance import environment
from lockgate.provenance import openlineage as ol
from lockgate.provenance.transport import HttpTransport
from lockgate.queryclient import ask
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.lineage import live

log = logging.getLogger("lockgate.lineage")
BACKLOG_S = 3600.0
# The emitter sends one event at a time and waits on this lookup (one per eval request, a rare event): bounded, a
# slow query service holds live lineage up for seconds, not the default 30 s each.
ENDED_TIMEOUT_S = 2.0


class LiveLineage:
    """Maps bus events to RunEvents and hands them to the transport, in an order that keeps START first."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.namespace = ctx.settings.openlineage_namespace or f"lockgate://{ctx.settings.prefix}"
        self.transport = HttpTransport(ctx.settings.openlineage_url)
        self.tracker = live.RunTracker()
        self.processed = Progress()  # bus events mapped; tests may await it
        self._suites: dict[str, dict[str, Any]] = {}
        self._inbox: Batcher[live.LiveEvent] = Batcher(self._emit, max_items=64, max_age_s=0.01, capacity=10_000,
                                                       overflow="drop_newest", on_drop=self.transport.lost,
                                                       name="openlineage-inbox", autostart=False)

    def start(self) -> None:
        """Begin mapping and sending (inside the running loop)."""
        self._inbox.start()
        self.transport.start()

    async def close(self) -> None:
        """Map and send what is queued, then close."""
        await self._inbox.close()
        await self.transport.close()

    async def on_requested(self, req: EvalRequested, delivery: Any) -> None:
        """An eval run was requested: its START, unless its end is recorded already (`_emit_one`). A request
        older than BACKLOG_S is skipped unasked (its end, if it comes, brings a START)."""
        if req.rerun_of or datetime.now(UTC) - req.time > timedelta(seconds=BACKLOG_S):  # a rerun is no run of record
            return
        self.on_event(req)

    def on_event(self, event: live.LiveEvent) -> None:
        """Queue one bus event for emission; never waits, never raises (a full queue drops and counts)."""
        self._inbox.add(event)

    async def _emit(self, events: list[live.LiveEvent]) -> None:
        for event in events:
            await self._emit_one(event)

    async def _emit_one(self, event: live.LiveEvent) -> None:
        try:
            if isinstance(event, EvalRequested) and await self._ended(event.run_id):
                return
            names = await self._names(event)
            events = live.run_events(event, names, self.namespace)
            start_of = {}
            if isinstance(event, EvalCompleted):
                row = {"run_id": event.run_id, "release": event.release, "suite": event.suite, "time": event.time}
                start = ol.eval_start_event(row, names.inputs, {"artifacts": dict(event.artifacts)}, names.artifacts,
                                            self.namespace)
                start_of[start["run"]["runId"]] = start
            for ev in self.tracker.order(events, start_of):
                self.transport.post(ev)
        except Exception:  # a broken lookup or an odd event must not stop lineage recording
            log.exception("no OpenLineage events for %s %s", type(event).__name__, getattr(event, "id", ""))
        finally:
            await self.processed.bump()

    async def _ended(self, run_id: str) -> bool:
        """Whether the run's end is recorded (its result row stored) though this process never saw it. The durable
        of requests replays the last BACKLOG_S when live emission is turned on (or on again), while the recorder's
        durable of results is past those runs already: a START posted for one stayed open for ever (probe p29 F7).
        Such a run is left out; a run whose end is still to come gets its START now, or with its end."""
        if self.tracker.knows(ol.run_uuid(run_id)):
            return False  # the tracker keeps its START first, or drops it after its end
        try:
            return await ask(self.ctx.bus, "eval_run_event_id", {"run_id": run_id}, into=str | None,
                             timeout_s=ENDED_TIMEOUT_S) is not None
        except LockgateError:
            # Unknown: a START left out now comes with the run's end, one sent for an ended run never ends.
            return True

    async def _suite(self, digest: str) -> dict[str, Any]:
        if digest not in self._suites:
            try:
                doc = await artifacts.load_structured(self.ctx.bus, digest)
            except LockgateError:
                doc = {}
            self._suites[digest] = doc if isinstance(doc, dict) else {}
            if len(self._suites) > 1000:
                self._suites.pop(next(iter(self._suites)))
        return self._suites[digest]

    async def _names(self, event: live.LiveEvent) -> live.Names:
        names = live.Names()
        hashes: list[str] = []
        if isinstance(event, EvalRequested | EvalCompleted):
            suite = await self._suite(event.suite)
            dataset = suite.get("dataset")
            names.inputs = [event.suite, *([dataset] if isinstance(dataset, str) and dataset else [])]
            names.artifacts[event.suite] = {"kind": "eval_suite", "name": str(suite.get("name") or event.suite)}
            arts = dict(event.artifacts)
            if not arts:
                try:
                    arts = await ask(self.ctx.bus, "release_artifacts", {"release": event.release},
                                     into=dict[str, str] | None) or {}
                except LockgateError:
                    arts = {}
            names.release_artifacts = arts
            if isinstance(event, EvalCompleted) and (env := event.environment.get(environment.HASH_KEY)):
                # The run's environment artifact, an input as in the export. It was registered just before the
                # result, so it is named as the evaluator registered it until the store has that registration.
                names.inputs.append(env)
                names.artifacts[env] = {"kind": "environment", "name": environment.artifact_name(env)}
            hashes = [*names.inputs, *arts.values()]
        elif isinstance(event, GateDecided):
            hashes = [event.policy] if event.policy else []
        elif isinstance(event, ReleaseRegistered):
            hashes = list(event.artifacts.values())
        if hashes:
            try:
                # As the export names them: the first registration by the release's tenant, as of the event.
                whose = {"tenant": event.tenant} if isinstance(event, ReleaseRegistered) else {"release": event.release}
                found = await ask(self.ctx.bus, "artifact_names", {"hashes": hashes, **whose, "at": event.time},
                                  into=dict[str, dict[str, str]])
                names.artifacts.update(found)
            except LockgateError:
                log.debug("artifact names unavailable; OpenLineage datasets are named by hash")
        return names
