"""Score outputs already recorded as inference events instead of calling the endpoint (pure).

Matching rule: an event answers a case when the router's digest of the whole chat request it served
(`REQUEST_DIGEST`: the messages, and any field that may change the answer beyond the release's own params) is that
of the messages the release's prompt renders for the case and nothing else. A request an application shaped (a
system message of its own, earlier turns, tools, sampling, `n`, `max_tokens`) is another request, never scored as
the case's. Repeat r of a case takes the r-th earliest matching event, so asking again until an answer suits the
asker changes nothing; a matching event whose call failed is an errored row (a failure is evidence too). A case (or
repeat) with no matching event is an errored row ("no recorded response"), so missing traffic is visible and scores
0 rather than vanishing. The events are only those a router served to the release's tenant, cache replays left out
(the query selects them; see execution.py). Each row keeps when its event was served (`served_us`), so the run
says how old the answers it judged are (`age_warning`): the earliest match may be from long before the release's
upstream changed (probe p90 F2), and only the task's `since` bounds that.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from lockgate.contracts.inference import request_digest
from lockgate.services.evaluator import calibrated, domain

_encoder = msgspec.json.Encoder()
SERVED_US = "served_us"  # a recorded row's detail: when the router served the event it scored (µs since the epoch)


def case_digest(messages: list[dict[str, str]]) -> str:
    """The digest of a served chat request that is exactly `messages` (a case as the release's prompt renders it)."""
    return request_digest(_encoder.encode(messages))


def index(events: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Events by request digest, earliest first (by time, then id): which one a case takes is the evaluator's
    choice, not the order the asker made them arrive in."""
    out: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for e in sorted(events, key=lambda e: (int(e.get("time_us") or 0), str(e.get("id", "")))):
        if e.get("digest"):
            out[str(e["digest"])].append(e)
    return out


def results(suite: domain.Suite, cases: Sequence[domain.Case], events: Sequence[Mapping[str, Any]],
            skip: set[tuple[str, int]], tenant: str = "") -> list[domain.CaseResult]:
    """A scored CaseResult for every (case, repeat) not in `skip`; `events` are those a router served to
    `tenant`, which a missing case's error names."""
    by_digest = index(events)
    task = suite.task
    where = f"{task.app}/{task.release}" if isinstance(task, domain.RecordedTask) else "the recorded events"
    if tenant:
        where += f" (only events a router served to tenant {tenant!r} count)"
    out = []
    for case in cases:
        messages = domain.render(suite, case)
        prompt = messages[-1]["content"]
        found = by_digest.get(case_digest(messages), [])
        for r in range(suite.repeats):
            if (case.id, r) in skip:
                continue
            if r >= len(found):
                out.append(domain.CaseResult(
                    case_id=case.id, repeat=r, input=prompt, expected=case.expected,
                    error=f"no recorded response for this prompt in {where}: a served chat request counts only when "
                          "its messages are exactly those the release's prompt renders and it sets nothing else "
                          "that may change the answer"))
                continue
            e = found[r]
            usage = {"latency_ms": float(e.get("latency_ms") or 0.0), "input_tokens": int(e.get("input_tokens") or 0),
                     "output_tokens": int(e.get("output_tokens") or 0)}
            details = {"event_id": str(e.get("id", "")), SERVED_US: int(e.get("time_us") or 0)}
            if e.get("status", "ok") != "ok":
                out.append(domain.CaseResult(case_id=case.id, repeat=r, input=prompt, expected=case.expected,
                                             error=f"the served call failed: {e.get('error_type') or 'error'}",
                                             details=details, **usage))
                continue
            text = str(e.get("response") or "")
            out.append(domain.CaseResult(
                case_id=case.id, repeat=r, input=prompt, expected=case.expected, output=text,
                scores=calibrated.with_confidence(suite, domain.score(suite, text, case.expected, case_id=case.id),
                                                  text, None),
                details=details, **usage))
    return out


def _at(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{max(0, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def age_warning(results: Sequence[domain.CaseResult], now_us: int, since: str) -> str:
    """The run's warning naming when the served answers it scored were recorded and how old the oldest is at
    `now_us`, and what bounds their age (the task's `since`, or nothing); "" when it scored none."""
    served = [t for r in results if isinstance(t := r.details.get(SERVED_US), int) and t > 0]
    if not served:
        return ""
    first, last = min(served), max(served)
    bound = (f"the task's `since` ({since}) admits none older" if since else
             "the task sets no `since`, so the earliest matching answers count however old; set `since` to judge "
             "only answers served after a change")
    return (f"recorded answers: the {len(served)} served answers scored were recorded {_at(first)} to {_at(last)}, "
            f"the oldest {_age((now_us - first) / 1e6)} old; {bound}")
