"""Admission: rate limits and budgets before the upstream call, settlement after, and the response cache.

The gateway file (settings.gateway_file, LOCKGATE_GATEWAY_FILE) declares all three; without it every
request is admitted at the cost of one attribute check. The hot path touches the KV only when this
replica's allowance of a budget runs out (see budgets.py for the leasing design); everything else is
in memory. Budget events leave through a batcher, off the request path.

    # gateway.yaml
    budgets:
      acme-daily: {tenant: acme, period: day, usd: 25}
      each-key:   {tenant: acme, per: key, period: month, tokens: 5000000}
    rate_limits:
      - {tenant: acme, rpm: 600, tpm: 200000}
    cache:
      deployments: {faq: {ttl_s: 600}}
    fail_open: false            # budget store unreachable: 503 (default) or let traffic through
    default_max_tokens: 4096    # the output reserved for a request without max_tokens
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any, NamedTuple, TypeVar

import msgspec
from aiohttp import web

from lockgate import documents, queryclient
from lockgate.batcher import Batcher
from lockgate.config import Settings
from lockgate.contracts import BudgetEvent
from lockgate.contracts.inference import (
    ADMITTED_AT,
    CHARGED_INPUT_RATE,
    CHARGED_INPUT_TOKENS,
    CHARGED_OUTPUT_TOKENS,
    CLIENT_DISCONNECTED,
    DEAREST,
    ROUTER_BUSY,
    UPSTREAM_UNANSWERED,
    USAGE_UNKNOWN,
)
from lockgate.errors import ConfigError, LockgateError
from lockgate.kvcas import KV_ERRORS, RETRY_S, CasStore, KVOutcomeUnknown, KVUnavailable, KVUnreadable
from lockgate.llmwire import ApiRequest, OutputLimits
from lockgate.pricebook import ModelPrice, load_price_book
from lockgate.server.apikeys import ApiKey
from lockgate.services.router.budgets import (
    NANO,
    ZERO,
    Allowance,
    Amount,
    Budget,
    BudgetSpec,
    Counter,
    EventThrottle,
    NamedState,
    Periods,
    Pointed,
    Scope,
    cost_of,
    create_step,
    grant,
    input_estimate,
    input_guessed,
    lease_ask,
    lease_chunk,
    most_output,
    period_id,
    period_start,
    pointed_at,
    reckoned,
    resolve,
    scope,
    seed_step,
    spend_amount,
    still_needed,
    to_lower,
    worst_case,
)
from lockgate.services.router.cache import (
    EVENT_STREAM,
    MAX_KEYED_BYTES,
    CacheConfig,
    Entry,
    ResponseCache,
    from_shared,
    request_key,
    to_shared,
)
from lockgate.services.router.ratelimit import (
    Lacking,
    Level,
    RateLimiter,
    RateLimitSpec,
    Refusal,
    Slot,
    give_back,
    kv_key,
    lease,
    refusal,
)
from lockgate.services.router.resilience import may_have_generated
from lockgate.services.router.wire import CHAT, RESPONSE_FAILED, USAGE_WARNING, error_response, own_request_id

log = logging.getLogger("lockgate.router.admission")
T = TypeVar("T")

# The failures of a request no upstream answered (besides an HTTP error status other than a gateway's timeout:
# resilience.MAY_HAVE_GENERATED): never reached, never tried,
# or given up on. The calls it made that may have generated (abandoned after their request went out) are
# charged on their own (settle's `abandoned`); nothing else was generated. Every other failure may have
# followed a 200 and generated tokens the provider bills.
NOTHING_GENERATED = frozenset({"upstream_unreachable", "upstream_circuit_open", "upstream_not_configured",
                               "upstream_timeout", ROUTER_BUSY})

BudgetName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
Positive = Annotated[float, msgspec.Meta(gt=0)]


class GatewayFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The operator's gateway policy: budgets, rate limits, the response cache and how to fail."""

    budgets: dict[BudgetName, BudgetSpec] = {}
    rate_limits: list[RateLimitSpec] = []
    cache: CacheConfig = CacheConfig()
    fail_open: bool = False
    default_max_tokens: Annotated[int, msgspec.Meta(gt=0)] = 4096
    bytes_per_token: Positive = 1.0  # input estimate from body bytes; 1.0 never under-counts a byte-level tokenizer
    # Input a body points at without carrying it (budgets.pointed_at): per image part (one figure for every
    # model: the dearest image of any model served), and once for a stored response, conversation or file,
    # inline or not (up to a model's whole context window).
    media_tokens: Annotated[int, msgspec.Meta(ge=0)] = 3000
    stored_input_tokens: Annotated[int, msgspec.Meta(ge=0)] = 200_000
    lease_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.05
    lease_s: Positive = 5.0
    # a KV round trip under load; past it the request fails closed (or open). Not on the hot path: leases only.
    store_timeout_s: Positive = 5.0
    event_interval_s: Positive = 5.0


