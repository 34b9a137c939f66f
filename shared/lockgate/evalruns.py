"""Requested eval runs in KV: the evaluator records each request it accepts, and the gatekeeper
decides only on an EvalCompleted for a recorded run whose content matches it. Both read a release's
binding the same way (`binding_of`): the evaluator when a run starts, the gatekeeper when it decides.

Who may write this bucket (the evaluator's NATS identity only) is enforced by NATS permissions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import nats.errors
import nats.js.errors

from lockgate.codec import Codec, encode
from lockgate.contracts import EvalCompleted, EvalRequested, ReleaseBinding
from lockgate.errors import BusUnavailable, InvalidEvent
from lockgate.identity import bundle_content
from lockgate.ids import content_hash
from lockgate.subjects import token

_requests: Codec[EvalRequested] = Codec(EvalRequested)


class UntrustedEvalResult(InvalidEvent):
    """An eval result for a run nobody requested, or whose content differs from the request (dead-lettered)."""


class RunIdTaken(InvalidEvent):
    """An eval request under a run id already recorded for another request (dead-lettered)."""


async def record_request(bus: Any, req: EvalRequested) -> None:
    """Record a request the evaluator accepted, before it runs (so its result can never arrive first).

    A run id binds once: its stored cases are what a redelivery resumes from, so a second request under it
    (another release, model or suite, or a rerun's run id now asked without `rerun_of`) would be judged on
    the first one's answers without a call. Only the same request again (a redelivery) passes; any other
    raises RunIdTaken."""
    key = token(req.run_id)
    try:
        kv = await bus.kv(bus.subjects.kv_eval_runs)
        try:
            await kv.create(key, encode(req))
            return
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await kv.get(key)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot record eval run {req.run_id} in KV {bus.subjects.kv_eval_runs}: {exc!r}") from None
    recorded = _requests.decode(entry.value) if entry.value else None
    if recorded != req:
        was = f"release {recorded.release!r}" + (f", a rerun of {recorded.rerun_of}" if recorded.rerun_of else "") \
            if recorded is not None else "a request"
        raise RunIdTaken(f"eval request {req.id} ({req.release}) refused: run id {req.run_id!r} is already "
                         f"recorded for another request ({was}); its stored cases are that request's. "
                         "Give every eval a new run id")


async def requested_run(bus: Any, run_id: str) -> EvalRequested | None:
    """The recorded request of a run, or None if no evaluator accepted one."""
    try:
        kv = await bus.kv(bus.subjects.kv_eval_runs)
        entry = await kv.get(token(run_id))
    except nats.js.errors.KeyNotFoundError:
        return None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot read eval run {run_id} from KV {bus.subjects.kv_eval_runs}: {exc!r}") from None
    return _requests.decode(entry.value) if entry.value else None


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
