"""Budgets before admission: what an operator declares, what one request may cost at most, and the
per-replica allowance ledger. Pure (no I/O, clocks passed in); admission.py does the KV compare-and-set.

Design (docs/budgets.md): the KV holds, per budget counter and period, the total
amount *leased* to replicas. A replica leases a chunk (a share of the limit, at least what the request
needs) with one compare-and-set on the counter's revision, and then reserves requests from that local
allowance without touching the KV. A grant never takes the counter past the limit, so every replica's
reservations together fit in the budget; settling gives the unused part of a reservation back to the
local allowance. A replica holds at most one chunk unreserved: a lease tops the allowance up to a chunk, an
allowance past `lease_s` that still covers a request is renewed rather than leased again, what a live one
holds above a chunk goes back to the KV at the next sweep, and one unused for `lease_s` goes back whole, so
neither busy nor idle replicas sit on budget. Money is counted in integer nano-USD so the counters add up exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from lockgate.errors import ConfigError
from lockgate.llmwire import ApiRequest, OutputLimits
from lockgate.pricebook import ModelPrice

NANO = 1_000_000_000  # nano-USD per USD
Period = Literal["day", "month"]
Per = Literal["", "tenant", "app", "key"]
Usd = Annotated[float, msgspec.Meta(ge=0)]
Tokens = Annotated[int, msgspec.Meta(ge=0)]


class BudgetSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One declared budget: which traffic it covers, its period and its limits (USD and/or tokens).

    `tenant`, `app` and `key` (an API key id) select traffic; empty matches any. `per` splits the
    budget into one counter per tenant, app or key (`per: key` = this limit for each key); empty
    means one counter for all the traffic selected.
    """

    tenant: str = ""
    app: str = ""
    key: str = ""
    per: Per = ""
    period: Period = "day"
    usd: Usd | None = None
    tokens: Tokens | None = None


class Amount(msgspec.Struct, frozen=True, array_like=True):
    """Nano-USD and tokens; the dimensions a budget does not limit stay 0."""

    usd: int = 0
    tokens: int = 0

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.usd + other.usd, self.tokens + other.tokens)

    def __sub__(self, other: Amount) -> Amount:
        return Amount(self.usd - other.usd, self.tokens - other.tokens)

    def covers(self, need: Amount) -> bool:
        """True when both dimensions are at least `need`'s."""
        return self.usd >= need.usd and self.tokens >= need.tokens

    def clip(self, limit: Amount) -> Amount:
        """Each dimension at most `limit`'s."""
        return Amount(min(self.usd, limit.usd), min(self.tokens, limit.tokens))


ZERO = Amount()


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """A declared budget, resolved: its name and limits in counter units."""

    name: str
    spec: BudgetSpec
    limit: Amount  # nano-USD and tokens; an unlimited dimension is 0 and never counted
    limits_usd: bool
    limits_tokens: bool

    def matches(self, tenant: str, app: str, key_id: str) -> bool:
        """True when this budget covers traffic of this tenant, app and key."""
        s = self.spec
        return (not s.tenant or s.tenant == tenant) and (not s.app or s.app == app) and (not s.key or s.key == key_id)

    def counter(self, tenant: str, app: str, key_id: str, periods: Periods) -> str:
        """The KV key of the counter this request charges: budget, split value, period."""
        per = self.spec.per
        pid = periods.day if self.spec.period == "day" else periods.month
        if not per:
            return _counter_key(self.name, None, pid)
        return _counter_key(self.name, tenant if per == "tenant" else key_id if per == "key" else f"{tenant}/{app}", pid)

    def need(self, cost: Amount) -> Amount:
        """The part of a request's cost this budget counts."""
        return Amount(cost.usd if self.limits_usd else 0, cost.tokens if self.limits_tokens else 0)

    def describe(self) -> str:
        """`acme-daily (5.00 USD and 100000 tokens per day)` for error messages."""
        parts = ([f"{self.spec.usd:g} USD"] if self.limits_usd else []) + \
                ([f"{self.spec.tokens} tokens"] if self.limits_tokens else [])
        return f"{self.name} ({' and '.join(parts)} per {self.spec.period})"


