"""One eval run end to end: load, resume, run (or read recorded outputs), summarise, compare, publish."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import msgspec

from lockgate import artifacts, evalruns, shipped
from lockgate.contracts import EvalCompleted, EvalRequested, EvalReran, LineageRun, ReleaseBinding
from lockgate.endpoints import Access
from lockgate.errors import ConfigError, NotFound
from lockgate.evalruns import EvalRun, binding_digest
from lockgate.provenance import environment
from lockgate.redact import shown_url
from lockgate.server.service import ServiceContext
from lockgate.services.evaluator import (
    calibrated,
    domain,
    judge,
    persist,
    pricing,
    recorded,
    runner,
    summary,
    targets,
)
from lockgate.services.evaluator.cache import ResponseCache
from lockgate.services.evaluator.judge import JudgeParams
from lockgate.services.evaluator.progress import Ticker
from lockgate.services.evaluator.ratelimit import TokenBucket
from lockgate.services.evaluator.upstream import Upstream, judge_step, judge_warning
from lockgate.shipped import Shipped

log = logging.getLogger("lockgate.evaluator")


@dataclass
class Loaded:
    """A validated suite, its cases, and the artifacts it was built from."""

    suite: domain.Suite
    cases: tuple[domain.Case, ...]
    inputs: list[str]
    prices: dict[str, pricing.ModelPrice] = field(default_factory=dict)
    price_source: str = ""
    target: Access | None = None  # the evaluated endpoint (a call task)
    model: str = ""  # the evaluated model (a call task: what the release ships), which prices its tokens
    params: dict = field(default_factory=dict)  # sampling parameters the release's model config fixes
    judge: Access | None = None  # the suite judge's endpoint, when it has one
    judge_params: JudgeParams | None = None  # the suite's LLM judge, when it has one
    tenant: str = ""  # a recorded task: the tenant its release is bound under, whose served events it scores
    artifacts: dict[str, str] = field(default_factory=dict)  # the release content the result names as evaluated
    prompt: str = "suite"  # what renders each case: the release's `prompt/name=sha256:...`, or the suite's own
    binding: str = ""  # the digest of the binding the run started on, which each case it stores carries


@dataclass
class Outcome:
    """Everything EvalCompleted carries besides the request's identity."""

    status: str
    error: str = ""
    results: list[domain.CaseResult] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict = field(default_factory=dict)
    comparisons: dict = field(default_factory=dict)
    baseline_run: str = ""
    warnings: list[str] = field(default_factory=list)
    ratios: dict = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)


