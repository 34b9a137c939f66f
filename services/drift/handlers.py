"""NATS edge of the drift monitor: inference batches and online scores in, drift reports published (the sink
stores them, the gatekeeper judges them by a release's drift policy)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import msgspec

from lockgate.bus import Delivery
from lockgate.contracts import DriftReport, InferenceEvent, InferenceScored, RolloutState
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.drift import domain, snapshots, text
from lockgate.subjects import token

_SEEN_MAX = 4096
_snapshots = msgspec.json.Decoder(snapshots.Snapshot)
_texts = msgspec.json.Decoder(snapshots.TextRing)
_promotions = msgspec.json.Decoder(snapshots.Promotion)
PROMOTION = ".promotion"  # the KV key of a deployment's Promotion: its windows' key and this
SNAPSHOT_S = 2.0  # windows are saved at most this often (and on a clean stop): a crash loses at most this much
log = logging.getLogger("lockgate.drift")


class DriftHandlers:
    """Feeds the in-memory monitor; announces each report it yields."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        s = ctx.settings
        self.monitor = domain.DriftMonitor(s.drift_reference_size, s.drift_window_size, s.drift_psi_threshold,
                                           max_windows=s.drift_max_windows)
        self.events = Progress()
        self.reports = Progress()
        self.resets = Progress()
        self.rollouts = Progress()  # route changes read (each may restart windows: `resets` counts those that did)
        self.evictions = Progress()  # window sets the per-tenant cap evicted (or dropped at a start)
        # Reports computed but not yet published (a failed emit is retried on redelivery),
        # and recently observed message tokens, so a redelivered message is not counted twice.
        self._pending: list[DriftReport] = []
        self._emitting = asyncio.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._restored = False
        # Deployments whose windows changed since the last save; `saved` counts the events the last save covered.
        self._dirty: set[str] = set()
        self.saved = Progress()
        self.snapshot_s = SNAPSHOT_S
        self._oversized: set[str] = set()  # keys too large to save, warned about once
        # Windows whose snapshot is in KV (restored or saved by this monitor), and those of them the cap evicted,
        # whose snapshots the next save deletes (a start would restore them otherwise). Tenants told of the cap.
        self._stored: set[str] = set()
        self._evicted: set[str] = set()
        self._capped: set[str] = set()
        self._saving = asyncio.Lock()
        self._restoring = asyncio.Lock()
        # Per deployment, the promotion (or rollback) its windows were last restarted for (kept in KV beside them).
        self.promotions: dict[str, snapshots.Promotion] = {}

    async def _restore(self) -> None:
        """Load saved windows before the first event, so a restart keeps its reference, its current and rollout
        windows and their text vectors. An unreadable value is logged and skipped (those windows refill)."""
        if self._restored:
            return
        async with self._restoring:  # the inference, scores and rollout consumers may all be first
            if not self._restored:
                await self._load()

    async def _load(self) -> None:
        if self.monitor.embedder is None:  # a local model takes seconds to load: off the event loop
            embedder = await asyncio.to_thread(text.default_embedder)
            self.monitor.embedder, self.monitor.dim = embedder, embedder.dim
            log.info("text drift embeds with %s", embedder.name)
        entries = await self.ctx.bus.kv_entries(self.ctx.bus.subjects.kv_drift)
        snaps: dict[str, tuple[str, snapshots.Snapshot]] = {}  # windows -> its KV key, its snapshot
        for key in entries:
            if key.endswith(PROMOTION):
                self._restore_promotion(key, entries[key])
            if "." in key:  # text rings are read with their deployment
                continue
            try:
                snap = _snapshots.decode(entries[key])
            except msgspec.DecodeError as exc:
                log.warning("ignoring unreadable drift windows %s: %s", key, exc)
                continue
            _, _, served, app = domain.windows_of(snap.deployment)
            if not served and snap.app != app:
                # An application's windows saved before they were kept per app (as '<deployment>#app'), the last
                # app's events in them and maybe another's before: they refill, and their snapshot goes.
                log.info("dropping drift windows %s saved before windows were kept per application", key)
                self._stored.add(snap.deployment)
                self._evicted.add(snap.deployment)
                continue
            snaps[snap.deployment] = (key, snap)
        # Only what the per-tenant cap holds, the most recently saved first; the rest are evicted for good.
        keep, drop = domain.restorable({w: snap.saved for w, (_, snap) in snaps.items()}, self.monitor.max_windows)
        for windows in keep:
            self._restore_one(entries, *snaps[windows])
        if drop:
            log.warning("drift windows of %d deployments beyond drift_max_windows=%d per tenant not restored "
                        "(the least recently saved of their tenants' applications); their snapshots are deleted",
                        len(drop), self.monitor.max_windows)
            self._stored |= set(drop)
            self._evicted |= set(drop)
            await self.evictions.bump(len(drop))
        self._restored = True

    def _restore_promotion(self, key: str, value: bytes) -> None:
        try:
            p = _promotions.decode(value)
        except msgspec.DecodeError as exc:  # the next promotion's message restarts the windows (once more)
            log.warning("ignoring unreadable drift promotion %s: %s", key, exc)
            return
        self.promotions[p.deployment] = p
        self.monitor.serving[p.deployment] = (p.release, p.since)

    def _restore_one(self, entries: dict[str, bytes], key: str, snap: snapshots.Snapshot) -> None:
        m = self.monitor
        try:
            w = snapshots.restore(snap, m.reference_size, m.window_size, m.dim)
            pair = snapshots.restore_pair(snap, m.window_size, m.dim)
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("ignoring unreadable drift windows %s: %s", key, exc)
            return
        if snap.tenant != domain.windows_of(snap.deployment)[0]:
            # Saved before windows were kept per tenant, last filled by another tenant's events than the default
            # tenant's its key now means: mixed, so they refill from live traffic instead.
            log.info("ignoring drift windows %s saved with tenant %r's events: they refill", key, snap.tenant)
            return
        m.windows[snap.deployment] = w
        self._stored.add(snap.deployment)
        if pair is not None:
            m.pairs[snap.deployment] = pair
        m.learn(snap.tenant, snapshots.labels(snap), domain.windows_of(snap.deployment)[3])
        embedder = m.embedder.name if m.embedder is not None else ""
        for part in snapshots.TEXT_PARTS if embedder else ():
            if (raw := entries.get(f"{key}.text.{part}")) is None:
                continue
            try:
                snapshots.restore_text(part, _texts.decode(raw), w, pair, embedder)
            except (msgspec.DecodeError, ValueError) as exc:
                log.warning("ignoring unreadable drift text vectors %s.text.%s: %s", key, part, exc)

    async def save(self) -> None:
        """Persist the windows of deployments that changed since the last save (all of them at once: at most
        every `snapshot_s` seconds, and on a clean stop)."""
        async with self._saving:
            await self._save()

    async def _save(self) -> None:
        if not self._dirty and not self._evicted:
            return
        dirty, self._dirty = self._dirty, set()
        evicted, self._evicted = self._evicted, set()
        covered = self.events.count
        kv = await self.ctx.bus.kv(self.ctx.bus.subjects.kv_drift)
        m = self.monitor
        saved, deleted = time.time(), set()
        try:
            # First the evicted windows' snapshots (windows seen again since are put back below, as new).
            for windows in sorted(evicted):
                key = token(windows)
                for k in (key, *(f"{key}.text.{part}" for part in snapshots.TEXT_PARTS)):
                    await kv.delete(k)
                self._stored.discard(windows)
                deleted.add(windows)
            for windows in dirty:  # a deployment's served windows, or its application's (domain.window_key)
                w = m.windows.get(windows)
                if w is None:
                    continue
                key, pair = token(windows), m.pairs.get(windows)
                name = m.embedder.name if m.embedder is not None else ""
                values = {key: msgspec.json.encode(snapshots.snapshot(windows, w, pair, m.labels_for(windows), saved))}
                values |= {f"{key}.text.{part}": msgspec.json.encode(ring)
                           for part, ring in snapshots.text_rings(w, pair, name).items()}
                for k, value in values.items():
                    if len(value) > self.ctx.bus.nc.max_payload - 4096:  # headers and subject fit beside it
                        if k not in self._oversized:  # windows this large (sizes in settings) are not saved
                            self._oversized.add(k)
                            log.warning("drift windows %s (%d bytes) exceed NATS max_payload: not saved; lower "
                                        "drift_reference_size/drift_window_size to keep them across restarts",
                                        k, len(value))
                        continue
                    await kv.put(k, value)
                self._stored.add(windows)
        except BaseException:
            self._dirty |= dirty  # saved again next time
            self._evicted |= evicted - deleted  # deleted next time
            raise
        await self.saved.bump(covered - self.saved.count)

    async def run_snapshots(self) -> None:
        """Save changed windows every `snapshot_s` seconds (a failed save is retried at the next one)."""
        while True:
            await asyncio.sleep(self.snapshot_s)
            if self._dirty or self._evicted:
                try:
                    await self.save()
                except Exception:
                    log.exception("saving drift windows failed; retrying in %.3g s", self.snapshot_s)

    async def on_inference(self, value: list[InferenceEvent] | InferenceEvent, delivery: Delivery) -> None:
        """Observe a message's events once; emit any reports that came due."""
        events = value if isinstance(value, list) else [value]
        await self._observe(events, delivery, served=self.ctx.bus.subjects.is_served(delivery.subject))

    async def on_scores(self, value: InferenceScored, delivery: Delivery) -> None:
        """An online score of a sampled event (the evaluator's): a row of score features."""
        await self._observe([value], delivery, served=value.served)

    async def _observe(self, events: list[InferenceEvent] | list[InferenceScored], delivery: Delivery, *,
                       served: bool) -> None:
        """`served`: the events are answers a router served (their reports may move traffic), so they also fill
        the canary-versus-stable windows."""
        await self._restore()
        # Shadow calls answered nobody: they are the candidate's, not the deployment's traffic. Cached answers
        # are replays of earlier ones: one request repeated would otherwise fill (and dilute) a window. Failures
        # the client caused (a hang-up, a refused body) are the client's doing, which it may aim at one arm.
        # Failed calls a retry or fallback went past stay: they count in status and error_type only (features.rows).
        events = [e for e in events if e.variant != "shadow"
                  and not (isinstance(e, InferenceEvent) and (e.cached or e.client_failed))]
        token = delivery.msg_id or f"{delivery.subject}-seq-{delivery.stream_seq}"
        if token not in self._seen:
            reports = self.monitor.observe_events(events, served=served)
            await self._evict()
            self._pending += reports
            self._seen[token] = None
            if len(self._seen) > _SEEN_MAX:
                self._seen.popitem(last=False)
            self._dirty |= {domain.window_key(e.tenant, domain.deployment_of(e), served, e.app) for e in events}
            await self.events.bump(len(events))
        # One emitter at a time: the inference and scores consumers run concurrently, and two loops over the
        # same list published a report twice and popped the next one unpublished (then from an empty list).
        async with self._emitting:
            while self._pending:
                await self._emit(self._pending[0])
                self._pending.pop(0)

    async def _evict(self) -> None:
        """Take what the cap evicted: their snapshots go at the next save; logged once per tenant."""
        m = self.monitor
        evicted, m.evicted = m.evicted, []
        for tenant in m.capped - self._capped:
            log.warning("tenant %r holds drift_max_windows=%d drift window sets: for a new one, the application "
                        "holding the most loses its least recently seen, never one within its fair share (an "
                        "application's events naming many deployments; logged once per tenant)", tenant, m.max_windows)
        self._capped |= m.capped
        m.capped = set()
        self._evicted |= {k for k in evicted if k in self._stored}
        if evicted:
            await self.evictions.bump(len(evicted))

    async def on_rollout(self, state: RolloutState, delivery: Delivery) -> None:
        """A promotion makes the promoted release's traffic the reference, and a rollback the restored release's
        (once a promotion restarted the windows); an abort ends the canary's window.

        Only once per promotion: the router announces the promoted route again on any change while the release is
        under post-promotion analysis (a BLOCK of an old known-good release, the analysis's progress deadline), and
        each of those restarted the windows, whose reference then refilled from the release's degraded traffic: its
        drift was never reported (probe p69). So the windows restart when the stable release or its promotion
        differs from the one they last restarted for (`promotions`, kept in KV, so a restart agrees)."""
        await self._restore()  # before changing windows that a restore would otherwise put back
        await self._restart(state)
        await self.rollouts.bump()

    async def _restart(self, state: RolloutState) -> None:
        last = self.promotions.get(state.deployment)
        if state.phase == "aborted":
            self._dirty |= self.monitor.end_rollout(state.deployment)
        if state.phase == "promoted":
            if last is not None and (last.release, last.promoted_at) == (state.stable_release, state.promoted_at):
                return  # the same promotion announced again
        elif last is None or last.release == state.stable_release:
            return  # a canary's change or abort: stable's traffic, and its reference, stand
        # Else another release serves since the last restart (a rollback, an operator's new stable release): its
        # windows only take that release's events (DriftMonitor.restart), so they restart with it.
        since = state.promoted_at or state.time.timestamp()
        promotion = snapshots.Promotion(deployment=state.deployment, release=state.stable_release,
                                        promoted_at=state.promoted_at, since=since)
        async with self._saving:  # a save in flight must not put the old windows back after the delete
            # Every tenant's windows of the deployment, and the default tenant's served key whatever this replica holds.
            keys = self.monitor.keys_of(state.deployment) | {domain.window_key(domain.DEFAULT_TENANT, state.deployment,
                                                                               True)}
            self.monitor.restart(state.deployment, state.stable_release, since)
            kv = await self.ctx.bus.kv(self.ctx.bus.subjects.kv_drift)
            for windows in sorted(keys):
                self._dirty.discard(windows)
                self._stored.discard(windows)
                key = token(windows)
                for k in (key, *(f"{key}.text.{part}" for part in snapshots.TEXT_PARTS)):
                    await kv.delete(k)
            await kv.put(token(state.deployment) + PROMOTION, msgspec.json.encode(promotion))
            self.promotions[state.deployment] = promotion
        await self.resets.bump()

    async def _emit(self, report: DriftReport) -> None:
        await self.ctx.bus.publish(self.ctx.bus.subjects.drift(report.deployment), report)
        await self.reports.bump()
