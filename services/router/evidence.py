"""Live evidence for canary analysis: recent inference events per deployment and release. Pure, no I/O.

Every replica keeps its own copy, fed from the events of requests the routers served (the subject
only routers may publish to: an application's events are stored, priced and watched for drift, but
never steer a rollout), so replicas see the same evidence and reach the same verdicts; the routes KV's
compare-and-set decides which replica's verdict is written. Rows live in columnar ring buffers, so
summarising a window is a few vectorised masks, not a Python loop on the router's event loop. Each row
keeps the API key that sent its request (an index into the keys seen), so a window splits by caller, and the unit
its request was split to an arm by (`unit`), so analysis counts a user's alike requests as one user's.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import replace
from typing import Generic, NamedTuple, TypeVar

import numpy as np

from lockgate.contracts import DriftReport, InferenceEvent
from lockgate.contracts.drift import Comparison
from lockgate.contracts.inference import (
    CLIENT_DISCONNECTED,
    KEPT_WAITING,
    SHADOW_SKIPPED,
    UPSTREAM_UNANSWERED,
)
from lockgate.services.router.analysis import ROWS, VariantSample, from_rows

MAX_ROWS = 50_000  # per deployment and release: enough for p99 on any step, bounded memory; full, see `_Ring`
_FIRST = 1024  # buffers start small and double up to MAX_ROWS
_COLS = len(ROWS) + 1  # and the API key's index
_REFUSED = ROWS.index("refused")
_HUNG_UP = ROWS.index("hung_up")
# The error types of a call a timeout gave up on (the router's upstream.py and proxy.py): no first byte within
# `first_byte_s` (a hop's own event, and the request's when no hop answered), no connection within `connect_s`, a
# client gone after `router_unanswered_s` of the upstream's silence, a stream that stalled or outran `total_s`.
# Analysis counts them in latency and TTFT at their time to failure (`analysis.from_rows`).
TIMED_OUT = frozenset({"first_byte", "connect_timeout", "upstream_timeout", UPSTREAM_UNANSWERED,
                       "stream_interrupted:ChunkTimeout", "stream_interrupted:TotalTimeout"})


def refused_4xx(event: InferenceEvent) -> bool:
    """The event's upstream refused its request with a 4xx taken for the client's fault (client_failed, but not a
    hang-up): left out of analysis but for client_error_rate (a hang-up: but for hang_up_rate)."""
    return event.client_failed and event.error_type[:1] == "4"


def unit(event: InferenceEvent) -> float:
    """The sampling unit of the event's request (`analysis.ROWS`' `unit`): what the proxy split it to an arm by
    (`InferenceEvent.arm_key`), as a float that holds it exactly (52 bits of a hash: two of a deployment's users
    share one with a negligible chance); -1.0 for a request that names none, which drew its own arm and is a unit of
    its own. A user's requests are alike (prompt lengths, habits) and all on one arm: counted as independent draws, a
    few heavy users on the canary aborted an identical release (probe p75 F1)."""
    key = event.arm_key
    if not key:
        return -1.0
    return float(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 12)


class Unanswered(NamedTuple):
    """A call of a release in flight on this replica whose upstream has been silent for `router_unanswered_s` or
    longer (`Rollouts.unanswered`): when it began (unix seconds), for how long it has been silent, and the API key
    that sent its request."""

    at: float
    silent_s: float
    key_id: str


Call = TypeVar("Call", bound=Hashable)


class InFlight(Generic[Call]):
    """This replica's requests whose upstream calls are under way, per deployment: each one's call (the proxy's
    `Underway`, which `Upstream.send` keeps up to date with the hop in flight and when it began) and the API key
    that sent it. A request is added as it is sent and removed as it ends: two dict operations on the hot path, and
    no object beyond the request's own. A look reads them (`Rollouts.unanswered`): a call that never answers has no
    event until a timeout or its client's hang-up ends it, so evidence made of events alone lacks exactly the
    calls of a release that hangs (probe p26)."""

    def __init__(self) -> None:
        self._calls: dict[str, dict[Call, str]] = {}  # deployment -> call -> its key id (few deployments)

    def begin(self, deployment: str, call: Call, key_id: str) -> None:
        """A request of `deployment` sends its calls, followed by `call`."""
        calls = self._calls.get(deployment)
        if calls is None:
            calls = self._calls[deployment] = {}
        calls[call] = key_id

    def end(self, deployment: str, call: Call) -> None:
        """The request of `call` ended (answered, failed or its client gone)."""
        calls = self._calls.get(deployment)
        if calls is not None:
            calls.pop(call, None)

    def calls(self, deployment: str) -> list[tuple[Call, str]]:
        """The requests of `deployment` under way, each call with its key id (a copy)."""
        return list(self._calls.get(deployment, {}).items())


class _Ring:
    """One release's rows: time, failed, latency, ttft (0 = not streamed), tokens, cost (-1 = unpriced), refused (1 =
    its upstream refused it with a 4xx taken for the client's fault), timed out (1 = `TIMED_OUT`), hung up (1 = its
    client hung up while the upstream was answering), its unit (`unit`), and the index of the request's API key
    (`Evidence._keys`), in no particular order (every reader masks by time).

    Full, a new row takes the slot of the oldest row of the API key holding the most rows (its own when it holds as
    many), so a key within its fair share (the limit over the keys holding rows) loses none to another's flood.
    Overwriting the oldest row whoever sent it, one key's good requests (or 400s its upstream refused, which bill
    nothing) between the real callers' failures and the next look left the look its rows alone, and a failing
    canary was promoted (probe p46 F1)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cap = min(_FIRST, limit)
        self.n = 0
        self.cols = np.zeros((_COLS, self.cap), dtype=np.float64)
        self.keys = _Holders()

    def add(self, row: tuple[float, ...]) -> None:
        key = int(row[-1])
        if self.n < self.limit:
            if self.n == self.cap:  # full, not yet at the limit: grow
                self.cap = min(2 * self.cap, self.limit)
                grown = np.zeros((_COLS, self.cap), dtype=np.float64)
                grown[:, :self.n] = self.cols
                self.cols = grown
            slot = self.n
            self.n += 1
            self.keys.push(key, slot)
        else:
            slot = self.keys.evict_for(key)
        self.cols[:, slot] = row


