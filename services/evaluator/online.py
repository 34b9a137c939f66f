"""Online evaluation of sampled live traffic: which events to score, with what, and their scores. Pure, no I/O.

Decoupled from routing: the evaluator reads inference events after the fact (a durable consumer),
so the request path never waits for a scorer. Each deployment may declare its own rates per variant,
scorers and LLM judge (lockgate.onlineeval, in its deployment document); without one, the global
rate and scorers apply. The deterministic scorers run at once; the judge's calls are the edge's
(online_handler.py), within the judge's own call rate and daily budget (judgeledger.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lockgate import secretkinds
from lockgate.contracts import InferenceEvent, InferenceScored, Score
from lockgate.contracts.inference import SECRETS_MASKED
from lockgate.errors import ConfigError
from lockgate.ids import derived_id
from lockgate.onlineeval import JUDGE, SCORERS, JudgeSpec, OnlineEvalSpec, ScorerSpec
from lockgate.redact import scrub_secrets
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
    "json_schema": scorers.json_schema,
    "regex": scorers.regex,
    "length": length,
}
assert tuple(ONLINE) == SCORERS, "lockgate.onlineeval.SCORERS lists the scorers of this table"
SOURCE = "lockgate-evaluator"
SCORED = "scorers"  # message_id's kind of the deterministic scorers' scores
MAX_ERROR = 300  # characters of a scorer error kept


def check(names: Sequence[str]) -> tuple[str, ...]:
    """The globally configured scorer names, or ConfigError naming the ones that cannot run there."""
    unknown = [n for n in names if n not in ONLINE]
    if unknown:
        raise ConfigError(f"online_eval_scorers: {', '.join(unknown)} cannot score live traffic "
                          f"(reference-free scorers only: {', '.join(sorted(ONLINE))})")
    needs = [n for n in names if n in ("regex", "json_schema")]
    if needs:
        raise ConfigError(f"online_eval_scorers: {', '.join(needs)} need params: declare them in a deployment's "
                          "`online_eval:` instead")
    return tuple(names)


def sampled(event_id: str, rate: float) -> bool:
    """Deterministic sampling by event id: every evaluator replica (and a redelivery) agrees."""
    if rate >= 1.0:
        return True
    digest = hashlib.sha256(event_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < rate * 2**64


@dataclass(frozen=True)
class Plan:
    """How one deployment's answers are scored: rates per variant, scorers, an optional judge."""

    default_rate: float
    scorers: tuple[ScorerSpec, ...]
    sample: Mapping[str, float] = field(default_factory=dict)
    judge: JudgeSpec | None = None

    def rate(self, variant: str) -> float:
        """The share of this variant's answers that is scored."""
        return self.sample.get(variant, self.sample.get("default", self.default_rate))

    @property
    def active(self) -> bool:
        """Whether any answer of the deployment can be scored at all."""
        return self.default_rate > 0 or any(r > 0 for r in self.sample.values())


def plan(spec: OnlineEvalSpec | None, default_rate: float, default_scorers: Sequence[str],
         where: str = "online_eval") -> Plan:
    """The plan of a deployment's `online_eval` (None: the global rate and scorers); a scorer whose params
    cannot run (a bad regex, say) is a ConfigError naming `where`."""
    if spec is None:
        return Plan(default_rate=default_rate, scorers=tuple(ScorerSpec(name=n) for n in check(default_scorers)))
    specs = tuple(spec.specs()) if spec.scorers else tuple(ScorerSpec(name=n) for n in default_scorers)
    for s in specs:
        try:
            ONLINE[s.name]("", None, s.params)
        except ConfigError as exc:
            raise ConfigError(f"{where}: scorer {s.label}: {exc.message}") from None
    return Plan(default_rate=spec.sample.get("default", default_rate), scorers=specs, sample=dict(spec.sample),
                judge=spec.judge)


def scorable(event: InferenceEvent) -> bool:
    """Whether any plan could score this event: a generated answer (an error has none to score, a cache hit is an
    earlier answer again). Needs no plan, so an event that is not one costs no plan's read."""
    return event.status == "ok" and event.response is not None and not event.cached


