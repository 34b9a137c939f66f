"""The inference events of requests the routers served, as the sink stored them: what a (re)starting router reads
back as canary evidence, since the inference stream keeps an event only until its consumers have taken it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lockgate.services.query.registry import Limit
from lockgate.store import Store

# Every column canary evidence and shadow comparisons read (router evidence.py, rollouts.observe), and the NATS
# message each event came in (msg_id), by which the router counts a batch both live and stored once. Neither prompt
# nor response: an analysis measures outcomes, and a page of 800 kB prompts would not fit in one NATS message. Of the
# attributes, only the keys the reader names (`attributes`): an event's others (its tool calls, up to 64 kB) made a
# page of 500 rows too large for one message, for ever (probe p36 F1).
_COLUMNS = ("id, time, tenant, app, deployment, variant, release, model, response_model, provider, operation, "
            "input_tokens, output_tokens, cached_tokens, latency_ms, ttft_ms, status, error_type, finish_reason, "
            "user_hash, session_id, trace_id, span_id, source, {attributes}, scores, key_id, msg_id")
_NAMED = "mapFilter((k, v) -> has({attributes:Array(String)}, k), attributes) AS attributes"
# What `key_only` asks for: a row too large for one message even alone (a record no router of this version writes:
# its events fit one message, fit.py) is read as its key, so the reader can say it skips it and go on past it.
_KEY = "id, time, msg_id, true AS key_only"


def served_events(store: Store, since: datetime, deployments: list[str] | None = None,
                  attributes: list[str] | None = None, after_time: datetime | None = None, after_id: str = "",
                  key_only: bool = False, limit: Limit = 500) -> list[dict[str, Any]]:
    """The served inference events of `deployments` (an event without one: of its app) stored at or after `since`,
    with their `attributes` of those keys only, oldest first, paged by (time, id): the next page starts after the
    last row's (`after_time`, `after_id`). Never another deployment's: a router reads back only the rollouts it
    judges, and another tenant's traffic neither fills its pages nor is read by it. Without `deployments` or
    `attributes` (a router of the version before, during a rolling upgrade), every deployment's, every attribute."""
    where = "served AND time >= {since:DateTime64(6, 'UTC')}"
    params: dict[str, Any] = {"since": since, "limit": limit}
    if deployments is not None:
        where += (" AND (deployment IN {deployments:Array(String)}"
                  " OR (deployment = '' AND app IN {deployments:Array(String)}))")
        params["deployments"] = deployments
    if attributes is not None and not key_only:
        params["attributes"] = attributes
    if after_time is not None:
        where += " AND (time, id) > ({after_time:DateTime64(6, 'UTC')}, {after_id:String})"
        params |= {"after_time": after_time, "after_id": after_id}
    columns = _KEY if key_only else _COLUMNS.format(attributes="attributes" if attributes is None else _NAMED)
    return store.rows(f"SELECT {columns} FROM inference_events WHERE {where} ORDER BY time, id LIMIT {{limit:UInt32}}",
                      params)
