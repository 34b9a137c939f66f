"""Where eval results go: finished cases published as facts for the sink, and read back from their stream to resume
a run or compare with it; baseline and recorded outputs read through the query service (this process never opens
ClickHouse), a run's cases checked against the digest the evaluator recorded them with."""

from __future__ import annotations

import contextlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

import msgspec

from lockgate import evalruns
from lockgate.batcher import Batcher
from lockgate.bus import Bus
from lockgate.codec import Codec, encode
from lockgate.contracts import EvalCaseResult, EvalCasesRecorded
from lockgate.errors import BusUnavailable, InvalidEvent
from lockgate.ids import derived_id
from lockgate.outbox import chunked
from lockgate.queryclient import ask, ask_pages
from lockgate.retry import RetryPolicy
from lockgate.services.evaluator import domain

log = logging.getLogger("lockgate.evaluator.persist")
_facts: Codec[EvalCasesRecorded] = Codec(EvalCasesRecorded)


class CaseWriter:
    """Publishes finished cases in batches (by count, or every `interval_s`) for the sink to store.

    A batch's id, its Nats-Msg-Id, derives from the run and the batch's (case, repeat) keys, so a batch
    published again is dropped by JetStream; a case published again in another batch (a resumed run
    re-running a case whose batch the stopped evaluator published without seeing it acknowledged, or past the
    stream's age) is dropped by the sink, which stores each (run, case, repeat) once. So no path, cancellation
    included, stores a case twice.
    """

    def __init__(self, bus: Bus, run_id: str, release: str, *, tenant: str = "default", batch: int = 256,
                 interval_s: float = 0.25, capacity: int = 100_000, retry: RetryPolicy | None = None) -> None:
        self.bus = bus
        self.run_id = run_id
        self.release = release
        self.tenant = tenant
        self.written = 0
        # The cases recorded as errors because their result, even cut, was too large for a bus message (`add`).
        self.refused: dict[tuple[str, int], domain.CaseResult] = {}
        self._retry = retry or RetryPolicy()
        # Sized by the caller to the whole run, so no finished case is ever refused. Each case with its encoded size,
        # measured once, for `_publish` to cut the batch by.
        self._batcher: Batcher[tuple[EvalCaseResult, int]] = Batcher(
            self._publish, max_items=batch, max_age_s=interval_s, capacity=capacity, name=f"eval-cases:{run_id}")

    def add(self, result: domain.CaseResult) -> domain.CaseResult:
        """Queue one finished case (never waits); returns it as recorded: itself, or an error saying its result
        was too large for one bus message even with its texts cut (domain.unpublishable), then in `refused`."""
        fact = domain.case_fact(result)
        if (size := len(encode(fact))) > domain.FACT_BYTES:
            result = self.refused[(result.case_id, result.repeat)] = domain.unpublishable(result, size)
            log.warning("eval %s: case %s/%d recorded as an error: %s", self.run_id, result.case_id, result.repeat,
                        result.error)
            fact = domain.case_fact(result)
            size = len(encode(fact))
        if not self._batcher.add((fact, size)):
            log.warning("eval %s: case %s/%d not queued (buffer full); a resume runs it again",
                        self.run_id, result.case_id, result.repeat)
        return result

    def fact(self, cases: list[EvalCaseResult]) -> EvalCasesRecorded:
        """The fact one batch is published as; the same cases always give the same id."""
        keys = sorted(f"{c.case_id}\x00{c.repeat}" for c in cases)
        return EvalCasesRecorded(id=derived_id("eval-cases", self.run_id, *keys), run_id=self.run_id,
                                 release=self.release, cases=cases, tenant=self.tenant, source="evaluator")

    async def _publish(self, batch: list[tuple[EvalCaseResult, int]]) -> None:
        # As many messages as it takes to keep each under a bus message's bytes, as the cost service cuts its ledger
        # facts and the outbox the router's events: a batch of cases that finished together (a run answered from the
        # cache) was one message over NATS' max_payload, refused at every retry, and the run dead-lettered
        # (probe p52 F1: 256 cases of 4 KB answers, 1.1 MB). Each part's id derives from its own cases.
        parts = chunked([fact for fact, _ in batch], [size + 1 for _, size in batch], max_items=len(batch))
        for part in parts:
            fact = self.fact(part)
            await self._retry.call(lambda fact=fact: self.bus.publish(self.bus.subjects.eval_cases, fact),
                                   retry_on=BusUnavailable, what=f"publish of eval {self.run_id} cases")
            self.written += len(part)

    async def close(self) -> None:
        """Publish what is left and wait for it; raises BusUnavailable if any case could not be published
        (the eval is then redelivered and resumes from what was published)."""
        await self._batcher.close()
        if self._batcher.failed or self._batcher.dropped:
            raise BusUnavailable(f"eval {self.run_id}: {self._batcher.failed + self._batcher.dropped} case "
                                 "results were not published")


