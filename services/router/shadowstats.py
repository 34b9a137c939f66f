"""Shadow traffic bookkeeping: the mirror's budget and the served-versus-shadow comparison. Pure, no I/O.

`Budget` decides, per request and without waiting, whether one more mirrored call fits: a sampled
share, a token bucket of `max_rps` (burst: one second's worth), `max_concurrency` calls in flight and
`max_requests` per rollout (on this replica). A request over any of them is not mirrored, and counted
under the reason. The clock is injected.

`max_cost_usd` is the rollout's, over every replica and restart: its spend is a `Spend` in NATS KV (the
budget bucket, key `spend_key`), into which each copy reserves its worst case before it is made (`reserve`)
and settles its real cost after (`settle`), by compare-and-set (shadow.py). Kept in a replica's memory, it
started from 0 on every replica that (re)started mid-rollout: each one spent another `max_cost_usd`.

`Ledger` pairs each shadow event with the served event of the same trace (every replica sees every
event, so every replica pairs the same) and keeps a per-deployment comparison: exact match, length,
latency and error deltas, and the shadow's cost. A pair either of whose calls the client failed
(InferenceEvent.client_failed) is not compared; the shadow call's cost counts all the same. Events read back
from the record at a start (handlers.replay_served) carry no answer: their pairs compare all but the texts.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable

import msgspec

from lockgate.contracts import InferenceEvent
from lockgate.services.router.strategy import ShadowSpec
from lockgate.subjects import token

NANO = 1_000_000_000  # nano-USD per USD: the stored spend is an integer, so replicas' changes add up exactly

# Why a copy is not made that every API key's copies share: the budgets (`Budget.admit`, and `max_cost_usd` in
# shadow.py), and the spend store all of them reserve in by compare-and-set (`cost_store_unavailable`: away, or too
# contended to answer). A request left uncopied so may be left so by another key's copies, and its served event says
# so (SHADOW_SKIPPED).
SHARED = frozenset({"over_max_requests", "over_max_rps", "over_max_concurrency", "over_max_cost",
                    "cost_store_unavailable"})

_PENDING_MAX = 4096  # unpaired events kept per ledger (served events that were not mirrored age out)
_RECENT = 20  # pair comparisons kept to show


class Budget:
    """One rollout's mirror budget on this replica (rate and concurrency are per replica)."""

    def __init__(self, spec: ShadowSpec, clock: Callable[[], float], key: str = "") -> None:
        self.spec = spec
        self.clock = clock
        self.key = key  # the rollout's Spend in the KV (`spend_key`)
        self.tokens = spec.max_rps  # a full bucket: one second's worth of burst
        self.last = clock()
        self.in_flight = 0
        self.sent = 0
        self.skipped: Counter[str] = Counter()
        self.why = ""  # why `admit` last refused a copy ("": it admitted one)
        self.spent_usd: float | None = None  # the rollout's Spend as the store last answered this replica

    def admit(self, draw: float) -> bool:
        """True when one more mirrored call fits (`draw` in [0, 1) samples it); it is then in flight until `done`,
        or until `refused` when its cost cannot be reserved."""
        spec = self.spec
        why = ""
        if draw >= spec.sample:
            why = "not_sampled"
        elif spec.max_requests is not None and self.sent >= spec.max_requests:
            why = "over_max_requests"
        elif self.in_flight >= spec.max_concurrency:
            why = "over_max_concurrency"
        else:
            now = self.clock()
            self.tokens = min(spec.max_rps, self.tokens + max(0.0, now - self.last) * spec.max_rps)
            self.last = now
            if self.tokens < 1.0:
                why = "over_max_rps"
        self.why = why
        if why:
            self.skipped[why] += 1
            return False
        self.tokens -= 1.0
        self.in_flight += 1
        self.sent += 1
        return True

    def done(self) -> None:
        """A mirrored call finished (answered, failed or timed out)."""
        self.in_flight -= 1

    def refused(self, why: str) -> None:
        """An admitted call was not made after all (its cost did not fit `max_cost_usd`, or could not be
        reserved): it is counted under `why`, and takes no slot, request or rate token."""
        self.in_flight -= 1
        self.sent -= 1
        self.tokens = min(self.spec.max_rps, self.tokens + 1.0)
        self.skipped[why] += 1


