"""Budgets before admission: what an operator declares, what one request may cost at most, and the
per-replica allowance ledger. Pure (no I/O, clocks passed in); admission.py does the KV compare-and-set.

Design (README "Budgets and rate limits"): the KV holds, per budget counter and period, the total
amount *leased* to replicas. A replica leases a chunk (a share of the limit, at least what the request
needs) with one compare-and-set on the counter's revision, and then reserves requests from that local
allowance without touching the KV. A grant never takes the counter past the limit, so every replica's
reservations together fit in the budget; settling gives the unused part of a reservation back to the
local allowance, and an allowance unused for `lease_s` goes back to the KV, so idle replicas do not sit
on budget. Money is counted in integer nano-USD so the counters add up exactly.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

from lockgate.errors import ConfigError
from lockgate.llmwire import ApiRequest, OutputLimits
from lockgate.pricebook import ModelPrice

NANO = 1_000_000_000  # nano-USD per USD
Period = Literal["day", "month"]
Per = Literal["", "tenant", "app", "key"]
Usd = Annotated[float, msgspec.Meta(ge=0)]
Tokens = Annotated[int, msgspec.Meta(ge=0)]


class BudgetSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One declared budget: which traffic it covers, its period and its limits (USD and/or tokens).

    `tenant`, `app` and `key` (an API key id) select traffic; empty matches any. `per` splits the
    budget into one counter per tenant, app or key (`per: key` = this limit for each key); empty
    means one counter for all the traffic selected.
    """

    tenant: str = ""
    app: str = ""
    key: str = ""
    per: Per = ""
    period: Period = "day"
    usd: Usd | None = None
    tokens: Tokens | None = None


class Amount(msgspec.Struct, frozen=True, array_like=True):
    """Nano-USD and tokens; the dimensions a budget does not limit stay 0."""

    usd: int = 0
    tokens: int = 0

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.usd + other.usd, self.tokens + other.tokens)

    def __sub__(self, other: Amount) -> Amount:
        return Amount(self.usd - other.usd, self.tokens - other.tokens)

    def covers(self, need: Amount) -> bool:
        """True when both dimensions are at least `need`'s."""
        return self.usd >= need.usd and self.tokens >= need.tokens

    def clip(self, limit: Amount) -> Amount:
        """Each dimension at most `limit`'s."""
        return Amount(min(self.usd, limit.usd), min(self.tokens, limit.tokens))


ZERO = Amount()


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """A declared budget, resolved: its name and limits in counter units."""

    name: str
    spec: BudgetSpec
    limit: Amount  # nano-USD and tokens; an unlimited dimension is 0 and never counted
    limits_usd: bool
    limits_tokens: bool

    def matches(self, tenant: str, app: str, key_id: str) -> bool:
        """True when this budget covers traffic of this tenant, app and key."""
        s = self.spec
        return (not s.tenant or s.tenant == tenant) and (not s.app or s.app == app) and (not s.key or s.key == key_id)

    def counter(self, tenant: str, app: str, key_id: str, periods: Periods) -> str:
        """The KV key of the counter this request charges: budget, split value, period."""
        per = self.spec.per
        pid = periods.day if self.spec.period == "day" else periods.month
        if not per:
            return _counter_key(self.name, None, pid)
        return _counter_key(self.name, tenant if per == "tenant" else key_id if per == "key" else f"{tenant}/{app}", pid)

    def need(self, cost: Amount) -> Amount:
        """The part of a request's cost this budget counts."""
        return Amount(cost.usd if self.limits_usd else 0, cost.tokens if self.limits_tokens else 0)

    def describe(self) -> str:
        """`acme-daily (5.00 USD and 100000 tokens per day)` for error messages."""
        parts = ([f"{self.spec.usd:g} USD"] if self.limits_usd else []) + \
                ([f"{self.spec.tokens} tokens"] if self.limits_tokens else [])
        return f"{self.name} ({' and '.join(parts)} per {self.spec.period})"


def resolve(budgets: dict[str, BudgetSpec]) -> list[Budget]:
    """The declared budgets with their limits in counter units (ConfigError for one that limits nothing)."""
    for name, s in budgets.items():
        if s.usd is None and s.tokens is None:
            raise ConfigError(f"budget {name!r} limits nothing: give it `usd`, `tokens` or both")
    return [Budget(name=name, spec=s, limits_usd=s.usd is not None, limits_tokens=s.tokens is not None,
                   limit=Amount(round((s.usd or 0.0) * NANO), s.tokens or 0))
            for name, s in budgets.items()]


class Periods(msgspec.Struct, frozen=True):
    """The current day and month ids, computed once per day rather than per request."""

    ordinal: int
    day: str
    month: str

    @classmethod
    def at(cls, now: datetime) -> Periods:
        return cls(now.toordinal(), period_id("day", now), period_id("month", now))


