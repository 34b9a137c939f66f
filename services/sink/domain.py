"""Pure sink logic: which streams project into which tables, which rows are new, insert tokens."""

from __future__ import annotations

import functools
import hashlib
import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import msgspec

from lockgate.contracts import (
    EVENT_TYPES,
    AnalysisRun,
    ArtifactRegistered,
    AuditRecord,
    CostLedger,
    DriftReport,
    EvalCasesRecorded,
    EvalCompleted,
    GateAudited,
    InferenceEvent,
    InferenceScored,
    LineageEdges,
    LineageRun,
    ReleaseRegistered,
    RolloutState,
    SpanBatch,
)
from lockgate.contracts.inference import APPLICATION
from lockgate.ids import uuid7_prefix
from lockgate.redact import RedactMode, redact, scrub_mapping, scrub_secrets
from lockgate.store import tables
from lockgate.store.rows import Table
from lockgate.subjects import Subjects


@dataclass(frozen=True)
class Projection:
    """A table fed by one subject. Every insert first looks its facts' keys up, so a fact repeated in
    any message (a redelivery, or a producer re-sending it under another message id) is stored once.

    `per_row`: each row is a fact of its own (an inference event, a ledger entry), so rows sharing a
    key are duplicates even within one message; otherwise rows sharing a key are one fact's rows.
    `within`: the time column that bounds the lookup to the batch's time range, so a high-volume
    table is never searched whole (a re-sent fact carries the time it was first sent with).
    `keys_table`: a table of every stored row's key, ordered by it (kept by a materialized view), looked up
    instead, with no time bound: for facts a producer may re-send under another time (an app building an
    event again under its id). The key's last column is then an id whose text sorts as it was made (UUIDv7),
    which the stored-keys window orders rows by. With `within` too, the keys table is looked up within the
    batch's time range and the window orders rows by that time: for facts re-sent with their time but keyed by
    ids that do not sort (spans)."""

    table: Table
    subject: Callable[[Subjects], str]
    stream: str
    wire_type: Any
    per_row: bool = False
    within: str | None = None
    keys_table: str | None = None

    @property
    def by_id(self) -> bool:
        """Whether the stored-keys window orders rows by their ids (a keys table with no time bound), else by time."""
        return bool(self.keys_table) and not self.within


FACTS: tuple[Projection, ...] = (
    Projection(tables.ARTIFACTS, lambda s: s.artifact_registered, "events", ArtifactRegistered),
    # From the lineage recorder's fact, not the event: only content matching the name's binding lands.
    Projection(tables.RELEASES, lambda s: s.release_bound, "facts", ReleaseRegistered),
    Projection(tables.LINEAGE_RUNS, lambda s: s.lineage_run, "events", LineageRun),
    Projection(tables.LINEAGE_EDGES, lambda s: s.lineage_edges, "facts", LineageEdges),
    Projection(tables.EVAL_RUNS, lambda s: s.eval_completed, "events", EvalCompleted),
    Projection(tables.EVAL_CASES, lambda s: s.eval_cases, "facts", EvalCasesRecorded),
    Projection(tables.GATE_DECISIONS, lambda s: s.gate_audit, "facts", GateAudited),
    Projection(tables.ROLLOUT_EVENTS, lambda s: s.rollout_all, "events", RolloutState),
    Projection(tables.DRIFT_REPORTS, lambda s: s.drift_all, "events", DriftReport),
    # One row per event id: the bill counts an event once, whichever ledger facts carry it.
    Projection(tables.COST_LEDGER, lambda s: s.cost_ledger, "ledger", CostLedger, per_row=True,
               keys_table="cost_ledger_keys"),
    Projection(tables.AUDIT_LOG, lambda s: s.audit_records, "facts", AuditRecord),
    # One row per (answer, scorer): a score re-sent (a redelivery, the evaluator re-scoring) is stored once.
    Projection(tables.INFERENCE_SCORES, lambda s: s.eval_scores_all, "events", InferenceScored, per_row=True,
               keys_table="inference_scores_keys"),
    # A look every interval per analysed rollout: the lookup of redelivered records stays within their times.
    Projection(tables.ANALYSIS_RUNS, lambda s: s.analysis_runs, "facts", AnalysisRun, within="time"),
)

