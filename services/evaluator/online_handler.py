"""Bus edge of online evaluation: inference events in, `eval.scores.<deployment>` out.

Per deployment, the plan (rates per variant, scorers, judge) comes from its deployment document as
last applied (KV gitops, `deployment.<name>`), read again after CONFIG_TTL_S, for the events of the document's
own tenant (its stable release's) and the answers its own route served (from a release: its tenant's keys' and
admin keys'); another tenant's events naming the deployment get the global plan, as a deployment nobody
configured, so they never spend its judge budget (Plans). A deployment without a document is known from one
listing of the applied documents' keys, also read again after CONFIG_TTL_S: an event naming a made-up deployment
costs no read. The router's served answers (canary evidence) come on a consumer of their own, apart from
applications' events (app.py), so no application's flood delays them. The deterministic scores are published
before the message is acked, a message's scores in flight together; a large answer's scorers run in one thread of
their own (OFF_LOOP), not on the event loop the router shares under `lockgate up`. The judge grades only answers a
router served (the `served` subject, which only the router identity may publish to) and never a cache hit: its
calls cost the operator money from a daily budget and feed canary analysis, so an application's own events (which
may name any deployment and variant) must neither spend nor fill it. Its calls run per (tenant, deployment) in a few
workers fed by the deployment's own bounded queue, within the judge's calls per minute and USD per day: a
flood of one deployment's answers fills only that deployment's queue, the consumer never waits for a
judge, and neither does any request. A judge that fails (down, 5xx, timeout, a reply without a score)
publishes the error in place of a score, counted in `judge_errors`; rollout analysis reads it as an
error, never as a low score. The judge's endpoint is an id of the operator's allow-list and gets that
endpoint's credential (lockgate.endpoints); a credential that is missing is an error outcome, never a call
without it. Each call reserves its largest cost from the day's budget shared by every evaluator replica
before it starts and settles to its real cost after (judgebudget.py), so calls in flight never take the
day past its limit; a budget store that does not answer means no call (an error outcome). A judge job
still queued when the evaluator stops is lost (a sampled measurement, not a fact); the answer's
deterministic scores were published already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
import msgspec
import nats.errors
import nats.js.errors

from lockgate import artifacts
from lockgate.bus import Delivery
from lockgate.contracts import InferenceEvent, InferenceScored, StateEntry
from lockgate.documents import convert
from lockgate.endpoints import Access
from lockgate.errors import BusUnavailable, ConfigError, LockgateError, NotFound
from lockgate.gitops.state import state_key
from lockgate.kvcas import KVUnavailable
from lockgate.onlineeval import JudgeSpec, OnlineEvalSpec
from lockgate.pricebook import ModelPrice
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.evaluator import judge, judgeledger, online, pricing, runner, targets
from lockgate.services.evaluator.judgebudget import JudgeBudget, Reservation
from lockgate.services.evaluator.ratelimit import TokenBucket

log = logging.getLogger("lockgate.evaluator")
CONFIG_TTL_S = 10.0  # an applied change of a deployment's online_eval takes effect within this
QUEUE = 256  # judge jobs waiting per deployment; beyond, an answer is not judged (counted in judge_skipped)
WORKERS = 4  # per deployment: a slow or rate-limited judge of one deployment holds none of another's
# Plans kept at most, the least recently used going first: of deployments with a document (one without any keeps
# none: Plans._documented). A deployment whose plan went reads it again (one KV get) at its next event.
PLANS_MAX = 256
# Characters of an answer from which its scorers run in the evaluator's scoring thread, not on the event loop (as the
# bus scrubs a dead letter's payload from 64 KiB): probe p55 F2, a 900 KB answer's pii_free, refusal and non_toxic took
# about 1 s of it, every service's and the router's under `lockgate up`. The whole answer is scored, never a cut: PII
# past a cut would escape pii_free.
OFF_LOOP = 64 * 1024
_entry = msgspec.json.Decoder(StateEntry)


class Plans:
    """Deployment -> online.Plan, read from the applied state and kept CONFIG_TTL_S seconds (PLANS_MAX at most).

    A deployment's document is its tenant's: the tenant its stable release is registered under. Another tenant's
    events naming it get the global plan, as a deployment nobody configured: under passthrough a router serves such a
    tenant's requests for that name by the default route, release-less (probe p25 F2: they took 17 of the 20 judge
    calls of the deployment's minute), and the document's judge, sampling and scorers are not that tenant's to spend
    or to fill. A document whose tenant is not known (its stable release not registered) is every tenant's."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.default = online.plan(None, ctx.settings.online_eval_sample, ctx.settings.online_eval_scorers)
        # deployment -> (read at, its plan, the tenant whose document it is: "" when not known, every tenant's)
        self._cache: OrderedDict[str, tuple[float, online.Plan, str]] = OrderedDict()  # least recently used first
        self._listed: tuple[float, frozenset[str]] | None = None  # (listed at, the KV keys of applied deployments)

    async def _documented(self) -> frozenset[str]:
        """The KV keys of the deployments with an applied document (deleted ones' too), listed again after
        CONFIG_TTL_S. One request for every name: an application's events may name any deployment, and a made-up
        name read its missing document each time (probe p55 F1: one KV read per event, past the PLANS_MAX names
        kept, held every tenant's online scores behind them)."""
        now = time.monotonic()
        if self._listed is None or now - self._listed[0] >= CONFIG_TTL_S:
            bus = self.ctx.bus
            self._listed = (now, frozenset(await bus.kv_listed(bus.subjects.kv_gitops, under="deployment.")))
        return self._listed[1]

    async def _spec(self, deployment: str) -> tuple[OnlineEvalSpec | None, str]:
        """The deployment's applied online_eval (None without one) and the stable release its document names."""
        bus = self.ctx.bus
        try:
            entry = await (await bus.kv(bus.subjects.kv_gitops)).get(state_key("deployment", deployment))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.BucketNotFoundError):
            return None, ""
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise BusUnavailable(f"cannot read deployment {deployment!r} from KV {bus.subjects.kv_gitops}: "
                                 f"{exc!r}") from None
        spec = _entry.decode(entry.value).spec if entry.value else {}
        raw, stable = spec.get("online_eval"), spec.get("stable")
        return (None if raw is None else convert(raw, OnlineEvalSpec, name=f"deployment {deployment} online_eval"),
                stable if isinstance(stable, str) else "")

    async def _owner(self, release: str) -> str:
        """The tenant `release` is registered under; "" when it is not (nor bound): then nobody's is known."""
        try:
            tenant = (await artifacts.release_of(self.ctx.bus, release)).get("tenant") if release else ""
        except NotFound:  # TakenUnbound too
            return ""
        return tenant if isinstance(tenant, str) else ""

    async def get(self, deployment: str, tenant: str | None = None) -> online.Plan:
        """The plan for `tenant`'s events naming the deployment (None: answers its own route served): its document's,
        unless the document is another tenant's (then the global plan); a document the evaluator cannot use falls
        back to the global plan, logged."""
        now = time.monotonic()
        hit = self._cache.get(deployment)
        if hit is not None and now - hit[0] < CONFIG_TTL_S:
            self._cache.move_to_end(deployment)
        elif state_key("deployment", deployment) not in await self._documented():
            return self.default  # no document: nothing to read, nor to keep
        else:
            owner = ""
            try:
                spec, stable = await self._spec(deployment)
                owner = await self._owner(stable) if spec is not None else ""
                plan = online.plan(spec, self.default.default_rate, [s.name for s in self.default.scorers],
                                   where=f"deployment {deployment} online_eval")
            except ConfigError as exc:
                log.warning("%s; scoring it with the global online evaluation settings", exc.message)
                plan = self.default
            hit = self._cache[deployment] = (now, plan, owner)
            self._cache.move_to_end(deployment)
            while len(self._cache) > PLANS_MAX:
                self._cache.popitem(last=False)
        _, plan, owner = hit
        return plan if tenant is None or owner in ("", tenant) else self.default