def _result(row: dict[str, Any]) -> domain.CaseResult:
    details: dict[str, Any] = {}
    if row.get("details"):
        with contextlib.suppress(ValueError):
            details = json.loads(row["details"])
    return domain.CaseResult(
        case_id=row["case_id"], repeat=int(row["repeat"]), input=row["input"], expected=row["expected"],
        output=row["output"], scores=dict(row["scores"]), latency_ms=float(row["latency_ms"]),
        input_tokens=int(row["input_tokens"]), output_tokens=int(row["output_tokens"]), error=row["error"],
        details=details)


async def compared_cases(bus: Bus, run_id: str, *, suite: str,
                         release: str | None = None) -> tuple[list[domain.CaseResult] | None, str]:
    """The cases of a run of `suite` (of `release`, if given) another run compares with, as the evaluator published
    them, or None and why they cannot be had.

    The query service's answer is taken only when it is the cases the evaluator recorded the run completing with
    (their digest, in the run's record in the eval_runs bucket, which only the evaluator's identity may write);
    else the cases are read back from the facts stream, when it still holds all the run published. The query lane
    is whatever its first responder says: before (probe p65), a made-up answer for the baseline's cases (every one
    wrong) let a "no worse than baseline" rule pass a worse candidate, and the gatekeeper signed the PASS."""
    run = await evalruns.run_record(bus, run_id)
    if run is None or run.request.suite != suite or (release is not None and run.request.release != release):
        return None, (f"run {run_id} is no run the evaluator recorded of suite {suite}"
                      + (f" for release {release!r}" if release is not None else ""))
    if run.cases_digest and domain.cases_digest(answered := await run_cases(bus, run_id)) == run.cases_digest:
        return answered, ""
    facts = bus.subjects.streams["facts"].name
    if await bus.first_seq(facts) <= run.cases_after + 1:
        return domain.finished(await published_cases(bus, run_id, run.cases_after)), ""
    why = ("the query service's answer is not the cases the evaluator recorded it completing with"
           if run.cases_digest else "it completed before the evaluator recorded a run's cases")
    return None, (f"the cases of run {run_id} cannot be checked: {why}, and they have left the facts stream "
                  f"{facts}")


async def run_cases(bus: Bus, run_id: str) -> list[domain.CaseResult]:
    """Stored per-case results of a run, one per (case, repeat), in (case_id, repeat) order, as the query service
    answers (no authority: `compared_cases` checks them)."""
    rows = await ask_pages(bus, "eval_case_results", {"run_id": run_id},
                           after=lambda r: {"after_case": r["case_id"], "after_repeat": r["repeat"]})
    return [_result(r) for r in rows]


async def published_cases(bus: Bus, run_id: str, after: int) -> list[domain.CaseResult]:
    """The cases of a run published after the facts stream's sequence `after`, oldest first, whether or not the
    sink has stored them: read from the stream, which keeps them for its `max_age_s` (7 days), not from the table.

    Only the evaluator's identity may publish on the subject (nats-server checks it), so what is read here is its own;
    the query service's answer is whatever the first responder on the query subject says (probe p65 F1). A resumed run
    that read the table asked again every case the sink had not stored yet (it was behind, or down), and paid the
    upstream twice for it."""
    out: list[domain.CaseResult] = []
    named = msgspec.json.encode(run_id)  # other runs' batches are skipped undecoded
    async for _, _, data in bus.stored_after(bus.subjects.streams["facts"].name, bus.subjects.eval_cases, after):
        if named not in data:
            continue
        try:
            fact = _facts.decode(data)
        except InvalidEvent:
            continue  # not a batch of cases (the sink dead-letters it): nothing of this run's answers
        if fact.run_id == run_id:
            out.extend(domain.fact_case(c) for c in fact.cases)
    return out


async def baseline_run(bus: Bus, release: str, suite: str) -> str | None:
    """The run of `suite` for `release` to compare with (the query service's baseline_run: its latest completed run
    the gate judged, else its latest completed measurement), or None."""
    return await ask(bus, "baseline_run", {"release": release, "suite": suite}, into=str | None)


async def stored_event_id(bus: Bus, run_id: str) -> str | None:
    """The EvalCompleted id stored with a run's summary row, or None if it was never stored."""
    return await ask(bus, "eval_run_event_id", {"run_id": run_id}, into=str | None)


async def recorded_events(bus: Bus, app: str, release: str, since: str, tenant: str) -> list[dict[str, Any]]:
    """Chat requests a router served to `tenant` for app/release (since a time), each with its request digest,
    failed ones too, most recent first."""
    args: dict[str, Any] = {"app": app, "release": release, "tenant": tenant}
    if since:
        at = datetime.fromisoformat(since)
        args["since"] = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)  # naive times are UTC
    return await ask_pages(bus, "recorded_events", args,
                           after=lambda r: {"before_us": r["time_us"], "before_id": r["id"]})

