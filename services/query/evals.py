"""Eval runs and their per-case results."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lockgate.contracts.inference import CLIENT_DISCONNECTED, REQUEST_DIGEST
from lockgate.services.query.registry import Limit
from lockgate.store import Store


def eval_runs(store: Store, release: str | None = None, limit: Limit = 50) -> list[dict[str, Any]]:
    """Eval runs for one release or all, latest first (metrics as a dict)."""
    where = "WHERE release = {release:String}" if release else ""
    return store.rows(
        "SELECT run_id, release, suite, baseline, policy, status, n_cases, n_errors, metrics, error, time, "
        f"event_id FROM eval_runs {where} ORDER BY time DESC, run_id DESC LIMIT {{limit:UInt32}}",
        {"release": release or "", "limit": max(0, int(limit))},
    )


def eval_cases(store: Store, run_id: str, limit: Limit = 1000) -> list[dict[str, Any]]:
    """Per-case results of one run, in case order (errors included)."""
    return store.rows(
        "SELECT case_id, repeat, input, expected, output, scores, latency_ms, input_tokens, output_tokens, "
        "error, time FROM eval_cases WHERE run_id = {run_id:String} ORDER BY case_id, repeat "
        "LIMIT {limit:UInt32}",
        {"run_id": run_id, "limit": max(0, int(limit))},
    )


# The services' reads: paged by key (never OFFSET), so a large run arrives in replies that each
# fit in one NATS message and a page boundary never skips or repeats a row.

def eval_case_results(store: Store, run_id: str, after_case: str = "", after_repeat: int = -1,
                      limit: Limit = 500) -> list[dict[str, Any]]:
    """Stored results of a run after (case_id, repeat), one row per (case, repeat), with details."""
    return store.rows(
        "SELECT case_id, repeat, input, expected, output, scores, latency_ms, input_tokens, output_tokens, "
        "error, details FROM eval_cases WHERE run_id = {run_id:String} "
        "AND (case_id, toInt32(repeat)) > ({after_case:String}, {after_repeat:Int32}) "
        "ORDER BY case_id, repeat LIMIT 1 BY case_id, repeat LIMIT {limit:UInt32}",
        {"run_id": run_id, "after_case": after_case, "after_repeat": after_repeat, "limit": max(0, limit)},
    )


def baseline_run(store: Store, release: str, suite: str) -> str | None:
    """The run of `suite` for `release` an eval of another release is compared with: its latest completed run the
    gate judged (one naming a policy), else its latest completed measurement, else None."""
    # A gated run of the release replaces its decision, so the newest one is the run its current decision judged
    # (when that decision is of this suite): the only run the gate takes as the yardstick. Before, the newest run
    # of any kind was taken, so an operator's measurement of the baseline (`eval run` without --policy) became it,
    # and the gate refused every candidate compared with that baseline (rule baseline_allowed) until it was gated
    # again. A measurement still serves a release no gate ever judged on the suite: the comparison is shown, and
    # the gate refuses it as before.
    rows = store.rows(
        "SELECT run_id FROM eval_runs WHERE release = {release:String} AND suite = {suite:String} "
        "AND status = 'completed' ORDER BY policy != '' DESC, time DESC LIMIT 1", {"release": release, "suite": suite})
    return rows[0]["run_id"] if rows else None


def eval_run_event_id(store: Store, run_id: str) -> str | None:
    """The EvalCompleted id stored with a run's summary row, or None if the run was never stored."""
    rows = store.rows("SELECT event_id FROM eval_runs WHERE run_id = {run_id:String} LIMIT 1", {"run_id": run_id})
    return rows[0]["event_id"] if rows else None


def recorded_events(store: Store, app: str, release: str, tenant: str, since: datetime | None = None,
                    before_us: int | None = None, before_id: str = "", limit: Limit = 500) -> list[dict[str, Any]]:
    """Chat requests of `tenant` that a router served for app/release, with the digest of the whole request
    (`digest`), failed ones too, cache replays left out; most recent first, one per id; paged by (time_us, id)
    before the last row of the previous page."""
    # Only served events: an application (of any tenant) may send events naming any release on its own subject.
    # Only with the router's request digest: a recorded case is scored only by the request its release's prompt
    # makes (evaluator recorded.py); the failed calls of those requests are evidence too, but a cache hit replays an
    # earlier answer, no new one, and a client's own hang-up is no answer at all (probe p18 F1: one key hanging up on
    # each case first made its hang-ups the cases' earliest events, errors of a release that answered every later
    # ask right). A request the release's prompt renders exactly is the release's, so its 4xx still counts.
    where = ("tenant = {tenant:String} AND served AND app = {app:String} AND release = {release:String} "
             f"AND mapContains(attributes, '{REQUEST_DIGEST}') AND attributes['cache'] != 'hit' "
             f"AND error_type != '{CLIENT_DISCONNECTED}'")
    params: dict[str, Any] = {"tenant": tenant, "app": app, "release": release, "limit": max(0, limit)}
    if since is not None:
        where += " AND time >= {since:DateTime64(6, 'UTC')}"
        params["since"] = since
    if before_us is not None:
        where += " AND (toUnixTimestamp64Micro(time), id) < ({before_us:Int64}, {before_id:String})"
        params |= {"before_us": before_us, "before_id": before_id}
    return store.rows(
        f"SELECT id, toUnixTimestamp64Micro(time) AS time_us, attributes['{REQUEST_DIGEST}'] AS digest, status, "
        "error_type, response, latency_ms, input_tokens, output_tokens "
        f"FROM inference_events WHERE {where} ORDER BY time DESC, id DESC LIMIT 1 BY id "
        "LIMIT {limit:UInt32}", params)


def eval_run(store: Store, run_id: str) -> dict[str, Any] | None:
    """One stored eval run with the environment it captured (what `lockgate eval rerun` repeats), or None."""
    rows = store.rows(
        "SELECT run_id, release, suite, baseline, policy, status, n_cases, n_errors, metrics, error, environment, "
        "time FROM eval_runs WHERE run_id = {run_id:String} ORDER BY time DESC LIMIT 1", {"run_id": run_id})
    return rows[0] if rows else None