class _Holders:
    """Which slots of a ring each API key index holds, oldest first, and how many: a list per key linked through
    `_next` (an array of slots, no object per row), and the keys by the count they hold, so the key holding the most
    is found in O(1) however many keys there are (an admin may make many)."""

    def __init__(self) -> None:
        self._next = array("l")  # slot -> the slot of the same key's next newer row
        self._head: dict[int, int] = {}  # key -> its oldest slot
        self._tail: dict[int, int] = {}  # key -> its newest slot
        self._held: dict[int, int] = {}  # key -> how many slots it holds
        self._at: dict[int, set[int]] = {}  # count -> the keys holding that many
        self._most = 0

    def push(self, key: int, slot: int) -> None:
        """`key`'s newest row is in `slot` (a new one, or one `evict_for` freed)."""
        if slot == len(self._next):
            self._next.append(-1)
        tail = self._tail.get(key)
        if tail is None:
            self._head[key] = slot
        else:
            self._next[tail] = slot
        self._tail[key] = slot
        self._count(key, 1)

    def evict_for(self, key: int) -> int:
        """The slot for `key`'s new row in a full ring: its own oldest when it holds the most rows (counts stay),
        else the oldest of a key that does."""
        held = self._held.get(key, 0)
        victim = key if held == self._most else next(iter(self._at[self._most]))
        slot = self._head[victim]
        if victim == key and self._tail[key] == slot:  # its only row: replaced in place
            return slot
        if self._tail[victim] == slot:
            del self._head[victim], self._tail[victim]
        else:
            self._head[victim] = self._next[slot]
        if victim == key:  # its oldest slot becomes its newest, counts unchanged
            self._next[self._tail[key]] = slot
            self._tail[key] = slot
            return slot
        self._count(victim, -1)
        self.push(key, slot)
        return slot

    def _count(self, key: int, by: int) -> None:
        """`key` holds `by` (1 or -1) more slots."""
        held = self._held.get(key, 0)
        if held:
            keys = self._at[held]
            keys.discard(key)
            if not keys:
                del self._at[held]
                if self._most == held and by < 0:
                    self._most = held - 1
        held += by
        if held:
            self._held[key] = held
            self._at.setdefault(held, set()).add(key)
            self._most = max(self._most, held)
        else:
            del self._held[key]


