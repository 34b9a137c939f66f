"""What the drift monitor measures of each inference event (and each online score), as one row of floats.

Numeric features are values; categorical ones are codes (48 bits of the value's hash, exact in a float64
column, stable across restarts). NaN means "not measured for this row": an event that was not scored has
no scores, a score arriving on its own (InferenceScored) has only scores. Tests use each column's non-NaN
values, so every feature has its own sample sizes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

from lockgate.contracts import InferenceEvent, InferenceScored

NUMERIC = ("output_tokens", "latency_ms", "input_tokens")
# The evaluator's online scorers (reference-free, see its online module); a 0/1 score is compared as
# categorical by the test selection. `refusal` is the categorical feature below instead.
SCORES = ("pii_free", "non_toxic", "json_valid", "length")
SCORE_FEATURES = tuple(f"score.{s}" for s in SCORES)
CATEGORICAL = ("finish_reason", "error_type", "model", "status", "refusal", "tool_call")
FEATURES = NUMERIC + SCORE_FEATURES + CATEGORICAL
KINDS = {**dict.fromkeys(NUMERIC + SCORE_FEATURES, "num"), **dict.fromkeys(CATEGORICAL, "cat")}
TEXTS = ("prompt_text", "response_text")
TOOL_FINISH = frozenset({"tool_calls", "function_call", "tool_use"})
OUTPUT_MESSAGES = "gen_ai.output.messages"  # every choice as JSON when there is more than text (router)
_TOOL_PART = '"type":"tool_call"'
NAN = math.nan
# Category names a tenant's table keeps to name a drifting category (codes are what is stored), the least recently
# seen going first. Per tenant: one table of 4,096 for all, kept first come, was filled for good by one tenant's
# made-up values (any string an event carries: model, status, error type), and every other tenant's reports named
# their categories by code. A name in use comes back with the next event that carries it.
LABELS_MAX = 1024
# Characters of a category's name a table keeps (then '...'): an event's model or status may be any string up to
# the message's size, and a table of 1,024 such names would hold a gigabyte.
LABEL_CHARS = 128


def code(value: str) -> float:
    """A category's code: 48 bits of its hash (exact in a float64 column, stable across restarts)."""
    return float(int.from_bytes(hashlib.sha256(value.encode()).digest()[:6], "big"))


@dataclass
class Rows:
    """A batch of observations: feature values, times (epoch seconds), the texts to embed (None: absent), and each
    row's unit (`unit`)."""

    values: np.ndarray
    times: np.ndarray
    prompts: list[str | None]
    responses: list[str | None]
    units: np.ndarray


def _refusal(scores: Mapping[str, float]) -> str | None:
    value = scores.get("refusal")
    return None if value is None else ("yes" if value >= 0.5 else "no")


def unit(e: InferenceEvent) -> float:
    """The row's unit for a canary-versus-stable test: the code of what the router's sticky split put it on its arm by
    (`InferenceEvent.arm_key`: its user, session or sticky key), NaN when it names none (the row is its own unit).
    A whole user is on one arm and one user's requests are alike, so tests that counted rows as independent read
    the users' split as a canary's drift (probe p81 F1/F2). An online score carries no user: its own unit."""
    key = e.arm_key
    return code(key) if key else NAN


class _Ended(msgspec.Struct):
    finish_reason: str = ""


_ENDINGS = msgspec.json.Decoder(list[_Ended])
_NORMAL = frozenset({"", "stop"})


def finish_reason(e: InferenceEvent) -> str:
    """The answer's finish reason: choice 0's (the event's), unless that ended normally and another choice did
    not (cut at `max_tokens`, filtered, ...): with `n` > 1 the router records every choice's in the output
    messages, and a canary cutting every second choice was never seen by drift, which read choice 0's alone (probe
    p81 F3). Unreadable output messages (an application's own attribute) leave choice 0's."""
    if e.finish_reason not in _NORMAL or OUTPUT_MESSAGES not in e.attributes:
        return e.finish_reason
    try:
        choices = _ENDINGS.decode(e.attributes[OUTPUT_MESSAGES])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return e.finish_reason
    return next((c.finish_reason for c in choices if c.finish_reason not in _NORMAL), e.finish_reason)


def _tool_call(e: InferenceEvent) -> str:
    return "yes" if e.finish_reason in TOOL_FINISH or _TOOL_PART in e.attributes.get(OUTPUT_MESSAGES, "") else "no"


def _row(numeric: Sequence[float], scores: Mapping[str, float], cats: Sequence[str | None],
         seen: dict[float, str]) -> list[float]:
    codes = []
    for c in cats:
        if c is None:
            codes.append(NAN)
            continue
        k = code(c)
        seen[k] = c if len(c) <= LABEL_CHARS else c[:LABEL_CHARS] + "..."
        codes.append(k)
    return [*numeric, *(float(scores.get(s, NAN)) for s in SCORES), *codes]


def learn(labels: MutableMapping[float, str], names: Mapping[float, str]) -> None:
    """Put names into a table as its most recently seen, dropping its least recently seen past LABELS_MAX
    (an OrderedDict drops each in O(1))."""
    for k, name in names.items():
        labels.pop(k, None)
        labels[k] = name
    while len(labels) > LABELS_MAX:
        del labels[next(iter(labels))]


def rows(items: Sequence[InferenceEvent | InferenceScored],
         labels: MutableMapping[float, str] | None = None) -> Rows:
    """One row per event or online score; `labels` (one tenant's table) learns the names of the category codes."""
    out, prompts, responses, units = [], [], [], []
    seen: dict[float, str] = {}  # the batch's categories, learnt once each
    for e in items:
        if isinstance(e, InferenceScored):
            out.append(_row((NAN,) * len(NUMERIC), e.scores, (None,) * 4 + (_refusal(e.scores), None), seen))
            prompts.append(None)
            responses.append(None)
            units.append(NAN)
            continue
        if e.status != "ok":
            # A failure is no answer: it counts in `status` and `error_type` (its share of the arm's calls), never in
            # the answers' shape. Its 0 tokens (no usage reported), its time to failure and its missing finish
            # reason went in as an answer's, and a stable whose calls failed fast (retried to answers) drifted from
            # an identical canary (`output_tokens`, mean 6 -> 10: probe p78 F2). A failed call a retry or fallback
            # went past (`superseded`) stays in status: a canary's calls fallen back from leave no other trace in
            # its arm's window (the request's answer is stable's); its prompt is its request's, counted there.
            cats = (None, e.error_type, e.model, e.status, None, None)
            out.append(_row((NAN,) * len(NUMERIC), {}, cats, seen))
            prompts.append(None if e.superseded else e.prompt)
            responses.append(None)
            units.append(unit(e))
            continue
        cats = (finish_reason(e), e.error_type, e.model, e.status, _refusal(e.scores), _tool_call(e))
        out.append(_row((e.output_tokens, e.latency_ms, e.input_tokens), e.scores, cats, seen))
        prompts.append(e.prompt)
        responses.append(e.response)
        units.append(unit(e))
    if labels is not None:
        learn(labels, seen)
    values = np.array(out, dtype=np.float64).reshape(len(items), len(FEATURES))
    times = np.array([e.time.timestamp() for e in items], dtype=np.float64)
    return Rows(values, times, prompts, responses, np.array(units, dtype=np.float64))
