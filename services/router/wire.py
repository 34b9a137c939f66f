"""How the router reads and writes the OpenAI wire (shapes in lockgate.llmwire): one codec per
operation (which upstream path, how its answer and stream fill the event), request patches, error bodies.

Several choices (`n` > 1), tool calls and refusals: the event's `response` is choice 0's text (what drift and
the evaluator compare), and when there is more than that text, `attributes["gen_ai.output.messages"]`
holds every choice as JSON in the OpenTelemetry GenAI output-messages shape:
`[{"role": "assistant", "parts": [{"type": "text", "content": ...}, {"type": "refusal", "content": ...},
{"type": "tool_call", "id": ..., "name": ..., "arguments": ...}], "finish_reason": ...}, ...]`, one entry per
choice in index order. Streamed, each choice has its own buffer, so interleaved chunks never mix.

A refusal (chat's `message.refusal`, a Responses `refusal` part) is the text of its choice when it has no other
(joined after it when it has): what the model said, read by the online scorers (`refusal` finds it a refusal,
`pii_free` reads what it may leak) and by drift's response embeddings, as OpenAI-compatible servers without structured
refusals send it as text. The `refusal` part (a GenAI generic part) says the provider marked it one. A legacy
`functions` answer's `function_call` is a tool call part (no id: that API has none), as drift's tool-call feature reads.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from lockgate.contracts.inference import ANSWER_NEUTRAL, request_digest
from lockgate.llmwire import (
    ApiRequest,
    Choice,
    ErrorDetail,
    Response,
    ResponseItem,
    TokenUsage,
    answer_text,
    decode_completion,
    decode_error,
    decode_response,
    decode_response_event,
    input_text,
    last_user_text,
    with_refusal,
)
from lockgate.redact import scrub_json, scrub_secrets
from lockgate.textbound import cut

if TYPE_CHECKING:
    from lockgate.services.router.proxy import _Record


_encoder = msgspec.json.Encoder()
OUTPUT_MESSAGES = "gen_ai.output.messages"
# An upstream's usage the router did not believe (a count negative, absurd or not a number, one the operation
# bills missing, a total that is no count): the event attribute saying why; a count that is none is 0 in
# the event, and the call's budgets charge its worst case.
USAGE_WARNING = "lockgate.usage_warning"
# The error type of a Responses turn the provider failed (`status: failed`, streamed as `response.failed`): its
# response object is the final word, its usage the turn's whole (settlement believes it, stream or not).
RESPONSE_FAILED = "response_failed"
# The processing tier the upstream says it served the call at (OpenAI's `service_tier`: `default`, `priority`,
# `flex`...), named as OpenTelemetry's OpenAI conventions name it.
SERVICE_TIER = "openai.response.service_tier"
# An answer whose `model` names another model than the one asked for (an aggregator's fallback): the event attribute
# saying which, and what it was priced as (Proxy._answered_by); the event's `response_model` is the answer's.
OTHER_MODEL = "lockgate.other_model"
# Request fields that choose what the operator pays per token, not what the model does: a client's never reaches
# an upstream; a release's params may set them (shipped.PARAMS). OpenAI bills `service_tier: priority` at about
# twice the standard rates, which budgets and the ledger price.
OPERATOR_FIELDS = ("service_tier",)


def as_released(data: dict[str, Any], model: str | None, params: dict[str, Any], op: Operation) -> None:
    """Make a decoded request the release's: its model and the params its operation takes (`Operation.params`,
    under that operation's names), none of the client's OPERATOR_FIELDS, and, when the release sets an output
    limit, none of the client's (replaced)."""
    for name in replaced(params, op):
        data.pop(name, None)
    if model:
        data["model"] = model
    # Not this operation's params are left out: before, a release's temperature went into every embeddings request.
    placed: dict[str, Any] = {}
    for name, value in params.items():
        if (field := op.params.get(name)) is not None:
            # Chat's two output limits onto one field (Responses' max_output_tokens): the smaller.
            placed[field] = min(placed[field], value) if field in placed else value
    data.update(placed)


