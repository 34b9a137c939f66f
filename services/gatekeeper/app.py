"""Gatekeeper wiring: durable consumers on `eval.completed`, `gate.review.>`, `audit.>` (the audit
chainer) and the artifact lifecycles (sunsets), every replica's subscription to the lifecycles (listed again after a
reconnect, and until a listing succeeds), and the signing key."""

from __future__ import annotations

import contextlib
import logging

from nats.aio.subscription import Subscription

from lockgate.bus import consume
from lockgate.contracts import AuditEntry, DriftReport, EvalCompleted, GateReview
from lockgate.contracts.provenance import ArtifactLifecycle
from lockgate.errors import LockgateError
from lockgate.retry import RetryPolicy
from lockgate.server.service import Service, ServiceContext
from lockgate.services.gatekeeper.chain import CHAIN_WAITS, Chainer
from lockgate.services.gatekeeper.driftgate import DriftGate
from lockgate.services.gatekeeper.gatesfile import load_gates_file
from lockgate.services.gatekeeper.handlers import GateHandlers
from lockgate.services.gatekeeper.sunsets import Sunsets
from lockgate.signing import ensure_signer_trusted, gatekeeper_signer

log = logging.getLogger("lockgate.gatekeeper")
# A listing of the sunsets that failed is tried again until one succeeds: soon after a blip, then every half minute
# at most while the provenance stream stays away (only listing its lifecycle subjects fails a listing: a sunset whose
# history or releases cannot be read is retried by its own timer, `Sunsets._due`).
_RELIST = RetryPolicy(attempts=None, initial_s=1.0, max_s=30.0)