def chosen(event: InferenceEvent, p: Plan) -> bool:
    """Whether this event is scored: a generated answer (`scorable`) in its variant's sample."""
    return scorable(event) and sampled(event.id, p.rate(event.variant))


def _scored(event: InferenceEvent, values: dict[str, float], results: list[Score], served: bool) -> InferenceScored:
    # The answer's time, so a re-sent score is the same fact and windows of answers and scores agree.
    return InferenceScored(event_id=event.id, tenant=event.tenant, trace_id=event.trace_id, source=SOURCE,
                           time=event.time, app=event.app, deployment=event.deployment, variant=event.variant,
                           release=event.release, scores=values, results=results, served=served)


def masked_secrets(event: InferenceEvent) -> dict[str, int]:
    """The secrets masked in the event's answer before it was published, by kind (SECRETS_MASKED, "kind:count,...";
    none without counts). A router's counts are of its own scrub (fit.encode_served) and only its served events'
    scores steer rollouts; an application's counts on its own event score that event alone."""
    return secretkinds.decode(event.attributes.get(SECRETS_MASKED, ""))


def _value(s: ScorerSpec, answer: str, masked: dict[str, int]) -> float:
    # pii_free also counts the secrets masked out of the answer: it reads the answer after the scrub, which left it
    # none of them to find (before, probe p63 E, a canary leaking provider keys in every answer scored 1.0). They are
    # the kinds pii_free looks for, found in the answer before the scrub, so its `kinds` apply as to the raw answer.
    if s.name == "pii_free" and safety.finds_masked(s.params, masked):
        return 0.0
    return ONLINE[s.name](answer, None, s.params)


def score(event: InferenceEvent, p: Plan, served: bool = False) -> InferenceScored | None:
    """The deterministic scores of one event if it is chosen, else None (`served`: a router served it)."""
    if not chosen(event, p):
        return None
    masked = masked_secrets(event)
    values = {s.label: _value(s, event.response or "", masked) for s in p.scorers}
    return _scored(event, values, [Score(scorer=k, value=v) for k, v in values.items()], served)


def wants_judge(event: InferenceEvent, p: Plan, served: bool) -> bool:
    """Whether the judge grades this (chosen) event: only an answer a router served (the judge costs the
    operator money and feeds canary analysis; an application's own events could name any deployment and
    variant), in the judge's own share of the sample, by event id too."""
    return (served and p.judge is not None and chosen(event, p)
            and sampled(f"{event.id}:{JUDGE}", p.judge.sample))


def message_id(result: InferenceScored, kind: str) -> str:
    """The Nats-Msg-Id of an answer's scores of one `kind` (SCORED: the deterministic scorers', or JUDGE): the same
    on every re-score, so JetStream drops a repeat, and never another answer's. The answer is its (tenant, app,
    served, event id), encoded without ambiguity: tenant, app and kind are names, which hold no NUL (derived_id's
    separator), and the id its producer chose comes last. (Before, probe p47 F1, it was `scored-{tenant}-{id}`:
    another application's event under the same id, or tenant `acme`'s `corp-x` against tenant `acme-corp`'s `x`,
    took the message id first and these scores were dropped as its duplicate: never stored nor seen by drift.)"""
    where = "served" if result.served else "sent"
    return "scored-" + derived_id("online-scores", result.tenant, result.app, where, kind, result.event_id)


def judged(event: InferenceEvent, value: float | None, error: str = "", served: bool = False) -> InferenceScored:
    """The judge's outcome on one event: a score, or the error that left it without one (stored and shown to
    operators, so scrubbed of secrets an upstream may have echoed, and kept short)."""
    why = "" if value is not None else scrub_secrets(error or "no score")[:MAX_ERROR]
    return _scored(event, {JUDGE: value} if value is not None else {}, [Score(scorer=JUDGE, value=value, error=why)],
                   served)