def replaced(params: Mapping[str, Any], op: Operation) -> set[str]:
    """The client's fields a release with `params` replaces in a request of `op`: those its params set, the
    OPERATOR_FIELDS, and every LIMIT_FIELDS one when it sets an output limit. A limit replaced under its own name
    only left the client's other one in the body: a client's `max_completion_tokens: 5000` reached the upstream of
    a release gated at `max_tokens: 200` (the Anthropic translation and newer servers read it first; OpenAI
    refuses a body with both) (probe p17)."""
    fields = {op.params[name] for name in params if name in op.params}
    return {*fields, *OPERATOR_FIELDS, *(LIMIT_FIELDS if fields & set(op.max_fields) else ())}


_top_level = msgspec.json.Decoder(dict[str, msgspec.Raw])


def top_level(body: bytes) -> dict[str, Any]:
    """A request's top-level fields, each value left as its JSON bytes (msgspec.Raw, encoded back verbatim):
    changing a field never builds the rest into objects (a 28 MB nested value held the event loop for seconds)."""
    return _top_level.decode(body)


def patch_body(body: bytes, model: str | None, include_usage: bool, params: dict[str, Any] | None = None,
               op: Operation | None = None) -> bytes:
    """Re-encode the request as the release serves it to `op` (as_released; chat's by default) and/or with stream
    usage requested."""
    data = top_level(body)
    as_released(data, model, params or {}, op or CHAT)
    if include_usage:
        raw = data.get("stream_options")
        opts = msgspec.json.decode(raw) if raw is not None else None
        data["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return _encoder.encode(data)


class Choices:
    """Every choice's text, tool calls and finish reason, each in its own buffer."""

    __slots__ = ("finish", "parts", "refusals", "tools")

    def __init__(self) -> None:
        self.parts: dict[int, list[str]] = {}
        self.refusals: dict[int, list[str]] = {}
        self.tools: dict[int, dict[int, list[str]]] = {}  # choice -> tool index -> [id, name, arguments...]
        self.finish: dict[int, str] = {}

    def add_text(self, choice: int, text: str) -> None:
        """Append streamed (or complete) text to one choice."""
        self.parts.setdefault(choice, []).append(text)

    def add_refusal(self, choice: int, text: str) -> None:
        """Append a streamed (or complete) refusal to one choice."""
        self.refusals.setdefault(choice, []).append(text)

    def add_tool(self, choice: int, index: int, id_: str | None, name: str | None, arguments: str | None) -> None:
        """Fold one tool call, or a streamed piece of one, into its choice."""
        call = self.tools.setdefault(choice, {}).setdefault(index, ["", ""])
        if id_:
            call[0] = id_
        if name:
            call[1] += name
        if arguments:
            call.append(arguments)

    def text(self, choice: int = 0) -> str:
        """The text of one choice so far: its content, and its refusal (after a newline when both)."""
        return with_refusal("".join(self.parts.get(choice, ())), "".join(self.refusals.get(choice, ())))

    def begun(self) -> bool:
        """Whether any choice has output (text, a refusal or a tool call)."""
        return bool(self.parts or self.refusals or self.tools)

    def finished(self) -> bool:
        """Whether every choice begun has its finish reason (a stream that ends so is complete)."""
        return bool(self.finish) and all(c in self.finish for c in (*self.parts, *self.refusals, *self.tools))

    def has_more_than_text(self) -> bool:
        """Whether the event needs the output-messages attribute: a second choice, a refusal or any tool call."""
        return bool(self.tools or self.refusals) or any(c > 0 for c in (*self.parts, *self.finish))

    def output_messages(self, limit: int | None = None,
                        scrub: Callable[[str], str] = scrub_secrets) -> tuple[str, int | None]:
        """Every choice in the GenAI output-messages shape, as JSON, its text scrubbed of secrets; and, when their
        texts and tool-call arguments together were over `limit` UTF-8 bytes, the size the JSON had before each of
        them was cut to an equal share of `limit` (else None).

        `scrub` scrubs what the event holds only here, every tool call and the texts of choices after the first
        (the router's counts what it masked: fit.Tally); choice 0's text is the event's `response` too, scrubbed
        and counted with the event (fit.masked), so it is scrubbed here uncounted, never counted twice.

        Each string is scrubbed before it is encoded (a tool call's arguments as the JSON they hold): in the JSON
        text a newline before a key is `\n`, and a credential the arguments name (`{"api_key": ...}`) sits in a
        string within a string, so the event's own scrub of this attribute let both through. The cut comes after
        the scrub (half a secret is no longer recognised) and part by part, so the JSON stays whole and every
        choice, tool call and finish reason is still there (drift reads the tool calls)."""
        out: list[dict[str, Any]] = []
        long: list[tuple[dict[str, Any], str]] = []  # each part's free text: (part, key)
        for c in sorted({*self.parts, *self.refusals, *self.tools, *self.finish}):
            parts: list[dict[str, Any]] = []
            for kind, pieces in (("text", self.parts.get(c)), ("refusal", self.refusals.get(c))):
                if pieces:
                    parts.append({"type": kind, "content": (scrub if c else scrub_secrets)("".join(pieces))})
                    long.append((parts[-1], "content"))
            for _, call in sorted(self.tools.get(c, {}).items()):
                parts.append({"type": "tool_call", "id": scrub(call[0]), "name": scrub(call[1]),
                              "arguments": scrub_json("".join(call[2:]), scrub)})
                long.append((parts[-1], "arguments"))
            out.append({"role": "assistant", "parts": parts, "finish_reason": scrub_secrets(self.finish.get(c, ""))})
        if limit is None or sum(len(p[k]) for p, k in long) * 4 <= limit:  # within it whatever the characters
            return _encoder.encode(out).decode(), None
        sizes = [len(p[k].encode("utf-8", "surrogatepass")) for p, k in long]
        if sum(sizes) <= limit:
            return _encoder.encode(out).decode(), None
        share, gone = limit // len(long), 0
        for (part, key), size in zip(long, sizes, strict=True):
            if size > share:
                part[key] = cut(part[key], share)
                gone += size - len(part[key].encode())
        data = _encoder.encode(out).decode()
        return data, len(data.encode("utf-8", "surrogatepass")) + gone


def _usage(rec: _Record, usage: TokenUsage) -> None:
    """The call's usage: the last an answer reports (a stream's final chunk), believed or not."""
    rec.input_tokens, rec.output_tokens = usage.input_tokens, usage.output_tokens
    if usage.cached_tokens:
        rec.cached_tokens = usage.cached_tokens
    if usage.cache_write_tokens:
        rec.cache_write_tokens, rec.cache_write_1h_tokens = usage.cache_write_tokens, usage.cache_write_1h_tokens
    if usage.doubt:  # the event says so, and settlement charges the call's worst case (admission.settle)
        rec.attributes[USAGE_WARNING] = f"usage not believed: {usage.doubt}"
    else:
        rec.attributes.pop(USAGE_WARNING, None)


def _tier(rec: _Record, tier: Any) -> None:
    """Record the tier an answer says it was served at (a short string; anything else is no tier)."""
    if isinstance(tier, str) and tier:
        rec.attributes[SERVICE_TIER] = tier[:64]


# The tool index of a legacy `functions` answer's one call (`function_call`): apart from any `tool_calls` index.
LEGACY_CALL = -1


def _fold_choice(out: Choices, ch: Choice) -> None:
    msg = ch.message if ch.message is not None else ch.delta
    if ch.text:
        out.add_text(ch.index, ch.text)
    if msg is not None:
        if msg.content and (text := answer_text(msg.content)):
            out.add_text(ch.index, text)
        if msg.refusal:
            out.add_refusal(ch.index, msg.refusal)
        for i, call in enumerate(msg.tool_calls or ()):
            fn = call.function
            out.add_tool(ch.index, call.index if call.index is not None else i, call.id,
                         fn.name if fn else None, fn.arguments if fn else None)
        if (fn := msg.function_call) is not None:
            out.add_tool(ch.index, LEGACY_CALL, None, fn.name, fn.arguments)
    if ch.finish_reason:
        out.finish[ch.index] = ch.finish_reason


class ErrorAnswer(Exception):
    """An upstream answered 200 with an error object instead of a result."""


def parse_completion(data: bytes, rec: _Record) -> None:
    """Fill the record from a non-streaming chat or text completion (raises msgspec.DecodeError, or
    ErrorAnswer for an error body)."""
    c = decode_completion(data)
    if c.error and not c.choices:
        raise ErrorAnswer
    if c.model:  # none (absent or null): the event's is the model asked for (Proxy)
        rec.response_model = c.model
    _tier(rec, c.service_tier)
    for ch in c.choices:
        _fold_choice(rec.out, ch)
    if c.usage is not None:
        _usage(rec, c.usage.tokens())


def parse_chunk(data: bytes, rec: _Record) -> bool:
    """Fold one chat or text completion stream chunk into the record; True when it is a usage-only chunk."""
    c = decode_completion(data)
    if c.error:  # passed on to the client, whose SDK raises it; the call failed
        rec.status, rec.error_type = "error", "upstream_stream_error"
    if c.model:
        rec.response_model = c.model
    _tier(rec, c.service_tier)
    for ch in c.choices:
        _fold_choice(rec.out, ch)
    if c.usage is not None:
        _usage(rec, c.usage.tokens())
    return not c.choices and c.usage is not None


def parse_embeddings(data: bytes, rec: _Record) -> None:
    """Fill the record from an embeddings answer: the model and the input tokens (no text)."""
    c = decode_completion(data)
    if c.error:
        raise ErrorAnswer
    if c.model:
        rec.response_model = c.model
    if c.usage is not None:
        _usage(rec, c.usage.tokens(output_billed=False))  # embeddings bill their input alone


def _response(r: Response, rec: _Record) -> None:
    """A Responses API response object: text of its output messages, function calls, usage, status."""
    rec.response_model = r.model or rec.response_model
    _stored_as(r, rec)
    _tier(rec, r.service_tier)
    out = rec.out = Choices()  # the terminal event restates everything: start clean
    tools = 0
    for item in r.output:
        if item.type == "message":
            for part in item.content:
                if part.type == "output_text":
                    out.add_text(0, part.text)
                elif part.type == "refusal" and part.refusal:
                    out.add_refusal(0, part.refusal)
        elif item.type == "function_call":
            out.add_tool(0, tools, item.call_id, item.name, item.arguments)
            tools += 1
    if r.status == "completed":
        out.finish[0] = "tool_calls" if tools else "stop"
    elif r.status == "incomplete":
        reason = (r.incomplete_details or {}).get("reason") or "incomplete"
        out.finish[0] = "length" if reason == "max_output_tokens" else str(reason)
    elif r.status:
        out.finish[0] = r.status
    if r.status == "failed":  # the model's turn failed (streamed: response.failed), whatever the HTTP status
        rec.status, rec.error_type = "error", RESPONSE_FAILED
    if r.usage is not None:
        _usage(rec, r.usage.tokens())


def _stored_as(r: Response, rec: _Record) -> None:
    """Note the ids under which the provider keeps a response and its output items (rec.kept, for owners.py to
    claim), as response objects name them (a stream's `response.created` first), unless the answer says it keeps
    nothing (`"store": false`); and the containers its code interpreter calls ran in, whatever it says."""
    if r.store is False:
        rec.unstored = True
    if isinstance(r.id, str):
        _keeps(r.id, rec)
    for item in r.output:
        _item(item, rec)


def _item(item: ResponseItem, rec: _Record) -> None:
    """Note an output item's id, and its container's: a container outlives the answer (`"store": false` or not) and
    holds the files its code read and wrote, for whoever names it in a code interpreter tool."""
    _keeps(item.id, rec)
    _keeps(item.container_id, rec, always=True)


def _keeps(state_id: Any, rec: _Record, always: bool = False) -> None:
    """Note one id the provider keeps the answer's state under (an output item's, as it appears in a stream); `always`:
    whatever the answer says of its storage."""
    if isinstance(state_id, str) and state_id and (always or not rec.unstored) and state_id not in rec.kept:
        rec.kept.append(state_id)


def parse_response(data: bytes, rec: _Record) -> None:
    """Fill the record from a non-streaming Responses API answer."""
    _response(decode_response(data), rec)


def parse_response_event(data: bytes, rec: _Record) -> bool:
    """Fold one Responses API stream event: text deltas as they come, the terminal event's response
    as the final word (it carries usage and every output item)."""
    e = decode_response_event(data)
    if e.type == "response.output_text.delta":
        rec.out.add_text(0, e.delta)
    elif e.type == "response.refusal.delta":
        rec.out.add_refusal(0, e.delta)
    elif e.type == "error":  # the stream's error event, passed on to the client
        rec.status, rec.error_type = "error", "upstream_stream_error"
    elif e.response is not None and e.type == "response.created":
        _stored_as(e.response, rec)
    elif e.item is not None:  # an output item as it begins or ends: its ids are claimed before the event goes out
        _item(e.item, rec)
    elif e.response is not None and e.type in ("response.completed", "response.incomplete", "response.failed"):
        _response(e.response, rec)
        if e.type == "response.failed":
            rec.status, rec.error_type = "error", RESPONSE_FAILED
    return False


class _ErrorMark(msgspec.Struct):
    object: Any = None
    error: Any = None
    message: Any = None
    type: Any = None
    code: Any = None


_error_mark = msgspec.json.Decoder(_ErrorMark)


def stream_error(data: bytes) -> bytes | None:
    """An upstream's error event in a stream of any operation, as the client gets it; None when the event is
    no error. OpenAI's shape (`{"error": {...}}`, which the SDK raises) stays as it is; vLLM's (`{"object":
    "error", "message": ...}`), which the SDK would read as a chunk without choices, is put in it. An unescaped
    `"error"` occurs in JSON only as a key or a whole value, never inside a text: most events are not decoded
    twice."""
    if b'"error"' not in data:
        return None
    try:
        mark = _error_mark.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None  # the operation's own codec judged it already
    if mark.error:  # as the SDK reads it
        return data
    if mark.object != "error":
        return None
    return error_body(str(mark.message or "(no message)"), str(mark.type or "upstream_error"),
                      None if mark.code is None else str(mark.code))


class Operation(msgspec.Struct, frozen=True):
    """One OpenAI operation the gateway serves: its upstream path, its GenAI operation name and how its
    request and answers are read. `stream_usage`: streams may be asked to include usage (then hidden).
    `max_fields`: the request fields that bound its output as its upstreams read them (admission reserves
    from these alone; a client's limit in another field is refused, as its upstream would ignore it); none
    for an operation that generates no output (embeddings), which reserves its input alone."""

    name: str  # gen_ai.operation.name
    api: str  # the OpenAI API, recorded as the event's `lockgate.api` attribute
    path: str  # appended to the endpoint's base URL
    stream_usage: bool
    parse: Callable[[bytes, _Record], None]
    chunk: Callable[[bytes, _Record], bool] | None
    prompt: Callable[[ApiRequest], str | None]
    max_fields: tuple[str, ...] = ()
    # The release params (lockgate.shipped.PARAMS) this operation takes, each under its field's name here; the
    # others are not sent (an upstream that checks fields refuses a request with one it does not know).
    params: Mapping[str, str] = {}


# Chat: OpenAI reads max_completion_tokens (max_tokens is its older name), while an OpenAI-compatible
# server that predates the new name reads max_tokens only: both bound the output, the larger is reserved.
_SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "stop")
CHAT = Operation("chat", "chat.completions", "/chat/completions", True, parse_completion, parse_chunk,
                 lambda r: last_user_text(r.messages), ("max_completion_tokens", "max_tokens"),
                 {name: name for name in (*_SAMPLING, "max_tokens", "max_completion_tokens", "service_tier")})
