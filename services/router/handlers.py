"""NATS edge of the router: gate decisions, drift reports and live inference events in, route changes
out (via Rollouts)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.msg import Msg

from lockgate import queryclient
from lockgate.bus import Delivery, Handler
from lockgate.contracts import DriftReport, GateDecided, InferenceEvent, InferenceScored
from lockgate.errors import LockgateError, SignatureError
from lockgate.ids import batch_id
from lockgate.retry import RetryPolicy
from lockgate.services.router import progress
from lockgate.services.router.rollouts import EVIDENCE_ATTRIBUTES, Rollouts

log = logging.getLogger("lockgate.router")

_inference = msgspec.json.Decoder(list[InferenceEvent] | InferenceEvent)
_scored = msgspec.json.Decoder(InferenceScored)
_drift = msgspec.json.Decoder(DriftReport)
_SEEN_MAX = 4096
# Stored served events asked for at once; a page too large for one NATS message is asked again at half the size
# (queryclient.pages), as 500 answers with 2 kB tool calls made it for ever (probe p36 F1).
_STORED_PAGE = 500


def gate_handler(rollouts: Rollouts) -> Handler:
    """Handler for `gate.decided.>`: verify, then apply to matching canaries; persistence errors retry via nack."""

    async def handle(decision: GateDecided, delivery: Delivery) -> None:
        # SignatureError ("signature invalid: ...") sends the decision to the DLQ instead of acting on it.
        await rollouts.verifier.verify(decision)
        expected = rollouts.ctx.bus.subjects.gate_decided(decision.release)
        if delivery.subject != expected:
            raise SignatureError(f"decision {decision.id} for {decision.release!r} arrived on {delivery.subject}, "
                                 f"not {expected}: refusing it")
        await rollouts.on_decision(decision)

    return handle


def drift_handler(rollouts: Rollouts) -> Handler:
    """Handler for `drift.>`: a DRIFT covering a live canary aborts it; persistence errors retry via nack."""

    async def handle(report: DriftReport, delivery: Delivery) -> None:
        await rollouts.on_drift(report)

    return handle


class Seen:
    """The Nats-Msg-Ids of the evidence messages taken lately (bounded): a message that comes twice (published
    again, or both live and in the replay at start) counts once."""

    def __init__(self, limit: int = _SEEN_MAX) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def first(self, msg_id: str) -> bool:
        """True the first time `msg_id` is offered (always for a message without one)."""
        if not msg_id:
            return True
        if msg_id in self._ids:
            return False
        self._ids[msg_id] = None
        if len(self._ids) > self._limit:
            self._ids.popitem(last=False)
        return True


def _evidence(rollouts: Rollouts, take: Callable[[bytes], None],
              seen: Seen | None = None) -> Callable[[Msg], Awaitable[None]]:
    """A core-NATS callback feeding analysis evidence: every replica sees every message (no queue
    group), so all replicas measure the same evidence. Duplicate publishes (same Nats-Msg-Id) count
    once; undecodable messages are the sink's to dead-letter, here they are only skipped."""
    seen = seen or Seen()

    async def on_message(msg: Msg) -> None:
        if not rollouts.analysing():
            return  # no canary under analysis: not worth decoding
        if not seen.first((msg.headers or {}).get("Nats-Msg-Id", "")):
            return
        try:
            take(msg.data)
        except (msgspec.DecodeError, UnicodeDecodeError):  # not evidence (the durable consumers dead-letter it)
            return

    return on_message


def evidence_callback(rollouts: Rollouts, seen: Seen | None = None) -> Callable[[Msg], Awaitable[None]]:
    """For `inference.*.*.router`: the events of requests the routers served (`subjects.served`); `seen` is
    shared with `replay_served`, so a batch both live and replayed counts once."""

    def take(data: bytes) -> None:
        value = _inference.decode(data)
        rollouts.observe(value if isinstance(value, list) else [value])

    return _evidence(rollouts, take, seen)