class Evidence:
    """Recent rows per (deployment, release); `sample` summarises a window for `analysis.measure`."""

    def __init__(self, price: Callable[[InferenceEvent], float | None], max_rows: int | None = None) -> None:
        self._price = price
        self._max = MAX_ROWS if max_rows is None else max_rows
        self._rings: dict[tuple[str, str], _Ring] = {}
        # Requests an open breaker diverted from a canary (`divert`), per deployment and canary release, held until
        # they count as its failures: from its first failed call of its own on (`charge`), which a replica that
        # reads its events back out of time order may come to after them.
        self._diverted: dict[tuple[str, str], _Ring] = {}
        # Per (deployment, release), the API keys (their indexes) whose requests it served the shadow left uncopied
        # for a reason other than its sample (SHADOW_SKIPPED), each with the latest such request's time (`uncopied`).
        self._uncopied: dict[tuple[str, str], dict[int, float]] = {}
        # Online evaluation scores per (deployment, release) and scorer: the scored answer's event id -> (time,
        # value), oldest first. By event id, so an answer's score counts once however often it arrives (live and
        # read back at start, or re-sent after the bus's duplicate window).
        self._scores: dict[tuple[str, str], dict[str, dict[str, tuple[float, float]]]] = {}
        # The latest drift report per deployment and canary release ("" for now-versus-reference ones).
        self._drift: dict[tuple[str, str], DriftReport] = {}
        # API key ids interned: a row holds its key's index (few keys, many rows). Never shrinks: keys are few.
        self._keys: list[str] = []
        self._key_index: dict[str, int] = {}

    def add(self, event: InferenceEvent, release: str | None = None) -> None:
        """Record one event under its release (or `release`, for events that name only a variant); one the
        client failed (`InferenceEvent.client_failed`) counts nowhere: not as a request, an error, a latency
        or a cost; but one its upstream refused with a 4xx counts in client_error_rate (`VariantSample.refused`),
        and one its client hung up on after the upstream kept it waiting (`KEPT_WAITING`: silent for router_hang_up_s
        or longer, the answer not yet whole) in hang_up_rate (`VariantSample.hung_up`), whose shares of each arm's requests analysis compares: a canary that refuses the requests stable answers,
        or keeps its clients waiting until they give up, is at fault, whoever is blamed for one of them. Left out,
        a canary that never answered 30% of its calls, its clients giving up after 5 s (before
        `router_unanswered_s`), was judged on its answers and promoted (probe p63 A). A hang-up while the answer flowed
        is the client's choice and counts nowhere: an app key closing the streams whose first chunk named the canary's
        model could abort any healthy canary (probe p71 F2)."""
        key = (event.deployment or event.app, event.release if release is None else release)
        refused = refused_4xx(event)
        hung_up = event.client_failed and event.error_type == CLIENT_DISCONNECTED and KEPT_WAITING in event.attributes
        if event.client_failed and not (refused or hung_up):  # no call was made (router_busy), or the client's choice
            return
        _ring(self._rings, key, self._max).add(self._row(event, refused, hung_up))
        if hung_up:
            return
        if SHADOW_SKIPPED in event.attributes:
            seen, index = self._uncopied.setdefault(key, {}), self._key(event.key_id)
            seen[index] = max(seen.get(index, 0.0), event.time.timestamp())  # read back at a start: any order
        if refused:
            return
        if event.scores:  # scores an SDK attached to its own events
            self.add_scores(key[0], key[1], event.id, event.time.timestamp(), event.scores)

    def divert(self, event: InferenceEvent, release: str, counted_from: float | None) -> None:
        """Record a request of `release`'s arm that an open breaker diverted (`event`: stable's answer, as a failure
        of `release`'s): one of its requests from `counted_from` (unix seconds) on, else held (`charge` counts it
        later; None: not yet). Its row only: the scores of stable's answer are no evidence of `release`."""
        key = (event.deployment or event.app, release)
        held = counted_from is None or event.time.timestamp() < counted_from
        _ring(self._diverted if held else self._rings, key, self._max).add(self._row(event, called=False))

    def charge(self, deployment: str, release: str, since: float) -> None:
        """Count the diversions held for `release` (`divert`) from `since` (unix seconds) on as its requests."""
        held = self._diverted.get((deployment, release))
        if held is None:
            return
        rows = held.cols[:, :held.n]
        due = rows[0] >= since
        if not due.any():
            return
        ring = _ring(self._rings, (deployment, release), self._max)
        for row in rows[:, due].T:
            ring.add(tuple(row))
        del self._diverted[(deployment, release)]
        for row in rows[:, ~due].T:  # from before `since`: held still
            _ring(self._diverted, (deployment, release), self._max).add(tuple(row))

    def _row(self, event: InferenceEvent, refused: bool = False, hung_up: bool = False,
             called: bool = True) -> tuple[float, ...]:
        """The event's row (`_Ring`). Tokens and cost are what the call is billed for (`InferenceEvent.billed_tokens`,
        `Evidence`'s price): a call whose upstream reported no usage at the worst case the router charged for it.
        By its reported usage, such a call read as 0 tokens and $0, and a canary whose upstream reported none while
        the ledger billed each call 4,096 output tokens passed tokens_per_request and cost_per_request against
        stable's 41 tokens (probe p63 B). A failed call's are added to its arm's answers' (`analysis._answers`).
        Not `called` (a request an open breaker diverted, `event` stable's answer): the arm made no call, billed
        nothing; stable's answer is priced on stable's own row."""
        cost = None if refused or hung_up else self._price(event) if called else 0.0
        index = self._key(event.key_id)
        tokens_in, tokens_out, _ = event.billed_tokens if called else (0, 0, 0)  # cached input is a part of the input
        return (event.time.timestamp(), float(event.status != "ok"), event.latency_ms, event.ttft_ms,
                float(tokens_in + tokens_out), -1.0 if cost is None else cost, float(refused),
                float(event.status != "ok" and event.error_type in TIMED_OUT), float(hung_up), unit(event),
                float(index))

    def _unanswered_row(self, call: Unanswered, since: float) -> tuple[float, ...]:
        """A call in flight as the row of its event had its client hung up now (`upstream_unanswered`)."""
        return (max(call.at, since), 1.0, call.silent_s * 1000.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0, -1.0,
                float(self._key(call.key_id)))

    def _key(self, key_id: str) -> int:
        """The index of `key_id` in the keys seen (interned on first sight)."""
        index = self._key_index.get(key_id)
        if index is None:
            index = self._key_index[key_id] = len(self._keys)
            self._keys.append(key_id)
        return index

    def add_scores(self, deployment: str, release: str, event_id: str, at: float,
                   scores: Mapping[str, float]) -> None:
        """Record online evaluation scores of one answer (`event_id`, answered at unix seconds `at`); a scorer's
        score of an answer already recorded is not counted again (the first one stands, as the sink keeps it)."""
        per = self._scores.setdefault((deployment, release), {})
        for name, value in scores.items():
            ring = per.get(name)
            if ring is None:
                ring = per[name] = {}
            if event_id in ring:
                continue
            ring[event_id] = (at, float(value))
            if len(ring) > self._max:
                del ring[next(iter(ring))]  # the oldest recorded

    def add_drift(self, report: DriftReport) -> None:
        """Keep a drift report if it is the newest of its deployment and comparison (and canary release), and
        of answers the routers served: one of an application's own events is no evidence of what a release did
        (nor is a canary-versus-stable one naming no release: it is about no canary in particular)."""
        if not report.served or (report.comparison == "canary_vs_stable" and not report.release):
            return
        key = (report.deployment, report.release if report.comparison == "canary_vs_stable" else "")
        held = self._drift.get(key)
        if held is None or report.window_end >= held.window_end:
            self._drift[key] = report

    def drift(self, deployment: str, release: str, since: float,
              comparison: Comparison = "canary_vs_stable", whole: bool = False) -> DriftReport | None:
        """The newest drift report of `comparison` whose window ends at `since` (unix seconds) or later (`whole`:
        begins): canary_vs_stable, the one of `release`; now_vs_reference, the deployment's, whatever `release` (it
        covers the whole deployment's traffic). Never one kind in place of the other: which kind is evidence about
        a release is the caller's to say (`progress.drift_evidence`)."""
        report = self._drift.get((deployment, release if comparison == "canary_vs_stable" else ""))
        edge = report.window_start if whole and report is not None else report.window_end if report else None
        return report if edge is not None and edge.timestamp() >= since else None

    def forget(self, deployment: str, keep: set[str]) -> None:
        """Drop a deployment's rows except for the releases in `keep` (and its now-versus-reference drift,
        which may predate the rollout)."""
        for key in [k for k in self._drift if k[0] == deployment and k[1] not in keep]:
            del self._drift[key]
        for rings in (self._rings, self._diverted):
            for key in [k for k in rings if k[0] == deployment and k[1] not in keep]:
                del rings[key]
        for key in [k for k in self._scores if k[0] == deployment and k[1] not in keep]:
            del self._scores[key]
        for key in [k for k in self._uncopied if k[0] == deployment and k[1] not in keep]:
            del self._uncopied[key]

    def uncopied(self, deployment: str, release: str, since: float) -> list[str]:
        """The API keys with a request `release` served for `deployment` from `since` (unix seconds) on that the
        shadow left uncopied for a reason other than its sample (SHADOW_SKIPPED)."""
        seen = self._uncopied.get((deployment, release), {})
        return [self._keys[i] for i, at in seen.items() if at >= since]

    def count(self, deployment: str, release: str, since: float) -> int:
        """How many requests `release` served for `deployment` from `since` (unix seconds) on (in analysis: not
        those refused or hung up on, `VariantSample.n`)."""
        ring = self._rings.get((deployment, release))
        if ring is None:
            return 0
        cols = ring.cols[:, :ring.n]
        return int(((cols[0] >= since) & (cols[_REFUSED] == 0) & (cols[_HUNG_UP] == 0)).sum())

    def sample(self, deployment: str, release: str, since: float,
               unanswered: Sequence[Unanswered] = ()) -> VariantSample:
        """What `release` served for `deployment` from `since` (unix seconds) on, also split by the API key that sent
        each request (copies: safe to hand to another thread while events keep arriving). `unanswered`: its calls in
        flight past `router_unanswered_s`, each counted as a call a timeout gave up on now (failed, at its silence
        in latency and TTFT) as its client's hang-up would be, at when it began (`since` if before)."""
        ring = self._rings.get((deployment, release))
        # Each score with its answer's time: analysis compares scores like with like in time (probe p22 F2).
        timed = {name: [(t, v) for t, v in ring_.values() if t >= since]
                 for name, ring_ in self._scores.get((deployment, release), {}).items()}
        scores = {name: [v for _, v in tv] for name, tv in timed.items()}
        score_times = {name: [t for t, _ in tv] for name, tv in timed.items()}
        cols = ring.cols[:, :ring.n] if ring is not None else np.zeros((_COLS, 0))
        if unanswered:
            cols = np.concatenate([cols, np.array([self._unanswered_row(u, since) for u in unanswered]).T], axis=1)
        if not cols.shape[1]:
            return VariantSample(scores=scores, score_times=score_times)
        key = cols[_COLS - 1]
        window = cols[0] >= since

        def of(rows: np.ndarray) -> VariantSample:  # with each request's time: analysis compares like with like
            return from_rows(cols[:_COLS - 1, rows])

        whole = of(window)
        keys = np.unique(key[window])
        # Split on every arm, one key too: analysis compares each caller's canary requests with its own stable ones.
        by_key = {self._keys[int(k)]: of(window & (key == k)) for k in keys} if len(keys) > 1 else \
            {self._keys[int(k)]: whole for k in keys}
        return replace(whole, scores=scores, score_times=score_times, by_key=by_key)


def _ring(rings: dict[tuple[str, str], _Ring], key: tuple[str, str], limit: int) -> _Ring:
    """The ring of `key` in `rings`, made when it has none yet."""
    ring = rings.get(key)
    if ring is None:
        ring = rings[key] = _Ring(limit)
    return ring
