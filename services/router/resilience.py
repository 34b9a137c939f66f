"""How the router treats a failing upstream, as pure rules: timeouts, retry schedule and retry budget,
circuit breaker, fallback chain. upstream.py applies them to real calls.

No I/O and no clock of its own: callers pass `now` (the event loop's monotonic time), so every rule is
tested without sockets or sleeps. The backoff is lockgate.retry's (one retry policy in the house);
what is added here is when a retry is allowed at all.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import msgspec

from lockgate.endpoints import by_price
from lockgate.retry import RetryPolicy

Pos = Annotated[float, msgspec.Meta(gt=0)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]


class Timeouts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bounds on one call to an endpoint, in seconds.

    `first_byte_s` bounds the wait for the answer's headers and, for a stream, its first event; a
    non-streamed answer arrives whole when generation ends, so it bounds that too. `total_s` bounds
    the whole request, retries and fallbacks included. The defaults end a hung upstream's hold well
    before a client's own 600 s while leaving room for long non-streamed generations; set them lower
    for fast models.
    """

    connect_s: Pos = 3.0
    first_byte_s: Pos = 60.0
    between_chunks_s: Pos = 30.0
    total_s: Pos = 600.0


class RetrySpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Retries against one endpoint (429, 5xx, connection errors), before any fallback.

    The budget caps retries at `budget_ratio` of the endpoint's requests over `budget_window_s`
    (plus `budget_min` per window so a quiet endpoint can still retry): a failing upstream gets at
    most that much extra load, not `attempts` times its traffic.
    """

    attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3  # tries in all; 1 = never retry
    initial_s: NonNeg = 0.1
    max_s: NonNeg = 2.0
    max_retry_after_s: NonNeg = 5.0  # a longer Retry-After goes to the fallback or the client, not waited out
    budget_ratio: Ratio = 0.2
    budget_min: Annotated[int, msgspec.Meta(ge=0)] = 10
    budget_window_s: Pos = 10.0

    def policy(self) -> RetryPolicy:
        """The house backoff with this endpoint's numbers."""
        return RetryPolicy(attempts=self.attempts, initial_s=self.initial_s, max_s=self.max_s)


class BreakerSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When an endpoint's breaker opens, and for how long it skips the endpoint."""

    consecutive_failures: Annotated[int, msgspec.Meta(ge=1)] = 5
    failure_ratio: Ratio = 0.5  # over the window, once it holds at least `min_requests` calls
    min_requests: Annotated[int, msgspec.Meta(ge=1)] = 20
    window_s: Pos = 30.0
    cooldown_s: NonNeg = 10.0


def retryable_status(status: int) -> bool:
    """429 and 5xx are worth another try (elsewhere or later); other 4xx are the caller's mistake."""
    return status == 429 or status >= 500


def told_not_to_retry(headers: Mapping[str, str] | None) -> bool:
    """Whether an upstream's answer says the same call would fail again (`x-should-retry: false`, any case), which
    overrides its status: the router then makes it no more on that endpoint."""
    return any(name.lower() == "x-should-retry" and value.strip().lower() == "false"
               for name, value in (headers or {}).items())


# Statuses of a gateway in front of the provider that gave up waiting (nginx's proxy_read_timeout 504, Cloudflare's
# 524) or of a server that timed the request out (408): the request reached the model, which may have generated the
# whole answer, and the provider bills it. Every other status says nothing was generated (a refusal, an overload).
MAY_HAVE_GENERATED = frozenset({408, 504, 524})


def may_have_generated(status: int) -> bool:
    """An HTTP error status after which the provider may still bill a whole answer (MAY_HAVE_GENERATED)."""
    return status in MAY_HAVE_GENERATED


def breaker_failure(status: int) -> bool:
    """Server errors count against an endpoint's health; a 429 is throttling, not sickness."""
    return status >= 500