def resolve(budgets: dict[str, BudgetSpec]) -> list[Budget]:
    """The declared budgets with their limits in counter units (ConfigError for one that limits nothing)."""
    for name, s in budgets.items():
        if s.usd is None and s.tokens is None:
            raise ConfigError(f"budget {name!r} limits nothing: give it `usd`, `tokens` or both")
    return [Budget(name=name, spec=s, limits_usd=s.usd is not None, limits_tokens=s.tokens is not None,
                   limit=Amount(round((s.usd or 0.0) * NANO), s.tokens or 0))
            for name, s in budgets.items()]


class Periods(msgspec.Struct, frozen=True):
    """The current day and month ids, computed once per day rather than per request."""

    ordinal: int
    day: str
    month: str

    @classmethod
    def at(cls, now: datetime) -> Periods:
        return cls(now.toordinal(), period_id("day", now), period_id("month", now))


@functools.lru_cache(maxsize=65536)
def _counter_key(name: str, split: str | None, pid: str) -> str:
    return ".".join(_kv_token(p) for p in (name, split, pid) if p is not None)


def _kv_token(value: str) -> str:
    # KV keys allow [-/_=.a-zA-Z0-9]; dots separate the parts, so escape anything else (dots included).
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else f"={ord(c):02X}" for c in value) or "="


def period_id(period: Period, now: datetime) -> str:
    """The UTC period a time falls in: `2026-12-03` for a day, `2026-12` for a month."""
    now = now.astimezone(UTC)
    return now.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


# Input a provider adds to a request that declares tools (its tool-use instructions: a few hundred
# tokens at Anthropic), which no byte of the request carries.
TOOLS_TOKENS = 1000


# Where a request points at input it does not carry, as each API defines it: a content part (chat
# `messages[].content[]`, a Responses input item's `content[]` or a tool output) of an image type, or of a
# file (chat `file` with `file_data` or `file_id`, Responses `input_file`: a PDF's text and an image of every
# page, tens of thousands of tokens from a 2 KB body) or a stored item (`item_reference`); and the Responses
# API's top-level `previous_response_id` and `conversation`. The same names elsewhere (metadata, a tool's
# parameters, a response_format schema) are the application's own data and point at nothing.
_MEDIA = frozenset({"image_url", "input_image", "computer_screenshot"})
# A medium only named by URL (vLLM's `video_url`, `audio_url`: minutes of video are any number of tokens) is read
# from elsewhere as a file is.
_STORED = frozenset({"file", "input_file", "item_reference", "video_url", "audio_url"})
# Nothing above can occur in a body without one of these bytes (a quoted name, or a `\u` escape spelling one
# otherwise: `"previous_response_\u0069d"`). JSON escapes every quote inside a string, so a text saying
# "file" has none: the common body is passed over by a few byte scans, never walked nor decoded again.
# A chat assistant turn's `audio: {"id": ...}` brings back an earlier audio answer, stored by the provider.
_TRIGGERS = (*(f'"{name}"'.encode() for name in (*_MEDIA, *_STORED)), b'"previous_response_id"', b'"conversation"',
             b'"audio"')


class _TopLevel(msgspec.Struct):
    """A Responses request's stored state (fields llmwire.ApiRequest does not read)."""

    # Raw: only whether they are there counts; a value of any size is never built into objects (a 28 MB array held
    # the event loop for seconds).
    previous_response_id: msgspec.Raw = msgspec.Raw()
    conversation: msgspec.Raw = msgspec.Raw()


_top_level = msgspec.json.Decoder(_TopLevel)
_any = msgspec.json.Decoder()


class _ConversationRef(msgspec.Struct):
    """`conversation` as an object: `{"id": "conv_..."}`."""

    id: str


_response_id = msgspec.json.Decoder(str)
_conversation_id = msgspec.json.Decoder(str | _ConversationRef)
_NAMES_STATE = (b'"previous_response_id"', b'"conversation"')

# The stored state a request names: (its field, its id, or None when the value is no id).
NamedState = tuple[tuple[str, str | None], ...]


class Pointed(NamedTuple):
    """Input tokens a request only points at: its image parts (`media`) and stored input (`stored`)."""

    media: int = 0
    stored: int = 0

    @property
    def tokens(self) -> int:
        return self.media + self.stored

    def explain(self) -> str:
        """Why a reservation is larger than the body, for a refusal's message ("" when it is not)."""
        parts = ([f"{self.stored} tokens for input it only points at (a stored response, conversation or file: "
                  "the gateway file's stored_input_tokens)"] if self.stored else []) + \
                ([f"{self.media} tokens for its images (media_tokens each)"] if self.media else [])
        return f"This request's reservation includes {' and '.join(parts)}." if parts else ""


