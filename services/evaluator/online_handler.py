"""Bus edge of online evaluation: inference events in, `eval.scores.<deployment>` out.

Per deployment, the plan (rates per variant, scorers, judge) comes from its deployment document as
last applied (KV gitops, `deployment.<name>`), read again after CONFIG_TTL_S. The deterministic
scores are published before the message is acked. The judge's calls run in a few workers fed by a
bounded queue, within the judge's calls per minute and USD per day: the consumer never waits for a
judge, and neither does any request. A judge that fails (down, 5xx, timeout, a reply without a score)
publishes the error in place of a score, counted in `judge_errors`; rollout analysis reads it as an
error, never as a low score. A call's cost is known only once it returns, so the day's spend may pass its
limit by the calls already in flight (at most one per worker and judge reply). A judge job still queued when the evaluator stops is lost (a sampled
measurement, not a fact); the answer's deterministic scores were published already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import msgspec
import nats.errors
import nats.js.errors

from lockgate.bus import Delivery
from lockgate.contracts import InferenceEvent, InferenceScored
from lockgate.documents import convert, load_yaml
from lockgate.errors import BusUnavailable, ConfigError, LockgateError
from lockgate.gitops.plan import StateEntry
from lockgate.gitops.state import state_key
from lockgate.onlineeval import JudgeSpec, OnlineEvalSpec
from lockgate.pricebook import ModelPrice
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.evaluator import judge, online, pricing, runner
from lockgate.services.evaluator.ratelimit import TokenBucket

log = logging.getLogger("lockgate.evaluator")
CONFIG_TTL_S = 10.0  # an applied change of a deployment's online_eval takes effect within this
QUEUE = 1024  # judge jobs waiting; beyond, an answer is not judged (counted in judge_skipped)
WORKERS = 4
_entry = msgspec.json.Decoder(StateEntry)


class _Endpoint(msgspec.Struct):
    url: str


class _EndpointsFile(msgspec.Struct):
    endpoints: dict[str, _Endpoint] = {}


def judge_endpoints(ctx: ServiceContext) -> dict[str, str]:
    """Endpoint id -> base URL, from the operator's allow-list (the router's endpoints file, or the two
    upstream settings when there is none): the only places a judge may be sent live answers."""
    s = ctx.settings
    if not s.endpoints_file:
        return {"default": s.stable_upstream, "canary": s.canary_upstream}
    return {k: v.url for k, v in load_yaml(s.endpoints_file, _EndpointsFile, name="endpoints file").endpoints.items()}


class Plans:
    """Deployment -> online.Plan, read from the applied state and kept CONFIG_TTL_S seconds."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.default = online.plan(None, ctx.settings.online_eval_sample, ctx.settings.online_eval_scorers)
        self._cache: dict[str, tuple[float, online.Plan]] = {}

    async def _spec(self, deployment: str) -> OnlineEvalSpec | None:
        bus = self.ctx.bus
        try:
            entry = await (await bus.kv(bus.subjects.kv_gitops)).get(state_key("deployment", deployment))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.BucketNotFoundError):
            return None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read deployment {deployment!r} from KV {bus.subjects.kv_gitops}: "
                                 f"{exc!r}") from None
        raw = _entry.decode(entry.value).spec.get("online_eval") if entry.value else None
        return None if raw is None else convert(raw, OnlineEvalSpec, name=f"deployment {deployment} online_eval")

    async def get(self, deployment: str) -> online.Plan:
        """The deployment's plan; a document the evaluator cannot use falls back to the global plan, logged."""
        now = time.monotonic()
        hit = self._cache.get(deployment)
        if hit is not None and now - hit[0] < CONFIG_TTL_S:
            return hit[1]
        try:
            plan = online.plan(await self._spec(deployment), self.default.default_rate,
                               [s.name for s in self.default.scorers], where=f"deployment {deployment} online_eval")
        except ConfigError as exc:
            log.warning("%s; scoring it with the global online evaluation settings", exc.message)
            plan = self.default
        self._cache[deployment] = (now, plan)
        return plan


@dataclass
class _JudgeState:
    """One deployment's judge: its spec, URL, price, call rate and today's spend."""

    spec: JudgeSpec
    url: str
    price: ModelPrice
    bucket: TokenBucket
    spend: online.DailySpend