def load_gateway_file(path: str) -> GatewayFile:
    """Read and validate the gateway file; an empty path means no policy (everything admitted)."""
    if not path:
        return GatewayFile()
    raw = documents.read(path, "yaml", name="gateway file") or {}  # the CLI's guarded reader (probe p11)
    try:
        return msgspec.convert(raw, GatewayFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad gateway file {path}: {exc}") from None


_counter_dec = msgspec.json.Decoder(Counter)
_level_dec = msgspec.json.Decoder(Level)
_SHARED_WAIT_S = 0.2  # the most a shared-cache lookup may add to a request
_SHARED_MAX = 900_000  # bytes: a shared entry fits NATS' default 1 MB message
# After the cost ledger could not be read to seed a counter, its leases count on from the counter's creation and ask
# the ledger again only this much later: a query service that is down is not waited for at every lease.
SEED_RETRY_S = 10.0


class LedgerSpend(msgspec.Struct, frozen=True):
    """The query service's `budget_spend`: what the ledger booked for served requests of one scope and time span."""

    usd: float = 0.0
    tokens: int = 0
    calls: int = 0


class Call(NamedTuple):
    """One upstream call of a request, as budgets price it: the model it is billed at, the length of the body it
    sends, that body's output limits and whether its upstream may write the prompt cache (its input then priced at
    a write's rate in its worst case: budgets.reckoned)."""

    model: str
    body_bytes: int
    limits: OutputLimits
    writes: bool = False


class Refused(NamedTuple):
    """Why a reservation was refused: the error answer's status, message, type, code and headers."""

    status: int
    message: str
    type_: str
    code: str
    headers: dict[str, str] | None = None

    def response(self) -> web.Response:
        """The refusal as the client gets it, in OpenAI's error shape."""
        return error_response(self.status, self.message, self.type_, code=self.code, headers=self.headers)


class Ticket:
    """One admitted request: what it reserved where, settled once after its calls."""

    __slots__ = ("admitted", "app", "cache_key", "charges", "cost", "deployment", "key", "key_id", "limits",
                 "max_fields", "pointed", "price", "prices", "req", "spent", "tenant")

    def __init__(self, key: ApiKey | None, cost: Amount, price: ModelPrice | None,
                 prices: dict[str, ModelPrice | None] | None = None) -> None:
        self.key = key
        self.tenant, self.app, self.key_id = (key.tenant, key.app, key.id) if key else ("", "", "")
        self.cost = cost  # everything reserved (on each budget, its part), and in the token rate limits
        self.price = price  # what the reservation was priced at: the dearest model the request may reach
        self.prices = prices or {}  # every model it may reach (a canary's, stable's on fallback), for settling
        self.charges: list[tuple[str, Budget, Amount]] = []  # counter, budget, amount reserved
        self.cache_key: str | None = None
        # What settle charged for the call that answered (None until settled, or when it is unknown which call ran):
        # what a hit on its cached answer saves.
        self.spent: Amount | None = None
        # What a call's worst case is computed from (Admission.worst): the request, what its body points at and
        # the fields that bound its output; and its deployment, for budget events.
        self.req: ApiRequest | None = None
        self.pointed = 0
        self.max_fields: Sequence[str] = ()
        self.deployment = ""
        # The key's router rate limits after admission, as `x-ratelimit-*` headers (RateLimiter.headers).
        self.limits: dict[str, str] = {}
        # When it was admitted, under a policy: the instant whose periods its budgets count it in (ADMITTED_AT).
        self.admitted: datetime | None = None

    @property
    def reserved(self) -> bool:
        """Something is held on a budget or rate limit (not when no policy applies, nor once settled)."""
        return self.cost is not ZERO



def _cut_stream(ticket: Ticket, rec: Any) -> bool:
    """The call `rec` records streamed and stopped before its end: cut (by the client, a timeout, a broken connection),
    truncated, or ended by an error event. A failed Responses turn (RESPONSE_FAILED) ended with its final word."""
    return (ticket.req is not None and bool(ticket.req.stream) and rec.status != "ok"
            and rec.error_type != RESPONSE_FAILED)


class Admission:
    """Rate limits, budgets and the response cache of one router replica."""

    def __init__(self, settings: Settings, bus: Any, *, replica: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC),
                 wall_s: Callable[[], float] = time.time) -> None:
        self.file = load_gateway_file(settings.gateway_file)
        self.bus = bus
        self.replica = replica
        self.clock, self.wall, self.wall_s = clock, wall, wall_s
        self.budgets = resolve(self.file.budgets)
        self.limiter = RateLimiter(list(self.file.rate_limits))
        self.cache = ResponseCache(self.file.cache)
        self.active = bool(self.budgets or self.limiter or self.file.cache.deployments)
        self.prices = load_price_book(settings.price_book).models if self.active else {}
        self.allowances: dict[str, Allowance] = {}
        # Per counter, the give-backs this replica dropped unconfirmed (KVOutcomeUnknown: the write may have been
        # applied, its answer lost). One that did not land stays charged until the period ends (stranded).
        self.unconfirmed: dict[str, Amount] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Counters this replica found seeded (or created before seeding): no ledger read for them again; and when
        # to ask the ledger again for one it could not seed.
        self._seeded: set[str] = set()
        self._seed_after: dict[str, float] = {}
        self._throttle = EventThrottle(self.file.event_interval_s)
        # the shared counters (budgets and rate-limit buckets), changed by compare-and-set
        self.counters = CasStore(bus, bus.subjects.kv_budgets if bus is not None else "",
                                 timeout_s=self.file.store_timeout_s, clock=clock, what="the budget store")
        self._shared_kv: Any = None
        self._puts: set[asyncio.Task[None]] = set()
        self._leasing: set[asyncio.Task[Any]] = set()  # lease writes under way (_unabandoned)
        self._refunding: asyncio.Task[None] | None = None  # giving back what settlements owe shared rate limits
        self._periods = Periods(-1, "", "")
        self.events = Batcher(self._publish, max_items=100, max_age_s=0.2, capacity=1000, name="budget-events",
                              autostart=False)

    # -- admission ---------------------------------------------------------------------------------

    async def admit(self, key: ApiKey, deployment: str, model: str, req: ApiRequest, body_bytes: int,
                    sent: Sequence[OutputLimits] = (), body: bytes = b"", also: Sequence[str] = (),
                    max_fields: Sequence[str] = CHAT.max_fields, writes: bool = False,
                    named: NamedState | None = None, requests: int = 1) -> Ticket | web.Response:
        """Reserve the request's largest cost on every budget that covers it, after its rate limits;
        a Ticket to settle after the call, or the 429/503 answer. `body_bytes`: the length of the longest
        body an upstream of this request may receive (input_estimate); `sent`: the output limits of each
        (a release's params or a provider's translation may set others than the client's); `body`: the
        client's, for what it points at (images, stored state: budgets.pointed_at); `also`: the other models
        the request may be billed at (stable's, when a canary falls back to it): the dearest is reserved;
        `max_fields`: the fields that bound the output of the request's operation (budgets.most_output); `writes`:
        an upstream of the request may write the prompt cache, so its input is reserved at a write's rate
        (budgets.reckoned: a write kept an hour is billed 2x input, beyond a reservation at the input rate); `named`:
        the stored state a Responses request names, read already (budgets.named_state); `requests`: what it counts
        against `rpm` (0 for a shadow copy: its tokens count, the caller made no request of it)."""
        pointed = pointed_at(req, body, self.file.media_tokens, self.file.stored_input_tokens, named)
        if not self.active:
            # No policy applies: nothing reserved, but what a call of unknown usage may cost is still its worst case,
            # on its event and in the cost ledger (settle), so the ticket keeps what that is computed from.
            return self._described(Ticket(key, ZERO, None), req, pointed.tokens, max_fields, deployment)
        max_out = most_output(req, max_fields, self.file.default_max_tokens, sent)
        lower = partial(to_lower, req, max_fields, self.file.default_max_tokens, sent)  # said on a refusal only
        tokens_in = input_estimate(body_bytes, req, self.file.bytes_per_token, pointed.tokens)
        prices = {m: self.prices.get(m) for m in (model, *also)}
        # An unpriced model among them is named below (a USD budget cannot be enforced on it); else the dearest.
        model = next((m for m, p in prices.items() if p is None), None) or max(
            prices, key=lambda m: cost_of(reckoned(prices[m], writes), tokens_in, max_out).usd)
        price = prices[model]
        cost = cost_of(reckoned(price, writes), tokens_in, max_out)
        if self.limiter:
            try:
                refused = await self._rate_limit(key, cost.tokens, requests)
            except KVUnreadable as exc:
                return error_response(503, exc.message, "service_unavailable", code="rate_limit_unreadable")
            # The key's own limits as OpenAI reports its: what a client paces itself on (on a 429 and every answer).
            limits = self.limiter.headers(key.tenant, key.app, key.id, self.clock())
            if refused and math.isinf(refused.retry_after_s):  # larger than the limit itself: no wait admits it
                return error_response(429, _explained(f"{refused.message}; {lower()}", pointed), "tokens",
                                      code="request_too_large", headers={**_NO_RETRY, **limits})
            if refused:
                return error_response(429, _explained(refused.message, pointed), "requests",
                                      code="rate_limit_exceeded",
                                      headers={"Retry-After": str(max(1, math.ceil(refused.retry_after_s))),
                                               **limits})
        ticket = self._described(Ticket(key, cost, price, prices), req, pointed.tokens, max_fields, deployment)
        if self.limiter:
            ticket.limits = limits
        now = self.clock()
        wall = ticket.admitted = self.wall()
        periods = self._periods if self._periods.ordinal == wall.toordinal() else self._new_periods(wall)
        for b in self.budgets:
            if not b.matches(key.tenant, key.app, key.id):
                continue
            if b.limits_usd and price is None:
                self._undo(ticket)
                return error_response(403, f"model {model!r} has no price in the price book, so budget "
                                           f"{b.describe()} cannot be enforced; add the model to the price book "
                                           "(settings.price_book)", "permission_error", code="model_unpriced")
            counter, need = b.counter(key.tenant, key.app, key.id, periods), b.need(cost)
            try:
                taken = await self._take(b, counter, need, key, deployment, model, max_out, lower, now, wall)
            except asyncio.CancelledError:  # the client went away while waiting: give back what was reserved
                self._undo(ticket)
                raise
            if isinstance(taken, Refused):
                self._undo(ticket)
                return taken._replace(message=_explained(taken.message, pointed)).response()
            if taken:
                ticket.charges.append((counter, b, need))
        return ticket

    @staticmethod
    def _described(ticket: Ticket, req: ApiRequest, pointed: int, max_fields: Sequence[str], deployment: str) -> Ticket:
        """`ticket` with what its calls' worst cases are computed from (Admission.worst)."""
        ticket.req, ticket.pointed, ticket.max_fields, ticket.deployment = req, pointed, max_fields, deployment
        return ticket

    async def _take(self, b: Budget, counter: str, need: Amount, key: ApiKey, deployment: str, model: str,
                    max_out: int, lower: Callable[[], str], now: float, wall: datetime,
                    asking: str = "this request") -> bool | Refused:
        """Reserve `need` on one budget's counter: True when reserved, False when nothing was (its store is
        unreachable and the gateway fails open: the request goes through uncounted on it), else the refusal.
        `asking`: who needs it, for the over-budget message."""
        if self._allowance(counter).take(need, now):
            return True
        # No allowance holds more than the limit, so only here (off the hot path): one larger than the whole limit
        # is told so, not to wait for a reset that will not help (and no lease is tried for it).
        if (too_large := _too_large(b, need, model, max_out, lower, asking)) is not None:
            return too_large
        try:
            leased = await self._lease(b, counter, need, scope(b, key.tenant, key.app, key.id))
        except KVUnreadable as exc:
            # The store answered with a value that is no counter: no outage, so fail_open does not apply
            # (an identity that can aim JetStream's answer at the key would otherwise lift the budget).
            self._report("counter_unreadable", b, counter, key, deployment, model, need, None, wall)
            bucket = self.counters.bucket
            return Refused(503, f"budget {b.describe()} cannot be checked: {exc.message} (KV {bucket}); "
                                "refusing the request whatever `fail_open` says (the store answered: a "
                                "value that is no counter is not an outage). An operator resets the "
                                f"counter by deleting it: nats kv del {bucket} {counter} (the period's "
                                "count restarts from what the cost ledger booked before)", "service_unavailable",
                           "budget_counter_unreadable")
        except KVUnavailable as exc:
            self._report("store_unavailable", b, counter, key, deployment, model, need, None, wall)
            if self.file.fail_open:
                return False
            return Refused(503, f"budget {b.describe()} cannot be checked: {exc.message}; refusing "
                                "the request (fail closed; `fail_open: true` in the gateway file lets "
                                "traffic through while the store is down)", "service_unavailable",
                           "budget_store_unavailable")
        if leased is not None:  # the store's counter when it refused
            self._report("over_budget", b, counter, key, deployment, model, need, leased, wall)
            return self._over_budget(b, counter, need, leased, model, max_out, wall, asking)
        return True

    # -- calls whose usage is unknown ----------------------------------------------------------------

    def worst(self, ticket: Ticket, call: Call, reported_input: int = 0) -> tuple[int, int, Amount]:
        """A call's worst case (budgets.worst_case): input and output tokens, and their cost at its model's price;
        its input the `reported_input` count the upstream reported when that is larger than its estimate."""
        assert ticket.req is not None  # an admitted ticket (a further reservation's has no calls to price)
        return worst_case(ticket.prices.get(call.model, ticket.price), call.body_bytes, ticket.req, call.limits,
                          ticket.max_fields, self.file.default_max_tokens, self.file.bytes_per_token, ticket.pointed,
                          call.writes, reported_input)

    async def cover(self, ticket: Ticket, spent: Sequence[Call], then: Call) -> str | None:
        """Before a call (a fallback) that follows calls abandoned after their request went out: reserve what the
        request may now spend beyond what it holds, i.e. the abandoned calls' worst cases plus this call's, less
        its reservation, on the budgets its admission charged and in its token rate limits (admission reserved
        one call's worth; each abandoned call may be billed in full). None when reserved (or nothing more is
        needed), else why not: the call is not made."""
        key = ticket.key
        if key is None or ticket.req is None or ticket.cost is ZERO:
            return None
        spent_cost = sum((self.worst(ticket, c)[2] for c in spent), ZERO)
        _, max_out, then_cost = self.worst(ticket, then)
        lower = partial(to_lower, ticket.req, ticket.max_fields, self.file.default_max_tokens, (then.limits,))
        need = still_needed(ticket.cost, spent_cost, then_cost)
        if need == ZERO:
            return None
        extra = Ticket(key, need, ticket.price, ticket.prices)
        if self.limiter and need.tokens:
            try:
                refused = await self._rate_limit(key, need.tokens, requests=0)
            except KVUnreadable as exc:
                return exc.message
            if refused:
                return f"{refused.message}; {lower()}" if math.isinf(refused.retry_after_s) else \
                    refused.message
        now, wall = self.clock(), self.wall()
        for counter, b, _ in ticket.charges:  # the counters admission reserved on, of that period
            part = b.need(need)
            if part == ZERO:
                continue
            try:
                taken = await self._take(b, counter, part, key, ticket.deployment, then.model, max_out, lower, now, wall,
                                         asking="a further reservation for it")
            except asyncio.CancelledError:
                self._undo(extra)
                raise
            if isinstance(taken, Refused):
                self._undo(extra)
                return taken.message
            if taken:
                extra.charges.append((counter, b, part))
        for counter, b, part in extra.charges:
            at = next(i for i, c in enumerate(ticket.charges) if c[0] == counter)
            ticket.charges[at] = (counter, b, ticket.charges[at][2] + part)
        ticket.cost = ticket.cost + need
        return None

    def _unknown(self, ticket: Ticket, rec: Any, call: Call, reported_input: int = 0) -> Amount:
        """A call whose usage is unknown costs its worst case (its input the believed `reported_input` when larger);
        its record says so, and what was charged (its event's attributes), so the cost accountant books the same."""
        tokens_in, tokens_out, cost = self.worst(ticket, call, reported_input)
        rec.attributes[USAGE_UNKNOWN] = "worst_case"
        rec.attributes[CHARGED_INPUT_TOKENS] = str(tokens_in)
        rec.attributes[CHARGED_OUTPUT_TOKENS] = str(tokens_out)
        if call.writes:  # its input charged at a cache write's rate (budgets.reckoned)
            rec.attributes[CHARGED_INPUT_RATE] = DEAREST
        return cost

    async def _rate_limit(self, key: ApiKey, tokens: int, requests: int = 1) -> Refusal | None:
        """The rate limits' verdict: None when admitted (its units taken), else the Refusal (KVUnreadable when a
        shared bucket's value cannot be read). A shared
        limit leases from the KV when this replica's share falls short (a few times at most: other
        requests and replicas take from the same buckets meanwhile). `requests`: 0 for a further reservation
        of a request already counted."""
        for _ in range(4):
            verdict = self.limiter.admit(key.tenant, key.app, key.id, tokens, self.clock(), requests)
            if not isinstance(verdict, list):
                return verdict
            for lack in verdict:
                refused = await self._lease_rate(lack)
                if refused is not None:
                    return refused
        return Refusal(f"rate limit of key {key.id}: its shared buckets are contended; retry", 1.0)

    async def _lease_rate(self, lack: Lacking) -> Refusal | None:
        """Lease a share of a shared rate-limit bucket into this replica: None when leased (or the KV is
        unreachable: the limit falls back to this replica's bucket for a while), else the Refusal."""
        name = kv_key(lack.slot)
        async with self._lock(name):  # one lease at a time per bucket: the requests queued here share it
            if self.limiter.covered(lack.slot, lack.units, self.clock()):
                return None
            ask = max(lack.need, math.ceil(lack.capacity * self.file.lease_fraction))
            # What this replica owes the bucket goes back in the same write, before the lease: a refund given back
            # after it would land above what the KV would hold (and a failed write drops it, as _give_back does).
            back = self.limiter.take_owed(lack.slot)
            try:
                got, wait = await self._unabandoned(self._rate_leased(lack, ask, back))
            except KVUnreadable as exc:  # no outage: falling back to this replica's bucket would lift the limit
                bucket = self.counters.bucket
                raise KVUnreadable(
                    f"rate limit of key {lack.slot[2]} ({lack.capacity} {lack.slot[1]} per minute, shared) cannot be "
                    f"checked: {exc.message} (KV {bucket}); refusing the request. An operator resets the bucket by "
                    f"deleting it: nats kv del {bucket} {name} (it starts full again)") from None
            except KVUnavailable:
                self.limiter.local_until = self.clock() + RETRY_S
                return None
            if got is None:
                return refusal(lack.slot[2], lack.capacity, lack.slot[1], wait)
        return None

    async def _rate_leased(self, lack: Lacking, ask: float, back: float) -> tuple[float | None, float]:
        """Lease `ask` units of a shared rate-limit bucket (giving back `back`) and add them to this replica's share:
        (units leased, or None when refused, and the seconds to wait then)."""
        got, wait = await self._cas_rate(kv_key(lack.slot), lambda state: lease(state, lack.capacity, self.wall_s(),
                                                                                ask, lack.need, back))
        if got is not None:
            self.limiter.add_share(lack.slot, got, self.clock(), self.file.lease_s)
        return got, wait

    async def _unabandoned(self, write: Coroutine[Any, Any, T]) -> T:
        """Await a lease's `write` (which adds what it leased to this replica's allowance or share), run to its end
        even when the request awaiting it is cancelled (its client left): once sent, the store may apply it, and
        what it granted must reach this replica, which gives back what it does not use, not stay counted in the
        store for nobody until the period ends. Before, probe p66 F2, a client hanging up on a request while its
        lease was written left that lease in the counter. A write whose request left releases the lease lock with it:
        a request queued there may lease once more meanwhile (this replica's excess, given back by the sweep)."""
        task = asyncio.get_running_loop().create_task(write)
        self._leasing.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._leasing.discard)
        task.add_done_callback(_retrieved)
        return await asyncio.shield(task)

    async def _cas_rate(self, name: str, change: Callable[[Level | None], tuple[Level | None, float | None, float]]
                        ) -> tuple[float | None, float]:
        """Apply `change` to a shared rate-limit bucket by compare-and-set: (units it moved, or None when
        it refused, and the seconds to wait then). Its new state is written unless None."""
        def step(state: Level | None) -> tuple[Level | None, tuple[float | None, float]]:
            after, moved, wait = change(state)
            return after, (moved, 0.0 if moved is not None else wait)

        return await self.counters.update(name, lambda b: _level_dec.decode(b or b""), step,
                                          f"rate-limit bucket {name}", "the rate-limit store")

    async def _return_shares(self, now: float) -> None:
        """Give this replica's unused shares of shared rate limits back (a lost one refills anyway), and what it owes
        them."""
        for slot in self.limiter.surrender(now):
            await self._give_back(slot)

    async def _give_back(self, slot: Slot) -> None:
        """Give what this replica owes a shared rate-limit bucket back to the KV, under the bucket's lock so no lease
        of it here lands first. One that failed is dropped, never sent again: its write may have landed
        (KVOutcomeUnknown), and twice would lift the limit."""
        name = kv_key(slot)
        async with self._lock(name):
            units, capacity = self.limiter.take_owed(slot), self.limiter.capacity(slot)
            if units:
                with contextlib.suppress(KVUnavailable):
                    await self._cas_rate(name, lambda state: (give_back(state, capacity, self.wall_s(), units), units,
                                                              0.0))

    async def _give_back_owed(self) -> None:
        """Give back what settlements owe the shared rate-limit buckets, until nothing is owed."""
        while self.limiter.owed:
            for slot in list(self.limiter.owed):
                await self._give_back(slot)

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def settle(self, ticket: Ticket, rec: Any, model: str = "", call: Call | None = None,
               abandoned: Sequence[tuple[Any, Call]] = ()) -> None:
        """After the request: charge what its calls used and give the rest of its reservations back. The call
        `rec` records (`call`, when one answered) costs its usage at the price of the `model` that answered, as
        the ledger prices it; nothing when refused (an HTTP error status) or when no upstream answered; its worst
        case when its usage is unknown. Each call `abandoned` after its request went out (a first-byte timeout, a
        broken reply, a call under way when the client left: a record and its call) costs its worst case whatever
        the last call did. A call charged its worst case has its record say so (`_unknown`), whatever the ticket: the
        cost ledger books it so when no budget or rate limit covers the key too (before, probe p56 F1, such a call was
        booked 0 tokens and $0 then, though the provider bills it); only the counters need a reservation."""
        if ticket.charges and ticket.admitted is not None:
            # Counted on budget counters of the period of its admission: the events say when, so that the seed of a
            # counter of the next period (the ledger dates a call as it ends) leaves them out (budget_spend).
            stamp = ticket.admitted.isoformat(timespec="microseconds")
            for r in (rec, *(r for r, _ in abandoned)):
                r.attributes[ADMITTED_AT] = stamp
        spent = sum((self._unknown(ticket, r, c) for r, c in abandoned), ZERO)
        final = ticket.spent = self._final(ticket, rec, model, call)
        if not ticket.reserved:  # no policy applies, or nothing is held any more (a cache hit released it)
            return
        # Which call ran, and how far, unknown (the request failed in an unforeseen way): everything reserved stays spent.
        self._finish(ticket, ticket.cost if final is None else spent + final)

    def _final(self, ticket: Ticket, rec: Any, model: str, call: Call | None) -> Amount | None:
        """What the call `rec` records costs (settle); None when it is unknown which call ran."""
        # Usage the router did not believe (10^30 tokens, a negative count) is as none: no absurd number reaches
        # the counter (which would refuse everything for the rest of the period).
        believed = USAGE_WARNING not in rec.attributes
        if believed and call is not None and (doubt := self._doubt(ticket, rec, call)):
            rec.attributes[USAGE_WARNING] = f"usage not believed: {doubt}"
            believed = False
        if believed and (rec.input_tokens or rec.output_tokens):
            if call is not None and _cut_stream(ticket, rec):
                # A stream that stopped before its end reported a running count at most (vLLM's in every chunk when
                # the client asks `continuous_usage_stats`), not what the provider bills for what it generated
                # before it noticed the cut: its output is unknown. The input it reported stands where it is above
                # the estimate (one that only guesses). Before, probe p88 F1, a client leaving after 3 chunks was
                # charged 3 output tokens, and the ledger booked them.
                return self._unknown(ticket, rec, call, rec.input_tokens)
            # `model` may be none the request could reach: another model answered (Proxy._answered_by), at its price.
            price = ticket.prices[model] if model in ticket.prices else self.prices.get(model, ticket.price)
            return cost_of(price, rec.input_tokens, rec.output_tokens, rec.cached_tokens, rec.cache_write_tokens,
                           rec.cache_write_1h_tokens)
        if believed and rec.status != "ok" and ((rec.error_type.isdigit() and not may_have_generated(
                int(rec.error_type))) or rec.error_type in NOTHING_GENERATED):
            # Refused (an HTTP error status) or no upstream answered: what it abandoned is charged apart. A gateway's
            # timeout status (504, 524, 408) is no refusal: the answer may have been generated, and is charged below.
            return ZERO
        if call is not None:
            # Interrupted streams (cut, or ended by the provider's error event or a bad chunk after content
            # went out), a 200 whose body did not read, answers without usage: the provider may bill tokens
            # the router never counted.
            return self._unknown(ticket, rec, call)
        if rec.error_type in (CLIENT_DISCONNECTED, UPSTREAM_UNANSWERED):
            return ZERO  # the client left before any call answered: the one under way then is among `abandoned`
        return None

    def _doubt(self, ticket: Ticket, rec: Any, call: Call) -> str:
        """Why the counts `rec` reports for `call` are beyond what the call can be billed (its worst case), "" when
        they are not: a broken or lying count, charged the worst case instead (a `total_tokens` of 10^8 for
        `max_tokens: 5` spent a day's budget, probe p9; a `prompt_tokens` of 10^8 for "hi", probe p66 F3)."""
        assert ticket.req is not None  # an admitted ticket, whose calls are settled
        # More output than the call's own limit lets a provider generate (`n` choices of max tokens, reasoning
        # included). Without a limit the default is only a guess, and the count stands.
        if rec.output_tokens > (cap := most_output(ticket.req, ticket.max_fields, 0, (call.limits,))) > 0:
            return f"{rec.output_tokens} output tokens, more than the call's limit of {cap}"
        # More input than the body the call sent can hold, with what it points at: a token per byte at most, whatever
        # bytes_per_token a gateway file reserves at. Where the estimate is only a guess (a configured size, a hosted
        # tool's results: budgets.input_guessed), the count stands.
        most = input_estimate(call.body_bytes, ticket.req, min(self.file.bytes_per_token, 1.0), ticket.pointed)
        if rec.input_tokens > most and not input_guessed(ticket.req, ticket.pointed):
            return f"{rec.input_tokens} input tokens, more than the call's input estimate of {most}"
        return ""

    def release(self, ticket: Ticket) -> None:
        """Nothing was spent (a cache hit): give the whole reservation back."""
        if ticket.reserved:
            self._finish(ticket, ZERO)

    def _finish(self, ticket: Ticket, used: Amount) -> None:
        for counter, b, reserved in ticket.charges:
            self._allowance(counter).credit(reserved - b.need(used))
        ticket.charges = []
        if self.limiter:
            self.limiter.settle(ticket.tenant, ticket.app, ticket.key_id, ticket.cost.tokens, used.tokens,
                                self.clock())
            if self.limiter.owed and (self._refunding is None or self._refunding.done()):
                # At once rather than at the next sweep: the other replicas lease from the KV meanwhile.
                self._refunding = asyncio.get_running_loop().create_task(self._give_back_owed())
        ticket.cost = ZERO

    def _undo(self, ticket: Ticket) -> None:
        self._finish(ticket, ZERO)

    def _new_periods(self, wall: datetime) -> Periods:
        self._periods = Periods.at(wall)
        return self._periods

    def _allowance(self, counter: str) -> Allowance:
        a = self.allowances.get(counter)
        if a is None:
            a = self.allowances[counter] = Allowance()
        return a

    def _over_budget(self, b: Budget, counter: str, need: Amount, leased: Amount, model: str, max_out: int,
                     wall: datetime, asking: str = "this request") -> Refused:
        """The 429 saying what blocks: the request (`asking`) needs more than is left. What is left is the limit less
        what the store's counter holds leased, plus what this replica holds of it unreserved, less what calls here
        used beyond their reservations (a deficit the next lease charges to the counter first). Saying only the
        counter's figure read "0.000046 of 0.0005 USD spent or reserved, needs 0.000057", which seemed to fit."""
        pid = period_id(b.spec.period, wall)
        available = self._allowance(counter).available
        left = b.limit - leased + available
        dims = []
        if b.limits_usd:
            dims.append((_usd, "USD", left.usd, need.usd, b.limit.usd, available.usd,
                         f" ({model} prices, up to {max_out} output tokens)"))
        if b.limits_tokens:
            dims.append((str, "tokens", left.tokens, need.tokens, b.limit.tokens, available.tokens, ""))
        blocking = [d for d in dims if d[2] < d[3]]
        if not blocking:
            # What is left covers the request: concurrent requests here took this replica's allowance each time it
            # leased (_lease tries a few times). Never worded "needs N, more than the M left" with N <= M.
            return Refused(429, f"budget {b.describe()} has enough left for {asking}, but concurrent requests on this "
                                "replica took it first; retry", "insufficient_quota", "budget_exceeded",
                           {"Retry-After": "1"})
        used = []
        for fmt, unit, have, want, limit, held, priced in blocking:
            beyond = f", {fmt(-held)} {unit} of it used beyond reservations" if held < 0 else ""
            used.append(f"{asking} needs up to {fmt(want)} {unit}{priced}, more than the {fmt(max(have, 0))} "
                        f"{unit} left ({fmt(limit - have)} of {fmt(limit)} {unit} spent or reserved{beyond})")
        reset = _period_end(b.spec.period, wall)
        return Refused(
            429, f"budget {b.describe()} has too little left for {b.spec.period} {pid}: {'; '.join(used)}. "
                 f"It resets at {reset:%Y-%m-%d %H:%M} UTC.", "insufficient_quota", "budget_exceeded",
            {"Retry-After": str(max(1, math.ceil((reset - wall).total_seconds())))})

    # -- the shared counters -------------------------------------------------------------------------

    async def _lease(self, b: Budget, counter: str, need: Amount, counts: Scope) -> Amount | None:
        """Lease enough for `need` into this replica's allowance and take it: None when taken, else the
        store's counter when the budget cannot cover it (KVUnavailable when the store does not answer).
        `counts`: the traffic the counter counts, for seeding it (_seed)."""
        lock = self._locks.get(counter)
        if lock is None:
            lock = self._locks[counter] = asyncio.Lock()
        async with lock:  # one lease at a time per counter: the requests queued here share it
            if counter not in self._seeded:
                await self._seed(b, counter, counts)
            chunk = lease_chunk(b.need(b.limit), self.file.lease_fraction)
            for _ in range(4):
                allowance = self._allowance(counter)
                # An expired allowance that covers the request is renewed, not leased again (probe p38 F1).
                if allowance.renew(need, self.clock(), self.file.lease_s):
                    return None
                lacking = allowance.lacking(need)
                got, leased = await self._unabandoned(self._leased(counter, b.limit, lease_ask(
                    chunk, allowance.available, lacking), lacking, chunk))
                if got is None:
                    # While the store answered, requests here may have settled and given their unused reservations
                    # back: the allowance may now cover the request (the loop takes it), or lack less than the
                    # store has left (the loop leases that). Before, the request was refused as needing more
                    # than what was left, with that refilled allowance counted in what was left.
                    lacking = self._allowance(counter).lacking(need)
                    if grant(Counter(leased=leased), b.limit, lacking, lacking) is not None:
                        continue
                    return leased
            return None if self._allowance(counter).take(need, self.clock()) else leased

    async def _leased(self, counter: str, limit: Amount, ask: Amount, minimum: Amount, chunk: Amount
                      ) -> tuple[Amount | None, Amount]:
        """Lease a grant of `ask` (at least `minimum`) on the counter (`_cas`) and add it to this replica's allowance:
        (what was granted or None, the counter after)."""
        got, leased = await self._cas(counter, limit, ask, minimum)
        if got is not None:
            self._allowance(counter).add(got, self.clock(), self.file.lease_s, chunk)
        return got, leased

    async def _cas(self, counter: str, limit: Amount, ask: Amount, minimum: Amount | None) -> tuple[Amount | None,
                                                                                                   Amount]:
        """Add a grant (or, with minimum None, exactly `ask`, which may be negative) to the counter by
        compare-and-set on its revision: (what was added or None, the counter after)."""
        def step(current: Counter | None) -> tuple[Counter | None, tuple[Amount | None, Amount]]:
            if current is None:  # gone since _seed saw it (deleted, expired): counting from now, to be seeded
                self._seeded.discard(counter)
                current = Counter(since=self.wall())
            got = ask if minimum is None else grant(current, limit, ask, minimum)
            if got is None:
                return None, (None, current.leased)
            after = msgspec.structs.replace(current, leased=current.leased + got)  # keeps since and seeded
            return after, (got, after.leased)

        return await self.counters.update(counter, self._decode_counter, step, f"budget counter {counter}",
                                          "the budget store")

    async def _seed(self, b: Budget, counter: str, counts: Scope) -> None:
        """Create the counter if there is none (compare-and-set create: one replica's lands, counting from then), and
        add to it once what the cost ledger booked for the traffic it counts (`counts`) from its period's start to its
        creation: a budget added or renamed mid-period then holds the period's earlier spend. The ledger unreadable
        (no query service, a slow one), the counter counts from its creation and says so (`seeded` None), and a later
        lease asks the ledger again (after SEED_RETRY_S). Store failures raise as a lease's do."""
        if self.clock() < self._seed_after.get(counter, -math.inf):
            return
        what = f"budget counter {counter}"
        state: Counter = await self.counters.update(counter, self._decode_counter,
                                                    partial(create_step, now=self.wall()), what, "the budget store")
        if state.since is None or state.seeded is not None:  # seeded, or created before counters were
            self._seeded.add(counter)
            return
        start = period_start(b.spec.period, state.since)
        try:
            got = await queryclient.ask(self.bus, "budget_spend", {
                "since": start.isoformat(), "until": state.since.isoformat(), "tenant": counts.tenant,
                "app": counts.app, "key": counts.key}, into=LedgerSpend, timeout_s=self.file.store_timeout_s)
        except LockgateError as exc:
            self._seed_after[counter] = self.clock() + SEED_RETRY_S
            log.warning("%s counts from its creation (%s) only: the cost ledger's spend before it is not added yet "
                        "(asked again in %g s): %s", what, state.since.isoformat(), SEED_RETRY_S, exc.message)
            return
        spent = b.need(spend_amount(got.usd, got.tokens))
        await self.counters.update(counter, self._decode_counter,
                                   partial(seed_step, since=state.since, spent=spent), what, "the budget store")
        self._seeded.add(counter)
        self._seed_after.pop(counter, None)

    @staticmethod
    def _decode_counter(raw: bytes | None) -> Counter:
        return _counter_dec.decode(raw or b"{}")

    async def return_expired(self, force: bool = False) -> None:
        """Give allowances unused for `lease_s` (all of them with `force`), and what a live one holds above its lease
        chunk, back to the store."""
        now = math.inf if force else self.clock()
        if self.limiter:
            await self._return_shares(now)
        for counter, allowance in list(self.allowances.items()):
            back = allowance.surrender(now)
            if back == ZERO:
                if now >= allowance.expires and counter not in self._busy():
                    # Past periods and idle keys: forget them (a late settlement makes a fresh one).
                    self.allowances.pop(counter, None)
                    self._locks.pop(counter, None)
                    self._seeded.discard(counter)
                    self._seed_after.pop(counter, None)
                continue
            try:
                await self._cas(counter, ZERO, ZERO - back, None)
            except KVOutcomeUnknown as exc:
                # The give-back was sent and may have landed with only its answer late: sent again it could land
                # twice (the counter below the spend, the budget granting past its limit by a lease each time).
                # Its credit is dropped: stranded until the period ends (under-use); a deficit in it is kept and
                # charged again (counted twice at worst, the safe direction too).
                owed = back.clip(ZERO)
                self._allowance(counter).credit(owed)
                dropped = back - owed
                self.unconfirmed[counter] = self.unconfirmed.get(counter, ZERO) + dropped
                log.warning("budget counter %s: give-back of %s not confirmed, not sent again (it stays charged "
                            "until the period ends): %s", counter, dropped, exc.message)
            except KVUnavailable:  # nothing was sent: keep it, returned on a later sweep
                self._allowance(counter).credit(back)
                if force:
                    log.warning("budget counter %s: %s left leased to this replica at stop", counter, back)

    def _busy(self) -> set[str]:
        return {c for c, lock in self._locks.items() if lock.locked()}

    async def run(self) -> None:
        """Background: return expired allowances, and live ones' excess over a chunk, every half lease."""
        self.events.start()
        while True:
            await asyncio.sleep(self.file.lease_s / 2)
            try:
                await self.return_expired()
            except Exception:  # the sweep must outlive one bad turn
                log.exception("returning budget allowances failed")

    async def close(self) -> None:
        """Return every allowance and flush budget events (at stop)."""
        await self.shared()
        # Leases whose requests left land in the allowances first, to be returned with them.
        await asyncio.gather(*self._leasing, return_exceptions=True)
        if self._refunding is not None:
            await asyncio.gather(self._refunding, return_exceptions=True)
        if self.budgets or self.limiter:
            await self.return_expired(force=True)
        self.events.start()
        with contextlib.suppress(Exception):
            await self.events.close()

    # -- budget events ---------------------------------------------------------------------------------

    def _report(self, reason: str, b: Budget, counter: str, key: ApiKey, deployment: str, model: str,
                need: Amount, leased: Amount | None, wall: datetime) -> None:
        n = self._throttle.count(counter, reason, self.clock())
        if not n:
            return
        leased = leased or ZERO
        self.events.add(BudgetEvent(
            tenant=key.tenant, source="lockgate-router", reason=reason, budget=b.name, counter=counter,  # type: ignore[arg-type]
            period=b.spec.period, period_id=period_id(b.spec.period, wall), app=key.app, key_id=key.id,
            deployment=deployment, model=model, limit_usd=b.spec.usd, limit_tokens=b.spec.tokens,
            leased_usd=leased.usd / NANO, leased_tokens=leased.tokens, requested_usd=need.usd / NANO,
            requested_tokens=need.tokens, denied=n, fail_open=reason == "store_unavailable" and self.file.fail_open,
            replica=self.replica))

    async def _publish(self, events: list[BudgetEvent]) -> None:
        for e in events:
            await self.bus.publish(self.bus.subjects.budget(e.tenant), e)

    # -- response cache ------------------------------------------------------------------------------

    async def lookup(self, ticket: Ticket, operation: str, deployment: str, release: str, body: bytes, rec: Any,
                     headers: dict[str, str], shown_usage: bool = False) -> web.Response | None:
        """A cached answer for this request to `operation` (its path: one body sent to two operations has
        two answers) with the reservation released and the event marked as a hit, or None.
        `shown_usage`: a stream's client asked for the usage chunk (the upstream body always asks)."""
        spec = self.cache.spec(deployment)  # None when no gateway file opts the deployment in
        if spec is None or len(body) > MAX_KEYED_BYTES:  # its key would hold the event loop for its size
            return None
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return None
        if isinstance(data, dict) and data.get("stream"):
            data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": shown_usage}
        ticket.cache_key = (request_key(ticket.tenant, ticket.app, deployment, release, operation, data, spec)
                            if isinstance(data, dict) else None)
        if ticket.cache_key is None:
            return None
        entry = self.cache.get(ticket.cache_key, self.clock())
        if entry is None and spec.shared:
            entry = await self._shared_get(ticket.cache_key)
        if entry is None:
            headers["x-lockgate-cache"] = "miss"
            rec.attributes["cache"] = "miss"
            return None
        self.release(ticket)
        # What settlement charged for the miss, as the ledger booked it (before, probe p76 F3, its raw counts priced at
        # the name of the model that answered: a dated model's answer saved 0, a lying count 50 USD). An entry a replica
        # from before shared (no cost_nano) is priced from its counts, as then, for the rest of its TTL.
        saved = (entry.cost_nano if entry.cost_nano is not None else cost_of(
            self.prices.get(entry.model), entry.input_tokens, entry.output_tokens, entry.cached_tokens).usd)
        # Nothing was generated: the event carries no usage (so cost accounting charges nothing) and
        # says what the hit saved.
        rec.response_model = entry.model  # what it answered: the caller reads it from the body (rec.replayed)
        rec.attributes.update({"cache": "hit", "cost_saved": f"{saved / NANO:.9f}"})
        headers["x-lockgate-cache"] = "hit"
        # An id of its own, as every answer has one (the SDK's `request_id`, what a user quotes): not the stored
        # answer's, which named another request to its upstream.
        headers["x-request-id"] = own_request_id()
        ticket.cache_key = None
        if entry.content_type == EVENT_STREAM:  # a cached stream: its events in one body, as SSE
            headers["Cache-Control"] = "no-cache"
        return web.Response(body=entry.body, status=200, content_type=entry.content_type, headers=headers)

    def remember(self, ticket: Ticket, deployment: str, response: web.StreamResponse, rec: Any,
                 streamed: list[bytes] | None = None) -> None:
        """Keep a successful answer of a cacheable request for its deployment's TTL: a body, or the
        lines of a stream as the client received them (`streamed`). Not one a fallback served: the key is
        the chosen target's (a canary's release), whose answer it is not."""
        if ticket.cache_key is None or rec.status != "ok" or "lockgate.fallback_from" in rec.attributes:
            return
        spec = self.cache.spec(deployment)
        if streamed is not None:
            body: Any = b"".join(streamed)
            content_type = EVENT_STREAM
        elif isinstance(response, web.Response):
            body, content_type = response.body, "application/json"
        else:
            return
        if spec is None or not isinstance(body, bytes):
            return
        entry = Entry(body=body, expires=self.clock() + spec.ttl_s, model=rec.response_model,
                      input_tokens=rec.input_tokens, output_tokens=rec.output_tokens, cached_tokens=rec.cached_tokens,
                      content_type=content_type, cost_nano=(ticket.spent or ZERO).usd)
        if self.cache.put(ticket.cache_key, entry) and spec.shared and len(body) < _SHARED_MAX:
            task = asyncio.get_running_loop().create_task(self._shared_put(ticket.cache_key, entry))
            self._puts.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self._puts.discard)

    async def shared(self) -> None:
        """Wait until the answers being shared are in the bucket (for tests and a clean stop)."""
        await asyncio.gather(*self._puts, return_exceptions=True)

    async def _shared_get(self, key: str) -> Entry | None:
        """The entry another replica shared, kept locally too; None on a miss or a slow or absent store
        (a cache lookup never delays a request by more than _SHARED_WAIT_S)."""
        try:
            async with asyncio.timeout(_SHARED_WAIT_S):
                kv = await self._cache_kv()
                found = await kv.get(key)
        except (*KV_ERRORS, LockgateError):
            return None
        entry = from_shared(found.value or b"", self.clock(), self.wall_s())
        if entry is not None:
            self.cache.put(key, entry)
        return entry

    async def _shared_put(self, key: str, entry: Entry) -> None:
        try:
            async with asyncio.timeout(self.file.store_timeout_s):
                await (await self._cache_kv()).put(key, to_shared(entry, self.clock(), self.wall_s()))
        except (*KV_ERRORS, LockgateError) as exc:  # the answer was served; sharing it is best effort
            log.debug("response cache entry not shared: %r", exc)

    async def _cache_kv(self) -> Any:
        if self.bus is None or self.bus.state != "connected":
            raise KVUnavailable("bus not connected")
        if self._shared_kv is None:
            self._shared_kv = await self.bus.kv(self.bus.subjects.kv_response_cache)
        return self._shared_kv


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A lease write's outcome, retrieved: its request may have left, and what it raised is that request's alone (the
    store's failure is kept by CasStore for the next requests)."""
    if not task.cancelled():
        task.exception()


def _explained(message: str, pointed: Pointed) -> str:
    """A refusal's message, saying what part of the reservation is input the request only points at (a 2 KB
    request refused as "may use up to 200000 tokens" is otherwise a riddle)."""
    why = pointed.explain()
    return f"{message.rstrip('.')}. {why}" if why else message


# A refusal no retry changes: no Retry-After, and the openai SDK's own word not to retry (it otherwise retries a 429,
# after waiting a Retry-After of up to 2 minutes each time).
_NO_RETRY = {"x-should-retry": "false"}


def _too_large(b: Budget, need: Amount, model: str, max_out: int, lower: Callable[[], str],
               asking: str) -> Refused | None:
    """The 429 for a request (`asking`) that alone needs more than the budget's whole limit, None when it fits: no
    reset admits it, so it has no Retry-After. Before, it read "budget ... is exhausted ... needs up to 0.060059
    USD, more than the 0.050000 USD left (0.000000 of 0.050000 USD spent or reserved)" with a Retry-After until
    the period's end."""
    over = ([f"{_usd(need.usd)} USD ({model} prices, up to {max_out} output tokens), more than its whole limit of "
             f"{_usd(b.limit.usd)} USD"] if b.limits_usd and need.usd > b.limit.usd else []) + \
           ([f"{need.tokens} tokens (up to {max_out} of them output), more than its whole limit of "
             f"{b.limit.tokens} tokens"] if b.limits_tokens and need.tokens > b.limit.tokens else [])
    if not over:
        return None
    return Refused(429, f"budget {b.describe()} can never admit {asking}: it alone may use up to "
                        f"{' and '.join(over)}; {lower()}", "insufficient_quota", "request_too_large",
                   dict(_NO_RETRY))


def _usd(nano: int) -> str:
    return f"{nano / NANO:.6f}"


def _period_end(period: str, now: datetime) -> datetime:
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day + timedelta(days=1)
    first = day.replace(day=1)
    return (first + timedelta(days=32)).replace(day=1)


OPEN_ADMISSION = Admission(Settings(), None)  # no gateway file: every request admitted, nothing cached
