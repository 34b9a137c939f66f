"""A deployment's online evaluation, as declared in its deployment document (`online_eval:`).

The evaluator reads it from the applied state (KV `{prefix}_gitops`, entry `deployment.<name>`), so it
is versioned with the rest of the folder (`lockgate plan` shows a change, `apply` records its commit):

    online_eval:
      sample: {canary: 0.5, stable: 0.05}     # share of each variant's answers scored; `default` for others
      scorers: [pii_free, refusal, {name: regex, params: {pattern: "^[A-Z]"}},
                {name: json_schema, params: {schema: {type: object, required: [answer]}}}]
      judge: {endpoint: judge, model: gpt-4o-mini, rubric: "Is the answer polite?",
              max_calls_per_minute: 30, max_usd_per_day: 2}

A deployment without it is scored at the evaluator's global rate with its global scorers. The judge's
endpoint is a name in the operator's endpoint allow-list, never a URL: a document never sends live
answers anywhere the operator did not list.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from lockgate.documents import NonEmpty
from lockgate.pricebook import ModelPrice

Rate = Annotated[float, msgspec.Meta(ge=0, le=1)]
# Reference-free scorers that can score a live answer (no expected answer exists for live traffic).
SCORERS: tuple[str, ...] = ("pii_free", "refusal", "non_toxic", "json_valid", "json_schema", "regex", "length")
JUDGE = "llm_judge"
# Params a scorer cannot run without.
_REQUIRED = {"regex": "pattern", "json_schema": "schema"}


class ScorerSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One scorer and its params (`regex` needs `pattern`, `json_schema` needs `schema`)."""

    name: NonEmpty
    params: dict[str, Any] = {}
    # The score's name in events and analysis (`score:<as>`), so two regexes can run side by side.
    as_: str = msgspec.field(default="", name="as")

    def __post_init__(self) -> None:
        if self.name not in SCORERS:
            raise ValueError(f"scorer {self.name!r} cannot score live traffic (reference-free scorers: "
                             f"{', '.join(SCORERS)}; the LLM judge is `judge:`)")
        need = _REQUIRED.get(self.name)
        if need and need not in self.params:
            raise ValueError(f"scorer {self.name} needs params.{need}")
        if self.name == "json_schema" and not isinstance(self.params["schema"], dict):
            raise ValueError("scorer json_schema: params.schema must be a JSON Schema object")
        if self.as_ and self.as_ != self.name and self.as_ in SCORERS:
            # A metric reading `score json_valid` must be the json_valid scorer, never a regex named so.
            raise ValueError(f"scorer {self.name}: `as: {self.as_}` is another scorer's name; name its score "
                             "something of its own")

    @property
    def label(self) -> str:
        """The name its scores carry."""
        return self.as_ or self.name


class JudgeSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An LLM judge on a named endpoint with its own budget; its score is `llm_judge` (0..1)."""

    endpoint: NonEmpty  # an id of the endpoint allow-list
    model: NonEmpty
    rubric: NonEmpty
    n: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.0
    pass_mark: Rate = 0.5
    sample: Rate = 1.0  # of the answers sampled for scoring, the share the judge also grades
    max_calls_per_minute: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    max_usd_per_day: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # the longest reply asked for: it bounds a call's cost, which is reserved from the day's budget before
    # the call (every evaluator replica shares that budget) and settled to the real cost after
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    price: ModelPrice | None = None  # else the price book's price of `model`


class OnlineEvalSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sample rates per variant, the deterministic scorers, and an optional LLM judge."""

    sample: dict[str, Rate] = {}
    scorers: list[str | ScorerSpec] = []
    judge: JudgeSpec | None = None

    def __post_init__(self) -> None:
        labels = [s.label for s in self.specs()]
        dup = sorted({n for n in labels if labels.count(n) > 1})
        if dup:
            raise ValueError(f"scorer(s) {', '.join(dup)} named twice: give one an `as:` name")
        if JUDGE in labels:
            raise ValueError(f"{JUDGE} is the judge's score: name another scorer otherwise")

    def specs(self) -> list[ScorerSpec]:
        """The scorers as ScorerSpecs (a bare name has no params)."""
        return [ScorerSpec(name=s) if isinstance(s, str) else s for s in self.scorers]

    def rate(self, variant: str, default: float) -> float:
        """The share of `variant`'s answers scored: its own rate, else `default:` here, else `default`."""
        return self.sample.get(variant, self.sample.get("default", default))