def retry_after_s(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """Seconds the upstream asked to wait (`retry-after-ms`, or `Retry-After` as seconds or an HTTP date), the
    names in any case: HTTP's are case-insensitive, and the headers are as the upstream wrote them (Anthropic and
    many OpenAI-compatible servers send `retry-after`, which was not seen, and a 40 s wait was retried at once)."""
    named = {name.lower(): value for name, value in headers.items() if name[0] in "rR"}
    ms = _seconds(named.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000.0
    value = named.get("retry-after")
    if not value:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    parsed = email.utils.parsedate_tz(value)  # the HTTP-date form; None when malformed
    return None if parsed is None else max(0.0, email.utils.mktime_tz(parsed) - now_epoch)


def _seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def retry_wait(spec: RetrySpec, attempt: int, retry_after: float | None, remaining_s: float,
               policy: RetryPolicy | None = None) -> float | None:
    """Seconds to wait before try `attempt + 1` on the same endpoint, or None to move on.

    Moves on when the tries are used up, when the upstream asks for a longer wait than
    `max_retry_after_s`, or when the wait would not leave the request any time.
    """
    if attempt >= spec.attempts:
        return None
    if retry_after is not None:
        if retry_after > spec.max_retry_after_s:
            return None
        wait = retry_after
    else:
        wait = (policy or spec.policy()).delay(attempt)
    return wait if wait < remaining_s else None


class Window:
    """Two counters over the last `span_s` seconds, in `buckets` slots that age out as time moves."""

    __slots__ = ("_a", "_b", "_epoch", "_n", "_width")

    def __init__(self, span_s: float, buckets: int = 10) -> None:
        self._n = buckets
        self._width = span_s / buckets
        self._epoch = [-1] * buckets
        self._a = [0] * buckets
        self._b = [0] * buckets

    def add(self, now: float, a: int = 0, b: int = 0) -> None:
        """Count `a` and `b` at `now`."""
        tick = int(now / self._width)
        slot = tick % self._n
        if self._epoch[slot] != tick:
            self._epoch[slot], self._a[slot], self._b[slot] = tick, 0, 0
        self._a[slot] += a
        self._b[slot] += b

    def totals(self, now: float) -> tuple[int, int]:
        """Both counters summed over the window ending at `now`."""
        oldest = int(now / self._width) - self._n
        a = b = 0
        for slot in range(self._n):
            if self._epoch[slot] > oldest:
                a += self._a[slot]
                b += self._b[slot]
        return a, b

    def clear(self) -> None:
        """Forget everything (a breaker starts afresh when it closes)."""
        self._epoch = [-1] * self._n


class RetryBudget:
    """Retries allowed per endpoint: at most `budget_ratio` of its requests over the window."""

    __slots__ = ("_spec", "_window")

    def __init__(self, spec: RetrySpec) -> None:
        self._spec = spec
        self._window = Window(spec.budget_window_s)  # a: requests, b: retries

    def request(self, now: float) -> None:
        """A request reached this endpoint (its first try): it earns a fraction of a retry."""
        self._window.add(now, a=1)

    def spend(self, now: float) -> bool:
        """Take one retry from the budget; False when it is exhausted."""
        requests, retries = self._window.totals(now)
        if retries >= max(self._spec.budget_min, self._spec.budget_ratio * requests):
            return False
        self._window.add(now, b=1)
        return True


BreakerState = Literal["closed", "open", "half_open"]


class Breaker:
    """Closed -> open after `consecutive_failures` in a row or `failure_ratio` over the window;
    open -> half-open after `cooldown_s`, letting one probe through; the probe's success closes it,
    its failure opens it for another cooldown."""

    __slots__ = ("_probing", "_spec", "_window", "failures_in_row", "opened_at", "state")

    def __init__(self, spec: BreakerSpec) -> None:
        self._spec = spec
        self._window = Window(spec.window_s)  # a: calls, b: failures
        self.state: BreakerState = "closed"
        self.failures_in_row = 0
        self.opened_at = 0.0
        self._probing = False

    def allow(self, now: float) -> bool:
        """May a call go to the endpoint now? In half-open, only one probe at a time."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if now - self.opened_at < self._spec.cooldown_s:
                return False
            self.state = "half_open"
        if self._probing:
            return False
        self._probing = True
        return True

    def refusing(self, now: float) -> bool:
        """True while `allow` would let no call through: open within its cooldown, or half-open with its probe
        out. Read only (`allow` moves an open breaker past its cooldown to half-open)."""
        if self.state == "open":
            return now - self.opened_at < self._spec.cooldown_s
        return self.state == "half_open" and self._probing

    def retry_in(self, now: float) -> float:
        """Seconds until `allow` may let a call through again, for a refused client's Retry-After: the rest of an open
        breaker's cooldown; a half-open one's probe is out and answers within its call's timeouts: a second."""
        if self.state == "open":
            return max(0.0, self._spec.cooldown_s - (now - self.opened_at))
        return 1.0 if self.state == "half_open" and self._probing else 0.0

    def record(self, now: float, ok: bool) -> None:
        """The outcome of a call that `allow` let through."""
        if self.state == "half_open":
            self._probing = False
            if ok:
                self.state, self.failures_in_row = "closed", 0
                self._window.clear()
            else:
                self._open(now)
            return
        self._window.add(now, a=1, b=0 if ok else 1)
        if ok:
            self.failures_in_row = 0
            return
        self.failures_in_row += 1
        calls, failures = self._window.totals(now)
        if self.failures_in_row >= self._spec.consecutive_failures or (
                calls >= self._spec.min_requests and failures >= self._spec.failure_ratio * calls):
            self._open(now)

    def abandon(self) -> None:
        """A let-through call ended without a verdict (the client went away): free the probe."""
        self._probing = False

    def _open(self, now: float) -> None:
        self.state, self.opened_at = "open", now
        self._probing = False


def rank(members: Sequence[str], choose: str, prices: Mapping[str, float | None],
         latencies: Mapping[str, float | None], explore: float = 0.0, draw: float = 1.0) -> list[str]:
    """A group's members best first. By price: cheapest first, unpriced last. By latency: members
    not measured yet first (so each gets measured), then the fastest measured first byte. Ties keep
    the configured order. By latency, when `draw` < `explore` the runner-up goes first, so its figure
    stays current (prices are declared, not measured: nothing to explore)."""
    if choose == "price":  # the evaluator's allow-list ranks so too: the member it evaluates is the one served
        return by_price(members, prices)
    order = sorted(members, key=lambda m: (latencies.get(m) is not None, latencies.get(m) or 0.0))
    if draw < explore and len(order) > 1:
        order[0], order[1] = order[1], order[0]
    return order


def fallback_chain(starts: Sequence[str], fallbacks: Mapping[str, str | None], limit: int = 4) -> list[tuple[int, str]]:
    """(start index, endpoint id) pairs to try in order: each start's endpoint then its named
    fallbacks, for the first start (the chosen target), then the next (stable, when a canary is
    served). A pair appears once; the chain stops at `limit` hops so a long or cyclic chain cannot
    multiply a request."""
    chain: list[tuple[int, str]] = []
    for index, start in enumerate(starts):
        seen: set[str] = set()
        eid: str | None = start
        while eid and eid not in seen and len(chain) < limit:
            seen.add(eid)
            chain.append((index, eid))
            eid = fallbacks.get(eid)
    return chain