@dataclass(frozen=True)
class _Reply:
    ok: bool
    text: str  # the judge's reply, or why there is none


@dataclass
class _Lane:
    """One deployment's judge jobs: its own bounded queue and workers."""

    queue: asyncio.Queue[tuple[InferenceEvent, JudgeSpec, bool]]
    workers: list[asyncio.Task[None]]


@dataclass
class _JudgeState:
    """One deployment's judge: its spec, endpoint (URL and credential), price and this replica's call pacing."""

    spec: JudgeSpec
    access: Access
    price: ModelPrice
    bucket: TokenBucket
    policy: runner.CallPolicy


class OnlineEval:
    """Scores a sampled share of live inference events; the rollout analysis reads the scores as metrics."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.plans = Plans(ctx)
        self.scored = Progress()  # events scored and published (tests await it)
        self.judged = Progress()  # judge outcomes published, scores and errors alike
        self.judge_errors = Progress()  # judge outcomes without a score (outage, unreadable reply, no endpoint)
        self.judge_skipped = Progress()  # answers not judged: the deployment's judge queue was full or today's budget spent
        # By (tenant, deployment): one tenant's answers never take another's queue or calls per minute (and only the
        # document's own tenant's get its judge at all: Plans.get).
        self._lanes: dict[tuple[str, str], _Lane] = {}  # only deployments whose applied document has a judge get one
        self._judges: dict[tuple[str, str], _JudgeState] = {}
        self._closed = False
        self._session: aiohttp.ClientSession | None = None
        self._prices: dict[str, ModelPrice] | None = None
        # One thread for large answers' scorers (OFF_LOOP): pure Python holding the GIL, so more threads would only
        # take more of the loop's share. Each consumer awaits its event's scores, so at most one job per consumer is
        # in it, however many large events come.
        self._scoring: ThreadPoolExecutor | None = None
        self.budget = JudgeBudget(ctx.bus)  # the day's spend, shared with the other evaluator replicas

    async def on_inference(self, value: list[InferenceEvent] | InferenceEvent, delivery: Delivery) -> None:
        """Score the sampled events of one message and publish their scores (a failed publish nacks the
        message: scores are idempotent by the scored event's id); then queue the judge's work."""
        bus = self.ctx.bus
        served = bus.subjects.is_served(delivery.subject)  # a router's events: its scores are canary evidence
        results: list[InferenceScored] = []
        judged: list[tuple[InferenceEvent, JudgeSpec]] = []
        for event in value if isinstance(value, list) else [value]:
            if not online.scorable(event):  # no plan scores it: none is read
                continue
            # An answer a router served from a release was served by the deployment's own route, which serves only
            # its tenant's keys and admin keys: the document's. Any other event is its tenant's (Plans.get).
            whose = None if served and event.release else event.tenant
            plan = await self.plans.get(event.deployment or event.app, whose)
            result = await self._score(event, plan, served) if plan.active else None
            if result is None:
                continue
            if result.scores:
                results.append(result)
            if plan.judge is not None and online.wants_judge(event, plan, served):
                judged.append((event, plan.judge))
        # In flight together, as the cost service's: awaited one after another, a message of 500 events held its
        # consumer for 500 acknowledgements in turn (probe p55 F1).
        await asyncio.gather(*(bus.publish(bus.subjects.eval_scores(r.deployment or r.app), r,
                                           msg_id=online.message_id(r, online.SCORED)) for r in results))
        for event, spec in judged:
            await self._enqueue(event, spec, served)
        await self.scored.bump(len(results))

    async def _score(self, event: InferenceEvent, plan: online.Plan, served: bool) -> InferenceScored | None:
        """`online.score`; a large answer's (OFF_LOOP) in the scoring thread, whole."""
        if len(event.response or "") < OFF_LOOP or not online.chosen(event, plan):
            return online.score(event, plan, served)
        if self._scoring is None:
            self._scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="online-score")
        return await asyncio.get_running_loop().run_in_executor(self._scoring, online.score, event, plan, served)

    async def _enqueue(self, event: InferenceEvent, spec: JudgeSpec, served: bool) -> None:
        if self._closed:  # stopping: the consumer may still deliver, but no worker may start again
            await self.judge_skipped.bump()
            return
        deployment = event.deployment or event.app
        lane = self._lanes.get((event.tenant, deployment))
        if lane is None:
            lane = _Lane(queue=asyncio.Queue(QUEUE), workers=[])
            lane.workers = [asyncio.create_task(self._work(lane.queue),
                                                name=f"evaluator:judge-{event.tenant}-{deployment}-{i}")
                            for i in range(WORKERS)]
            self._lanes[(event.tenant, deployment)] = lane
        try:
            lane.queue.put_nowait((event, spec, served))
        except asyncio.QueueFull:
            await self.judge_skipped.bump()

    async def close(self) -> None:
        """Stop the judge's workers and the scoring thread, and close the judge's HTTP pool."""
        self._closed = True
        if self._scoring is not None:  # a job cut short is scored again at its message's redelivery
            self._scoring.shutdown(wait=False, cancel_futures=True)
        workers = [task for lane in self._lanes.values() for task in lane.workers]
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._lanes = {}
        if self._session is not None:
            await self._session.close()

    def _state(self, tenant: str, deployment: str, spec: JudgeSpec) -> _JudgeState:
        """The judge of a tenant's deployment, rebuilt when its spec changed (the day's spend is kept: it is the
        KV's)."""
        state = self._judges.get((tenant, deployment))
        if state is not None and state.spec == spec:
            return state
        access = targets.listed(self.ctx.settings, spec.endpoint, "judge endpoint")
        if self._prices is None:
            self._prices = pricing.load_file(self.ctx.settings.price_book)
        price = spec.price or self._prices.get(spec.model)
        if price is None:
            raise ConfigError(f"judge model {spec.model!r} has no price (price book or judge.price): its "
                              "daily budget could not be kept")
        per_s = spec.max_calls_per_minute / 60.0
        # No retry inside a call: each attempt is reserved on its own (a timed-out one may be billed), and a
        # failed call is an error outcome, which analysis counts as missing, never as a pass.
        state = _JudgeState(spec=spec, access=access, price=price, bucket=TokenBucket(per_s, burst=max(1.0, per_s)),
                            policy=runner.CallPolicy(timeout_s=spec.timeout_s, max_retries=0))
        self._judges[(tenant, deployment)] = state
        return state

    async def _work(self, queue: asyncio.Queue[tuple[InferenceEvent, JudgeSpec, bool]]) -> None:
        # `_closed` as well as the cancel: a cancel that lands inside the HTTP client's own timeout or
        # connection handling can be consumed there, and the worker must still stop.
        while not self._closed:
            event, spec, served = await queue.get()
            try:
                await self._judge(event, spec, served)
            except Exception:  # one bad job must not stop the worker
                log.exception("judging event %s failed", event.id)

    async def _judge(self, event: InferenceEvent, spec: JudgeSpec, served: bool) -> None:
        """Ask the judge n times (each call within its rate and budget); publish a score or the error."""
        deployment = event.deployment or event.app
        try:
            state = self._state(event.tenant, deployment, spec)
        except ConfigError as exc:
            await self._publish(online.judged(event, None, exc.message, served))
            return
        params = judge.JudgeParams(model=spec.model, rubric=spec.rubric, n=spec.n, temperature=spec.temperature,
                                   pass_mark=spec.pass_mark)
        msgs = judge.messages(params, event.prompt or "", event.response or "", None)
        need = judgeledger.largest_cost(state.price, msgs, spec.max_tokens)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32))
        replies: list[str] = []
        failures: list[str] = []
        for _ in range(spec.n):
            await state.bucket.acquire()
            try:
                reserved = await self.budget.reserve(deployment, spec, need)
            except KVUnavailable as exc:  # fail closed: no budget known, no call
                failures.append(f"judge of {deployment}: its budget cannot be checked, so it was not called: "
                                f"{exc.message}")
                break
            if isinstance(reserved, judgeledger.Refused):  # today's budget is spent
                break
            reply = await self._call(state, msgs, reserved)
            (replies if reply.ok else failures).append(reply.text)
        if not replies and not failures:  # today's budget was spent before the first call
            await self.judge_skipped.bump()
            return
        if not replies:
            result = online.judged(event, None, failures[0], served)
        else:
            # Of the n asked for: a failed call, or one today's budget refused, is a reply without a score, so an
            # obeying minority's clean score is never the verdict (judge.aggregate, probe p40 F1).
            verdict = judge.aggregate([*replies, *[None] * (spec.n - len(replies))], spec.pass_mark)
            result = online.judged(event, verdict.score, verdict.why, served)
        await self._publish(result)

    async def _call(self, state: _JudgeState, msgs: list[dict[str, str]], reserved: Reservation) -> _Reply:
        """One judge call with the endpoint's credential, its reservation settled to what it cost: the
        reply, or the failure (an error status bills nothing; a timeout may have, so it stays spent)."""
        spec = state.spec
        try:
            done = await runner.complete(self._session, state.access.base, spec.model, msgs, state.policy,
                                         {"temperature": spec.temperature, "max_tokens": spec.max_tokens},
                                         state.access.headers, state.access.provider)
        except LockgateError as exc:
            if isinstance(exc, runner.UpstreamRefused):
                await self.budget.settle(reserved, 0)
            return _Reply(False, f"judge endpoint {spec.endpoint}: {exc.message}")
        if done.input_tokens or done.output_tokens:  # an answer without usage may have been billed in full
            await self.budget.settle(reserved, judgeledger.cost(state.price, done.input_tokens, done.output_tokens))
        return _Reply(True, done.text)

    async def _publish(self, result: InferenceScored) -> None:
        bus = self.ctx.bus
        try:
            await bus.publish(bus.subjects.eval_scores(result.deployment or result.app), result,
                              msg_id=online.message_id(result, online.JUDGE))
        except LockgateError as exc:
            log.warning("judge outcome of %s not published: %s", result.event_id, exc.message)
            return
        if not result.scores:
            await self.judge_errors.bump()
        await self.judged.bump()