@functools.lru_cache(maxsize=65536)
def _counter_key(name: str, split: str | None, pid: str) -> str:
    return ".".join(_kv_token(p) for p in (name, split, pid) if p is not None)


def _kv_token(value: str) -> str:
    # KV keys allow [-/_=.a-zA-Z0-9]; dots separate the parts, so escape anything else (dots included).
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else f"={ord(c):02X}" for c in value) or "="


def period_id(period: Period, now: datetime) -> str:
    """The UTC period a time falls in: `2026-12-03` for a day, `2026-12` for a month."""
    now = now.astimezone(UTC)
    return now.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


# Input a provider adds to a request that declares tools (its tool-use instructions: a few hundred
# tokens at Anthropic), which no byte of the request carries.
TOOLS_TOKENS = 1000


# What a body only points at, and the tokens reserved for each pointer found. JSON escapes every quote inside a
# string, so a quoted key or type name below occurs in a body only as a key or a value, never inside text.
_MEDIA = (b'"image_url"', b'"input_image"')  # an image part (chat names it twice: its type and its key)
_STORED = (b'"previous_response_id"', b'"conversation"', b'"file_id"', b'"input_file"', b'"item_reference"')


def pointed_at(body: bytes, media_tokens: int, stored_tokens: int) -> int:
    """Input tokens a request body refers to without carrying them: `media_tokens` for each image part
    found, and `stored_tokens` (up to a model's whole context) once if it names a stored response,
    conversation or file. Counted in C over the bytes; an over-count only reserves more. A body with a `\\u`
    escape is scanned as re-encoded (keys written plainly): `"previous_response_\\u0069d"` is the same key to
    every JSON parser, and hid it from the scan."""
    if b"\\u" in body:
        with contextlib.suppress(msgspec.DecodeError, RecursionError):  # unreadable: the router refuses it anyway
            body = msgspec.json.encode(msgspec.json.decode(body))
    media = sum(body.count(p) for p in _MEDIA) * media_tokens
    return media + (stored_tokens if any(p in body for p in _STORED) else 0)


def input_estimate(body_bytes: int, req: ApiRequest, bytes_per_token: float, pointed: int = 0) -> int:
    """An upper bound of a request's input tokens, from the length of its body as the upstream receives it.

    Every text an upstream reads is in that body, whatever field carries it (messages and their tool calls,
    tools, response_format, prompt, input, instructions, a provider translation's fields), as JSON, which
    only lengthens text, and no byte-level tokenizer makes more tokens than bytes (bytes_per_token 1.0).
    Counting fields instead missed every one not counted (a Responses API `instructions` of 250 KB was
    reserved as 20 tokens). Plus a few tokens per message for the chat template, TOOLS_TOKENS when tools are
    declared, and `pointed`: what the body only points at (`pointed_at`: images, a stored response,
    conversation or file). Still not bounded: a hosted tool's results (web or file search) and a stored prompt
    template by id."""
    tools = TOOLS_TOKENS if req.declares_tools() else 0
    return math.ceil(body_bytes / bytes_per_token) + 8 * len(req.messages) + 3 + tools + pointed


def most_output(req: ApiRequest, fields: Sequence[str], default_max_tokens: int,
                sent: Sequence[OutputLimits] = ()) -> int:
    """The most output tokens one request may generate and be billed for: the largest of its `fields` (the
    max tokens its operation's upstream reads: wire.Operation.max_fields), else the configured default, for
    each choice (`n`, or a completion's `best_of`, all generated and billed), for each prompt of a completions
    batch (a list of strings or of token lists). A limit in a field the operation does not read bounds
    nothing: read from any field, `max_tokens: 1` on the Responses API reserved 1 token for an answer of
    thousands. `sent`: the limits of the request as each upstream gets it, when they differ from the client's
    (a release's params, a provider translation's required max_tokens): the largest counts. Budgets and
    token rate limits both reserve this."""
    prompt = req.prompt
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return max(_per_prompt(limits, fields, default_max_tokens) for limits in (req, *sent)) * prompts


def _per_prompt(limits: OutputLimits | ApiRequest, fields: Sequence[str], default_max_tokens: int) -> int:
    per_choice = max((getattr(limits, f) or 0 for f in fields), default=0) or default_max_tokens
    return per_choice * max(limits.n or 1, limits.best_of or 1)


