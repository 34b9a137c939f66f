"""The online judge's budget as one ledger per deployment and UTC day, shared by every evaluator replica. Pure.

A judge call reserves its largest possible cost (the prompt's bytes as tokens, an upper bound for byte-level
tokenizers, plus `max_tokens` of reply, at the judge's price) before it is made, and the reservation is
settled to the call's real cost after: so calls in flight on any replica can never take the day past its
limit. The ledger also counts this minute's calls against `max_calls_per_minute` (at most its ceiling in
any UTC minute, over all replicas). The edge (judgebudget.py) keeps the ledger in NATS KV and changes it
by compare-and-set (lockgate.kvcas).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import msgspec

from lockgate.pricebook import ModelPrice
from lockgate.subjects import token

NANO = 1_000_000_000  # the ledger counts nano-USD: integers add exactly


class Ledger(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One deployment's judge spend on one UTC day (its KV key names both). Unknown fields are refused, as a
    budget counter's (router/budgets.Counter): a stray JetStream acknowledgement stored here is no ledger at 0."""

    spent: int = 0  # nano-USD: settled costs plus the reservations of calls in flight
    minute: int = 0  # the minute (since the epoch) that `calls` counts
    calls: int = 0


class Refused(msgspec.Struct, frozen=True):
    """Why a call may not start: today's budget is spent (`wait_s` 0), or this minute's calls (wait)."""

    reason: str
    wait_s: float = 0.0


def key(deployment: str, now: datetime) -> str:
    """The KV key of a deployment's ledger for the UTC day of `now` (`_judge.` cannot be a budget's key)."""
    return f"_judge.{token(deployment)}.{now.astimezone(UTC):%Y-%m-%d}"


def largest_cost(price: ModelPrice, messages: Sequence[Mapping[str, str]], max_tokens: int) -> int:
    """Nano-USD, rounded up, that one call can cost at most: every prompt byte a token (plus a few per message
    for roles and separators) and the full `max_tokens` of reply."""
    prompt = sum(len(m.get("content", "").encode()) for m in messages) + 8 * len(messages) + 3
    return cost(price, prompt, max_tokens)


def cost(price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
    """Nano-USD, rounded up, of a call's usage (float noise below a millionth of a nano-USD is not a nano)."""
    return math.ceil(price.cost(input_tokens, output_tokens) * NANO - 1e-6)


def reserve(state: Ledger | None, need: int, limit_usd: float, per_minute: float,
            now: datetime) -> tuple[Ledger | None, Refused | None]:
    """The ledger with `need` reserved and one call counted (and None), or (None, why) when it does not fit."""
    state = state or Ledger()
    minute = int(now.timestamp() // 60)
    calls = state.calls if state.minute == minute else 0
    if state.spent + need > round(limit_usd * NANO):
        return None, Refused(f"today's judge budget of {limit_usd:g} USD is spent or reserved "
                             f"({state.spent / NANO:.6f} USD; a call may cost up to {need / NANO:.6f} USD)")
    if calls >= per_minute:
        return None, Refused(f"{per_minute:g} judge calls per minute reached", 60.0 - now.timestamp() % 60)
    return Ledger(spent=state.spent + need, minute=minute, calls=calls + 1), None


def settle(state: Ledger | None, reserved: int, used: int) -> Ledger:
    """The ledger with a reservation replaced by what the call really cost."""
    state = state or Ledger()
    return msgspec.structs.replace(state, spent=max(0, state.spent - reserved + used))