def pointed_at(req: ApiRequest, body: bytes, media_tokens: int, stored_tokens: int,
               named: NamedState | None = None) -> Pointed:
    """What a request (`req`, decoded from `body`) refers to without carrying it: `media_tokens` for each image
    part, and `stored_tokens` (up to a model's whole context) once if it has a file part, a stored item, or names
    a stored response or conversation (`named`, when the caller has read it already: `named_state`). Looked for
    only where the APIs put them (see _MEDIA), in the decoded request, so no JSON escape hides one; a body without
    a trigger byte string is not walked at all."""
    escaped = b"\\" in body and b"\\u" in body  # a one-byte scan first: most bodies have no backslash at all
    if not escaped and not any(t in body for t in _TRIGGERS):
        return Pointed()
    images = stored = 0
    for m in req.messages:
        i, s = _in_parts(m.content)
        images, stored = images + i, stored + s + (isinstance(m.audio, dict) and m.audio.get("id") is not None)
    for item in req.input if isinstance(req.input, list) else ():
        if isinstance(item, dict):  # an input item: itself a part (item_reference), or holding parts
            i, s = _in_parts([item, *(p for k in ("content", "output") for p in _as_parts(item.get(k)))])
            images, stored = images + i, stored + s
    if not stored and named is not None:
        stored = int(bool(named))
    elif not stored and (escaped or any(t in body for t in _NAMES_STATE)):
        try:
            stored = int(bool(named_state(body)))
        except msgspec.DecodeError:  # read once already (as an ApiRequest): should it fail now, reserve rather than not
            stored = 1
    return Pointed(images * media_tokens, stored_tokens if stored else 0)


def named_state(body: bytes) -> NamedState:
    """The stored state a Responses body's top level names (any value but null): each `previous_response_id` and
    `conversation` with its id (a non-empty string, or a conversation object's string `id`), or None for a value that
    is no id. A body with neither name quoted nor a `\\u` escape (which may spell one) is not decoded: `()` for the cost
    of a few byte scans. DecodeError for a body that is no JSON object (read once already as an ApiRequest)."""
    if not ((b"\\" in body and b"\\u" in body) or any(t in body for t in _NAMES_STATE)):
        return ()
    top = _top_level.decode(body)  # skips every other field without building it
    named: list[tuple[str, str | None]] = []
    for field, raw, decoder in (("previous_response_id", top.previous_response_id, _response_id),
                                ("conversation", top.conversation, _conversation_id)):
        value = bytes(raw)
        if value in (b"", b"null"):
            continue
        try:
            found = decoder.decode(value)
        except msgspec.DecodeError:  # an array, a number, an object without a string id: no id
            found = None
        named.append((field, (found.id if isinstance(found, _ConversationRef) else found) or None))  # "": no id
    return tuple(named)


def referenced_items(body: bytes, value: Any) -> NamedState:
    """The stored items a Responses request's `input` (`value`, decoded from `body`) names by their own id: each
    item reference, `{"type": "item_reference", "id": ...}` or with its type left out (an item of neither type nor
    role, as OpenAI reads it), as ("input", its id, or None when that is no non-empty string), each once. A body
    with neither `"id"` nor `"item_reference"` quoted nor a `\\u` escape (which may spell one) has none: `()` for the
    cost of a few byte scans."""
    if not isinstance(value, list) or not ((b"\\" in body and b"\\u" in body) or b'"id"' in body
                                           or b'"item_reference"' in body):
        return ()
    named: dict[tuple[str, str | None], None] = {}
    for item in value:
        if isinstance(item, dict) and (item.get("type") == "item_reference" or
                                       (item.get("type") is None and "role" not in item and "id" in item)):
            state_id = item.get("id")
            named["input", state_id if isinstance(state_id, str) and state_id else None] = None
    return tuple(named)