def cost_of(price: ModelPrice | None, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> Amount:
    """Nano-USD (rounded up) and total tokens of a call; an unpriced model costs 0 USD."""
    usd = 0 if price is None else math.ceil(price.cost(input_tokens, output_tokens, cached_tokens) * NANO)
    return Amount(usd, input_tokens + output_tokens)


def worst_case(price: ModelPrice | None, body_bytes: int, req: ApiRequest, limits: OutputLimits,
               fields: Sequence[str], default_max_tokens: int, bytes_per_token: float,
               pointed: int = 0) -> tuple[int, int, Amount]:
    """What one call may be billed at most: its input estimate (from the `body_bytes` it sends), the most output its
    body's `limits` (and the client's) allow, and their cost at its model's `price`. Charged for a call whose usage
    the router never learns (abandoned after its request went out), as admission reserves for a request of that
    call alone."""
    tokens_in = input_estimate(body_bytes, req, bytes_per_token, pointed)
    tokens_out = most_output(req, fields, default_max_tokens, (limits,))
    return tokens_in, tokens_out, cost_of(price, tokens_in, tokens_out)


def still_needed(held: Amount, spent: Amount, then: Amount) -> Amount:
    """What a request must reserve besides the `held` reservation before a call whose worst case is `then`, once
    calls it abandoned may have spent `spent` of it (ZERO when what it holds covers both)."""
    return Amount(max(0, spent.usd + then.usd - held.usd), max(0, spent.tokens + then.tokens - held.tokens))


class Counter(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a budget counter holds in the KV: the amount leased to replicas in one period. Unknown fields are
    refused: any identity that may publish on a stream's subject can have a JetStream acknowledgement
    (`{"stream":..,"seq":..}`) stored under a key, which read leniently would be a counter at zero (the budget
    reset); refused, the counter is unreadable and the budget fails closed (as when the store is down)."""

    leased: Amount = ZERO


def grant(counter: Counter, limit: Amount, ask: Amount, minimum: Amount) -> Amount | None:
    """What the store may lease: `ask` clipped to what is left under the limit, or None when even
    `minimum` (what the waiting request still lacks) does not fit. A dimension the request lacks
    nothing of never refuses: the counter may hold spend in a dimension its budget no longer limits
    (the gateway file changed `usd` to `tokens`), whose limit is now 0."""
    left = limit - counter.leased
    if (minimum.usd and left.usd < minimum.usd) or (minimum.tokens and left.tokens < minimum.tokens):
        return None
    return Amount(max(0, min(ask.usd, left.usd)), max(0, min(ask.tokens, left.tokens)))


def lease_ask(limit: Amount, lacking: Amount, fraction: float) -> Amount:
    """How much to lease: a `fraction` of the limit (so the hot path rarely leases), at least what is lacking."""
    return Amount(max(lacking.usd, math.ceil(limit.usd * fraction)),
                  max(lacking.tokens, math.ceil(limit.tokens * fraction)))


class Allowance:
    """What one replica holds of one counter: leased, not yet reserved. Negative after a request
    used more than it reserved (the next lease charges the deficit to the store first)."""

    __slots__ = ("available", "expires")

    def __init__(self) -> None:
        self.available = ZERO
        self.expires = 0.0  # monotonic seconds: after this the unused remainder goes back to the store

    def take(self, need: Amount, now: float) -> bool:
        """Reserve `need` from the allowance, if it is live and covers it."""
        if now < self.expires and self.available.covers(need):
            self.available = self.available - need
            return True
        return False

    def lacking(self, need: Amount) -> Amount:
        """What a lease must add so `need` can be taken (an expired allowance revives with the lease)."""
        return Amount(max(0, need.usd - self.available.usd), max(0, need.tokens - self.available.tokens))

    def add(self, amount: Amount, now: float, lease_s: float) -> None:
        """A lease arrived: add it and keep the allowance live for another `lease_s`."""
        self.available = self.available + amount
        self.expires = now + lease_s

    def credit(self, amount: Amount) -> None:
        """Settlement: the unused part of a reservation back (negative when the call cost more)."""
        self.available = self.available + amount

    def surrender(self, now: float) -> Amount:
        """Once expired, the remainder (or deficit) to return to the store; the allowance keeps nothing."""
        if now < self.expires or self.available == ZERO:
            return ZERO
        out, self.available = self.available, ZERO
        return out


class EventThrottle:
    """At most one budget event per counter and reason every `interval_s`; the refusals in between are
    counted into the next one, so a flood of refused requests is a handful of events, none lost."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], int] = {}

    def count(self, counter: str, reason: str, now: float) -> int:
        """Record one refusal; the number of refusals to report now, 0 to stay quiet."""
        k = (counter, reason)
        n = self._pending.get(k, 0) + 1
        last = self._last.get(k)
        if last is not None and now - last < self.interval_s:
            self._pending[k] = n
            return 0
        self._last[k] = now
        self._pending.pop(k, None)
        if len(self._last) > 10_000:  # counters of past periods: forget them rather than grow
            self._last = {k: self._last[k]}
        return n
