"""Shadow traffic bookkeeping: the mirror's budget and the served-versus-shadow comparison. Pure, no I/O.

`Budget` decides, per request and without waiting, whether one more mirrored call fits: a sampled
share, a token bucket of `max_rps` (burst: one second's worth), `max_concurrency` calls in flight,
`max_requests` per rollout and `max_cost_usd` (spent as measured from the shadow events). A request
over any budget is not mirrored, and counted under the reason. The clock is injected.

`Ledger` pairs each shadow event with the served event of the same trace (every replica sees every
event, so every replica pairs the same) and keeps a per-deployment comparison: exact match, length,
latency and error deltas, and the shadow's cost. A pair either of whose calls the client failed
(InferenceEvent.client_failed) is not compared; the shadow call's cost counts all the same.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable

import msgspec

from lockgate.contracts import InferenceEvent
from lockgate.services.router.strategy import ShadowSpec

_PENDING_MAX = 4096  # unpaired events kept per ledger (served events that were not mirrored age out)
_RECENT = 20  # pair comparisons kept to show


class Budget:
    """One rollout's mirror budget on this replica (rate and concurrency are per replica)."""

    def __init__(self, spec: ShadowSpec, clock: Callable[[], float]) -> None:
        self.spec = spec
        self.clock = clock
        self.tokens = spec.max_rps  # a full bucket: one second's worth of burst
        self.last = clock()
        self.in_flight = 0
        self.sent = 0
        self.skipped: Counter[str] = Counter()

    def admit(self, draw: float, spent_usd: float) -> bool:
        """True when one more mirrored call fits (`draw` in [0, 1) samples it); it is then in flight until `done`."""
        spec = self.spec
        why = ""
        if draw >= spec.sample:
            why = "not_sampled"
        elif spec.max_requests is not None and self.sent >= spec.max_requests:
            why = "over_max_requests"
        elif spec.max_cost_usd is not None and spent_usd >= spec.max_cost_usd:
            why = "over_max_cost"
        elif self.in_flight >= spec.max_concurrency:
            why = "over_max_concurrency"
        else:
            now = self.clock()
            self.tokens = min(spec.max_rps, self.tokens + max(0.0, now - self.last) * spec.max_rps)
            self.last = now
            if self.tokens < 1.0:
                why = "over_max_rps"
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


class PairResult(msgspec.Struct, frozen=True, kw_only=True):
    """One served answer against its shadow: the deltas are shadow minus served."""

    trace_id: str
    exact_match: bool
    served_status: str
    shadow_status: str
    length_delta: int  # characters of the answer
    output_tokens_delta: int
    latency_delta_ms: float


class ShadowSummary(msgspec.Struct, frozen=True, kw_only=True):
    """How the candidate's shadow answers compare with what users were served (`GET .../{deployment}/shadow`)."""

    deployment: str
    candidate: str = ""
    shadow_events: int = 0
    pairs: int = 0
    exact_match_rate: float | None = None
    served_error_rate: float | None = None
    shadow_error_rate: float | None = None
    mean_length_delta: float | None = None
    mean_output_tokens_delta: float | None = None
    mean_latency_delta_ms: float | None = None
    shadow_cost_usd: float = 0.0
    mirrored: int = 0  # calls this replica sent
    in_flight: int = 0
    skipped: dict[str, int] = {}  # requests this replica did not mirror, by budget
    recent: list[PairResult] = []


class _Comparison:
    """Running sums of one deployment's pairs."""

    def __init__(self, candidate: str) -> None:
        self.candidate = candidate
        self.shadow_events = self.pairs = self.exact = self.served_errors = self.shadow_errors = 0
        self.length = self.tokens = 0
        self.latency = self.cost = 0.0
        self.recent: list[PairResult] = []
        self.pending: OrderedDict[str, InferenceEvent] = OrderedDict()

    def pair(self, served: InferenceEvent, shadow: InferenceEvent) -> None:
        ok = served.status == "ok" and shadow.status == "ok"
        r = PairResult(trace_id=served.trace_id, exact_match=ok and (served.response or "") == (shadow.response or ""),
                       served_status=served.status, shadow_status=shadow.status,
                       length_delta=len(shadow.response or "") - len(served.response or ""),
                       output_tokens_delta=shadow.output_tokens - served.output_tokens,
                       latency_delta_ms=shadow.latency_ms - served.latency_ms)
        self.pairs += 1
        self.exact += r.exact_match
        self.served_errors += served.status != "ok"
        self.shadow_errors += shadow.status != "ok"
        self.length += r.length_delta
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

    def spent(self, deployment: str) -> float:
        """USD the shadow calls of the deployment's rollout cost so far (from their events)."""
        c = self._by.get(deployment)
        return c.cost if c is not None else 0.0

    def add(self, deployment: str, event: InferenceEvent) -> None:
        """One event of a deployment whose rollout mirrors: a shadow one, or a served one it may pair with."""
        c = self._by.get(deployment)
        if c is None or not event.trace_id:
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
        counts = {"mirrored": budget.sent, "in_flight": budget.in_flight,
                  "skipped": dict(budget.skipped)} if budget is not None else {}
        if c is None:
            return ShadowSummary(deployment=deployment, **counts)  # type: ignore[arg-type]
        n = c.pairs

        def mean(total: float) -> float | None:
            return total / n if n else None

        return ShadowSummary(deployment=deployment, candidate=c.candidate, shadow_events=c.shadow_events, pairs=n,
                             exact_match_rate=mean(c.exact), served_error_rate=mean(c.served_errors),
                             shadow_error_rate=mean(c.shadow_errors), mean_length_delta=mean(c.length),
                             mean_output_tokens_delta=mean(c.tokens), mean_latency_delta_ms=mean(c.latency),
                             shadow_cost_usd=c.cost, recent=list(c.recent), **counts)  # type: ignore[arg-type]