def named_containers(tools: msgspec.Raw) -> NamedState:
    """The code interpreter containers a Responses request's `tools` (as sent) name by their id: each tool's
    `container` given as a string, as ("tools", its id, or None for ""), each once (`{"type": "auto", ...}` asks for a
    new one: no id). Tools without `"container"` quoted nor a `\\u` escape (which may spell it) have none: `()` for
    the cost of a few byte scans."""
    raw = bytes(tools)
    if not ((b"\\" in raw and b"\\u" in raw) or b'"container"' in raw):
        return ()
    declared = _any.decode(raw)
    named: dict[tuple[str, str | None], None] = {}
    for tool in declared if isinstance(declared, list) else ():
        if isinstance(tool, dict) and isinstance(container := tool.get("container"), str):
            named["tools", container or None] = None
    return tuple(named)


def _as_parts(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value] if isinstance(value, dict) else []


def _in_parts(content: Any) -> tuple[int, int]:
    """Image parts and file or stored parts among a content list (a string content has none)."""
    images = stored = 0
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if not isinstance(kind, str):  # no type: named by its key (a part OpenAI refuses; reserving costs nothing)
            kind = next((k for k in part if k in _MEDIA or k in _STORED), "")
        images += kind in _MEDIA
        stored += kind in _STORED
    return images, stored


def input_estimate(body_bytes: int, req: ApiRequest, bytes_per_token: float, pointed: int = 0) -> int:
    """An upper bound of a request's input tokens, from the length of its body as the upstream receives it.

    Every text an upstream reads is in that body, whatever field carries it (messages and their tool calls,
    tools, response_format, prompt, input, instructions, a provider translation's fields), as JSON, which
    only lengthens text, and no byte-level tokenizer makes more tokens than bytes (bytes_per_token 1.0).
    Counting fields instead missed every one not counted (a Responses API `instructions` of 250 KB was
    reserved as 20 tokens). Plus a few tokens per message for the chat template, TOOLS_TOKENS when tools are
    declared, and `pointed`: what the body only points at (`pointed_at`: images, a stored response,
    conversation or file). Still not bounded: a hosted tool's results (web or file search) and a stored prompt
    template by id (input_guessed says when the estimate may fall short)."""
    tools = TOOLS_TOKENS if req.declares_tools() else 0
    return math.ceil(body_bytes / bytes_per_token) + 8 * len(req.messages) + 3 + tools + pointed


# Tool types the application runs itself, its results coming back in the body of its next request; any other (web or
# file search, a code interpreter, MCP, computer use) the provider runs, and reads its results as input no body carried.
_APPLICATION_TOOLS = frozenset({"function", "custom"})


def provider_runs(tools: Any) -> bool:
    """Whether a request's decoded `tools` declare one the provider runs (any but the application's own functions), or
    are not a list of tools the router can read: the answer then rests on what such a tool found or did on the
    provider's side (input_guessed; cache.request_key never caches it)."""
    return not isinstance(tools, list) or any(not isinstance(t, dict) or t.get("type") not in _APPLICATION_TOOLS
                                              for t in tools)


def input_guessed(req: ApiRequest, pointed: int) -> bool:
    """Whether a request's input estimate (input_estimate) may be below what its upstream reads: it holds a configured
    guess for what the body only points at (`pointed`: an image's `media_tokens`, a file's or stored state's
    `stored_input_tokens`), or nothing for the results of a tool the provider runs (any but a function: web or file
    search, MCP...; chat's `web_search_options`) or a stored prompt template (a Responses `prompt` object). Elsewhere
    the estimate bounds the input, and a count above it is not believed (Admission._doubt). Decodes `tools`: for a
    call whose count is above its estimate only, never on the request path."""
    if pointed or isinstance(req.prompt, dict) or bytes(req.web_search_options) not in (b"", b"null"):
        return True
    if not req.declares_tools():
        return False
    try:
        tools = _any.decode(bytes(req.tools))
    except msgspec.DecodeError:  # the upstream read something: what, the router cannot say
        return True
    return provider_runs(tools)


