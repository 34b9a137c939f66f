"""Calls an endpoint for every case: pooled, bounded, retried. An OpenAI-compatible endpoint is called as it
is; an Anthropic Messages one through the translation the router serves it with (lockgate.anthropicwire), so
a gate judges the answers the router would serve."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import aiohttp
import msgspec

from lockgate import anthropicwire
from lockgate.errors import LockgateError, UpstreamError
from lockgate.llmwire import Completion as WireCompletion
from lockgate.llmwire import Usage, decode_completion
from lockgate.redact import MARK, shown_url
from lockgate.retry import RetryPolicy
from lockgate.services.evaluator import calibrated, domain

T = TypeVar("T")
# The most of an answer the evaluator reads, in bytes (decompressed): far above a chat completion of the longest
# context with its log probabilities (a few MB), so only a broken or hostile endpoint passes it. Unbounded, one
# answer of 300 MB took an embedded stack from 561 MB to 7 GB and held every tenant's router 15-60 s (probe p52 F2);
# bounded, a run holds at most its concurrency times this. The judge is read through the same call.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
ERROR_TEXT_BYTES = 800  # what is read of an error status's body, for the 200 characters its message quotes
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})  # 529: Anthropic is overloaded


@dataclass(frozen=True)
class Completion:
    """One successful chat completion."""

    text: str
    latency_ms: float
    input_tokens: int = 0
    output_tokens: int = 0
    cached: bool = False
    logprobs: tuple[float, ...] | None = None  # token logprobs, when asked for and returned


@dataclass(frozen=True)
class CallPolicy:
    """Timeouts and retries for one eval run."""

    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 5.0

    def retry(self) -> RetryPolicy:
        """The shared retry policy with these limits (max_retries retries after the first try)."""
        return RetryPolicy(attempts=self.max_retries + 1, initial_s=self.backoff_s, max_s=self.max_backoff_s)


class UpstreamRefused(UpstreamError):
    """The endpoint answered with an error status (401, 429, 5xx ...): it generated nothing to bill."""


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, timeout, connection reset); `status` when the endpoint answered."""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class _OpenAI:
    """An OpenAI-compatible endpoint: chat completions as they are."""

    path = "/chat/completions"
    headers: dict[str, str] = {}

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        return body

    def completion(self, data: bytes) -> WireCompletion:
        return decode_completion(data)


class _Anthropic:
    """An Anthropic Messages endpoint, asked and read through the router's own translation."""

    path = "/messages"
    headers = {"anthropic-version": anthropicwire.VERSION}

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        return anthropicwire.request(body)  # Untranslatable (log probabilities, n > 1) as the router refuses them

    def completion(self, data: bytes) -> WireCompletion:
        msg = msgspec.json.decode(data)
        if not isinstance(msg, dict) or msg.get("type") != "message":
            raise msgspec.DecodeError("not an Anthropic message")
        try:
            return msgspec.convert(anthropicwire.response(msg), WireCompletion)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a message of the wrong shape
            raise msgspec.DecodeError(f"not an Anthropic Messages answer: {exc!r}") from None


_WIRES: dict[str, _OpenAI | _Anthropic] = {"openai": _OpenAI(), "anthropic": _Anthropic()}


async def complete(
    session: aiohttp.ClientSession, endpoint: str, model: str, messages: list[dict[str, str]], policy: CallPolicy,
    params: dict[str, Any] | None = None, headers: Mapping[str, str] | None = None, provider: str = "openai",
) -> Completion:
    """One chat completion with retries and exponential backoff; raises UpstreamError when it gives up
    (UpstreamRefused when the endpoint's last answer was an error status). `headers` carry the endpoint's
    credential: never in an error message. `provider` is the endpoint's (endpoints.Access.provider)."""
    wire = _WIRES[provider]  # the allow-list admits no other provider
    url = endpoint.rstrip("/") + wire.path
    shown = shown_url(url)  # an endpoint may carry its credential (userinfo, `?api-key=`): messages name this
    body = wire.request({"model": model, "messages": messages, "temperature": 0, **(params or {})})
    retry = policy.retry()
    last: _Transient | None = None

    async def attempt() -> Completion:
        nonlocal last
        try:
            return await _call(session, url, shown, body, policy.timeout_s, headers or {}, wire)
        except _Transient as exc:
            last = exc
            raise

    async def wait(delay: float) -> None:
        # An upstream that says when to come back (Retry-After) is waited for, within the cap.
        if last is not None and last.retry_after is not None:
            delay = min(max(delay, last.retry_after), policy.max_backoff_s)
        await asyncio.sleep(delay)  # backoff between attempts, not synchronisation

    try:
        return await retry.call(attempt, retry_on=_Transient, what=f"call to {shown}", sleep=wait)
    except _Transient as exc:
        error = UpstreamRefused if exc.status is not None else UpstreamError
        raise error(f"{exc} (gave up after {retry.attempts} attempts)") from None