COMPLETIONS = Operation("text_completion", "completions", "/completions", True, parse_completion, parse_chunk,
                        lambda r: input_text(r.prompt), ("max_tokens",),
                        {**{name: name for name in (*_SAMPLING, "max_tokens")}, "max_completion_tokens": "max_tokens"})
# Embeddings take no sampling parameter and no output limit: they generate no output, so no max_fields (admission
# reserves their input alone, and refuses a client's max tokens on them).
EMBEDDINGS = Operation("embeddings", "embeddings", "/embeddings", False, parse_embeddings, None,
                       lambda r: input_text(r.input))
# The Responses API generates a model turn from a conversation, which GenAI semconv calls "chat"; there is
# no "responses" operation name there, and "chat" keeps drift, cost and evaluation treating both alike. Its output
# limit is `max_output_tokens`; it has no seed, stop or penalties.
RESPONSES = Operation("chat", "responses", "/responses", False, parse_response, parse_response_event,
                      lambda r: input_text(r.input), ("max_output_tokens",),
                      {"temperature": "temperature", "top_p": "top_p", "service_tier": "service_tier",
                       "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"})
# Every field that bounds some operation's output (a client's in another operation is refused).
LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def chat_digest(body: bytes, model: str, params: Mapping[str, Any]) -> str | None:
    """A chat request's digest (contracts.inference.REQUEST_DIGEST) as its release serves it: the fields its params
    set (`params`, under chat's names) and its `model` are the release's, so the client's do not count; every other
    field that may change the answer does. None for a body that is no JSON object."""
    try:
        fields = top_level(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    fixed = replaced(params, CHAT)  # service_tier among them: ANSWER_NEUTRAL anyway
    shaping = {k: v for k, v in fields.items() if k not in ANSWER_NEUTRAL and k not in fixed}
    if not model and "model" in fields:  # a target without a model passes the client's on
        shaping["model"] = fields["model"]
    return request_digest(fields.get("messages", b"null"), shaping)  # the bytes as read, not copied


def openai_error(data: bytes) -> str:
    """The message of an upstream error body, or a short excerpt of it."""
    try:
        err = decode_error(data).error
    except msgspec.DecodeError:
        return data[:200].decode("utf-8", "replace") or "(empty body)"
    if isinstance(err, ErrorDetail):
        return err.message or "(no message)"
    return err or "(no message)"


def is_openai_error(data: bytes) -> bool:
    """Whether a body is an OpenAI-style error (`{"error": ...}`), which a client's SDK reads as one."""
    try:
        return decode_error(data).error is not None
    except msgspec.DecodeError:
        return False


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    """An OpenAI-style error body (`param`: the request field it is about, if one)."""
    return _encoder.encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


# The error type of a stream that ended before the answer did: no end marker with a choice unfinished, or an end
# marker before a choice's finish reason.
TRUNCATED = "stream_interrupted:truncated"


def interrupted_event(op: Operation, message: str, sequence: int) -> bytes:
    """The event that ends a stream the router cut short, in the shape of the operation's API: a Responses stream
    gets a typed `event: error` (`type`, `code`, `message`, `param`, the next `sequence_number`) as OpenAI sends
    it, keeping the `error` object by which the openai SDK raises (a cut answer never reads as a whole one);
    the others the `data: {"error": ...}` event the SDK raises."""
    if op.api == "responses":
        return b"event: error\ndata: " + _encoder.encode({
            "type": "error", "code": "stream_interrupted", "message": message, "param": None,
            "sequence_number": sequence,
            "error": {"message": message, "type": "upstream_error", "param": None, "code": "stream_interrupted"},
        }) + b"\n\n"
    return b"data: " + error_body(message, "upstream_error", "stream_interrupted") + b"\n\n"


def own_request_id() -> str:
    """An `x-request-id` of the router's own, for an answer no upstream gave one for (its errors, cache hits)."""
    return f"req_lockgate_{secrets.token_hex(12)}"


def own_answer(data: Any) -> web.Response:
    """A JSON answer of the router's own (the model list), with an `x-request-id` as every other answer has: the
    model list's had none, and the SDK's `request_id` was None (probe p79 F5)."""
    return web.json_response(data, headers={"x-request-id": own_request_id()})


def error_response(status: int, message: str, type_: str, *, headers: dict[str, str] | None = None,
                   code: str | None = None, param: str | None = None) -> web.Response:
    """An OpenAI-style error response, with an `x-request-id` as OpenAI's every answer has (the SDK's
    `request_id`, what a user quotes): the upstream's when `headers` carry one, else the router's own."""
    if headers is None or not any(name.lower() == "x-request-id" for name in headers):
        headers = {**(headers or {}), "x-request-id": own_request_id()}
    return web.Response(body=error_body(message, type_, code, param), status=status,
                        content_type="application/json", headers=headers)