class Spend(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One rollout's shadow spend, as the KV holds it for every replica. Unknown fields are refused, as a budget
    counter's (budgets.Counter): a stray JetStream acknowledgement stored under the key is no spend at 0."""

    spent: int = 0  # nano-USD: settled copies plus the reservations of copies in flight


def spend_key(deployment: str, candidate: str, started_at: float) -> str:
    """The KV key of a rollout's Spend: its deployment, candidate and start (a new rollout starts at 0). `_shadow.`
    cannot be a gateway budget's key (their names start with a letter or digit), nor the judges' `_judge.`."""
    return f"_shadow.{token(deployment)}.{token(candidate)}.{round(started_at * 1e6)}"


def reserve(state: Spend | None, need: int, cap_usd: float) -> Spend | None:
    """The spend with a copy's worst case (`need`, nano-USD) reserved, or None when it does not fit the cap."""
    spent = (state or Spend()).spent
    return Spend(spent=spent + need) if spent + need <= round(cap_usd * NANO) else None


def settle(state: Spend | None, reserved: int, used: int) -> Spend:
    """The spend with a copy's reservation replaced by what it cost."""
    return Spend(spent=max(0, (state or Spend()).spent - reserved + used))


class PairResult(msgspec.Struct, frozen=True, kw_only=True):
    """One served answer against its shadow: the deltas are shadow minus served."""

    trace_id: str
    exact_match: bool | None  # None: an answer is not known (read back from the record, which keeps none)
    served_status: str
    shadow_status: str
    length_delta: int | None  # characters of the answer (None as exact_match)
    output_tokens_delta: int
    latency_delta_ms: float


class ShadowSummary(msgspec.Struct, frozen=True, kw_only=True):
    """How the candidate's shadow answers compare with what users were served (`GET .../{deployment}/shadow`)."""

    deployment: str
    candidate: str = ""
    shadow_events: int = 0
    pairs: int = 0
    text_pairs: int = 0  # pairs whose answers are both known: what exact match and length compare
    exact_match_rate: float | None = None
    served_error_rate: float | None = None
    shadow_error_rate: float | None = None
    mean_length_delta: float | None = None
    mean_output_tokens_delta: float | None = None
    mean_latency_delta_ms: float | None = None
    shadow_cost_usd: float = 0.0
    # The rollout's spend against `max_cost_usd` (every replica's copies, settled or in flight) as the store last
    # answered this replica; None without a cap, or before this replica reserved for a copy.
    spent_usd: float | None = None
    mirrored: int = 0  # calls this replica sent
    in_flight: int = 0
    skipped: dict[str, int] = {}  # requests this replica did not mirror, by budget
    recent: list[PairResult] = []


class _Comparison:
    """Running sums of one deployment's pairs."""

    def __init__(self, candidate: str) -> None:
        self.candidate = candidate
        self.shadow_events = self.pairs = self.texts = self.exact = self.served_errors = self.shadow_errors = 0
        self.length = self.tokens = 0
        self.latency = self.cost = 0.0
        self.recent: list[PairResult] = []
        self.pending: OrderedDict[str, InferenceEvent] = OrderedDict()

    def pair(self, served: InferenceEvent, shadow: InferenceEvent) -> None:
        ok = served.status == "ok" and shadow.status == "ok"
        # A live ok event always carries its answer; one read back from the record carries none (None).
        texts = all(e.status != "ok" or e.response is not None for e in (served, shadow))
        r = PairResult(trace_id=served.trace_id,
                       exact_match=(ok and served.response == shadow.response) if texts else None,
                       served_status=served.status, shadow_status=shadow.status,
                       length_delta=len(shadow.response or "") - len(served.response or "") if texts else None,
                       output_tokens_delta=shadow.output_tokens - served.output_tokens,
                       latency_delta_ms=shadow.latency_ms - served.latency_ms)
        self.pairs += 1
        if texts:
            self.texts += 1
            self.exact += bool(r.exact_match)
            self.length += r.length_delta or 0
        self.served_errors += served.status != "ok"
        self.shadow_errors += shadow.status != "ok"
        self.tokens += r.output_tokens_delta
        self.latency += r.latency_delta_ms
        self.recent = [*self.recent[-(_RECENT - 1):], r]


class Ledger:
    """Shadow comparisons per deployment, fed every inference event of deployments with a live shadow."""

    def __init__(self, price: Callable[[InferenceEvent], float | None]) -> None:
        self._price = price
        self._by: dict[str, _Comparison] = {}

    def start(self, deployment: str, candidate: str) -> None:
        """A new rollout: its comparison starts from nothing."""
        self._by[deployment] = _Comparison(candidate)

    def add(self, deployment: str, event: InferenceEvent) -> None:
        """One event of a deployment whose rollout mirrors: a shadow one, or a served one it may pair with."""
        c = self._by.get(deployment)
        # A failed call a retry or fallback went past shares its request's trace: it is no answer to compare, and
        # pending in the answer's place (`two of a kind`) it took the shadow's pair (probe p78).
        if c is None or not event.trace_id or event.superseded:
            return
        if event.variant == "shadow":
            if event.release != c.candidate:
                return
            c.shadow_events += 1
            c.cost += self._price(event) or 0.0
        other = c.pending.pop(event.trace_id, None)
        if other is None:
            c.pending[event.trace_id] = event
            if len(c.pending) > _PENDING_MAX:
                c.pending.popitem(last=False)
            return
        if (other.variant == "shadow") == (event.variant == "shadow"):
            c.pending[event.trace_id] = event  # two of a kind (a redelivery): keep the newer, pair later
            return
        served, shadow = (other, event) if event.variant == "shadow" else (event, other)
        # As in canary analysis: a pair the client failed (hung up, body refused) compares no releases.
        if not (served.client_failed or shadow.client_failed):
            c.pair(served, shadow)

    def summary(self, deployment: str, budget: Budget | None = None) -> ShadowSummary:
        """The comparison so far, with this replica's budget counts."""
        c = self._by.get(deployment)
        counts = {"mirrored": budget.sent, "in_flight": budget.in_flight, "skipped": dict(budget.skipped),
                  "spent_usd": budget.spent_usd} if budget is not None else {}
        if c is None:
            return ShadowSummary(deployment=deployment, **counts)  # type: ignore[arg-type]
        n = c.pairs

        def mean(total: float, of: int = n) -> float | None:
            return total / of if of else None

        return ShadowSummary(deployment=deployment, candidate=c.candidate, shadow_events=c.shadow_events, pairs=n,
                             text_pairs=c.texts, exact_match_rate=mean(c.exact, c.texts),
                             served_error_rate=mean(c.served_errors), shadow_error_rate=mean(c.shadow_errors),
                             mean_length_delta=mean(c.length, c.texts),
                             mean_output_tokens_delta=mean(c.tokens), mean_latency_delta_ms=mean(c.latency),
                             shadow_cost_usd=c.cost, recent=list(c.recent), **counts)  # type: ignore[arg-type]
