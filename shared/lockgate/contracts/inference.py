"""Inference events: one model call, named after the OpenTelemetry GenAI conventions."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from lockgate.contracts.bounds import Who
from lockgate.contracts.envelope import Event
from lockgate.contracts.names import Name, OptName

# Bounded by the columns that store them (UInt32, Float32): a value beyond is refused when decoded,
# with its field named, instead of failing the insert of every event stored with it.
# Upstream 4xx that are the release's doing, not the client's (see client_failed): the endpoint refused lockgate's
# credential for it (401, 403, 407: the router answers those 502), timed out or throttles (408, 429).
_RELEASES_DOING = frozenset({"401", "403", "407", "408", "429"})
NonNeg = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
NonNegF = Annotated[float, msgspec.Meta(ge=0, le=3.4e38)]
# A call whose usage the router never learnt (given up on after its request went out, or answered without usage
# it believes) is charged its worst case on the budgets: its event keeps the usage it reported (none, mostly) and
# says so in these attributes, with the tokens charged, so the cost accountant books what the budgets kept.
USAGE_UNKNOWN = "lockgate.usage_unknown"
CHARGED_INPUT_TOKENS = "lockgate.charged_input_tokens"
CHARGED_OUTPUT_TOKENS = "lockgate.charged_output_tokens"
# On a router event of a request a budget counted: when the router admitted it (ISO 8601, UTC), the instant whose
# period (day, month) its budgets reserved and settled it in. The event is dated when it ends, which may be the next
# period: a new counter's seed (query budget_spend) leaves out calls admitted before its period, so none counts on two
# periods' counters (probe p88 F2).
ADMITTED_AT = "lockgate.admitted_at"
# With them, for a call whose upstream may write the prompt cache (Anthropic's): its input was charged at the dearest
# rate an input token may be billed at (`DEAREST`: pricebook.ModelPrice.dearest_input_per_mtok, an hour-long write's).
CHARGED_INPUT_RATE = "lockgate.charged_input_rate"
DEAREST = "dearest"
# A client's hang-up before its answer (error_type): its own doing (`CLIENT_DISCONNECTED`, `client_failed`: no evidence
# of the release), unless the router had by then waited on the upstream longer than `router_unanswered_s`, for its
# answer's first byte or a stream's next line (`UPSTREAM_UNANSWERED`): the release kept its client waiting, a failure
# of its variant. The router measures that silence itself, so a client can neither fake it nor aim it at an arm.
CLIENT_DISCONNECTED = "client_disconnected"
# On a `client_disconnected` event: the upstream had kept its client waiting (silent) this many seconds, at least the
# router's `router_hang_up_s`, when it hung up before the answer was whole: a hang-up its arm's `hang_up_rate`
# counts. One without it left while the answer flowed (or had it whole), by its own choice: it counts nowhere.
KEPT_WAITING = "lockgate.kept_waiting_s"
UPSTREAM_UNANSWERED = "upstream_unanswered"
# A request the router answered 503 because its own connections to the endpoint were all in use, or its tenant's share
# of them (services/router/h1.py Slots): the router's capacity, no call was made, so no evidence of the release (as a
# client's failure is: `client_failed`). Before, the wait for a connection slot ran on until the first-byte timeout
# and was recorded as the upstream's silence, charged to a healthy release (probe p37 F1).
ROUTER_BUSY = "router_busy"
# A router event of a request its deployment's header route sent to the candidate (value "header"): a tester's
# request (an admin key, or one the route names), not one the weight chose, so a judge of the weighted split can
# tell it apart; a blue-green preview's only served traffic.
ROUTED_BY = "lockgate.routed_by"
# A router event's digest of the chat request it served (`request_digest`): its messages and every field that may
# change the answer and that the release's own params do not override. A `recorded` eval scores a case only with
# events whose digest is that of the messages the release's prompt renders for it and nothing else (probe p12 F5:
# an application's own system message, tools or sampling decided what the eval scored).
REQUEST_DIGEST = "lockgate.request_digest"
# A router event's counts of the secrets its scrub masked in the answer (`response`, every other choice's text and
# every tool call in `gen_ai.output.messages`, never the prompt; probe p71 residual: tool calls' went uncounted), by kind
# ("kind:count,...", `secretkinds.encode`), set where the scrub runs (router fit.encode_served), never the secrets
# themselves: what online `pii_free` would have found, had it read the answer before the scrub (probe p63 E: a canary
# leaking provider keys scored 1.0 and was promoted). Only the kinds `pii_free` looks for (`secretkinds`), never every
# mask of the broader scrub (probe p71 F3: placeholder code, `password="password"`, scored a leak). Only a router's
# counts steer a rollout; an application's on its own event count for that event's scores alone.
SECRETS_MASKED = "lockgate.secrets_masked"
# A router event of a request stable served that its rollout's shadow left uncopied for a reason other than its sample
# (the value names it: a budget every key's copies share, `over_max_requests`, `over_max_rps`, `over_max_concurrency`,
# `over_max_cost`, `cost_store_unavailable`, so one key's copies may have spent it; the caller's own,
# `over_caller_budget`; or `provider_side_action`, a copy that would repeat a web search or a tool the provider runs).
# A blue-green preview judged on copies is no pass while such a key is short of its own sample of copies
# (analysis.uncopied; probe p46 F3, p83 F2).
SHADOW_SKIPPED = "lockgate.shadow_skipped"
# A router event of a failed call that a request went past (`ATTEMPT: SUPERSEDED`): retried, or fallen back from to
# another endpoint or arm, the request's own event following it. A call, not a request nor an answer: per-call
# error_rate counts it, cost analysis adds its charge to its arm's answers', the drift monitor counts it in status
# and error_type only, the shadow ledger pairs it with no shadow (probe p78).
ATTEMPT = "lockgate.attempt"
# A router event of a request that named neither a user nor a session, split to its arm by the client's
# `x-lockgate-sticky-key` header: that key, hashed as `user_hash` is (keyed with the router's secret). Canary analysis
# counts the request's user by it, as by `user_hash` (the router's evidence.unit; probe p84 F1: each such request
# counted as a user of its own, and a few heavy users aborted an identical canary).
STICKY = "lockgate.sticky"
SUPERSEDED = "superseded"
# An application's event of a call it made through a lockgate router (`ROUTER_BILLED`), which the router's own served
# event bills: the OTLP receiver marks a GenAI client span whose endpoint (`server.address`/`server.port`, `url.full`,
# OpenLLMetry's `gen_ai.openai.api_base`) is a router's. Kept for drift and traces, left out of the cost ledger, so
# `lockgate cost` counts the call once, as budgets do (probe p61 F3: it was booked twice).
BILLED_BY = "lockgate.billed_by"
ROUTER_BILLED = "router"
# Request fields that do not change what the model answers: how the answer is delivered (stream), who asks
# (user, metadata, safety_identifier), what the provider keeps (store, prompt_cache_key), the operator's price tier
# (never sent as the client's), and the model, which a release always sets. The messages are digested on their own.
# Who made an inference event (its envelope's `source`), unless it names itself: an application (the SDK, gRPC, JSON
# on its subject). The router names itself (`ROUTER`) and the OTLP receiver `otlp`; the envelope's own default,
# `lockgate`, said lockgate made what an application sent. The sink stores an event it did not get on the routers'
# subject that names lockgate (`lockgate`, `lockgate-...`) as `APPLICATION` (sink domain.as_stored).
APPLICATION = "application"
ROUTER = "lockgate-router"
ANSWER_NEUTRAL = frozenset({"model", "messages", "stream", "stream_options", "user", "metadata", "store",
                            "service_tier", "prompt_cache_key", "safety_identifier"})


class _Said(msgspec.Struct, forbid_unknown_fields=True):
    """A system or user message as an eval renders one (a tool or assistant turn never matches one anyway)."""

    role: str
    content: Any = None
    name: str | msgspec.UnsetType = msgspec.UNSET


_said = msgspec.json.Decoder(list[_Said])
_canonical = msgspec.json.Encoder(order="sorted")


def request_digest(messages: bytes | msgspec.Raw, shaping: Mapping[str, bytes | msgspec.Raw] | None = None) -> str:
    """`sha256:<hex>` of a chat request: its `messages` (JSON), canonical (key order and spacing do not count), and
    `shaping`, the request's other fields that may change the answer, each as its JSON. Messages with fields an eval
    never renders are digested as sent, so they match no eval's case."""
    try:
        h = hashlib.sha256(_canonical.encode(_said.decode(messages)))
    except (msgspec.DecodeError, RecursionError):
        h = hashlib.sha256(b"\x00as sent\x00")
        h.update(messages)
    fields = shaping or {}
    for name in sorted(fields):
        h.update(b"\x00" + name.encode() + b"\x00")
        h.update(fields[name])
    return "sha256:" + h.hexdigest()