class Gatekeeper(Service):
    """Turns eval results and human reviews into signed PASS/BLOCK/NEEDS_REVIEW decisions."""

    name = "gatekeeper"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        # Trust roots are configuration. Without LOCKGATE_TRUST_FILE they are the home's trust.json, where the
        # gatekeeper's persistent key is trusted before it signs anything (what `lockgate up` relies on; refused for
        # a key revoked or retired there). An explicit trust file (k8s: a mounted ConfigMap) is the operator's,
        # never written: a key it does not trust signs nothing (OwnKey).
        self.signer = gatekeeper_signer(ctx.settings) if ctx.settings.trust_file else ensure_signer_trusted(ctx.settings)
        # Read once, at start: an invalid gates file stops the gatekeeper (ConfigError naming the file)
        # rather than let evals be judged by whatever policy they name.
        self.handlers = GateHandlers(ctx, self.tracer, self.signer, load_gates_file(ctx.settings.gates_file))
        self.unheld = ""  # why the PASSes standing at start were not all judged against the gates file (start)
        self.unmeasured = ""  # why those standing at start were not all judged against their baselines (start)
        s = ctx.bus.subjects
        consume(ctx.bus, self.consumers, subject=s.eval_completed, stream="events",
                durable=s.durable("gatekeeper", "evals"), wire_type=EvalCompleted, origin="gatekeeper",
                handler=self.handlers.on_eval_completed, ack_wait_s=ctx.settings.ack_wait_s)
        consume(ctx.bus, self.consumers, subject=s.gate_review_all, stream="events",
                durable=s.durable("gatekeeper", "reviews"), wire_type=GateReview, origin="gatekeeper",
                handler=self.handlers.on_review, ack_wait_s=ctx.settings.ack_wait_s)
        # Drift reports over a policy's drift rules BLOCK the deployment's canary release (driftgate.py).
        self.drift = DriftGate(ctx, self.handlers.own, self.handlers.records, self.handlers.publish_key)
        consume(ctx.bus, self.consumers, subject=s.drift_all, stream="events",
                durable=s.durable("gatekeeper", "drift"), wire_type=DriftReport, origin="gatekeeper",
                handler=self.drift.on_drift, batch_size=1, ack_wait_s=ctx.settings.ack_wait_s)
        # An artifact version's sunset BLOCKs the decisions binding it that admit, when it passes (sunsets.py): each
        # lifecycle record appended arms the timer of its sunset, on every replica (`start`'s subscription); this
        # consumer reads those appended while no replica was connected.
        self.sunsets = Sunsets(ctx, self.handlers.own, self.handlers.records, self.handlers.publish_key, self.spawn)
        self.unsunset = ""  # why the last listing of the sunsets (start, reconnects) did not arm or judge them all
        self._lifecycles: Subscription | None = None
        # A message there that is no lifecycle record stays in the stream by design (deny_delete) and every reader
        # skips it (chain.read): skipped here too, not lettered (its letter's original is not the sink's to read).
        consume(ctx.bus, self.consumers, subject=s.lifecycle_any, stream="provenance",
                durable=s.durable("gatekeeper", "lifecycles"), wire_type=ArtifactLifecycle, origin="gatekeeper",
                handler=self.sunsets.on_lifecycle, ack_wait_s=ctx.settings.ack_wait_s, records_refusals=False)
        # The key that signs decisions also signs the audit chain; one entry in flight keeps it in order. An entry is
        # never dead-lettered for retries spent (CHAIN_WAITS): what it is refused for then is the chain's, not its
        # own (this replica's key not trusted, KV or the stream unavailable), and a lettered entry is a row lost for
        # good; it waits, redelivered (NACK_BACKOFF) until a replica with a trusted key chains it. What is wrong with
        # the entry itself is refused at once (InvalidEvent). Before, with no trusted key anywhere (the running
        # gatekeeper's revoked, as a leak is answered), entries were dead-lettered 7 to 50 s later: a `gate
        # revoke` or `gate trust` never in the log.
        self.chainer = Chainer(ctx, self.handlers.own)
        consume(ctx.bus, self.consumers, subject=s.audit_all, stream="audit",
                durable=s.durable("gatekeeper", "audit"), wire_type=AuditEntry, origin="gatekeeper",
                handler=self.chainer.on_entry, ack_wait_s=ctx.settings.ack_wait_s, max_ack_pending=1,
                max_deliver=CHAIN_WAITS)

    async def start(self) -> None:
        """Copy the public key to KV for information (consumers trust only their trust file)."""
        self.handlers.own.problem()  # a key the trust roots do not trust is said at once, not at the first message
        await self.handlers.publish_key()
        try:
            await self.handlers.upgrade_vetoes()
        except LockgateError as exc:
            # Each is under its content's key before its names are remade, so it binds every later eval; its names
            # gated before it are remade at the next decision about its content (or the next start).
            log.warning("vetoes of before not carried over to every name of their content: %s", exc.message)
        try:
            # The gates file binds what admits now, not only what is decided after it: a PASS decided under a policy
            # or suite it does not allow (before it covered the app, or under a pin changed since) is a BLOCK.
            await self.handlers.hold_to_gates_file()
        except LockgateError as exc:
            # Such a PASS may still admit: said (log and readiness) until a start judges them all.
            self.unheld = (f"PASSes decided before the gates file {self.ctx.settings.gates_file} were not all judged "
                           f"against it ({exc.message}): restart the gatekeeper")
            log.error("%s", self.unheld)
        try:
            # A PASS measured against a release that is no allowed baseline now is a BLOCK: its baseline withdrawn
            # before a gatekeeper that reaches back ran, or while one was stopped mid-pass (measured.Measured).
            await self.handlers.measured.sweep()
        except LockgateError as exc:
            self.unmeasured = (f"decisions measured against a release that is no allowed baseline now were not all "
                               f"judged again ({exc.message}): restart the gatekeeper")
            log.error("%s", self.unmeasured)
        # Every replica hears every lifecycle record appended from now on (no queue group): a record read by the
        # shared consumer alone armed one replica's timer, and the sunset went unheld if that one stopped (probe p32).
        # Taken before the listing below, so no record falls between the two.
        self._lifecycles = await self.ctx.bus.nc.subscribe(self.ctx.bus.subjects.lifecycle_any,
                                                           cb=self.sunsets.on_heard)
        reconnects = self.ctx.bus.reconnects  # before the listing: a reconnect during it is listed again after it
        try:
            await self._list_sunsets()  # a sunset already past is judged before the start returns
            listed = True
        except LockgateError:
            listed = False  # retried in the background: the start does not wait for the bus to come back
        self.spawn(self._keep_sunsets_listed(reconnects, listed), "sunsets-relist")

    async def _list_sunsets(self) -> None:
        """Arm or judge the sunset of every lifecycle (`Sunsets.start`); a listing that fails is said on readiness
        until one succeeds, and raised."""
        try:
            await self.sunsets.start()
        except LockgateError as exc:  # the lifecycles were not listed: no sunset is known to arm a timer for
            self.unsunset = (f"the sunsets of artifact versions were not all read ({exc.message}): a release using "
                             "one past its sunset may still admit; they are listed again until a listing succeeds "
                             f"(retried at most {_RELIST.max_s:g} s apart) and after each reconnect")
            log.error("%s", self.unsunset)
            raise
        self.unsunset = ""

    async def _keep_sunsets_listed(self, seen: int, listed: bool) -> None:
        # A listing that failed is tried again (_RELIST) until one succeeds, the bus connected or not: before, it
        # waited for the next reconnect or restart, and a bus that stayed connected left the sunsets unknown.
        # The subscription above does not replay either: a record appended while this replica's connection was down
        # went to the shared consumer, so to another replica's timer only, which stopping took the sunset with it.
        # Each time the connection comes back, the lifecycles are listed again as at start (idempotent: `_arm` keeps
        # the earliest timer, a remade decision's id is derived from the one it replaces).
        while True:
            if not listed:
                await _RELIST.call(self._list_sunsets, retry_on=LockgateError, what="listing the sunsets")
            seen = await self.ctx.bus.reconnected(after=seen)
            listed = False

    async def stop(self) -> None:
        """Hear no more lifecycle records and cancel the sunsets' timers first, so that no pass ending meanwhile
        arms one past the stop; then the background work."""
        if self._lifecycles is not None:
            with contextlib.suppress(Exception):  # the connection may already be closing
                await self._lifecycles.unsubscribe()
        self.sunsets.close()
        await super().stop()

    def problems(self) -> list[str]:
        """Not ready while its signing key is not trusted (it then decides and chains nothing), or while PASSes the
        gates file may not allow, or measured against a release no allowed baseline now, were not judged again, or
        releases using an artifact past its sunset may still admit."""
        problem = self.handlers.own.problem()
        return [p for p in (problem, self.unheld, self.unmeasured, self.unsunset, *self.sunsets.problems()) if p]


def create(ctx: ServiceContext) -> Gatekeeper:
    """Build the gatekeeper."""
    return Gatekeeper(ctx)