class OnlineEval:
    """Scores a sampled share of live inference events; the rollout analysis reads the scores as metrics."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.plans = Plans(ctx)
        self.scored = Progress()  # events scored and published (tests await it)
        self.judged = Progress()  # judge outcomes published, scores and errors alike
        self.judge_errors = Progress()  # judge outcomes without a score (outage, unreadable reply, no endpoint)
        self.judge_skipped = Progress()  # answers not judged: the judge's queue was full or today's budget spent
        self._queue: asyncio.Queue[tuple[InferenceEvent, JudgeSpec]] = asyncio.Queue(QUEUE)
        self._judges: dict[str, _JudgeState] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        self._session: aiohttp.ClientSession | None = None
        self._prices: dict[str, ModelPrice] | None = None

    async def on_inference(self, value: list[InferenceEvent] | InferenceEvent, delivery: Delivery) -> None:
        """Score the sampled events of one message and publish each one's scores (a failed publish
        nacks the message: scores are idempotent by the scored event's id); queue the judge's work."""
        bus = self.ctx.bus
        n = 0
        for event in value if isinstance(value, list) else [value]:
            plan = await self.plans.get(event.deployment or event.app)
            result = online.score(event, plan) if plan.active else None
            if result is None:
                continue
            if result.scores:
                await bus.publish(bus.subjects.eval_scores(result.deployment or result.app), result,
                                  msg_id=f"scored-{result.event_id}")
                n += 1
            if plan.judge is not None and online.wants_judge(event, plan):
                await self._enqueue(event, plan.judge)
        await self.scored.bump(n)

    async def _enqueue(self, event: InferenceEvent, spec: JudgeSpec) -> None:
        if self._closed:  # stopping: the consumer may still deliver, but no worker may start again
            await self.judge_skipped.bump()
            return
        if not self._workers:
            self._workers = [asyncio.create_task(self._work(), name=f"evaluator:judge-{i}") for i in range(WORKERS)]
        try:
            self._queue.put_nowait((event, spec))
        except asyncio.QueueFull:
            await self.judge_skipped.bump()

    async def close(self) -> None:
        """Stop the judge's workers and close its HTTP pool."""
        self._closed = True
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        if self._session is not None:
            await self._session.close()

    def _state(self, deployment: str, spec: JudgeSpec) -> _JudgeState:
        """The judge of a deployment, rebuilt when its spec changed (a new budget starts from zero)."""
        state = self._judges.get(deployment)
        if state is not None and state.spec == spec:
            return state
        urls = judge_endpoints(self.ctx)
        if spec.endpoint not in urls:
            raise ConfigError(f"judge endpoint {spec.endpoint!r} is not in the endpoint allow-list "
                              f"({', '.join(sorted(urls))})")
        if self._prices is None:
            self._prices = pricing.load_file(self.ctx.settings.price_book)
        price = spec.price or self._prices.get(spec.model)
        if price is None:
            raise ConfigError(f"judge model {spec.model!r} has no price (price book or judge.price): its "
                              "daily budget could not be kept")
        per_s = spec.max_calls_per_minute / 60.0
        state = _JudgeState(spec=spec, url=urls[spec.endpoint], price=price,
                            bucket=TokenBucket(per_s, burst=max(1.0, per_s)), spend=online.DailySpend(spec.max_usd_per_day))
        self._judges[deployment] = state
        return state

    async def _work(self) -> None:
        # `_closed` as well as the cancel: a cancel that lands inside the HTTP client's own timeout or
        # connection handling can be consumed there, and the worker must still stop.
        while not self._closed:
            event, spec = await self._queue.get()
            try:
                await self._judge(event, spec)
            except Exception:  # one bad job must not stop the worker
                log.exception("judging event %s failed", event.id)

    async def _judge(self, event: InferenceEvent, spec: JudgeSpec) -> None:
        """Ask the judge n times (each call within its rate and spend); publish a score or the error."""
        try:
            state = self._state(event.deployment or event.app, spec)
        except ConfigError as exc:
            await self._publish(online.judged(event, None, exc.message))
            return
        params = judge.JudgeParams(model=spec.model, rubric=spec.rubric, n=spec.n, temperature=spec.temperature,
                                   pass_mark=spec.pass_mark)
        msgs = judge.messages(params, event.prompt or "", event.response or "", None)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32))
        policy = runner.CallPolicy(timeout_s=spec.timeout_s, max_retries=1, backoff_s=0.1, max_backoff_s=1.0)
        replies: list[str] = []
        failures: list[str] = []
        for _ in range(spec.n):
            if not state.spend.allows(datetime.now(UTC)):
                break
            await state.bucket.acquire()
            try:
                done = await runner.complete(self._session, state.url, spec.model, msgs, policy,
                                             {"temperature": spec.temperature})
            except LockgateError as exc:
                failures.append(f"judge endpoint {spec.endpoint}: {exc.message}")
                continue
            state.spend.spend(state.price.cost(done.input_tokens, done.output_tokens), datetime.now(UTC))
            replies.append(done.text)
        if not replies and not failures:  # today's budget was spent before the first call
            await self.judge_skipped.bump()
            return
        try:
            if not replies:
                raise judge.JudgeParseError(failures[0])
            result = online.judged(event, judge.aggregate(replies, spec.pass_mark).score)
        except judge.JudgeParseError as exc:
            result = online.judged(event, None, exc.message)
        await self._publish(result)

    async def _publish(self, result: InferenceScored) -> None:
        bus = self.ctx.bus
        try:
            await bus.publish(bus.subjects.eval_scores(result.deployment or result.app), result,
                              msg_id=f"scored-{result.event_id}-{online.JUDGE}")
        except LockgateError as exc:
            log.warning("judge outcome of %s not published: %s", result.event_id, exc.message)
            return
        if not result.scores:
            await self.judge_errors.bump()
        await self.judged.bump()