# gc=False: an event holds only strings, numbers and flat dicts of them, so it can never be part of a
# reference cycle; untracked, the tens of thousands the sink decodes (and the SDK makes) per second no
# longer set off the cyclic collector (about a tenth of the sink's time).
class InferenceEvent(Event, frozen=True, kw_only=True, tag="lockgate.inference", gc=False):
    """One call to a model. Field docs give the GenAI semantic-convention attribute."""

    # An application's unless it says (`APPLICATION`): redefined here, the envelope's field keeps its place.
    source: Who = APPLICATION
    app: Name
    deployment: OptName = ""
    # The arm a router served it from (stable, canary, shadow); an application's event names one only if it says:
    # only a router chooses an arm, and it names the one it chose. (Before, "stable" by default: an SDK event
    # without one was stored as the stable release's traffic.)
    variant: str = ""
    release: OptName = ""
    model: Annotated[str, msgspec.Meta(description="gen_ai.request.model")] = ""
    response_model: Annotated[str, msgspec.Meta(description="gen_ai.response.model")] = ""
    provider: Annotated[str, msgspec.Meta(description="gen_ai.provider.name")] = ""
    operation: Annotated[str, msgspec.Meta(description="gen_ai.operation.name")] = "chat"
    input_tokens: Annotated[NonNeg, msgspec.Meta(description="gen_ai.usage.input_tokens")] = 0
    output_tokens: Annotated[NonNeg, msgspec.Meta(description="gen_ai.usage.output_tokens")] = 0
    cached_tokens: Annotated[NonNeg, msgspec.Meta(description="gen_ai.usage.cache_read.input_tokens")] = 0
    latency_ms: NonNegF = 0.0
    ttft_ms: Annotated[NonNegF, msgspec.Meta(description="time to first token")] = 0.0
    status: str = "ok"
    error_type: Annotated[str, msgspec.Meta(description="error.type")] = ""
    finish_reason: Annotated[str, msgspec.Meta(description="gen_ai.response.finish_reasons[0]")] = ""
    prompt: str | None = None
    response: str | None = None
    user_hash: Annotated[str, msgspec.Meta(max_length=128, description="a pseudonymous user id, never the raw one")] = ""
    session_id: str = ""
    attributes: dict[str, str] = {}
    scores: dict[str, float] = {}
    # Appended: the id (never the secret) of the API key that authenticated the request, set by the router;
    # empty on the events applications send (the SDK and gRPC have no such field; whatever an application's
    # own event says here is no evidence: only served events steer a rollout). Canary analysis judges each
    # key's requests apart, so one caller's traffic cannot dilute or outvote another's (router analysis.py).
    key_id: Annotated[str, msgspec.Meta(max_length=128, description="the router API key's id")] = ""
    # Appended: prompt-cache writes (Anthropic's `cache_creation_input_tokens`), counted inside `input_tokens` as
    # `cached_tokens` (the reads) are, and billed dearer than plain input: a write kept 5 minutes at 1.25x, one kept an
    # hour (`cache_write_1h_tokens`, of these) at 2x (pricebook.ModelPrice). Before, a write counted as plain input
    # only, and budgets and the cost ledger charged as little as half what Anthropic bills (probe p38 F3).
    cache_write_tokens: Annotated[NonNeg, msgspec.Meta(description="gen_ai.usage.cache_creation.input_tokens")] = 0
    cache_write_1h_tokens: Annotated[NonNeg, msgspec.Meta(description="cache writes kept for 1 hour")] = 0

    @property
    def cached(self) -> bool:
        """Answered from the router's response cache (its `cache: hit`): a replay of an earlier answer, so no
        evidence of what its release does (repeating one request could otherwise fill a canary's sample)."""
        return self.attributes.get("cache") == "hit"

    @property
    def superseded(self) -> bool:
        """A failed call its request went past (`ATTEMPT`): a retry or a fallback followed it."""
        return self.attributes.get(ATTEMPT) == SUPERSEDED

    @property
    def arm_key(self) -> str:
        """What the router's sticky split put the request on its arm by, as the event records it: its user's hash,
        else its session, else its sticky-key header's hash (`STICKY`), each named by kind; "" for a request naming
        none, which drew its arm alone. A user's requests are alike and all on one arm, so canary analysis and the
        drift monitor count them as one unit (probes p75 F1, p81 F1/F2, p84 F1)."""
        if self.user_hash:
            return "user:" + self.user_hash
        if self.session_id:
            return "session:" + self.session_id
        sticky = self.attributes.get(STICKY, "")
        return "sticky:" + sticky if sticky else ""

    @property
    def billed_by_router(self) -> bool:
        """A call a router's own event bills (`BILLED_BY`): not booked again from this event. The router's events
        never say so; an application's saying so of calls it made elsewhere only hides its own reported spend."""
        return self.attributes.get(BILLED_BY) == ROUTER_BILLED and self.source != ROUTER

    @property
    def billed_tokens(self) -> tuple[int, int, int]:
        """(input, output, cached input) tokens the call is billed for: its usage, or for a call whose usage is
        unknown (`lockgate.usage_unknown`) the worst case the router charged for it (`lockgate.charged_*`)."""
        charged = self._charged()
        return (*charged, 0) if charged else (self.input_tokens, self.output_tokens, self.cached_tokens)

    @property
    def billed_writes(self) -> tuple[int, int]:
        """(prompt-cache writes, of them kept an hour) among `billed_tokens`' input: none for a call whose worst
        case was charged (its input priced as a whole: `billed_dearest`)."""
        return (0, 0) if self._charged() else (self.cache_write_tokens, self.cache_write_1h_tokens)

    @property
    def billed_dearest(self) -> bool:
        """The router charged the call's worst case with its input at the dearest rate an input token may be billed
        at (its upstream may write the prompt cache), so the cost accountant prices it so too."""
        return self._charged() is not None and self.attributes.get(CHARGED_INPUT_RATE) == DEAREST

    def _charged(self) -> tuple[int, int] | None:
        """The (input, output) tokens the router charged for a call whose usage is unknown, else None."""
        if USAGE_UNKNOWN in self.attributes:
            tokens_in = _count(self.attributes.get(CHARGED_INPUT_TOKENS))
            tokens_out = _count(self.attributes.get(CHARGED_OUTPUT_TOKENS))
            if tokens_in is not None and tokens_out is not None:
                return tokens_in, tokens_out
        return None

    @property
    def client_failed(self) -> bool:
        """A failure the client caused: it hung up before the answer while the upstream was answering
        (`client_disconnected`; not `upstream_unanswered`: it hung up on an upstream silent for longer than the
        router's `router_unanswered_s`, the release's failure), or sent a body the upstream refused (a 4xx, recorded
        as its status; but for `_RELEASES_DOING`: the endpoint refused its credential, timed out or throttles). No
        evidence of what the release does: counted, any client could pick users that hash to a canary and fail it at
        will, so analysis, shadow comparisons and drift leave such events out (as Flagger's success rate counts only
        5xx against a release). A request the router had no upstream connection for (`router_busy`) is left out
        alike: no call was made, the capacity it lacked is the router's."""
        if self.status == "ok":
            return False
        e = self.error_type
        return e in (CLIENT_DISCONNECTED, ROUTER_BUSY) or (len(e) == 3 and e[0] == "4" and e.isdigit() and e not in _RELEASES_DOING)


