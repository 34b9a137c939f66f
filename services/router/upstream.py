"""The router's calls to upstream endpoints: timeouts, retries within a budget, circuit breakers and
the fallback chain (rules in resilience.py), plus the headers that cross in each direction.

upstream.py moves bytes; the providers translate them. Nothing here ever puts an upstream URL or
credential in a client-visible message: errors name endpoints by id, and an upstream's own error body
and the headers passed back have the endpoint's address replaced by its id, its credential (which an
upstream may quote back, in any form) and any other secret masked before they are passed on (`scrub`).
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from lockgate.contracts.inference import ROUTER_BUSY
from lockgate.endpoints import blended
from lockgate.errors import LockgateError
from lockgate.redact import MARK, MIN_SECRET, scrub_bytes, scrub_json, scrub_secrets
from lockgate.services.router import h1, resilience
from lockgate.services.router.endpoints import Endpoint, Endpoints
from lockgate.services.router.looplag import NO_LAG, LoopLag, Mark, NoLag
from lockgate.services.router.providers import Unsupported, provider
from lockgate.services.router.wire import own_request_id

# Request headers the client's SDK sends that the provider acts on (beta features, idempotent
# retries, SDK telemetry); the client's Authorization is lockgate's business and never forwarded.
# Not `OpenAI-Organization` nor `OpenAI-Project`: they choose whose account lockgate's credential bills, the
# endpoint's to say (`organization`, `project` in the endpoints file); a client's mismatched one made the provider
# answer 401, which is a 502 counted against the release: any app key could abort a good canary at will.
_FORWARD = ("OpenAI-Beta", "Idempotency-Key", "Accept")
_FORWARD_PREFIX = "x-stainless-"
_FORWARD_LOWER = frozenset(n.lower() for n in _FORWARD)
# Of those, the ones that may change the answer to one body: a beta feature, or a key under which a provider replays
# the first answer it gave (to another body too). A request carrying one is not the body alone: never cached, never
# digested for a recorded eval (probe p18 F3).
_SHAPING = ("OpenAI-Beta", "Idempotency-Key")
# Response headers the client needs to pace itself and to quote to the provider's support (OpenAI's
# processing time, API version and organization: what its SDK's users log next to the request id).
# Not `openai-organization`: the operator's provider account is none of an application's business. `x-should-retry`:
# the provider's word on whether the call is worth making again (OpenAI's and Anthropic's SDKs obey it before their
# own status rules): dropped before, a client retried an upstream's "don't" (probe p79 F2).
_RETURN = ("Retry-After", "retry-after-ms", "x-request-id", "openai-processing-ms", "openai-version", "x-should-retry")
_RETURN_PREFIX = "x-ratelimit-"
_RETURN_LOWER = frozenset(n.lower() for n in _RETURN)


def forward_headers(incoming: Mapping[str, str], out: dict[str, str]) -> None:
    """Copy the client's provider-facing request headers into `out`."""
    for name, value in incoming.items():
        # The first-letter test keeps this loop cheap: it runs on every request's every header.
        if name[0] in "aAiIoOxX" and ((low := name.lower()) in _FORWARD_LOWER or low.startswith(_FORWARD_PREFIX)):
            out[name] = value


def shapes_answer(incoming: Mapping[str, str]) -> bool:
    """Whether the client sent a header the router forwards that may change the answer to its body (`incoming`: the
    request's case-insensitive headers)."""
    return any(name in incoming for name in _SHAPING)


def returned_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """The upstream's rate-limit, retry and request-id headers, for the client."""
    out: dict[str, str] = {}
    for name, value in upstream.items():
        if name[0] in "rRxXoO" and ((low := name.lower()) in _RETURN_LOWER or low.startswith(_RETURN_PREFIX)):
            out[name] = value
    return out


def identified(passed: dict[str, str]) -> dict[str, str]:
    """`passed` (the upstream's headers for the client) with a request id of the router's own if the upstream gave
    none, as every OpenAI answer has one (the SDK's `request_id`, what a user quotes). Added after `passed_back`:
    the router's own random hex holds nothing to mask, and, scrubbed, every request paid a whole scrub for it (and
    filled the scrubber's memo of short texts with ids never seen again)."""
    if not any(name.lower() == "x-request-id" for name in passed):
        passed["x-request-id"] = own_request_id()
    return passed


