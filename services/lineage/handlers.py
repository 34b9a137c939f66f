"""NATS edge of the lineage recorder: decoded events in, idempotent inserts out."""

from __future__ import annotations

from lockgate import artifacts
from lockgate.bus import Delivery
from lockgate.contracts import ArtifactRegistered, LineageRun, ReleaseRegistered
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.lineage import domain


class LineageHandlers:
    """One handler for every lineage-bearing event; the event id is the insert token."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.processed = Progress()  # events handled; tests await it instead of sleeping

    async def on_event(self, event: domain.LineageEvent, delivery: Delivery) -> None:
        """Record the event's own row (if it has a table) and the edges it implies."""
        store = self.ctx.store
        # Tokens are per table, so the same event id can guard both inserts.
        match event:
            case ArtifactRegistered():
                await store.ainsert_rows("artifacts", domain.ARTIFACT_COLUMNS, [domain.artifact_row(event)],
                                         token=event.id)
            case ReleaseRegistered():
                # The name -> bundle binding (create-only KV) is the authority: an event that reached
                # the bus without `register_release`, or rebinds a name, is refused (ReleaseConflict,
                # dead-lettered) instead of recorded; a first sighting binds the name here.
                await artifacts.bind_release(self.ctx.bus, artifacts.release_bundle(
                    event.release, event.app, event.artifacts, parent=event.parent, tenant=event.tenant))
                await store.ainsert_rows("releases", domain.RELEASE_COLUMNS, [domain.release_row(event)],
                                         token=event.id)
            case LineageRun():
                await store.ainsert_rows("lineage_runs", domain.RUN_COLUMNS, [domain.run_row(event)],
                                         token=event.id)
        rows = domain.edge_rows(event)
        if rows:
            await store.ainsert_rows("lineage_edges", domain.EDGE_COLUMNS, rows, token=event.id)
        await self.processed.bump()
