"""The inference events of requests the routers served, as the sink stored them: what a (re)starting router reads
back as canary evidence, since the inference stream keeps an event only until its consumers have taken it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lockgate.services.query.registry import Limit
from lockgate.store import Store

# Every column canary evidence and shadow comparisons read (router evidence.py, rollouts.observe), and the NATS
# message each event came in (msg_id), by which the router counts a batch both live and stored once. Neither prompt
# nor response: an analysis measures outcomes, and a page of 800 kB prompts would not fit in one NATS message.
_COLUMNS = ("id, time, tenant, app, deployment, variant, release, model, response_model, provider, operation, "
            "input_tokens, output_tokens, cached_tokens, latency_ms, ttft_ms, status, error_type, finish_reason, "
            "user_hash, session_id, trace_id, span_id, source, attributes, scores, key_id, msg_id")


def served_events(store: Store, since: datetime, after_time: datetime | None = None, after_id: str = "",
                  limit: Limit = 500) -> list[dict[str, Any]]:
    """The served inference events stored at or after `since`, oldest first, paged by (time, id): the next page
    starts after the last row's (`after_time`, `after_id`)."""
    where = "served AND time >= {since:DateTime64(6, 'UTC')}"
    params: dict[str, Any] = {"since": since, "limit": limit}
    if after_time is not None:
        where += " AND (time, id) > ({after_time:DateTime64(6, 'UTC')}, {after_id:String})"
        params |= {"after_time": after_time, "after_id": after_id}
    return store.rows(f"SELECT {_COLUMNS} FROM inference_events WHERE {where} ORDER BY time, id "
                      "LIMIT {limit:UInt32}", params)