def most_output(req: ApiRequest, fields: Sequence[str], default_max_tokens: int,
                sent: Sequence[OutputLimits] = ()) -> int:
    """The most output tokens one request may generate and be billed for: the largest of its `fields` (the
    max tokens its operation's upstream reads: wire.Operation.max_fields), else the configured default, for
    each choice (`n`, or a completion's `best_of`, all generated and billed), for each prompt of a completions
    batch (a list of strings or of token lists). A limit in a field the operation does not read bounds
    nothing: read from any field, `max_tokens: 1` on the Responses API reserved 1 token for an answer of
    thousands. `sent`: the limits of the request's body as each upstream gets it (a release's params replace
    the client's, a provider translation may require one), the largest counting; the client's (`req`) only
    without them. No `fields`: the operation generates no output (embeddings), 0. Budgets and token rate limits
    both reserve this."""
    if not fields:  # before, the default: every embeddings request held 4,096 output tokens it never generates
        return 0
    prompt = req.prompt
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    # The bodies sent, not the client's beside them: a client without a limit counted default_max_tokens when
    # every body carried its release's 50 (probe p17): 4,096 charged for an abandoned call, a 429 under `tpm: 3000`.
    return max(_per_prompt(limits, fields, default_max_tokens) for limits in (sent or (req,))) * prompts


def _limit(limits: OutputLimits, fields: Sequence[str]) -> int:
    """A body's output limit per choice: the largest of its `fields`, 0 without one."""
    return max((getattr(limits, f) or 0 for f in fields), default=0)


def _per_prompt(limits: OutputLimits, fields: Sequence[str], default_max_tokens: int) -> int:
    return (_limit(limits, fields) or default_max_tokens) * max(limits.n or 1, limits.best_of or 1)


def to_lower(req: ApiRequest, fields: Sequence[str], default_max_tokens: int,
             sent: Sequence[OutputLimits] = ()) -> str:
    """What a request too large for a whole limit can change, naming the output limit its reservation took
    (most_output's): the client's own, one its upstream gets in its place, or the gateway's default. Before, every
    such refusal said "lower max_tokens", also to a client that sent none under a release that sets one."""
    if not fields:
        return "shorten the input"
    top = max(sent or (req,), key=lambda limits: _per_prompt(limits, fields, default_max_tokens))
    limit, asked = _limit(top, fields), _limit(req, fields)
    if not limit:
        return (f"it sets no {' or '.join(fields)}, so the gateway's default_max_tokens of {default_max_tokens} "
                "applies: set a lower one, lower n, or shorten the input")
    if limit == asked:
        return f"lower {next(f for f in fields if getattr(req, f) == asked)} ({asked}) or n, or shorten the input"
    field = next(f for f in fields if getattr(top, f) == limit)
    return (f"its output limit is the {field} of {limit} its upstream gets (its release's, or its provider's "
            "default when neither the release nor the request sets one): lower n, or shorten the input")


def cost_of(price: ModelPrice | None, input_tokens: int, output_tokens: int, cached_tokens: int = 0,
            cache_write_tokens: int = 0, cache_write_1h_tokens: int = 0) -> Amount:
    """Nano-USD (rounded up) and total tokens of a call; an unpriced model costs 0 USD. Prompt-cache writes (inside
    `input_tokens`) at their write rates, as the cost accountant prices them (ModelPrice.cost)."""
    usd = 0 if price is None else math.ceil(
        price.cost(input_tokens, output_tokens, cached_tokens, cache_write_tokens, cache_write_1h_tokens) * NANO)
    return Amount(usd, input_tokens + output_tokens)


def reckoned(price: ModelPrice | None, writes: bool) -> ModelPrice | None:
    """The price a reservation or worst case is reckoned at: the input at its dearest rate when the call's upstream
    `writes` the prompt cache (ModelPrice.writing: an Anthropic call writing its prompt for an hour is billed 2x
    input), else as it is (an OpenAI-compatible upstream reports no writes: its reservations do not grow)."""
    return price.writing() if writes and price is not None else price


def worst_case(price: ModelPrice | None, body_bytes: int, req: ApiRequest, limits: OutputLimits,
               fields: Sequence[str], default_max_tokens: int, bytes_per_token: float,
               pointed: int = 0, writes: bool = False, reported_input: int = 0) -> tuple[int, int, Amount]:
    """What one call may be billed at most: its input estimate (from the `body_bytes` it sends), the most output its
    body's `limits` allow, and their cost at its model's `price` (the input at a cache write's rate when its upstream
    `writes` the prompt cache: reckoned). Charged for a call whose usage the router never learns (abandoned after its
    request went out), as admission reserves for a request of that call alone. `reported_input`: an input count the
    upstream reported and the router believes (a cut stream's, told before its output was), charged when above the
    estimate: where the estimate only guesses (an image at `media_tokens`) the provider bills what it read."""
    tokens_in = max(input_estimate(body_bytes, req, bytes_per_token, pointed), reported_input)
    tokens_out = most_output(req, fields, default_max_tokens, (limits,))
    return tokens_in, tokens_out, cost_of(reckoned(price, writes), tokens_in, tokens_out)


