"""One evaluated (or judging) endpoint: response cache, rate limit, retries; plus the LLM-judge step."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
import msgspec

from lockgate.endpoints import Access
from lockgate.errors import LockgateError
from lockgate.services.evaluator import domain, judge, runner
from lockgate.services.evaluator.cache import Cached, ResponseCache, request_key, scope_of
from lockgate.services.evaluator.ratelimit import TokenBucket


class Upstream:
    """Calls `model` at endpoint `at` (its base URL, with its headers: credential, project) in the API of its
    provider (runner.complete): a cache hit (an answer of this endpoint for `tenant`) costs no call; misses wait
    for the rate limit, then call."""

    def __init__(self, session: aiohttp.ClientSession, at: Access, model: str, policy: runner.CallPolicy,
                 cache: ResponseCache | None = None, bucket: TokenBucket | None = None, tenant: str = "") -> None:
        self.session = session
        self.endpoint = at.base
        self.headers = at.headers
        self.provider = at.provider
        self.scope = scope_of(at, tenant)
        self.model = model
        self.policy = policy
        self.cache = cache
        self.bucket = bucket
        self.calls = 0

    async def __call__(self, messages: list[dict[str, str]], params: dict[str, Any] | None = None,
                       salt: Mapping[str, Any] | None = None) -> runner.Completion:
        """A completion; `salt` joins the cache key only (e.g. the judge replica, so n replies stay n)."""
        key = ""
        if self.cache is not None:
            key = request_key(self.scope, self.model, messages, {**(params or {}), **(salt or {})})
            hit = await self.cache.get(key)
            if hit is not None:
                return runner.Completion(text=hit.text, latency_ms=hit.latency_ms, input_tokens=hit.input_tokens,
                                         output_tokens=hit.output_tokens, cached=True, logprobs=hit.logprobs)
        if self.bucket is not None:
            await self.bucket.acquire()
        self.calls += 1
        done = await runner.complete(self.session, self.endpoint, self.model, messages, self.policy, params,
                                     self.headers, self.provider)
        if self.cache is not None:
            self.cache.put(key, Cached(done.text, done.latency_ms, done.input_tokens, done.output_tokens,
                                       done.logprobs))
        return done


def judge_step(upstream: Upstream, params: judge.JudgeParams) -> runner.Judge:
    """The runner hook that asks the judge n times and adds `llm_judge` and its agreement to a result."""

    # Every judge setting joins the cache key (model, endpoint and tenant are in it already), so a changed
    # rubric, sample count or pass mark never reuses replies given under other settings.
    setting = msgspec.to_builtins(params)

    async def one(i: int, msgs: list[dict[str, str]]) -> str | LockgateError:
        try:
            reply = await upstream(msgs, {"temperature": params.temperature}, salt={"replica": i, "judge": setting})
        except LockgateError as exc:
            return exc
        return reply.text

    async def step(result: domain.CaseResult) -> domain.CaseResult:
        if result.error:
            return result
        msgs = judge.messages(params, result.input, result.output, result.expected)
        outcomes = await asyncio.gather(*(one(i, msgs) for i in range(params.n)))
        # A failed call is a reply without a score: of the n, it agrees with nothing (judge.aggregate).
        verdict = judge.aggregate([o if isinstance(o, str) else None for o in outcomes], params.pass_mark)
        detail: dict[str, Any] = {"scores": list(verdict.scores), "reasons": list(verdict.reasons),
                                  "stdev": verdict.stdev, "unparsed": verdict.unparsed}
        # Agreement is reported for every judged case, a missing one too: its disagreement is what
        # measurement.min_judge_agreement reads.
        scores = {**result.scores, judge.AGREEMENT: verdict.agreement}
        if verdict.score is None:
            # No majority verdict is a missing measurement, not a 0: a judge outage must not look like a
            # regression, nor an obeying minority like a pass.
            detail |= {"replies": [o if isinstance(o, str) else f"<judge call failed: {o.message}>"
                                   for o in outcomes], "error": verdict.why}
        else:
            scores[judge.NAME] = verdict.score
        return replace(result, scores=scores, details={**result.details, judge.NAME: detail})

    return step


def judge_warning(results: Sequence[domain.CaseResult]) -> str:
    """The run's warning about judge replies without a score and cases left without a verdict ("" if none).

    Both counts, since unreadable replies in a case with a majority verdict are no missing case, and a case
    without one (a minority score is not its score) is, though some of its replies held a score (probe p40 F1)."""
    judged = [d for r in results if (d := r.details.get(judge.NAME))]
    unparsed = sum(int(d.get("unparsed", 0)) for d in judged)
    replies = sum(len(d.get("scores", [])) for d in judged) + unparsed
    missing = sum(1 for d in judged if "error" in d)
    if not unparsed and not missing:
        return ""
    return (f"llm_judge: {unparsed} of {replies} judge replies held no readable score (unreadable or failed); "
            f"{missing} of {len(judged)} judged cases had no majority of their replies agreeing on a score, so "
            "have none (missing, not scored 0)")