def drift_callback(rollouts: Rollouts) -> Callable[[Msg], Awaitable[None]]:
    """For `drift.>`: drift reports as analysis evidence on every replica (the durable consumer that acts
    on them reaches one replica per report)."""
    return _evidence(rollouts, lambda data: rollouts.observe_drift(_drift.decode(data)))


def scores_callback(rollouts: Rollouts) -> Callable[[Msg], Awaitable[None]]:
    """For `eval.scores.>`: online scores of sampled live answers."""
    return _evidence(rollouts, lambda data: rollouts.observe_scores([_scored.decode(data)]))


async def _replay(rollouts: Rollouts, stream_key: str, reads: dict[str, float], take: Callable[[bytes], bool],
                  what: str, *, give_up: bool = True) -> int:
    """Read back the messages stored in stream `stream_key` on each subject of `reads` since its time (unix
    seconds), oldest first, into
    `take` (True if it took the message); returns how many were taken. An unreadable message is skipped and a
    stream that cannot be read ends the replay, both logged: the start goes on, and evidence then comes from live
    messages only (`give_up=False`: the error is raised, for the caller to try again)."""
    bus, taken = rollouts.ctx.bus, 0
    stream = bus.subjects.streams[stream_key].name
    try:
        for subject, since in reads.items():
            async for seq, stored_on, data in bus.stored_since(stream, subject, since):
                try:
                    taken += take(data)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec checks UTF-8 with Python's codec
                    log.warning("%s replay skipped unreadable message %d of %s on %s: %s", what, seq, stream,
                                stored_on, exc)
    except LockgateError as exc:
        if not give_up:
            raise
        log.warning("%s replay stopped after %d messages (evidence comes from live ones): %s", what, taken, exc)
    return taken


async def replay_drift(rollouts: Rollouts) -> int:
    """At start, after subscribing to live reports: the drift reports each deployment under analysis got since its
    rollout started (`progress.drift_replay`), as evidence, so a replica that (re)starts mid-rollout does not
    hold its drift metric WAITING until the monitor's next report. Returns how many were taken."""
    subjects = rollouts.ctx.bus.subjects

    def take(data: bytes) -> bool:
        rollouts.observe_drift(_drift.decode(data))
        return True

    reads = {subjects.drift(d): since for d, since in progress.drift_replay(rollouts.routes.values(), time.time()).items()}
    return await _replay(rollouts, "events", reads, take, "drift")


def _published_id(value: list[InferenceEvent] | InferenceEvent) -> str:
    """The Nats-Msg-Id the message carried: a batch's id (the routers' outbox), an event's own (Bus.publish)."""
    return batch_id(value) if isinstance(value, list) else value.id


# The read-back of the served events is tried until it completes (the deployments it covers wait meanwhile): soon
# after a blip, then every half minute at most while the query service (or the stream) stays away.
REPLAY_RETRY = RetryPolicy(attempts=None, initial_s=1.0, max_s=30.0)
_PENDING = "served evidence {} not yet read back from the record ({})"


def _pending(after: float | None, why: str) -> str:
    """What the looks of a deployment waiting for the read-back say (`Rollouts.await_replay`)."""
    return _PENDING.format("before the restart" if after is None else "published while cut off from the bus", why)


def await_served(rollouts: Rollouts, after: float | None = None) -> None:
    """At start, before serving, and when the bus connection is lost (`after`: from when `read_back` reads): mark
    the deployments `replay_served` reads evidence back for, whose looks wait until it completes
    (`Rollouts.await_replay`)."""
    rollouts.await_replay(_pending(after, "reading"))