def still_needed(held: Amount, spent: Amount, then: Amount) -> Amount:
    """What a request must reserve besides the `held` reservation before a call whose worst case is `then`, once
    calls it abandoned may have spent `spent` of it (ZERO when what it holds covers both)."""
    return Amount(max(0, spent.usd + then.usd - held.usd), max(0, spent.tokens + then.tokens - held.tokens))


class Counter(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a budget counter holds in the KV: the amount leased to replicas in one period. Unknown fields are
    refused: any identity that may publish on a stream's subject can have a JetStream acknowledgement
    (`{"stream":..,"seq":..}`) stored under a key, which read leniently would be a counter at zero (the budget
    reset); refused, the counter is unreadable and the budget fails closed (as when the store is down).

    `since`: when the counter was created, i.e. from when replicas count on it. A counter is created at the first
    lease of its period, which is not the period's start when the budget was added (or renamed) later, so what the
    routers served before `since` is added once from the cost ledger: `seeded` is that amount, None until it is
    (the ledger not read yet). Before, a budget added at 15:00 counted from 0 and granted a whole day again (probe
    p23 F5). A counter without `since` was created before counters were seeded and is never seeded."""

    leased: Amount = ZERO
    since: datetime | None = None
    seeded: Amount | None = None

    @property
    def unseeded(self) -> bool:
        """The ledger's spend before `since` is not in it yet."""
        return self.since is not None and self.seeded is None


def create_step(current: Counter | None, now: datetime) -> tuple[Counter | None, Counter]:
    """A compare-and-set step: create the counter (counting from `now`, to be seeded) when there is none, else write
    nothing; (what to write, the counter as it stands)."""
    if current is None:
        fresh = Counter(since=now)
        return fresh, fresh
    return None, current


def seed_step(current: Counter | None, since: datetime, spent: Amount) -> tuple[Counter | None, bool]:
    """A compare-and-set step: add `spent` (the ledger's spend of the counter's scope from its period's start to
    `since`) once, to the counter created at `since` that no replica has seeded yet; (what to write, whether it was
    added). The write lands only over the revision read, so two replicas seeding at once add it once."""
    if current is None or not current.unseeded or current.since != since:
        return None, False
    return msgspec.structs.replace(current, leased=current.leased + spent, seeded=spent), True


class Scope(NamedTuple):
    """The traffic one counter counts: a tenant, app and key id, each empty for any."""

    tenant: str
    app: str
    key: str


def scope(b: Budget, tenant: str, app: str, key_id: str) -> Scope:
    """What the counter a request of this tenant, app and key charges on `b` counts: the budget's selection narrowed
    by its split (`per`)."""
    s = b.spec
    return Scope(s.tenant or (tenant if s.per in ("tenant", "app") else ""), s.app or (app if s.per == "app" else ""),
                 s.key or (key_id if s.per == "key" else ""))


def period_start(period: Period, now: datetime) -> datetime:
    """The UTC start of the day or month `now` falls in."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def spend_amount(usd: float, tokens: int) -> Amount:
    """A ledger sum in counter units (nano-USD, rounded: a sum of floats is off in its last digits either way)."""
    return Amount(round(max(usd, 0.0) * NANO), max(tokens, 0))


def parse_counter_key(key: str) -> tuple[str, str, str] | None:
    """A budget counter's KV key as (budget, split, period id); None for the other keys of the bucket (shared
    rate-limit buckets and judge budgets start with `_`)."""
    parts = key.split(".")
    if key.startswith("_") or len(parts) not in (2, 3):
        return None
    return parts[0], parts[1] if len(parts) == 3 else "", parts[-1]


def grant(counter: Counter, limit: Amount, ask: Amount, minimum: Amount) -> Amount | None:
    """What the store may lease: `ask` clipped to what is left under the limit, or None when even
    `minimum` (what the waiting request still lacks) does not fit. A dimension the request lacks
    nothing of never refuses: the counter may hold spend in a dimension its budget no longer limits
    (the gateway file changed `usd` to `tokens`), whose limit is now 0."""
    left = limit - counter.leased
    if (minimum.usd and left.usd < minimum.usd) or (minimum.tokens and left.tokens < minimum.tokens):
        return None
    return Amount(max(0, min(ask.usd, left.usd)), max(0, min(ask.tokens, left.tokens)))


def lease_chunk(limit: Amount, fraction: float) -> Amount:
    """One lease's worth: a `fraction` of the limit (so the hot path rarely leases), and the most a replica holds
    unreserved (Allowance.keep)."""
    return Amount(math.ceil(limit.usd * fraction), math.ceil(limit.tokens * fraction))


def lease_ask(chunk: Amount, available: Amount, lacking: Amount) -> Amount:
    """How much to lease: what tops the allowance (`available`) up to one `chunk`, at least what is lacking. Never a
    chunk on top of what is held: a replica's unreserved allowance stays within a chunk (probe p38 F1)."""
    return Amount(max(lacking.usd, chunk.usd - available.usd), max(lacking.tokens, chunk.tokens - available.tokens))