def _count(value: str | None) -> int | None:
    """A token count an attribute holds, within the usage fields' bounds; None when it holds none."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 10:
        return None
    n = int(value)
    return n if n <= 2**32 - 1 else None


class Score(msgspec.Struct, frozen=True, kw_only=True):
    """One scorer's outcome on one answer: its value, or why there is none (a judge outage, a judge
    reply without a score). A missing score is a missing measurement, never a 0."""

    scorer: str
    value: float | None = None
    error: str = ""


class InferenceScored(Event, frozen=True, kw_only=True, tag="lockgate.inference.scored"):
    """Online evaluation of one sampled inference event (`event_id`): scores from the evaluator's scorers,
    off the request path, for rollout analysis as live quality metrics. One answer may be scored in
    several events (the deterministic scorers at once, an LLM judge later), each naming its scorers.

    `time` is the scored answer's time, so a window of answers and a window of their scores agree.
    `scores` holds the values; `results` every scorer that ran, with the error of those that gave none
    (stored one row per scorer; analysis counts the errors, so an outage is never read as a pass)."""

    event_id: str
    app: Name
    deployment: OptName = ""
    variant: str = "stable"
    release: OptName = ""
    scores: dict[str, float] = {}
    results: list[Score] = []
    # The scored answer is one a router served (it came on `Subjects.served`): only such scores are a
    # canary's evidence, since an application may send any event on its own subject.
    served: bool = False

    def measured(self) -> dict[str, float]:
        """The scores, with NaN for each scorer that failed: the evidence analysis counts as an error."""
        failed = {r.scorer: math.nan for r in self.results if r.value is None}
        return {**self.scores, **failed} if failed else self.scores