# One insert of inference events holds up to this many rows, or what came within this age of its first
# message (visibility waits at most that long for a batch to fill).
INSERT_MAX_ROWS = 20_000
INSERT_MAX_AGE_S = 0.1


_source = attrgetter("source")


def names_lockgate(source: str) -> bool:
    """Whether an event's `source` names lockgate as its maker: the envelope's default or a lockgate service."""
    return source == "lockgate" or source.startswith("lockgate-")


def as_stored(events: list[InferenceEvent], *, served: bool) -> list[InferenceEvent]:
    """`events` as stored: one a router did not serve (not on the routers' subject, which only they may publish on)
    that names lockgate as its maker is an application's all the same, stored as `APPLICATION`. Before, an SDK
    event stored `lockgate` (the envelope's default, which SDKs before this one still write), and one naming
    `lockgate-router` read as the router's. Only those events are copied; most batches are returned as they are."""
    if served or not any(map(names_lockgate, set(map(_source, events)))):
        return events
    return [msgspec.structs.replace(e, source=APPLICATION) if names_lockgate(e.source) else e for e in events]


def events_in(value: InferenceEvent | list[InferenceEvent]) -> int:
    """The rows one decoded inference message becomes."""
    return len(value) if isinstance(value, list) else 1


# One row per (sender's tenant, trace, span) however many exports carried it: a re-exported span keeps its start.
SPANS = Projection(tables.OTEL_TRACES, lambda s: s.spans, "telemetry", SpanBatch, per_row=True, within="Timestamp",
                   keys_table="otel_traces_keys")

INFERENCE = Projection(tables.INFERENCE_EVENTS, lambda s: s.inference_all, "inference",
                       list[InferenceEvent] | InferenceEvent, per_row=True, keys_table="inference_event_keys")

# How far ahead of now an id's time may lie and still count in the stored-keys window's horizon: ids any
# producer chooses, and a horizon raised to an id's time makes every row before that time a lookup (one far ahead,
# forgotten, would have made every later row one). An id further ahead is looked up, and counts once now reaches it.
ID_AHEAD_S = 300.0


def id_order(keys: Sequence[tuple[str, ...]]) -> list[str]:
    """Where each row falls in the stored-keys window: its id's first 13 characters, a UUIDv7's milliseconds
    in hex, which sort as its time. Any other id falls where its text sorts: as sound, but spared fewer lookups.
    Characters, not bytes: the store reads the same orders back with `substringUTF8` (Writer._new_window); its
    byte order of UTF-8 text is the code point order Python compares by."""
    return [key[-1][:13] for key in keys]


def id_ceiling(now_s: float) -> str:
    """The latest id order the window vouches for (`ID_AHEAD_S` past `now_s`): a row after it is always looked up."""
    return uuid7_prefix(int((now_s + ID_AHEAD_S) * 1000))


def redaction(mode: RedactMode) -> dict[str, Callable[[Any], Any]]:
    """Column transforms on the way to `inference_events`: prompts and responses hashed or dropped per `mode`.
    Secrets are already scrubbed from every free-text field: the consume edge scrubs each inference event it
    decodes (`bus.consume`), for the sink as for every other consumer, whoever published it."""
    if mode == "scrub":
        return {}
    hide = functools.partial(redact, mode=mode)
    return {"prompt": hide, "response": hide}


# Dead letters are scrubbed where they are made (Bus.dead_letter); this scrubs those made elsewhere.
DEAD_LETTER_SCRUB: dict[str, Callable[[Any], Any]] = {
    "payload": scrub_secrets, "headers": scrub_mapping, "error": scrub_secrets, "reason": scrub_secrets,
}


# Each event type alone or in a batch, its `type` tag optional (as when it is decoded on its own).
_READERS = [msgspec.json.Decoder(t | list[t]) for t in EVENT_TYPES]  # type: ignore[operator,valid-type]