class Allowance:
    """What one replica holds of one counter: leased, not yet reserved. Negative after a request
    used more than it reserved (the next lease charges the deficit to the store first)."""

    __slots__ = ("available", "expires", "keep")

    def __init__(self) -> None:
        self.available = ZERO
        self.expires = 0.0  # monotonic seconds: after this the unused remainder goes back to the store
        self.keep = ZERO  # the most it holds while live (one lease chunk): the sweep returns what is above it

    def take(self, need: Amount, now: float) -> bool:
        """Reserve `need` from the allowance, if it is live and covers it."""
        if now < self.expires and self.available.covers(need):
            self.available = self.available - need
            return True
        return False

    def renew(self, need: Amount, now: float, lease_s: float) -> bool:
        """Reserve `need` if the allowance covers it, expired or not, and keep it live for another `lease_s`. Past its
        expiry an allowance the sweep has not returned yet is still this replica's: a request it covers needs no
        lease. (Before, probe p38 F1, such a request leased a whole chunk more at every expiry, and a sweep never
        found it expired under steady traffic: one replica held the whole budget, the others were refused.)"""
        if not self.available.covers(need):
            return False
        self.available = self.available - need
        self.expires = max(self.expires, now + lease_s)
        return True

    def lacking(self, need: Amount) -> Amount:
        """What a lease must add so `need` can be taken (an expired allowance revives with the lease)."""
        return Amount(max(0, need.usd - self.available.usd), max(0, need.tokens - self.available.tokens))

    def add(self, amount: Amount, now: float, lease_s: float, keep: Amount) -> None:
        """A lease arrived: add it and keep the allowance live for another `lease_s`, holding at most `keep` (one
        lease chunk) from the next sweep on."""
        self.available = self.available + amount
        self.expires = now + lease_s
        self.keep = keep

    def credit(self, amount: Amount) -> None:
        """Settlement: the unused part of a reservation back (negative when the call cost more)."""
        self.available = self.available + amount

    def surrender(self, now: float) -> Amount:
        """What to return to the store: once expired, the remainder (or deficit), keeping nothing; while live, what it
        holds above `keep` (settlements give back reservations larger than their cost, and a burst of requests leases
        several chunks at once: renewed in use, that would otherwise stay here). A live deficit waits for the next
        lease, which charges it."""
        if now < self.expires:
            out = Amount(max(0, self.available.usd - self.keep.usd), max(0, self.available.tokens - self.keep.tokens))
        else:
            out = self.available
        self.available = self.available - out
        return out


class EventThrottle:
    """At most one budget event per counter and reason every `interval_s`; the refusals in between are
    counted into the next one, so a flood of refused requests is a handful of events, none lost."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._pending: dict[tuple[str, str], int] = {}

    def count(self, counter: str, reason: str, now: float) -> int:
        """Record one refusal; the number of refusals to report now, 0 to stay quiet."""
        k = (counter, reason)
        n = self._pending.get(k, 0) + 1
        last = self._last.get(k)
        if last is not None and now - last < self.interval_s:
            self._pending[k] = n
            return 0
        self._last[k] = now
        self._pending.pop(k, None)
        if len(self._last) > 10_000:  # counters of past periods: forget them rather than grow
            self._last = {k: self._last[k]}
        return n
