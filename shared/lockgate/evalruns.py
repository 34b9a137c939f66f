"""Requested eval runs in KV: the evaluator records each request it accepts, with the release's bundle as
bound at the run's first delivery (what every delivery of the run evaluates), and the gatekeeper decides only
on an EvalCompleted for a recorded run whose content matches it. Both read a release's binding the same way
(`binding_of`): the evaluator when a run starts, the gatekeeper when it decides.

Who may write this bucket (the evaluator's NATS identity only) is enforced by NATS permissions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import msgspec
import nats.errors
import nats.js.errors

from lockgate import artifacts
from lockgate.codec import Codec, encode
from lockgate.contracts import EvalCompleted, EvalRequested, ReleaseBinding
from lockgate.errors import BusUnavailable, InvalidEvent, NotFound
from lockgate.identity import bundle_content
from lockgate.ids import content_hash
from lockgate.subjects import token


class EvalRun(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="lockgate.eval.run"):
    """A run as the evaluator recorded it at its first delivery: the request, and the release's bundle as bound
    then (None: not registered). Every delivery of the run evaluates that bundle, never the release as bound at
    the redelivery: a name registered while the evaluator was down would otherwise have its prompt and
    parameters ask the rest of a run whose first cases were asked without them."""

    request: EvalRequested
    bundle: dict[str, Any] | None = None
    # The facts stream's last sequence when the run was recorded: every case the run publishes is stored after it,
    # so a resumed run reads the cases it published from there (those the sink has not stored yet included).
    # 0 in a record an older evaluator wrote: the stream is read from its start.
    cases_after: int = 0
    # The digest of the run's cases as it completed (`cases_digest`), written by the evaluator as it finishes the run;
    # "" until then, and in a record an older evaluator completed. What checks the query service's answer for the
    # run's cases when another run compares with them (the query lane is no authority: probe p65).
    cases_digest: str = ""

    @property
    def binding(self) -> ReleaseBinding:
        """What the run evaluates, and its result names (`EvalCompleted.binding`)."""
        return binding_of(self.bundle)


# What the bucket holds under a run id: the record, or (written by an evaluator before records carried the
# bundle) the bare request.
_records: Codec[EvalRun | EvalRequested] = Codec(EvalRun | EvalRequested)


class UntrustedEvalResult(InvalidEvent):
    """An eval result for a run nobody requested, or whose content differs from the request (dead-lettered)."""


class RunIdTaken(InvalidEvent):
    """An eval request under a run id already recorded for another request (dead-lettered)."""


async def record_request(bus: Any, req: EvalRequested) -> EvalRun:
    """Record a request the evaluator accepted, before it runs (so its result can never arrive first), with the
    release's bundle as bound now; return the run's record, which says what every delivery of it evaluates.

    The first delivery reads the release and records it; a redelivery gets that record and reads nothing (the
    binding it started on, whatever was registered since). A run id binds once: its stored cases are what a
    redelivery resumes from, so a second request under it (another release, model or suite, or a rerun's run id
    now asked without `rerun_of`) would be judged on the first one's answers without a call. Only the same request
    again (a redelivery) passes; any other raises RunIdTaken."""
    key = token(req.run_id)
    try:
        kv = await bus.kv(bus.subjects.kv_eval_runs)
        for _ in range(3):  # a concurrent delivery recording it first is read on the next turn
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                entry = None
            if entry is not None:
                recorded = _records.decode(entry.value) if entry.value else None
                if isinstance(recorded, EvalRun) and recorded.request == req:
                    return recorded
                if recorded != req:
                    _taken(req, recorded.request if isinstance(recorded, EvalRun) else recorded)
                # The bare request, recorded by an earlier evaluator: the bundle is recorded now, and the cases that
                # evaluator published are read from the stream's start (those carry no binding, so none of them is
                # taken as asked under this one: Execution.execute fails the run).
            after = 0 if entry is not None else await bus.last_seq(bus.subjects.streams["facts"].name)
            run = EvalRun(request=req, bundle=await _bundle(bus, req.release), cases_after=after)
            try:
                if entry is None:
                    await kv.create(key, encode(run))
                else:
                    await kv.update(key, encode(run), last=entry.revision)
                return run
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot record eval run {req.run_id} in KV {bus.subjects.kv_eval_runs}: {exc!r}") from None
    raise BusUnavailable(f"cannot record eval run {req.run_id} in KV {bus.subjects.kv_eval_runs}: its entry kept "
                         "changing while it was recorded")


def _taken(req: EvalRequested, recorded: EvalRequested | None) -> NoReturn:
    was = f"release {recorded.release!r}" + (f", a rerun of {recorded.rerun_of}" if recorded.rerun_of else "") \
        if recorded is not None else "a request"
    raise RunIdTaken(f"eval request {req.id} ({req.release}) refused: run id {req.run_id!r} is already "
                     f"recorded for another request ({was}); its stored cases are that request's. "
                     "Give every eval a new run id")


async def _bundle(bus: Any, release: str) -> dict[str, Any] | None:
    """The bundle `release` is bound to now, None if it is not registered (an unreachable bus stays an error)."""
    try:
        return await artifacts.release_of(bus, release)
    except NotFound:
        return None


async def requested_run(bus: Any, run_id: str) -> EvalRequested | None:
    """The recorded request of a run, or None if no evaluator accepted one."""
    recorded = await _read(bus, run_id)
    return recorded.request if isinstance(recorded, EvalRun) else recorded


async def run_record(bus: Any, run_id: str) -> EvalRun | None:
    """A run as the evaluator recorded it (a bare request, recorded by an older evaluator, as a record of it
    whose cases start at the stream's start and carry no digest), or None if no evaluator accepted it."""
    recorded = await _read(bus, run_id)
    return EvalRun(request=recorded) if isinstance(recorded, EvalRequested) else recorded


async def record_cases(bus: Any, run_id: str, digest: str) -> None:
    """Write the digest of a finished run's cases into its record (compare-and-set: the evaluator alone writes it).
    A run nobody recorded is left so (then nothing is compared with it but the cases its stream holds);
    BusUnavailable if the bucket cannot be written."""
    try:
        kv = await bus.kv(bus.subjects.kv_eval_runs)
        for _ in range(3):
            entry = await kv.get(token(run_id))
            run = _records.decode(entry.value) if entry.value else None
            # A bare request (an older evaluator's, which record_request replaces as the run starts) is left as it is:
            # a record without the bundle would have a redelivery evaluate the release as unregistered.
            if not isinstance(run, EvalRun) or run.cases_digest == digest:
                return
            try:
                await kv.update(token(run_id), encode(msgspec.structs.replace(run, cases_digest=digest)),
                                last=entry.revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot record the cases of eval run {run_id} in KV {bus.subjects.kv_eval_runs}: "
                             f"{exc!r}") from None
    raise BusUnavailable(f"cannot record the cases of eval run {run_id} in KV {bus.subjects.kv_eval_runs}: its entry "
                         "kept changing while it was written")


async def _read(bus: Any, run_id: str) -> EvalRun | EvalRequested | None:
    try:
        kv = await bus.kv(bus.subjects.kv_eval_runs)
        entry = await kv.get(token(run_id))
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot read eval run {run_id} from KV {bus.subjects.kv_eval_runs}: {exc!r}") from None
    return _records.decode(entry.value) if entry.value else None


def check_result(done: EvalCompleted, req: EvalRequested | None) -> None:
    """Raise UntrustedEvalResult unless `done` answers the recorded request `req` field for field."""
    if req is None:
        raise UntrustedEvalResult(f"eval result {done.id} for run {done.run_id!r} ({done.release}) refused: "
                                  f"no evaluator recorded a request for that run")
    diffs = [f"{field} {getattr(done, field)!r} != requested {getattr(req, field)!r}"
             for field in ("release", "suite", "policy", "baseline") if getattr(done, field) != getattr(req, field)]
    if diffs:
        raise UntrustedEvalResult(f"eval result {done.id} for run {done.run_id!r} refused: it does not match the "
                                  f"request ({'; '.join(diffs)})")


def binding_of(bundle: Mapping[str, Any] | None) -> ReleaseBinding:
    """A release's binding as `artifacts.release_of` read it (None: not registered): its bundle's content
    hash, without the author (what makes two registrations the same release), and its artifacts."""
    if bundle is None:
        return ReleaseBinding(registered=False)
    return ReleaseBinding(registered=True, bundle=content_hash(bundle_content(bundle)),
                          artifacts=dict(bundle.get("artifacts") or {}))


def binding_digest(binding: ReleaseBinding) -> str:
    """The digest of a binding each case a run stores carries (`details["binding"]`): what it was asked under."""
    return content_hash(msgspec.to_builtins(binding))