class UpstreamUnavailable(LockgateError):
    """No endpoint in the chain answered: the client gets `http` (502, or 504 on a timeout).
    `earlier`: the failed calls besides the chosen hop's own (evidence, like Reply.earlier); `own`: the chosen
    hop's last failure, which the request's own event describes (a skip while its breaker was open, or a call);
    `code`: the error's code, when one says more than its type; `retry_after_s`: when a retry may be served."""

    def __init__(self, message: str, http: int, type_: str, earlier: list[Failed] | None = None,
                 own: Failed | None = None, code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.http = http
        self.type_ = type_
        self.earlier = earlier or []
        self.own = own
        self.code = code
        self.retry_after_s = retry_after_s


class ChunkTimeout(TimeoutError):
    """A stream went quiet for longer than its endpoint's between-chunks timeout."""


class TotalTimeout(TimeoutError):
    """A stream was still sending when the request's total time (`total_s`) ran out."""


class Lane(NamedTuple):
    """Whose calls one breaker on an endpoint counts: those for one model of one release of one tenant. The model is
    the release's (never a name the client picks, which would make a breaker per name; "" when the release passes
    the client's model through). The release is "" for a route of no release (passthrough, the default route), whose
    tenant is then the caller's. Keyed by the model alone, one breaker counted every tenant's and release's calls:
    another tenant's calls that its upstream failed opened it, held a canary's rollout for as long as they went on
    and had its requests, diverted to stable, charged as its failures (probe p27 F3, F3b)."""

    model: str = ""
    tenant: str = ""
    release: str = ""


class Hop(NamedTuple):
    """One place to send the request: the endpoint, the URL, body and headers as its provider takes
    them (with lockgate's credential for it alone), the caller's tag (its target) and the lane whose
    breaker on that endpoint its calls are counted by."""

    endpoint: Endpoint
    url: URL
    body: bytes
    headers: dict[str, str]
    tag: Any
    lane: Lane = Lane()


# How a request reaches one endpoint: (endpoint, body) -> (url, body, headers); raises Unsupported
# when the endpoint's provider cannot serve it.
Prepare = Callable[[Endpoint, bytes], tuple[URL, bytes, dict[str, str]]]
# Asked before a call that follows calls abandoned after their request went out (Failed.abandoned), with that
# call's hop and the abandoned ones': None when the request may make it, else why not (the call is not made).
# The caller's budgets reserved one call's worth, and each abandoned call may be billed in full.
Cover = Callable[[Hop, list[Hop]], Awaitable[str | None]]


class Underway:
    """What a send has done so far, for a caller cancelled before it returned (the client left): the hop whose call
    is under way (its connection being opened, its request sent, its answer awaited), else None, and the calls that
    failed before it. A call under way may be generating a whole answer the provider bills although nobody reads
    it (OpenAI does not stop a non-streamed generation when the connection drops)."""

    __slots__ = ("failures", "heard", "hop", "since", "started")

    def __init__(self) -> None:
        self.hop: Hop | None = None
        self.started = 0.0  # when the call under way began (the loop's clock)
        # The same as a mark of the router's loop-lag monitor, and when bytes of its answer last came in: how long its
        # upstream has been silent, less the holds of the loop that may have kept an answer unread (looplag).
        self.since = Mark(0.0, 0.0)
        self.heard = h1.Heard(NO_LAG.held_s)
        self.failures: list[Failed] = []

    @property
    def earlier(self) -> list[Failed]:
        """The failed calls (not the skips while a breaker was open), as Reply.earlier."""
        return [f for f in self.failures if f.kind != "breaker_open"]


class Reply:
    """The answer of the hop that served: status, body (non-streamed, or any non-200), the headers
    to pass on, and for a 200 stream its lines (those up to its first data line already read, so a retry or fallback
    was still possible until then and never after)."""

    __slots__ = ("_broken", "_deadline", "_first", "_lag", "_stall", "_stream", "attempts", "body", "charset",
                 "earlier", "fallback_from", "fallback_reason", "headers", "heard", "hop", "since", "started",
                 "status", "waiting")

    def __init__(self, hop: Hop, status: int, headers: dict[str, str], attempts: int,
                 fallback_from: Hop | None) -> None:
        self.hop = hop
        self.status = status
        self.headers = headers
        self.attempts = attempts
        self.fallback_from = fallback_from
        self.fallback_reason = ""
        # Calls that failed before this answer (retried or fallen back from): each is evidence about
        # its target (a canary's failures must not vanish behind a retry or stable's answer). A hop
        # skipped while its breaker is open made no call: the breaker is the endpoint's state, not
        # evidence about the release (a new canary on a recovering endpoint is not judged by it).
        self.earlier: list[Failed] = []
        self.body = b""
        self.charset = ""  # the charset the upstream's Content-Type named, kept when its body passes as it came
        self._stream: h1.Stream | None = None
        self._first: list[bytes] = []  # a stream's lines up to its first data line (`_first_data`)
        self._stall = 0.0
        self._deadline = 0.0
        self._broken: Callable[[], None] | None = None  # tells the endpoint's breaker the stream broke
        # When this hop's call began (the loop's clock; None: unknown, an answer `_give_up` passes on), so a fallback's
        # answer is timed from its own call, not from the calls that failed before it.
        self.started: float | None = None
        # The router's loop-lag monitor, whose marks `since` (when this hop's call began) and `waiting` are, and when
        # bytes of this call's answer last came in (on it): the upstream's silence is timed with them (looplag).
        self._lag: LoopLag | NoLag = NO_LAG
        self.since: Mark | None = None
        self.heard: h1.Heard | None = None
        # Since when a stream has been waiting for the upstream's next event with data, through its keep-alives (read or
        # handled); None while an event with data is being handled (its write is the client's time): a client that
        # hangs up during a long silence was let down by the upstream, not impatient.
        self.waiting: Mark | None = None

    def attributes(self) -> dict[str, str]:
        """Event attributes saying where the request was served and whether it fell back."""
        attrs = {"lockgate.endpoint": self.hop.endpoint.id}
        if self.attempts > 1:
            attrs["lockgate.attempts"] = str(self.attempts)
        if self.fallback_from is not None:
            attrs["lockgate.fallback_from"] = self.fallback_from.endpoint.id
            attrs["lockgate.fallback_reason"] = self.fallback_reason
        return attrs

    async def lines(self) -> AsyncIterator[bytes]:
        """The stream's lines; ChunkTimeout when the upstream stalls between two of them, TotalTimeout when
        the request's total time runs out first, BrokenReply when its connection fails."""
        stream = self._stream
        if stream is None:
            return
        for line in self._first:
            yield line
        stream.stall_after(self._stall, self._deadline)
        mark = self._lag.mark
        progress = h1.Progress()
        data = bool(self._first)  # the event under way has data (`_first` ends with the first data line)
        while True:
            # A keep-alive (a comment, a blank line, a ping) is no progress: the wait for the next data goes on across it
            # (probe p41 F1). It begins again once an event with data was handled.
            if self.waiting is None:
                self.waiting = mark()
            try:
                line = await stream.readline()
            except h1.Stalled:
                ep = self.hop.endpoint
                if asyncio.get_running_loop().time() >= self._deadline:
                    # The request's time ran out while the endpoint kept within its between-chunks bound: a
                    # long answer, not a failing endpoint. Counted against the breaker, long generations would
                    # open it and send healthy traffic to the fallback.
                    raise TotalTimeout(f"endpoint {ep.id} was still sending when the request's "
                                       f"{ep.timeouts.total_s:g} s in all (total_s) ran out") from None
                self._break()
                raise ChunkTimeout(f"endpoint {ep.id} sent nothing for {ep.timeouts.between_chunks_s:g} s "
                                   "(between_chunks_s)") from None
            except h1.BrokenReply:
                self._break()
                raise
            if not line:
                self.waiting = None
                return
            data = data or progress.line(line)
            if data:  # a line of an event with data, up to its blank line
                self.waiting = None
                data = bool(line.strip())
            yield line

    def _break(self) -> None:
        # A stream that stalls or breaks after its first byte is too late to retry, but it is a
        # failure of the endpoint all the same.
        if self._broken is not None:
            self._broken()
            self._broken = None

    def close(self) -> None:
        """Release the upstream connection; a stream left unfinished (the client went away, the
        upstream stalled) is closed, which cancels the upstream's generation."""
        if self._stream is not None:
            self._stream.release()
            self._stream = None

    async def __aenter__(self) -> Reply:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def _first_data(stream: h1.Stream) -> list[bytes]:
    """A stream's lines up to its first data line (h1.Progress), or to its end. The keep-alives of a queueing gateway
    (`: OPENROUTER PROCESSING`) are no answer: the call stays under way (a retry or fallback possible, its silence timed
    by `Rollouts.unanswered` and a hang-up) until a data line comes. Comments and the blank lines that end nothing are
    left out, so a long queue is not kept line by line; other fields stay (an event's `event:` line precedes its data).
    Before, the first line of any kind answered the call (probe p41)."""
    progress = h1.Progress()
    lines: list[bytes] = []
    while True:
        line = await stream.readline()
        if not line or progress.line(line):
            return [*lines, line] if line else lines
        if line.startswith(b":") or (not line.strip() and (not lines or not lines[-1].strip())):
            continue
        lines.append(line)


class _Health:
    """One endpoint's breakers, retry budget and first-byte latency (an exponentially weighted mean,
    for groups that choose by latency), shared by every request this replica sends there.

    A breaker per lane (Hop.lane: a release's model, of its tenant): a model that fails (a canary's new one,
    withdrawn or overloaded) is skipped alone, while the others on the same endpoint (stable's) keep being served
    and remain a canary's fallback; the calls one tenant or release makes, which its inputs may have the upstream
    fail, never open another's breaker. An endpoint that is down trips each lane's breaker in turn; retries stay
    budgeted per endpoint, the load they add is the endpoint's."""

    __slots__ = ("_breakers", "_spec", "budget", "latency_s", "policy", "throttled_until")

    def __init__(self, endpoint: Endpoint) -> None:
        self.latency_s: float | None = None
        # A 429 is no breaker failure (throttling, not sickness), so a group would put a throttled member first on
        # every request, each paying its retries and waits: until then (on Upstream.clock), the group ranks it last.
        self.throttled_until = 0.0
        self._spec = endpoint.breaker
        self._breakers: dict[Lane, resilience.Breaker] = {}
        self.budget = resilience.RetryBudget(endpoint.retry)
        self.policy = endpoint.retry.policy()

    def seen(self, lane: Lane) -> resilience.Breaker | None:
        """The breaker of the calls of `lane`, if any was made here (read only: none is made)."""
        return self._breakers.get(lane)

    def breaker(self, lane: Lane) -> resilience.Breaker:
        """The breaker of the calls of `lane` (made on first use)."""
        found = self._breakers.get(lane)
        if found is None:
            found = self._breakers[lane] = resilience.Breaker(self._spec)
        return found


# Calls given up on after their request went out (`Failed.abandoned`).
_ABANDONED = frozenset({"first_byte", "broken_reply"})


class Failed(NamedTuple):
    """One hop that did not serve: a failed call, or a skip while its breaker was open."""

    hop: Hop
    kind: str  # "connect", "connect_timeout", "first_byte", "broken_reply", "breaker_open", or "http"
    status: int = 0
    body: bytes = b""
    headers: dict[str, str] | None = None
    elapsed_s: float = 0.0
    retry_in_s: float = 0.0  # a skip: when its breaker may let a call through again

    def reason(self) -> str:
        """For the event: why this hop was left (an HTTP status or the kind of failure)."""
        return str(self.status) if self.kind == "http" else self.kind

    @property
    def abandoned(self) -> bool:
        """The request went out and its answer was given up on (no first byte in time, a broken reply), or a gateway
        in front of the provider gave up on it (a 504, 524 or 408: resilience.MAY_HAVE_GENERATED): the provider may
        have generated, and bill, the whole answer, which the router never saw. Before, probe p60 F4, such a 504 was
        charged nothing and retried: 9 answers the provider billed against a budget that admitted 5."""
        return self.kind in _ABANDONED or (self.kind == "http" and resilience.may_have_generated(self.status))


class Upstream:
    """Sends requests along a fallback chain; one per router, holding the connection pool."""

    def __init__(self, session: aiohttp.ClientSession | None = None,
                 clock: Callable[[], float] = time.monotonic, draw: Callable[[], float] = random.random,
                 pool: h1.H1Pool | None = None) -> None:
        self.session = session  # the shadow's copies and `/v1/models` go through aiohttp
        # The requests themselves, streamed or not: a lighter keep-alive client (h1.py), its slots per endpoint.
        self.pool = pool if pool is not None else h1.H1Pool()
        self.draw = draw  # for a group's exploration share
        # Breakers and budgets read this clock (swappable so tests move time past a cooldown);
        # the request's own deadlines are the event loop's timers.
        self.clock = clock
        # The router's loop-lag monitor (its start sets one): the upstream's silence is timed on its clock.
        self.lag: LoopLag | NoLag = NO_LAG
        self._health: dict[str, _Health] = {}

    def health(self, endpoint: Endpoint) -> _Health:
        """This replica's breaker and budget for an endpoint (made on first use)."""
        found = self._health.get(endpoint.id)
        if found is None:
            found = self._health[endpoint.id] = _Health(endpoint)
        return found

    def members(self, endpoints: Endpoints, endpoint_id: str) -> list[str]:
        """The endpoint ids to try for a release's endpoint: itself, or a group's members best first."""
        group = endpoints.groups.get(endpoint_id)
        if group is None:
            return [endpoint_id]
        prices = {m: blended(endpoints.by_id[m].price) for m in group.endpoints}
        latencies = {m: h.latency_s if (h := self._health.get(m)) is not None else None for m in group.endpoints}
        ranked = resilience.rank(group.endpoints, group.choose, prices, latencies, group.explore, self.draw())
        now = self.clock()
        return sorted(ranked, key=lambda m: (h := self._health.get(m)) is not None and h.throttled_until > now)

    def refused_for(self, endpoint_ids: Iterable[str], lane: Lane) -> float | None:
        """For how many seconds the breakers of `lane` on every one of `endpoint_ids` have been refusing calls (the
        latest opening of them), or None when any would let one through now (or has never failed here)."""
        now = self.clock()
        ago: float | None = None
        for eid in endpoint_ids:
            h = self._health.get(eid)
            breaker = h.seen(lane) if h is not None else None
            if breaker is None or not breaker.refusing(now):
                return None
            ago = now - breaker.opened_at if ago is None else min(ago, now - breaker.opened_at)
        return ago

    async def close(self) -> None:
        """Close the connection pools."""
        self.pool.close()
        if self.session is not None:
            await self.session.close()

    async def send(self, hops: Sequence[Hop], headers: dict[str, str], *, stream: bool,
                   cover: Cover | None = None, underway: Underway | None = None) -> Reply:
        """The first good answer along `hops`, retrying each within its budget.

        Returns the serving hop's Reply (a 200, or a client error the upstream gave, passed on as
        it is, or the last hop's 429/5xx when every hop failed with one); raises UpstreamUnavailable
        when no hop answered at all, or when `cover` refuses a call after an abandoned one (a 504).
        `underway`: kept up to date with the call in flight and the failures so far.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hops[0].endpoint.timeouts.total_s
        underway = underway if underway is not None else Underway()
        failures = underway.failures
        attempts = 0
        for hop in hops:
            h = self.health(hop.endpoint)
            breaker = h.breaker(hop.lane)
            if not breaker.allow(now := self.clock()):
                failures.append(Failed(hop, "breaker_open", retry_in_s=breaker.retry_in(now)))
                continue
            if cover is not None and (gone := [f.hop for f in failures if f.abandoned]):
                refused = await cover(hop, gone)
                if refused is not None:
                    breaker.abandon()  # no call: a half-open probe slot goes back
                    self._not_covered(hops, failures, hop, refused)
            h.budget.request(self.clock())
            tries = 0
            while True:
                tries += 1
                slot = await self._slot(failures, hop, breaker, deadline)
                attempts += 1
                verdict: bool | None = None
                since = underway.since = self.lag.mark()
                started = underway.started = since.at
                heard = underway.heard = h1.Heard(self.lag.held_s, sse=stream)
                underway.hop = hop
                try:
                    reply, failed = await self._try(hop, headers, stream, deadline, breaker, heard, slot)
                    underway.hop = None  # answered or failed: no longer in flight (a failure is in `failures`)
                    verdict = failed is None or (failed.kind == "http" and not resilience.breaker_failure(failed.status))
                finally:
                    # A cancelled call (the client left) gives no verdict: only free a half-open probe.
                    if verdict is None:
                        breaker.abandon()
                    else:
                        breaker.record(self.clock(), verdict)
                if failed is None:
                    assert reply is not None
                    took = loop.time() - started
                    h.latency_s = took if h.latency_s is None else 0.8 * h.latency_s + 0.2 * took
                    reply.attempts, reply.started, reply.since, reply.heard = attempts, started, since, heard
                    reply.earlier = [f for f in failures if f.kind != "breaker_open"]
                    if hop is not hops[0]:
                        reply.fallback_from, reply.fallback_reason = hops[0], failures[0].reason()
                    return reply
                failures.append(failed._replace(elapsed_s=loop.time() - started))
                after = resilience.retry_after_s(failed.headers, time.time()) if failed.headers is not None else None
                if failed.status == 429:
                    h.throttled_until = self.clock() + (after if after is not None else hop.endpoint.breaker.cooldown_s)
                wait = None
                # A call given up on is not made again: a hung upstream would have a second wait as long as the first,
                # and either may have generated (and bill) the answer. Fall back. A gateway's timeout status is retried
                # as any 5xx, but only once the request's budgets cover the abandoned calls and the retry (`cover`).
                # Nor one the upstream said is not worth making again (`x-should-retry: false`: an exhausted quota, a
                # failure the same call repeats); another endpoint is another call, so the fallback still is.
                if (failed.kind not in _ABANDONED and breaker.state == "closed"
                        and not resilience.told_not_to_retry(failed.headers)):
                    wait = resilience.retry_wait(hop.endpoint.retry, tries, after, deadline - loop.time(), h.policy)
                if wait is None or not h.budget.spend(self.clock()):
                    break
                if failed.abandoned and cover is not None and await cover(hop, [f.hop for f in failures
                                                                                if f.abandoned]) is not None:
                    break  # not covered: no retry; a fallback asks again (and is refused), else the 504 is passed on
                await asyncio.sleep(wait)  # backoff before the retry, not synchronisation
            if deadline <= loop.time():
                break
        return self._give_up(hops, failures, attempts)

    async def _slot(self, failures: list[Failed], hop: Hop, breaker: resilience.Breaker, deadline: float) -> h1.Slot:
        """A slot of the pool for a call of `hop`, before the call's timing starts (its wait is no silence of the
        upstream's), waited for as long as a connection (`connect_s`) at most; else the request ends in a 503 of the
        router's (`_busy`). Not a fallback: the answer of another endpoint or arm would be charged to this hop's as
        its failure, and the capacity it lacked is the router's, not the release's."""
        ep = hop.endpoint
        wait_s = max(0.0, min(ep.timeouts.connect_s, deadline - asyncio.get_running_loop().time()))
        try:
            return await self.pool.slot(ep.id, hop.lane.tenant or "", wait_s)
        except h1.NoSlot as exc:
            breaker.abandon()  # no call: a half-open probe slot goes back
            self._busy(failures, hop, exc, wait_s)
        except BaseException:
            breaker.abandon()
            raise

    async def _try(self, hop: Hop, headers: dict[str, str], stream: bool, deadline: float,
                   breaker: resilience.Breaker, heard: h1.Heard, slot: h1.Slot) -> tuple[Reply | None, Failed | None]:
        """One call: a Reply when the hop answered with a 200 or a client error, else how it failed.
        A 200 stream is answered once its first data line came (keep-alives are no answer: first_byte_s bounds the wait
        for it), so a retry or fallback is possible until then and never after; the connect bound is the pool's, the
        others are the loop's timers."""
        ep = hop.endpoint
        loop = asyncio.get_running_loop()
        if hop.headers:  # the provider's own headers and lockgate's key for this endpoint, for it alone
            headers = {**headers, **hop.headers}
        opened: h1.Stream | None = None
        try:
            async with asyncio.timeout_at(min(loop.time() + ep.timeouts.first_byte_s, deadline)):
                opened = await self.pool.open(hop.url, hop.body, headers, ep.timeouts.connect_s, heard, slot)
                streaming = stream and opened.status == 200
                if streaming:
                    first = await _first_data(opened)
                else:
                    body = await opened.read()
        except h1.ConnectTimedOut:
            return None, Failed(hop, "connect_timeout")
        except h1.ConnectFailed:
            return None, Failed(hop, "connect")
        except (h1.BrokenReply, TimeoutError) as exc:
            if opened is not None:
                opened.release()
            return None, Failed(hop, "broken_reply" if isinstance(exc, h1.BrokenReply) else "first_byte")
        except BaseException:
            if opened is not None:
                opened.release()
            raise
        status = opened.status
        passed = identified(passed_back(provider(ep.provider).returned(opened.headers, returned_headers(opened.headers)),
                                        ep))
        if not streaming:
            opened.release()
            if status != 200 and resilience.retryable_status(status):
                return None, Failed(hop, "http", status, body, passed)
        reply = Reply(hop, status, passed, 1, None)
        reply.charset = _charset(opened.headers)
        if streaming:
            reply._stream, reply._first, reply._lag = opened, first, self.lag
            reply._stall, reply._deadline = ep.timeouts.between_chunks_s, deadline
            reply._broken = lambda: breaker.record(self.clock(), False)
        else:
            reply.body = body if status == 200 else scrub(body, ep)
        return reply, None

    @staticmethod
    def _split(hops: Sequence[Hop], failures: list[Failed]) -> tuple[Failed, list[Failed]]:
        """The request's own failure (the chosen hop's last) and the other calls, which are evidence."""
        own = max(i for i, f in enumerate(failures) if f.hop is hops[0])
        return failures[own], [f for i, f in enumerate(failures) if i != own and f.kind != "breaker_open"]

    def _not_covered(self, hops: Sequence[Hop], failures: list[Failed], hop: Hop, why: str) -> NoReturn:
        """The 504 of a request whose next call the caller would not cover after an abandoned one."""
        own, earlier = self._split(hops, failures)
        gone = ", ".join(dict.fromkeys(f.hop.endpoint.id for f in failures if f.abandoned))
        raise UpstreamUnavailable(f"the call to endpoint {gone} was given up on (no answer within its first-byte "
                                  "timeout, a broken reply, or a gateway's timeout status: 504, 524 or 408) and is "
                                  "charged as if it generated its whole answer; "
                                  f"its fallback {hop.endpoint.id} was not called: {why}",
                                  504, "upstream_timeout", earlier, own, code="fallback_not_covered")

    @staticmethod
    def _busy(failures: list[Failed], hop: Hop, exc: h1.NoSlot, waited_s: float) -> NoReturn:
        """The 503 of a request whose call found no slot of the router's for its endpoint in time: the router's own
        capacity (`ROUTER_BUSY`, no evidence of the release). The calls made before it are evidence, each its own
        event (`earlier`), the chosen hop's too: the request's own event is the router's refusal."""
        earlier = [f for f in failures if f.kind != "breaker_open"]
        ep = hop.endpoint
        if exc.mine >= exc.share < exc.limit:
            # The tenant's own share is what it lacks (the others' requests may have the rest).
            which = (f"all in use for your tenant ({exc.mine}, the share of one tenant; {exc.in_use} of {exc.limit} "
                     "in all)")
        else:
            which = f"all in use ({exc.in_use} of {exc.limit}, {exc.mine} of them for your tenant)"
        raise UpstreamUnavailable(f"the router's connections to endpoint {ep.id} are {which}, and none came free "
                                  f"within {waited_s:g} s; retry later", 503, ROUTER_BUSY, earlier, None,
                                  code="upstream_connections_full",
                                  retry_after_s=1.0)

    def _give_up(self, hops: Sequence[Hop], failures: list[Failed], attempts: int) -> Reply:
        """Every hop failed: the last upstream answer if there was one, else a 502/504 naming endpoints."""
        tried = ", ".join(dict.fromkeys(f.hop.endpoint.id for f in failures))
        calls = [f for f in failures if f.kind != "breaker_open"]
        last = calls[-1] if calls else None
        own, earlier = self._split(hops, failures)
        answered = next((f for f in reversed(failures) if f.kind == "http"), None)
        if answered is not None:
            reply = Reply(answered.hop, answered.status, answered.headers or {}, attempts,
                          hops[0] if answered.hop is not hops[0] else None)
            reply.fallback_reason = failures[0].reason()
            reply.earlier = [f for f in failures if f is not answered and f.kind != "breaker_open"]
            reply.body = scrub(answered.body, answered.hop.endpoint)
            return reply
        if last is None:
            skipped = ", ".join(dict.fromkeys(f"{f.hop.endpoint.id} for model {f.hop.lane.model!r}" if f.hop.lane.model
                                              else f.hop.endpoint.id for f in failures))
            # Told when to come back (Retry-After): the soonest a breaker of the chain lets a call through.
            raise UpstreamUnavailable(f"endpoint {skipped} is failing and skipped (circuit breaker open); "
                                      "retry later", 502, "upstream_circuit_open", earlier, own,
                                      retry_after_s=min(f.retry_in_s for f in failures))
        ep = last.hop.endpoint
        if last.kind == "connect":
            raise UpstreamUnavailable(f"endpoint {ep.id} is unreachable (tried: {tried})", 502,
                                      "upstream_unreachable", earlier, own)
        if last.kind == "connect_timeout":
            raise UpstreamUnavailable(f"endpoint {ep.id} did not accept a connection within "
                                      f"{ep.timeouts.connect_s:g} s (tried: {tried})", 504, "upstream_timeout", earlier,
                                      own)
        if last.kind == "broken_reply":
            # Not a timeout (before, it was told as one, and an operator looked for a slow upstream): the connection
            # was reset or closed, or the answer was not HTTP, after the request went out.
            raise UpstreamUnavailable(f"endpoint {ep.id} broke off before answering (the connection was reset or "
                                      f"closed, or its reply was not valid HTTP) (tried: {tried})", 502,
                                      "upstream_broken_reply", earlier, own)
        raise UpstreamUnavailable(f"endpoint {ep.id} did not answer within {ep.timeouts.first_byte_s:g} s "
                                  f"(first byte) or the request's {hops[0].endpoint.timeouts.total_s:g} s in all "
                                  f"(tried: {tried})", 504, "upstream_timeout", earlier, own)


def chain(endpoints: Endpoints, starts: Sequence[tuple[str, bytes, Any, Lane]], prepare: Prepare,
          members: Callable[[str], list[str]] = lambda eid: [eid]) -> list[Hop]:
    """The hops for a request: each start (endpoint id, body, tag, Hop.lane), the chosen target first,
    then its named fallbacks, then the next start's, each prepared for its endpoint's provider. A start
    naming a group becomes its members, best first (`members`). The first hop must be configured
    and able to serve the request (UnknownEndpoint, Unsupported); a later one that is not (a stale
    stable route, a fallback speaking a provider without this operation) is left out. Each start's hops are capped
    on their own (`fallback_chain`'s limit): before, the cap counted the canary's and stable's together, so a canary
    whose endpoint had a chain of 3 fallbacks (or was a group of 4) filled it, and a failing canary answered 502
    while stable was healthy."""
    expanded: list[tuple[str, bytes, Any, Lane]] = []
    ids: list[tuple[int, str]] = []
    for eid, body, tag, lane in starts:
        first, own = len(expanded), members(eid)
        expanded += [(m, body, tag, lane) for m in own]
        ids += [(first + i, hop) for i, hop in resilience.fallback_chain(own, endpoints.fallbacks)]
    starts = expanded
    hops: list[Hop] = []
    for position, (index, eid) in enumerate(ids):
        if position == 0 or eid in endpoints.by_id:
            _, body, tag, lane = starts[index]
            endpoint = endpoints.get(eid)
            try:
                url, prepared, headers = prepare(endpoint, body)
            except Unsupported:
                if position == 0:
                    raise
                continue
            hops.append(Hop(endpoint, url, prepared, headers, tag, lane))
    return hops


def _charset(headers: Mapping[str, str]) -> str:
    """The `charset` parameter of a Content-Type header (`application/json; charset=utf-8`), else ""."""
    for name, value in headers.items():
        if name.lower() == "content-type":
            for param in value.split(";")[1:]:
                key, _, val = param.partition("=")
                if key.strip().lower() == "charset":
                    return val.strip().strip('"')
    return ""


_MARK = MARK.encode()


def scrub(body: bytes, endpoint: Endpoint) -> bytes:
    """An upstream error body (or a stream's line, or a header's value) as a client, log or event may see it: the
    endpoint's credential replaced by a marker (an upstream or a proxy in front of it may quote the Authorization it
    received), its address by its id (URLs stay internal), and whatever else the project's secret patterns find
    masked. The address in each spelling `_address` knows, so an address on a default port
    (`https://llm.internal/v1`, which names no port), a message naming only the host, or the upstream naming
    itself `localhost:8000` is replaced too."""
    keys = _keys(endpoint)
    for secret in _credential_forms(keys):
        body = body.replace(secret, _MARK)
    url = endpoint.url
    if url.host:
        hints, address = _address(url.host, url.port or 0)
        lowered = body.lower()
        # The usual error names neither the port nor the host: no pattern search for it.
        if any(hint in lowered for hint in hints):
            body = address.sub(lambda m: _named(m, endpoint.id), body)
    if b"\\" in body:
        # JSON may write any character of the key escaped (.NET's encoder writes `+` as `\u002B`, another all of
        # them): no list of forms covers that, so a JSON body, or a stream's `data:` line, is read as what it says.
        body = _decoded(body, keys)
    return scrub_bytes(body)


# Names an upstream may call itself by on its own machine (`listening on localhost:8000`): with the endpoint's port
# they are its address too.
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
# Whatever joins a host to a port: `:`, percent-encoded once or twice (a URL quoted in a query, then quoted again),
# the full-width colon (raw, or as JSON writes it).
_JOINS = rb"(?::|%3A|%253A|\xef\xbc\x9a|\\uff1a)"
# Any host an upstream may name itself by, before a port: a name or IPv4 address in any form (`0.0.0.0`, `127.1`,
# `2130706433`, its pod or machine name, which the configured URL never holds), whole (never the end of a longer
# word), or an IPv6 address in brackets in any form (`[0:0:0:0:0:0:0:1]`, `[::ffff:10.0.0.7]`), raw or encoded.
_NAME = rb"(?P<host>[A-Za-z0-9._-]+)"
_BRACKETED = rb"\[[0-9A-Fa-f:.]+(?:%[0-9A-Za-z._-]+)?\]|%5B(?:[0-9A-Fa-f.]|%3A)+%5D"
_SCHEME = rb"https?(?:://|:\\/\\/|%3A%2F%2F|%253A%252F%252F)"
# A bare number before a port is a count or a time (`3:8000`), not a host; a decimal IPv4 address has 8 digits and more.
_SHORTEST_NUMERIC_HOST = 8


def _named(match: re.Match[bytes], endpoint_id: str) -> bytes:
    """The replacement of one address `_address` found: the endpoint's id, never a bare number joined to the port."""
    host = match["host"]
    if host is not None and host.isdigit() and len(host) < _SHORTEST_NUMERIC_HOST:
        return match[0]
    return f"{'port of ' if match['said'] else ''}endpoint {endpoint_id}".encode()


@functools.lru_cache(maxsize=256)
def _address(host: str, port: int) -> tuple[tuple[bytes, ...], re.Pattern[bytes]]:
    """An endpoint's address in each spelling an error may use, any letter case, an `http(s)` scheme before it or
    not: any host joined to the endpoint's port (`_NAME`, `_BRACKETED`, `_JOINS`: an upstream names itself by its
    listener `0.0.0.0:8000`, its machine's name or any spelling of loopback, and a URL may be quoted once or twice),
    `port 8000` in words, the URL JSON-escaped (`http:\\/\\/host:port`), and the endpoint's own host alone (a
    default port, which the URL does not name, or a message naming only the host). With it, what each spelling holds
    in lower case (the port, or the host alone): a body holding none of them is not searched."""
    own = f"[{host}]" if ":" in host else host  # an IPv6 address is written in brackets before a port

    def forms(*names: str) -> list[str]:
        return sorted({form for name in names for form in (name, quote(name, safe=""))}, key=len, reverse=True)

    def spelled(*names: str) -> bytes:
        return "|".join(map(re.escape, forms(*names))).encode()

    number = rb"0*%d(?![0-9])" % port  # the port, a leading zero or not, never the start of a longer number
    # A name starts after a scheme or where no longer word goes on (`ip6-localhost` whole, never `localhost` of it).
    pattern = (rb"(?:%s|(?<![A-Za-z0-9._-]))%s%s%s|" % (_SCHEME, _NAME, _JOINS, number)
               + rb"(?:%s)?(?:%s|%s)%s%s|" % (_SCHEME, _BRACKETED, spelled(own, *_LOOPBACK), _JOINS, number)
               + rb"(?:%s)?(?:%s)(?:%s%s)?|" % (_SCHEME, spelled(own, host), _JOINS, number)
               + rb"(?P<said>(?<![A-Za-z])port\s*[:=#]?\s*%s)" % number)
    hints = (str(port).encode(), *(form.lower().encode() for form in forms(own, host)))
    return hints, re.compile(pattern, re.IGNORECASE)


def _decoded(body: bytes, keys: frozenset[str]) -> bytes:
    """A JSON body (or `data: <JSON>` line) with the keys and secrets masked in each string it holds."""
    start = 5 if body.startswith(b"data:") else 0
    data = body[start:].strip()  # the line's spaces and newline are kept as they were
    start = body.index(data, start) if data else len(body)

    def mask(text: str) -> str:
        for key in keys:
            text = text.replace(key, MARK)
        return scrub_secrets(text)

    text = data.decode("utf-8", "surrogateescape")
    masked = scrub_json(text, mask)
    if masked == text:
        return body
    return body[:start] + masked.encode("utf-8", "surrogateescape") + body[start + len(data):]


def passed_back(headers: dict[str, str], endpoint: Endpoint) -> dict[str, str]:
    """The upstream's headers for the client (`returned_headers`, mapped by the provider) with the endpoint's
    credential, address and other secrets masked in their values, as in an error body: an upstream, or a proxy or
    gateway in front of it, may echo the Authorization it received in `x-request-id` or a rate-limit header."""
    # One scrub of them all for the usual answer, whose values hold nothing to mask; values too short to hold a
    # secret or the key (rate-limit counts, `6ms`) are left out of it.
    shortest = min([MIN_SECRET, *map(len, _keys(endpoint))])
    joined = "\n".join(v for v in headers.values() if len(v) >= shortest).encode("utf-8", "surrogateescape")
    if not joined or scrub(joined, endpoint) == joined:
        return headers
    return {name: scrub(value.encode("utf-8", "surrogateescape"), endpoint).decode("utf-8", "surrogateescape")
            for name, value in headers.items()}


def _keys(endpoint: Endpoint) -> frozenset[str]:
    """The keys lockgate sends the endpoint: each credential header's value without its `Bearer ` (so `Bearer
    <key>` becomes `Bearer [REDACTED]` and a bare quote is masked too)."""
    values = [*endpoint.auth_headers.values(), endpoint.authorization or ""]
    return frozenset({v.removeprefix("Bearer ") for v in values} - {""})


@functools.lru_cache(maxsize=256)
def _credential_forms(keys: frozenset[str]) -> list[bytes]:
    """The keys as an echo may quote them: raw; as a JSON string holds them (a `"` or `\\` escaped), also with `/`
    written `\\/` (PHP's json_encode and several Java and .NET serializers do so by default, and base64 keys hold
    `/`); and percent-encoded (a URL or form quoting the key), with upper and lower-case hex digits."""
    forms: set[bytes] = set()
    for key in keys:
        as_json = msgspec.json.encode(key)[1:-1]
        quoted = {quote(key, safe=""), quote(key)}
        forms |= {key.encode(), as_json, as_json.replace(b"/", b"\\/"),
                  *(q.encode() for q in quoted), *(_PERCENT.sub(lambda m: m[0].lower(), q).encode() for q in quoted)}
    return sorted(forms, key=len, reverse=True)  # the longer first: a form inside another never half-replaces it


_PERCENT = re.compile("%[0-9A-F]{2}")