def unreadable(data: bytes) -> bool:
    """True if `data` is no lockgate event at all, of any type, alone or in a list.

    Only such an original is deleted when its dead letter is stored: anyone may publish a dead
    letter, so the letter's word is never enough to delete a message (a gate decision, say) that
    some consumer can read."""
    for reader in _READERS:
        try:
            reader.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError):
            continue
        return False
    return True


def new_rows(keys: Sequence[Any], origins: Sequence[int] | None, stored: set[Any],
             *, per_row: bool = False) -> list[int]:
    """Rows to insert: not stored already, and of the first message in the batch that carries their key
    (a fact republished in another message is dropped whole; one message's rows sharing a key are kept,
    unless `per_row`, where only the first row of a key is, and `origins` is not needed)."""
    owner: dict[Any, int] = {}
    if per_row:
        if not stored and len(set(keys)) == len(keys):  # the usual batch: every row new, no key twice
            return list(range(len(keys)))
        return [i for i, k in enumerate(keys) if k not in stored and owner.setdefault(k, i) == i]
    if origins is None:
        raise ValueError("new_rows: origins are needed unless per_row")
    return [i for i, (k, o) in enumerate(zip(keys, origins, strict=True))
            if k not in stored and owner.setdefault(k, o) == o]


# Orders stored after the ceiling are kept by their first 11 characters (a UUIDv7's 256 ms), so that a producer
# whose clock runs ahead keeps a few thousand of them, not one per event; a prefix followed by the largest
# character sorts after every order that starts with it.
AHEAD_PREFIX = 11
_AFTER_PREFIX = "\U0010ffff"
AHEAD_MAX = 65_536


