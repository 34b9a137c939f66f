"""Online evaluation of sampled live traffic: which events to score, and their scores. Pure, no I/O.

Decoupled from routing: the evaluator reads inference events after the fact (a durable consumer),
so the request path never waits for a scorer. Only reference-free, deterministic and cheap scorers
run here (no expected answer exists for live traffic, and no call may be made per event); an LLM
judge on live traffic would need its own endpoint and budget.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lockgate.contracts import InferenceEvent, InferenceScored
from lockgate.errors import ConfigError
from lockgate.services.evaluator import safety, scorers


def length(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """Characters of the answer (a drift of this is a change of behaviour even when it is not worse)."""
    return float(len(output))


# Name -> scorer(output, expected, params); expected is always None online.
ONLINE: dict[str, Callable[[str, Any, Mapping[str, Any]], float]] = {
    "pii_free": safety.pii_free,
    "refusal": safety.refusal,
    "non_toxic": safety.non_toxic,
    "json_valid": scorers.json_valid,
    "length": length,
}


def check(names: Sequence[str]) -> tuple[str, ...]:
    """The configured scorer names, or ConfigError naming the ones that cannot run online."""
    unknown = [n for n in names if n not in ONLINE]
    if unknown:
        raise ConfigError(f"online_eval_scorers: {', '.join(unknown)} cannot score live traffic "
                          f"(reference-free scorers only: {', '.join(sorted(ONLINE))})")
    return tuple(names)


def sampled(event_id: str, rate: float) -> bool:
    """Deterministic sampling by event id: every evaluator replica (and a redelivery) agrees."""
    if rate >= 1.0:
        return True
    digest = hashlib.sha256(event_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < rate * 2**64


def score(event: InferenceEvent, names: Sequence[str], rate: float) -> InferenceScored | None:
    """The scores of one event if it is sampled and answered (an error has no answer to score)."""
    if event.status != "ok" or event.response is None or not sampled(event.id, rate):
        return None
    values = {n: ONLINE[n](event.response, None, {}) for n in names}
    return InferenceScored(event_id=event.id, tenant=event.tenant, trace_id=event.trace_id, source="lockgate-evaluator",
                           app=event.app, deployment=event.deployment, variant=event.variant, release=event.release,
                           scores=values)