async def read_back(rollouts: Rollouts, seen: Seen, reconnects: int, retry: RetryPolicy | None = None) -> None:
    """From the start (after `await_served` and subscribing to live evidence with `seen`, the bus having come back
    `reconnects` times then) until the router stops, in the background: the served events and online scores from
    before the start (`replay_served`); then, each time the connection is lost, what the subscriptions miss until it
    is back, read back the same way from shortly before it was last known to work. (Drift reports are read back on
    their own after each reconnection: nothing waits for them, and they need not wait for a read-back held by an
    absent query service.) Before (probe p48 F1), only the drift reports were read back after a reconnection: a
    replica cut off from the bus for a second (or any nats-server restart) missed for good the events the others
    served meanwhile, judged its looks on a smaller sample than theirs, and once passed a failing canary's look
    whose large answers it had not seen."""
    bus, after = rollouts.ctx.bus, None
    while True:
        await replay_served(rollouts, seen, retry, after)
        # A loss while that read-back was under way is seen now: its deployments stayed marked meanwhile, and the
        # read-back that follows covers the loss from its start.
        await bus.lost(reconnects)
        # From the loss on the looks wait (they would judge part of the evidence), until the read-back completes.
        after = bus.lost_at(reconnects) - progress.RECONNECT_REPLAY_MARGIN_S
        await_served(rollouts, after)
        reconnects = await bus.reconnected(after=reconnects)


async def replay_served(rollouts: Rollouts, seen: Seen, retry: RetryPolicy | None = None,
                        after: float | None = None) -> int:
    """After `await_served` and subscribing to live served events (`evidence_callback` with the same `seen`), in
    the background while the replica serves: the events of requests the routers served since the earliest rollout
    whose evidence is kept (`progress.served_replay`; since `after` at most, for a replica back on the bus), as
    evidence. Evidence lives in memory, so without it a
    replica that (re)starts mid-canary measures from zero, and one that restarts after a blue-green promotion
    never again has the old release's baseline (it gets no traffic after the promotion): its post-promotion
    analysis could not judge the release. Each deployment keeps what `Rollouts.observe` keeps (its rollout's
    releases), within the evidence's row limits, and the online scores of those answers (`replay_scores`). Returns
    the batches taken.

    The inference stream keeps an event only until every consumer has acknowledged it (interest retention), so
    the replay reads the messages still in it first, then the rest from the record the sink keeps in ClickHouse
    (the `served_events` query): in that order, an event consumed between the two reads is found in the second.
    A read that fails is tried again from the start (`retry`, default `REPLAY_RETRY`; a batch is taken once across
    tries, a score once by its answer and scorer) until all three reads complete: until then the deployments marked
    by `await_served` judge part of their evidence only, and their looks wait (`analysis.incomplete`) saying why,
    so a canary that failed before the restart is not promoted on the healthy traffic after it."""
    now = time.time()
    since = progress.served_replay(rollouts.routes.values(), now, after)
    if since is None:
        rollouts.replay_done()
        return 0
    deployments = progress.served_replayed(rollouts.routes.values())
    # Each deployment's online scores from its own rollout's start (`progress.served_replay` of its route alone), for
    # the rollouts whose evidence is kept (a shadow comparison reads no scores).
    scores = {rollouts.ctx.bus.subjects.eval_scores(r.deployment): start for r in list(rollouts.routes.values())
              if progress.collecting(r) and (start := progress.served_replay([r], now, after)) is not None}
    # message id -> True while the record's rows of its batch are taken (a batch may straddle pages), False once it
    # is taken whole (live, or from the stream): across both reads and tries
    taken: dict[str, bool] = {}
    stored: set[str] = set()  # the ids of the events taken from the record, so a try again takes the rest only

    def take(data: bytes) -> bool:
        value = _inference.decode(data)
        msg_id = _published_id(value)
        if msg_id in taken:
            return False  # read twice
        # A batch still in the stream is mostly stored already: taken here whole, its rows in the record are not taken
        # again (they were, counting each of its events twice: in the stream until its last consumer took it).
        taken[msg_id] = False
        if not seen.first(msg_id):
            return False  # taken live already
        rollouts.observe(value if isinstance(value, list) else [value])
        return True

    async def once() -> int:
        try:
            batches = await _replay(rollouts, "inference", {rollouts.ctx.bus.subjects.served_all: since}, take,
                                    "served events", give_up=False)
        except LockgateError as exc:
            rollouts.replay_stalled(_pending(after, f"inference stream: {exc.message}"))
            log.warning("served events replay from the stream failed (tried again; looks wait): %s", exc)
            raise
        try:
            batches += await _replay_stored(rollouts, seen, taken, stored, since, deployments)
        except LockgateError as exc:
            rollouts.replay_stalled(_pending(after, f"query service: {exc.message}"))
            log.warning("served events replay from the record failed (tried again; looks wait): %s", exc)
            raise
        try:
            await replay_scores(rollouts, scores)
        except LockgateError as exc:
            rollouts.replay_stalled(_pending(after, f"online scores: {exc.message}"))
            log.warning("online scores replay failed (tried again; looks wait): %s", exc)
            raise
        return batches

    batches = await (retry or REPLAY_RETRY).call(once, retry_on=LockgateError, what="served events replay")
    rollouts.replay_done()
    return batches


