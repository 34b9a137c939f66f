"""Score outputs already recorded as inference events instead of calling the endpoint (pure).

Matching rule: an event answers a case when its recorded `prompt` (the router records the last
user message) equals the case's rendered user message, both with surrounding whitespace
stripped. Repeat r of a case takes the r-th most recent matching event; a case (or repeat) with
no matching event is an errored row ("no recorded response"), so missing traffic is visible
and scores 0 rather than vanishing. Redacted prompts (sink redaction) cannot match. The events are
only those a router served to the release's tenant (the query selects them; see execution.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from lockgate.services.evaluator import calibrated, domain


def index(events: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Events by stripped prompt, most recent first (events must arrive most recent first)."""
    out: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("prompt") is not None and e.get("response") is not None:
            out[str(e["prompt"]).strip()].append(e)
    return out


def results(suite: domain.Suite, cases: Sequence[domain.Case], events: Sequence[Mapping[str, Any]],
            skip: set[tuple[str, int]], tenant: str = "") -> list[domain.CaseResult]:
    """A scored CaseResult for every (case, repeat) not in `skip`; `events` are those a router served to
    `tenant`, which a missing case's error names."""
    by_prompt = index(events)
    task = suite.task
    where = f"{task.app}/{task.release}" if isinstance(task, domain.RecordedTask) else "the recorded events"
    if tenant:
        where += f" (only events a router served to tenant {tenant!r} count)"
    out = []
    for case in cases:
        prompt = domain.render(suite, case)[-1]["content"]
        found = by_prompt.get(prompt.strip(), [])
        for r in range(suite.repeats):
            if (case.id, r) in skip:
                continue
            if r >= len(found):
                out.append(domain.CaseResult(case_id=case.id, repeat=r, input=prompt, expected=case.expected,
                                             error=f"no recorded response for this prompt in {where}"))
                continue
            e = found[r]
            text = str(e["response"])
            out.append(domain.CaseResult(
                case_id=case.id, repeat=r, input=prompt, expected=case.expected, output=text,
                scores=calibrated.with_confidence(suite, domain.score(suite, text, case.expected, case_id=case.id),
                                                  text, None),
                latency_ms=float(e.get("latency_ms") or 0.0), input_tokens=int(e.get("input_tokens") or 0),
                output_tokens=int(e.get("output_tokens") or 0), details={"event_id": str(e.get("id", ""))}))
    return out