class StoredWindow:
    """The keys of the rows one writer stored lately, so that most rows need no lookup in the store.

    Sound only where that writer is the table's only one (chDB: one process per data path). Rows are
    ordered by a value a re-sent fact keeps (its time, for facts re-sent with the time they were first sent
    with; else its id's order, `id_order`). Every row ordered after `horizon` was then stored through this
    window: `horizon` starts as the table's latest order when the writer starts (what earlier processes stored
    lies at or before it), and rises past the rows this window forgets (oldest generation first, to bound
    memory). The keys of a failed insert are remembered too (it may have landed all the same). A row after
    `horizon` whose key is not here is therefore new, without asking the store; any other row is looked up.

    With `ceiling()` (an order a producer chooses, its id), an order after it is no part of that bound: one far
    ahead would make every later row a lookup once forgotten. Such a row is looked up, and the orders stored after
    the ceiling are kept (coarsened, `_ahead`: at store time, or at start from the table) until the ceiling passes
    them, when the horizon rises past them: a re-sent row keeps being looked up however late it comes. Past
    `ahead_max` of them, every row from the earliest not kept on (`_floor`) is looked up.

    Keys are kept as their hashes (about 60 bytes each instead of 120): a hash found here means
    "perhaps stored", and the row is looked up, so a collision costs a lookup, never a row."""

    def __init__(self, horizon: Any, capacity: int = 1_000_000, generations: int = 4,
                 ceiling: Callable[[], Any] | None = None, ahead: Iterable[str] = (), ahead_max: int = AHEAD_MAX) -> None:
        self.horizon = horizon
        self.ceiling = ceiling
        self._per_generation = max(1, capacity // generations)
        self._generations = generations
        self._keys: list[set[int]] = [set()]
        self._latest: list[Any] = [horizon]  # the latest order of each generation's rows
        self._ahead: list[str] = []  # a heap of the prefixes (`AHEAD_PREFIX`) of orders stored after the ceiling
        self._ahead_set: set[str] = set()
        self._ahead_max = ahead_max
        self._floor: str | None = None  # the earliest prefix of those not kept in `_ahead`
        self._keep_ahead(ahead)

    def to_look_up(self, keys: Sequence[Any], orders: Sequence[Any]) -> list[int]:
        """Indices of the rows whose keys may be stored already (so must be looked up)."""
        hashes = list(map(hash, keys))
        known: set[int] = set()
        for generation in self._keys:  # set operations at C speed; `known` is empty but for redeliveries
            known |= generation.intersection(hashes)
        ceiling = self._fold()
        horizon, floor = self.horizon, self._floor
        if not known and orders and min(orders) > horizon and (ceiling is None or max(orders) <= ceiling) \
                and (floor is None or max(orders) < floor):
            return []  # the usual batch: all new, found in a few passes in C
        return [i for i, (h, t) in enumerate(zip(hashes, orders, strict=True))
                if t <= horizon or h in known or (ceiling is not None and t > ceiling)
                or (floor is not None and t >= floor)]

    def stored(self, keys: Sequence[Any], orders: Sequence[Any]) -> None:
        """Remember rows an insert stored, or tried to store."""
        if not keys:
            return
        self._keys[-1].update(map(hash, keys))
        latest = max(orders)
        if self.ceiling is not None and latest > (ceiling := self.ceiling()):
            self._keep_ahead(t for t in orders if t > ceiling)
            latest = max((t for t in orders if t <= ceiling), default=self._latest[-1])
        self._latest[-1] = max(self._latest[-1], latest)
        if len(self._keys[-1]) >= self._per_generation:
            self._keys.append(set())
            self._latest.append(self.horizon)
            if len(self._keys) > self._generations:
                self._keys.pop(0)
                self.horizon = max(self.horizon, self._latest.pop(0))

    def _keep_ahead(self, orders: Iterable[str]) -> None:
        for prefix in {t[:AHEAD_PREFIX] for t in orders}:
            if prefix in self._ahead_set:
                continue
            if len(self._ahead) < self._ahead_max:
                heapq.heappush(self._ahead, prefix)
                self._ahead_set.add(prefix)
            elif self._floor is None or prefix < self._floor:
                self._floor = prefix

    def _fold(self) -> Any:
        """The ceiling now, after raising the horizon past the kept orders it has passed."""
        if self.ceiling is None:
            return None
        ceiling = self.ceiling()
        while self._ahead and self._ahead[0] <= ceiling[:AHEAD_PREFIX]:
            # Past every order of this prefix: those of rows stored ahead of the ceiling are at or before it now.
            prefix = heapq.heappop(self._ahead)
            self._ahead_set.discard(prefix)
            self.horizon = max(self.horizon, prefix + _AFTER_PREFIX)
        return ceiling




def select(data: Sequence[Sequence[Any]], rows: Sequence[int]) -> list[list[Any]]:
    """The given rows of column-oriented data."""
    return [[col[i] for i in rows] for col in data]


def key_strings(keys: Sequence[Any]) -> list[str]:
    """The distinct keys (as `Table.keys` gives them) as strings: a one-column key's value as its text, a
    tuple's values joined by NUL. A string key is kept as it is: the hot path of every insert."""
    if keys and isinstance(keys[0], str):
        # Deduplicated in arrival order: ids are time-ordered, so the sort in batch_token finds them nearly
        # sorted (a set's order would make it sort from scratch, a third of the token's time).
        return list(dict.fromkeys(keys))
    if keys and isinstance(keys[0], tuple) and all(isinstance(v, str) for v in keys[0]):
        # (tenant, app, id) of every inference event and ledger entry: joined in C, in arrival order as above.
        return list(dict.fromkeys(map("\x00".join, keys)))
    return list({"\x00".join(map(str, k)) if isinstance(k, tuple) else str(k) for k in keys})

_trace_id = attrgetter("trace_id")


def batch_token(parts: Sequence[str]) -> str:
    """Deduplication token of an insert made of several facts (order-independent)."""
    digest = hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()
    return f"batch-{digest[:40]}"


def linked_traces(events: Sequence[InferenceEvent], parent_trace: str, limit: int = 128) -> list[tuple[str, str]]:
    """(trace_id, span_id) of other traces in a batch, so the sink's span links back to each request."""
    if not any(map(_trace_id, events)):  # events sent outside any trace (the SDK's, mostly): one pass in C
        return []
    seen: set[str] = {parent_trace}
    out = []
    for e in events:
        if e.trace_id and e.span_id and e.trace_id not in seen:
            seen.add(e.trace_id)
            out.append((e.trace_id, e.span_id))
            if len(out) >= limit:
                break
    return out