async def _call(session: aiohttp.ClientSession, url: str, shown: str, body: dict[str, Any], timeout_s: float,
                headers: Mapping[str, str], wire: _OpenAI | _Anthropic) -> Completion:
    started = time.perf_counter()
    try:
        async with session.post(url, json=body, headers={**wire.headers, **headers},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status in RETRYABLE_STATUS:
                raise _Transient(f"HTTP {resp.status} from {shown}", _retry_after(resp.headers.get("Retry-After")),
                                 resp.status)
            if resp.status >= 400:
                head = (await _head(resp, ERROR_TEXT_BYTES)).decode("utf-8", "replace")
                raise UpstreamRefused(f"HTTP {resp.status} from {shown}: {_hidden(head[:200], headers)}")
            # A length over the bound is believed unread (compressed, the answer is longer still); else at most the
            # bound and one byte are read, the rest left to the connection closed with the response.
            if resp.content_length is not None and resp.content_length > MAX_ANSWER_BYTES:
                raise _too_large(shown)
            if len(data := await _head(resp, MAX_ANSWER_BYTES)) > MAX_ANSWER_BYTES:
                raise _too_large(shown)
    except TimeoutError:
        raise _Transient(f"timed out after {timeout_s:g}s calling {shown}") from None
    except aiohttp.ClientError as exc:
        raise _Transient(f"cannot reach {shown}: {shown_url(repr(exc))}") from None
    latency_ms = (time.perf_counter() - started) * 1000.0
    try:
        completion = wire.completion(data)
    except msgspec.DecodeError as exc:
        raise UpstreamError(f"{shown} answered something that is not a chat completion: {exc}") from None
    first = completion.choices[0] if completion.choices else None
    if first is None or first.message is None:
        raise UpstreamError(f"{shown} answered without choices[0].message") from None
    usage = (completion.usage or Usage()).tokens()
    return Completion(
        text=first.message.text(), latency_ms=latency_ms,  # a refusal too: must_refuse probes read it
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        logprobs=first.token_logprobs(),
    )


async def _head(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body if it is at most `limit` bytes, else its first `limit` + 1 (the rest left unread)."""
    data = bytearray()
    while len(data) <= limit and (chunk := await resp.content.read(limit + 1 - len(data))):
        data += chunk
    return bytes(data)


def _too_large(shown: str) -> UpstreamError:
    # Not retried: the same request gets the same answer.
    return UpstreamError(f"{shown} answered more than {MAX_ANSWER_BYTES:,} bytes, more than the evaluator reads of "
                         "one answer: not read")


def _hidden(text: str, headers: Mapping[str, str]) -> str:
    """An upstream's error text without the credential we sent, should it echo it back."""
    for value in headers.values():
        for secret in {value, value.removeprefix("Bearer ")}:
            if secret:
                text = text.replace(secret, MARK)
    return text


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


Call = Callable[[list[dict[str, str]]], Awaitable[Completion]]
Judge = Callable[[domain.CaseResult], Awaitable[domain.CaseResult]]
OnResult = Callable[[domain.CaseResult], Awaitable[None] | None]


class Stopped(LockgateError):
    """The run was asked to stop: cases in flight finished, the rest were not started."""


def over_time(max_run_s: float) -> str:
    """Why a case of a run past its time limit was not run."""
    return f"the run passed the evaluator's limit of {max_run_s:g} s a run (eval_max_run_s)"


async def _report(on_result: OnResult | None, result: domain.CaseResult) -> None:
    if on_result is not None:
        maybe = on_result(result)
        if maybe is not None:
            await maybe


async def _pool(items: Sequence[T], work: Callable[[T], Awaitable[domain.CaseResult]], concurrency: int,
                on_result: OnResult | None, stopping: asyncio.Event | None, max_run_s: float | None = None,
                not_run: Callable[[T, str], domain.CaseResult] | None = None) -> list[domain.CaseResult]:
    """`concurrency` workers pulling items in order; results keep input order. A stop lets in-flight items finish.
    Past `max_run_s` the items not done (in flight ones cancelled) end as `not_run` results saying so."""
    out: list[domain.CaseResult | None] = [None] * len(items)
    todo = iter(enumerate(items))

    async def worker() -> None:
        for i, item in todo:
            if stopping is not None and stopping.is_set():
                return
            result = await work(item)
            out[i] = result
            await _report(on_result, result)

    # A TaskGroup cancels the other workers if one raises (a scorer bug), leaving nothing orphaned.
    limit = asyncio.timeout(max_run_s)
    try:
        async with limit, asyncio.TaskGroup() as group:
            for _ in range(max(1, min(concurrency, len(items)))):
                group.create_task(worker())
    except* domain.SuiteError as group_error:
        raise group_error.exceptions[0] from None
    except* TimeoutError:
        if not limit.expired() or max_run_s is None or not_run is None:
            raise
        # The run passed its limit: it ends failed, each case it did not finish saying why (stored, so a
        # redelivery does not call them again).
        for i, item in enumerate(items):
            if out[i] is None:
                out[i] = not_run(item, over_time(max_run_s))
                await _report(on_result, out[i])
    if any(r is None for r in out):
        raise Stopped(f"stopped with {sum(r is None for r in out)} of {len(items)} cases not run")
    return out  # type: ignore[return-value]


async def run_cases(
    suite: domain.Suite,
    cases: Sequence[domain.Case],
    call: Call,
    *,
    concurrency: int,
    on_done: Callable[[], None] | None = None,
    skip: Collection[tuple[str, int]] = (),
    on_result: OnResult | None = None,
    judge: Judge | None = None,
    stopping: asyncio.Event | None = None,
    max_run_s: float | None = None,
) -> list[domain.CaseResult]:
    """Run every (case, repeat) not in `skip` through `call`, at most `concurrency` in flight; input order kept.
    Past `max_run_s` (None: no limit) the rest are not run, and are failed results saying so."""
    # Render everything first so a template error fails the run before any call is made.
    rendered = {case.id: domain.render(suite, case) for case in cases}
    items = [(case, r) for case in cases for r in range(suite.repeats) if (case.id, r) not in skip]

    def not_run(item: tuple[domain.Case, int], why: str) -> domain.CaseResult:
        case, repeat = item
        return domain.CaseResult(case_id=case.id, repeat=repeat, input=rendered[case.id][-1]["content"],
                                 expected=case.expected, error=why, details={domain.NOT_RUN: True})

    if (why := too_slow(suite, len(items), max_run_s)) is not None:
        # Known before the first call: the run would only hold its slot until the limit cuts it.
        results = [not_run(item, why) for item in items]
        for result in results:
            await _report(on_result, result)
        return results

    async def one(item: tuple[domain.Case, int]) -> domain.CaseResult:
        case, repeat = item
        messages = rendered[case.id]
        prompt = messages[-1]["content"]
        try:
            done = await call(messages)
        except LockgateError as exc:
            return domain.CaseResult(case_id=case.id, repeat=repeat, input=prompt, expected=case.expected,
                                     error=exc.message)
        result = domain.CaseResult(
            case_id=case.id, repeat=repeat, input=prompt, expected=case.expected, output=done.text,
            scores=await asyncio.to_thread(scored, suite, case, done), latency_ms=done.latency_ms,
            input_tokens=done.input_tokens, output_tokens=done.output_tokens,
            details={domain.CACHED: True} if done.cached else {},
        )
        if judge is not None:
            result = await judge(result)
        if on_done is not None:
            on_done()
        return result

    return await _pool(items, one, concurrency, on_result, stopping, max_run_s, not_run)


def scored(suite: domain.Suite, case: domain.Case, done: Completion) -> dict[str, float]:
    """A case's scores (with their confidences), run in a thread by `run_cases`: a scorer's work grows with the answer
    (ROUGE-L's above all), and on the event loop the services share it held every tenant's router (probe p52 F3: a
    100k-word answer held it 13 s, and the router cut its canaries out, its bus silent)."""
    return calibrated.with_confidence(suite, domain.score(suite, done.text, case.expected, case_id=case.id),
                                      done.text, done.logprobs)


def too_slow(suite: domain.Suite, calls: int, max_run_s: float | None) -> str | None:
    """Why `calls` calls at the suite's rate_limit_rps cannot end within `max_run_s` (None: they can)."""
    if not suite.rate_limit_rps or max_run_s is None:
        return None
    needed = calls / suite.rate_limit_rps
    if needed <= max_run_s:
        return None
    return (f"{calls} calls at rate_limit_rps {suite.rate_limit_rps:g} take {needed:g} s, more than the "
            f"evaluator's limit of {max_run_s:g} s a run (eval_max_run_s); raise rate_limit_rps or run fewer cases")


async def judge_results(
    results: Sequence[domain.CaseResult], judge: Judge | None, *, concurrency: int,
    on_result: OnResult | None = None, stopping: asyncio.Event | None = None, max_run_s: float | None = None,
) -> list[domain.CaseResult]:
    """Apply the judge (if any) to results made without calls (recorded outputs), reporting each. Past `max_run_s`
    (None: no limit) the rest are failed results saying so."""

    async def one(result: domain.CaseResult) -> domain.CaseResult:
        return await judge(result) if judge is not None and not result.error else result

    def not_run(result: domain.CaseResult, why: str) -> domain.CaseResult:
        return replace(result, error=why, details={**result.details, domain.NOT_RUN: True})

    return await _pool(results, one, concurrency, on_result, stopping, max_run_s, not_run)