async def replay_scores(rollouts: Rollouts, reads: dict[str, float]) -> int:
    """The online scores published on each subject of `reads` (`eval.scores.<deployment>`) since its time (unix
    seconds), as evidence (`Rollouts.observe_scores`: served answers only, each scorer's score of an answer once,
    so what also came live counts once); returns how many messages were read. Scores are evidence kept in memory
    like the served events: without this a restarted replica judged a score metric from zero, and after a
    blue-green promotion never again had the old release's scores (it gets no traffic), so the post-promotion
    analysis waited for ever. The events stream keeps them by limits (`Subjects.streams`: days, far longer than
    `progress.SERVED_REPLAY_MAX_S`), not by interest, so the stream alone holds them all: no read of the record.
    A stream that cannot be read raises its LockgateError (the caller tries again)."""
    batch: list[InferenceScored] = []

    def take(data: bytes) -> bool:
        batch.append(_scored.decode(data))
        if len(batch) >= _STORED_PAGE:  # in pages: thousands of messages need not all be held first
            rollouts.observe_scores(batch)
            batch.clear()
        return True

    read = await _replay(rollouts, "events", reads, take, "online scores", give_up=False)
    if batch:
        rollouts.observe_scores(batch)
    return read


async def _replay_stored(rollouts: Rollouts, seen: Seen, taken: dict[str, bool], stored: set[str],
                         since: float, deployments: list[str]) -> int:
    """The served events of `deployments` the sink stored since `since`, page by page, each batch (message id) taken
    once with `taken` and `seen` and each event once with `stored` (a batch may straddle pages, and a try that failed
    may have taken a part of it); a query that fails raises its LockgateError (the caller tries again). An event too
    large for one NATS message even alone is skipped, and said so: read again on every try, it held the replay, and
    every rollout it covers, for ever."""
    args = {"since": datetime.fromtimestamp(since, UTC).isoformat(), "deployments": deployments,
            "attributes": list(EVIDENCE_ATTRIBUTES)}
    batches = read = skipped = 0
    async for rows in queryclient.pages(rollouts.ctx.bus, "served_events", args, after=_after_served,
                                        page=_STORED_PAGE, alone={"key_only": True}):
        read += len(rows)
        events = []
        for row in rows:
            msg_id = row.pop("msg_id", "")
            first = taken.get(msg_id)
            if first is None:
                first = taken[msg_id] = not msg_id or seen.first(msg_id)
                batches += first
            if first and row.get("id") not in stored:
                if row.get("key_only"):
                    skipped += 1
                    stored.add(row["id"])
                    log.warning("served events replay skipped stored event %s: too large for one NATS message even "
                                "alone", row["id"])
                    continue
                try:
                    events.append(msgspec.convert(row, InferenceEvent, strict=False))
                    stored.add(row["id"])
                except msgspec.ValidationError as exc:
                    log.warning("served events replay skipped stored event %s: %s", row.get("id"), exc)
        rollouts.observe(events)
    log.info("served events replay read %d stored events of %s (%d skipped)", read, ", ".join(deployments), skipped)
    return batches


def _after_served(row: dict[str, Any]) -> dict[str, Any]:
    """The arguments of the `served_events` page after `row`."""
    return {"after_time": row["time"], "after_id": row["id"]}