class Execution:
    """Runs EvalRequested messages; `stopping` makes running evals finish in-flight cases and stop."""

    def __init__(self, ctx: ServiceContext, session: aiohttp.ClientSession, stopping: asyncio.Event) -> None:
        self.ctx = ctx
        self.session = session
        self.stopping = stopping

    async def load(self, run: EvalRun) -> Loaded:
        """Suite, dataset, the release's prompt and price book; ConfigError/NotFound name what is wrong.

        What the release holds (prompt, model config, tenant) is read from `run.bundle`, the binding the run
        started on as its first delivery recorded it, never from the release now: a resumed run asks its
        remaining cases as it asked the first ones, and the result names that binding (the gate passes it only
        while the release is still bound so)."""
        req, binding = run.request, run.binding
        # Refused before anything is read: the run's error, environment and decision would keep the credential
        # (the CLI refuses it before it requests; this is for a request published otherwise).
        shipped.refuse_url_credentials(req.endpoint)
        suite = domain.parse_suite(await artifacts.load_structured(self.ctx.bus, req.suite))
        # The cases are asked with the release's prompt, as its application asks them (it fetches the prompt from
        # the registry by release or alias): the gate judges the prompt the decision names, and a changed prompt
        # is a changed request, never answered from another release's cache entries.
        arts = evaluated_artifacts(req, binding)
        prompt, where = "suite", "suite.prompt.template"
        if (bound := domain.bound_prompt(arts, req.release)) is not None:
            prompt = f"{bound[0]}={bound[1]}"
            try:
                data = await artifacts.load(self.ctx.bus, bound[1])
            except NotFound as exc:  # ArtifactCorrupt stays so
                raise type(exc)(f"prompt {bound[0]} of release {req.release!r}: {exc.message}") from None
            suite, where = domain.with_prompt(suite, prompt, data)
        target = judged = judge_params = None
        model, params, tenant = req.model or suite.model, {}, ""
        if isinstance(suite.task, domain.RecordedTask):
            if not req.rerun_of:
                targets.recorded(req.release, suite.task.app, suite.task.release)
            tenant = await self._bound_tenant(suite.task.release, run.bundle, own=suite.task.release == req.release)
        if suite.task.type == "call":
            # A rerun (which no gate reads) may try another model on purpose; a gated run evaluates what ships.
            ships = None if req.rerun_of else await self._shipped(req.release, run.bundle)
            target, model, params = targets.evaluated(self.ctx.settings, ships, req.endpoint, model)
        spec = next((s for s in suite.scorers if s.name == judge.NAME), None)
        if spec is not None:
            judge_params = judge.parse_params(spec.params)
            if judge_params.endpoint or req.endpoint:
                judged = targets.of_run(self.ctx.settings, judge_params.endpoint or req.endpoint, "judge endpoint")
            elif target is not None:
                judged = target  # the judge defaults to where the evaluated model is
        inputs = [req.suite]
        if isinstance(suite.dataset, str):
            rows = await artifacts.load_structured(self.ctx.bus, suite.dataset)
            cases = domain.parse_cases(rows, where=f"dataset {suite.dataset}")
            inputs.append(suite.dataset)
        else:
            cases = suite.dataset
        for case in cases:  # template errors fail the run up front, before any call
            domain.render(suite, case, where=where)
        if suite.price_book:
            prices = pricing.parse(await artifacts.load_structured(self.ctx.bus, suite.price_book), suite.price_book)
            inputs.append(suite.price_book)
            source = suite.price_book
        else:
            prices = pricing.load_file(self.ctx.settings.price_book)
            source = self.ctx.settings.price_book or "the shipped price book"
        return Loaded(suite, cases, inputs, prices, source, target, model, params, judged, judge_params, tenant,
                      arts, prompt, binding_digest(binding))

    async def _bound_tenant(self, release: str, started: Mapping[str, Any] | None, *, own: bool) -> str:
        """The tenant `release` was registered under (its binding, never the request): a recorded task scores
        only the events a router served to that tenant. NotFound when the release is not registered: for the
        run's own release (`own`), when the run started (`started`, its recorded bundle); for another (a rerun's
        task), now."""
        bundle = started
        if not own:
            try:
                bundle = await artifacts.release_of(self.ctx.bus, release)
            except NotFound:
                bundle = None
        if bundle is None:
            raise NotFound(f"the suite scores events recorded for release {release!r}, which is not registered "
                           "(`lockgate release create`, or `apply`)" + (" when the run started" if own else "")
                           + ": only events a router served to the tenant it is registered under count")
        tenant = bundle.get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise ConfigError(f"release {release!r} is bound under no tenant, so no recorded event can be told "
                              "to be its own")
        return tenant

    async def _shipped(self, release: str, bundle: Mapping[str, Any] | None) -> Shipped | None:
        """The model config of `bundle`, the release as bound when the run started; None when it was not
        registered then or carries none usable (the run is then evaluated as asked, and the gatekeeper blocks a
        release that was not registered when the run started; the router serves no release without one). An
        unreadable bus stays an error (retried), never "evaluate as asked"."""
        if bundle is None:
            return None
        try:
            return await shipped.of_bundle(self.ctx.bus, release, bundle)
        except (NotFound, ConfigError):
            return None

    async def execute(self, req: EvalRequested, loaded: Loaded, cases_after: int = 0) -> Outcome:
        """Run the cases not answered yet, then summarise all of them. The answered ones are those this evaluator
        published after the facts stream's sequence `cases_after` (the run's record says where its cases start): none
        is asked again. A case asked but not yet published when the evaluator died (its batch not acknowledged by
        JetStream), or published so long ago that it has left the stream, is asked again."""
        suite, cases = loaded.suite, loaded.cases
        keys = {(c.id, r) for c in cases for r in range(suite.repeats)}
        # Read back from the facts stream, where nats-server lets no identity but the evaluator's publish a case;
        # never from the query service's answer, which whoever holds the query credential could give first (probe
        # p65 F1: 20 made-up perfect cases taken as answered, no call made, and the gate signed a PASS).
        published = await persist.published_cases(self.ctx.bus, req.run_id, cases_after)
        finished = [r for r in domain.finished(published) if (r.case_id, r.repeat) in keys]
        # Every case a run stores says which binding it was asked under; the run's is fixed when it starts, so
        # another here was stored by an evaluator that did not record it (or for another binding): resumed, those
        # answers would be judged as this binding's, and asked again, the sink would keep the first (one row per
        # case), so the run fails, naming why, and the gate blocks it.
        if other := [r for r in finished if r.details.get("binding") != loaded.binding]:
            return Outcome(status="failed", error=(
                f"eval run {req.run_id} cannot resume: {len(other)} of its {len(finished)} stored cases (first "
                f"{other[0].case_id}) were not asked under the binding of release {req.release!r} the run started "
                f"on ({loaded.binding}); run the eval again under a new run id"))
        skip = {(r.case_id, r.repeat) for r in finished}
        if finished:
            log.info("eval %s resumes: %d of %d cases already answered", req.run_id, len(finished), len(keys))
        ticker = Ticker(self._progress_sink(req.run_id), req.run_id, len(keys), done=len(finished),
                        errors=sum(1 for r in finished if r.error))
        await ticker.send()
        writer = persist.CaseWriter(self.ctx.bus, req.run_id, req.release, tenant=req.tenant,
                                    capacity=max(1, len(keys) - len(finished)))

        async def on_result(result: domain.CaseResult) -> None:
            recorded = writer.add(replace(result, details={**result.details, "binding": loaded.binding}))
            await ticker.step(bool(recorded.error))

        cache = None
        if self.ctx.settings.eval_cache and req.cache and not req.rerun_of:  # a rerun calls everything afresh
            cache = ResponseCache(await self.ctx.bus.kv(self.ctx.bus.subjects.kv_eval_cache))
        try:
            new = await self._run(req, loaded, skip, on_result, cache)
        finally:
            # Publish what finished even when cancelled, so a resume does not call those cases again.
            await asyncio.shield(writer.close())
            if cache is not None:
                await cache.flush()
        # A case whose result was too large to store is summarised as the error it was stored as.
        new = [writer.refused.get((r.case_id, r.repeat), r) for r in new]
        order = {c.id: i for i, c in enumerate(cases)}
        results = sorted([*finished, *new], key=lambda r: (order[r.case_id], r.repeat))
        outcome = await self._summarise(req, loaded, results)
        outcome.environment = environment.for_run(
            environment.host(), model=loaded.model,
            endpoint=shown_url(loaded.target.id if loaded.target is not None else req.endpoint),
            params=_params(suite, loaded), suite=req.suite,
            dataset=suite.dataset if isinstance(suite.dataset, str) else "inline", repeats=suite.repeats,
            concurrency=req.concurrency, timeout_s=req.timeout_s, cache=bool(cache is not None))
        # Whether `model` and `endpoint` were called ("call") or only name the run ("recorded": it scored
        # served events): the gate checks a called model against the release's model config.
        outcome.environment["task"] = suite.task.type
        if loaded.target is not None and loaded.target.member:
            # A release naming a group is asked at the member the router serves it from: the run says which.
            outcome.environment["endpoint_member"] = loaded.target.member
        outcome.environment["prompt"] = loaded.prompt
        # The result names the release's whole binding (the content its decision covers, which the gate requires
        # it to name); what of it the run did not read is said, so nobody takes it for judged.
        dataset = suite.dataset if isinstance(suite.dataset, str) else ""
        if skipped := domain.unread(loaded.artifacts, suite=req.suite, dataset=dataset, policy=req.policy):
            outcome.warnings.append(
                f"the run read suite {req.suite}, dataset {dataset or 'inline'} and policy {req.policy or 'none'}, "
                f"not the release's {', '.join(skipped)}, which the decision covers but this run did not judge")
        return outcome

    async def _run(self, req: EvalRequested, loaded: Loaded, skip: set[tuple[str, int]],
                   on_result: runner.OnResult, cache: ResponseCache | None) -> list[domain.CaseResult]:
        suite, cases = loaded.suite, loaded.cases
        policy = runner.CallPolicy(timeout_s=max(0.1, req.timeout_s))
        judge_hook = None
        if (params := loaded.judge_params) is not None:
            at = loaded.judge or Access(id="", base="")  # no endpoint: each call fails, and says so
            upstream = Upstream(self.session, at, params.model, policy, cache, tenant=req.tenant)
            judge_hook = judge_step(upstream, params)
        if suite.task.type == "recorded":
            t = suite.task
            events = await persist.recorded_events(self.ctx.bus, t.app, t.release, t.since, loaded.tenant)
            # In a thread: each served answer is scored here (runner.scored says why not on the loop).
            made = await asyncio.to_thread(recorded.results, suite, cases, events, skip, tenant=loaded.tenant)
            return await runner.judge_results(made, judge_hook, concurrency=req.concurrency, on_result=on_result,
                                              stopping=self.stopping, max_run_s=self.ctx.settings.eval_max_run_s)
        bucket = TokenBucket(suite.rate_limit_rps) if suite.rate_limit_rps else None
        at = loaded.target or Access(id=shown_url(req.endpoint), base=req.endpoint)
        target = Upstream(self.session, at, loaded.model, policy, cache, bucket, tenant=req.tenant)
        call = functools.partial(target, params=_params(suite, loaded))
        return await runner.run_cases(suite, cases, call, concurrency=req.concurrency, skip=skip,
                                      on_result=on_result, judge=judge_hook, stopping=self.stopping,
                                      max_run_s=self.ctx.settings.eval_max_run_s)

    def _progress_sink(self, run_id: str):
        subject = self.ctx.bus.subjects.eval_progress(run_id)

        async def publish(data: bytes) -> None:
            await self.ctx.bus.nc.publish(subject, data)

        return publish

    async def _summarise(self, req: EvalRequested, loaded: Loaded, results: list[domain.CaseResult]) -> Outcome:
        suite = loaded.suite
        warnings: list[str] = []
        model = loaded.model
        costs = None
        price = loaded.prices.get(model)
        if price is not None:
            costs = [price.cost(r.input_tokens, r.output_tokens) for r in results]
        elif loaded.prices or model:
            warnings.append(f"model {model!r} is not in {loaded.price_source}; cost metrics are omitted")
        if judged := judge_warning(results):
            warnings.append(judged)
        if isinstance(suite.task, domain.RecordedTask) and (aged := recorded.age_warning(
                results, time.time_ns() // 1000, suite.task.since)):
            warnings.append(aged)
        metrics = domain.aggregate(suite, results, costs)
        if cached := round(metrics.get(domain.N_CACHED, 0)):
            # Said, since a latency of such a row was measured when it was first called, maybe days ago, and a
            # relative latency rule sees a case shared with a baseline that filled the cache as unchanged (probe p29).
            warnings.append(f"eval cache: {cached} of {len(results)} rows were answered from the cache: their answers, "
                            "scores and latencies are those of the call that filled it (an earlier run's); "
                            "`--no-cache` calls and times every case afresh")
        calibration_metrics, calibration_warnings = calibrated.metrics(suite, results)
        metrics.update(calibration_metrics)
        warnings.extend(calibration_warnings)
        # Resampling is CPU work: off the loop so the heartbeat keeps beating.
        intervals = await asyncio.to_thread(summary.intervals, suite, results, costs)
        if suite.slices:
            slice_metrics, slice_intervals = await asyncio.to_thread(summary.slice_metrics, suite, results,
                                                                     self._labels(loaded))
            metrics.update(slice_metrics)
            intervals.update(slice_intervals)
        outcome = Outcome(status="completed", results=results, metrics=metrics, intervals=intervals,
                          warnings=warnings, error=domain.failure_summary(results))
        if outcome.error:
            outcome.status = "failed"
        if req.baseline:
            await self._compare(req, loaded, results, outcome)
        return outcome

    async def _compare(self, req: EvalRequested, loaded: Loaded, results: Sequence[domain.CaseResult],
                       outcome: Outcome) -> None:
        suite = loaded.suite
        base_run = await persist.baseline_run(self.ctx.bus, req.baseline, req.suite)
        if base_run is None:
            outcome.warnings.append(f"baseline {req.baseline!r} has no completed run of suite {req.suite}; "
                                    "nothing was compared")
            return
        # Which run is the query service's word, checked: a run the evaluator recorded of this suite for the baseline
        # (and the gatekeeper takes only the run the baseline's PASS judged); its cases are the evaluator's own.
        base, why = await persist.compared_cases(self.ctx.bus, base_run, suite=req.suite, release=req.baseline)
        if base is None:
            # No run named, nothing compared: the gatekeeper refuses the baseline (baseline_allowed), as with none.
            outcome.warnings.append(f"baseline {req.baseline!r}: {why}; nothing was compared")
            return
        outcome.baseline_run = base_run
        price = loaded.prices.get(loaded.model)
        # The baseline's tokens are priced like the candidate's: the comparison is of usage at today's prices.
        cost = None if price is None else (lambda r: price.cost(r.input_tokens, r.output_tokens))
        comparisons, warnings, outcome.ratios = await asyncio.to_thread(summary.compare_all, suite, results, base,
                                                                         cost)
        if suite.slices:
            comparisons.update(await asyncio.to_thread(summary.slice_compare, suite, results, base,
                                                       self._labels(loaded)))
        outcome.comparisons = comparisons
        outcome.warnings.extend(warnings)

    async def rerun(self, req: EvalRequested, loaded: Loaded | None, outcome: Outcome) -> EvalReran:
        """Publish a rerun's result beside the stored run's, recomputed from its stored cases by the same code
        (same suite, same seeds): on its own subject, so no gate acts on it and no eval run is stored."""
        stored = Outcome(status="failed")
        n_stored = 0
        if loaded is not None:
            keys = {(c.id, r) for c in loaded.cases for r in range(loaded.suite.repeats)}
            stored_cases, why = await persist.compared_cases(self.ctx.bus, req.rerun_of, suite=req.suite)
            cases = [r for r in stored_cases or [] if (r.case_id, r.repeat) in keys]
            order = {c.id: i for i, c in enumerate(loaded.cases)}
            cases.sort(key=lambda r: (order[r.case_id], r.repeat))
            n_stored = len(cases)
            if cases:
                stored = await self._summarise(msgspec.structs.replace(req, baseline=""), loaded, cases)
        warnings = list(outcome.warnings)
        # How many rows the cache answered says how the stored run was served, not what it found: a rerun (the cache
        # off) has none, and is not to disagree for that.
        stored.metrics.pop(domain.N_CACHED, None)
        if loaded is not None and not n_stored:
            warnings.append(f"run {req.rerun_of} has no stored cases of suite {req.suite}"
                            f"{f' ({why})' if why else ''}: nothing to compare")
        done = EvalReran(
            run_id=req.run_id, rerun_of=req.rerun_of, release=req.release, suite=req.suite, status=outcome.status,
            n_cases=len(outcome.results), n_errors=sum(1 for r in outcome.results if r.error), error=outcome.error,
            metrics=outcome.metrics, intervals=outcome.intervals, stored_metrics=stored.metrics,
            stored_intervals=stored.intervals, stored_cases=n_stored, environment=outcome.environment,
            warnings=warnings, tenant=req.tenant, source="evaluator")
        await self.ctx.bus.publish(self.ctx.bus.subjects.eval_reran, done, msg_id=f"eval-reran-{req.run_id}")
        return done

    @staticmethod
    def _labels(loaded: Loaded) -> dict[str, tuple[str, ...]]:
        return {c.id: domain.slice_labels(loaded.suite, c) for c in loaded.cases}

    async def stored_event_id(self, run_id: str) -> str | None:
        """The EvalCompleted id of a run already stored (a redelivery after the run row was written)."""
        return await persist.stored_event_id(self.ctx.bus, run_id)

    async def finish(self, req: EvalRequested, outcome: Outcome, inputs: list[str], binding: ReleaseBinding,
                     event_id: str | None = None) -> EvalCompleted:
        """Publish EvalCompleted (the sink stores it as the run's `eval_runs` row) and the lineage run.

        `binding` is the release's as the run's record holds it (read at its first delivery); it is never read
        again here: a release registered while the run called what its request named would be named as what was
        judged."""
        n_errors = sum(1 for r in outcome.results if r.error)
        arts = evaluated_artifacts(req, binding)
        env = outcome.environment
        if env:
            # The environment is an artifact like the suite and dataset the run read: content-addressed (the same
            # environment is the same hash, registered once), its hash on the run and among the run's lineage
            # inputs, so `lineage sha256:<env>` finds every run that shared it. Before (probe p29 F9), it was only
            # this map: no hash, and nothing could find the runs of one environment.
            env = {**env, environment.HASH_KEY: await self._register_environment(env, req.tenant)}
            inputs = [*inputs, env[environment.HASH_KEY]]
        done = EvalCompleted(
            run_id=req.run_id, release=req.release, suite=req.suite, baseline=req.baseline, policy=req.policy,
            status=outcome.status, n_cases=len(outcome.results), n_errors=n_errors, metrics=outcome.metrics,
            error=outcome.error, intervals=outcome.intervals, baseline_run=outcome.baseline_run,
            comparisons=outcome.comparisons, warnings=outcome.warnings, artifacts=arts,
            ratios=outcome.ratios, environment=env, binding=binding,
            tenant=req.tenant, source="evaluator", **({"id": event_id} if event_id else {}),
        )
        # The digest of its cases, before the result: any run compared with this one later takes the query service's
        # answer for its cases only when it matches (persist.compared_cases).
        await evalruns.record_cases(self.ctx.bus, req.run_id, domain.cases_digest(outcome.results))
        await self.publish(done, inputs)
        if outcome.status == "failed":
            log.warning("eval %s for %s failed: %s", req.run_id, req.release, outcome.error)
        return done

    async def _register_environment(self, env: Mapping[str, str], tenant: str) -> str:
        """Register a run's environment as an `environment` artifact of the run's tenant; returns its hash."""
        content = environment.content(env)
        registered = await artifacts.register(self.ctx.bus, "environment",
                                              environment.artifact_name(environment.digest(content)), content,
                                              tenant=tenant, once=True)
        return registered.hash

    async def publish(self, done: EvalCompleted, inputs: list[str]) -> None:
        """EvalCompleted, then the lineage run linking the suite, dataset and environment to the result."""
        s = self.ctx.bus.subjects
        await self.ctx.bus.publish(s.eval_completed, done, msg_id=f"eval-completed-{done.run_id}")
        if inputs:
            lineage = LineageRun(run_id=done.run_id, kind="eval", release=done.release, inputs=inputs,
                                 outputs=[done.run_id], tenant=done.tenant, source="evaluator")
            await self.ctx.bus.publish(s.lineage_run, lineage, msg_id=f"lineage-eval-{done.run_id}")


def evaluated_artifacts(req: EvalRequested, binding: ReleaseBinding) -> dict[str, str]:
    """The release content a run evaluates and its result names: the binding read when the run started (the run
    renders its prompt and calls its model config, and the decision covers it); an unregistered name's is only
    what the request says (the gate blocks it)."""
    return dict(binding.artifacts) if binding.registered else dict(req.artifacts)


def load_error(exc: ConfigError | NotFound) -> Outcome:
    """A suite that cannot run still yields a (failed) result the gate blocks on: never silent."""
    return Outcome(status="failed", error=exc.message)


def _params(suite: domain.Suite, loaded: Loaded) -> dict | None:
    """What each call sends besides model and messages: the suite's needs, then the release's fixed sampling
    parameters over them (as the router sends them over a client's)."""
    merged = {**(calibrated.request_params(suite) or {}), **loaded.params}
    return merged or None
