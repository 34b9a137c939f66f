"""The OpenAI wire shapes, read once: by the router (requests, responses, stream chunks of chat
completions, completions, embeddings and responses), the evaluator (responses) and the dev simulator
(requests). Only the fields lockgate uses
are declared; everything else in a body is ignored on decode and forwarded untouched by the router.
"""

from __future__ import annotations

import math
import operator
from typing import Annotated, Any, NamedTuple

import msgspec


class Message(msgspec.Struct):
    """One chat message; `content` is a string or a list of content parts."""

    role: str = ""
    content: Any = None
    audio: Any = None  # an assistant turn's reference to an earlier audio answer (`{"id": ...}`), stored upstream


def null_stream_is_false(request: Any) -> None:
    """A request's `"stream": null` read as false, as OpenAI reads it (nullable, default false): the openai SDK sends
    it for `stream=None`, which its types allow. Refused before, a 400 "Expected `bool`, got `null`" (probe p79 F3).
    The request's other booleans are declared nullable or not read at all."""
    if request.stream is None:
        request.stream = False


class ChatRequest(msgspec.Struct):
    """The request fields routing, events and the simulator need."""

    model: str = ""
    messages: list[Message] = []
    stream: bool | None = False  # never None once decoded (null_stream_is_false)
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    n: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def __post_init__(self) -> None:
        null_stream_is_false(self)


Count = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]


class OutputLimits(msgspec.Struct):
    """What bounds a request's output, read from any body an upstream gets (the client's, or one a release's
    params or a provider translation changed). What admission reserves for (budgets, token rate limits):
    never below one, as OpenAI's own checks say, so no request can reserve less than nothing; and at most a
    32-bit integer, as providers take them, so their product stays a price (a 400-digit max_tokens overflowed
    the float of its cost: a 500)."""

    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    max_output_tokens: Count | None = None  # the Responses API's name for it
    n: Count | None = None  # choices, each up to the max tokens
    best_of: Count | None = None  # completions: generated (and billed) server-side


# Request fields by which an aggregator upstream lets the caller choose another model, provider, base URL or key than
# the request's `model` names, or answer without one: OpenRouter's fallback `models` (and `route`), `provider`
# routing, `preset`, `plugins` (its auto-router, paid web search) and `transforms`; a LiteLLM proxy's client-side
# `fallbacks` (and its context-window and content-policy ones), `model_list`/`user_config` (a whole router),
# `tags` (tag routing), client-side credentials (`api_key`, `api_base`, `base_url`, `api_version`,
# `custom_llm_provider`) and its mocks. A release says its model, endpoint and parameters: the router refuses a
# client's (proxy.py), on every operation. The one list; each is a field of ApiRequest (msgspec.Raw: never built).
ROUTING_FIELDS = (
    "models", "route", "provider", "preset", "plugins", "transforms",  # OpenRouter
    "fallbacks", "context_window_fallback_dict", "content_policy_fallbacks", "model_list", "user_config", "tags",
    "api_key", "api_base", "base_url", "api_version", "custom_llm_provider", "mock_response",
    "mock_testing_fallbacks",  # LiteLLM
)
# ApiRequest's base: OutputLimits and one Raw field per ROUTING_FIELDS name (empty when absent).
_Routed = msgspec.defstruct("_Routed", [(name, msgspec.Raw, msgspec.Raw()) for name in ROUTING_FIELDS],
                            bases=(OutputLimits,))
_routing_values = operator.attrgetter(*ROUTING_FIELDS)
_NULL = msgspec.Raw(b"null")


class ApiRequest(_Routed):
    """The fields the router reads from a request of any operation (chat: `messages`; completions:
    `prompt`; embeddings and responses: `input`). Admission bounds the input by the body's length, not
    by these fields (llmwire reads only some of what an upstream reads)."""

    model: str = ""
    stream: bool | None = False  # never None once decoded (null_stream_is_false)
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    messages: list[Message] = []
    prompt: Any = None
    input: Any = None
    # Whether tools are declared (a provider then adds instructions of its own to the input). Raw: their
    # JSON as sent, not decoded into objects on every request; absent, `null` and `[]` are at most 4 bytes.
    tools: msgspec.Raw = msgspec.Raw()
    # Chat's web search (search models): its results are input the body never carried (budgets.input_guessed).
    web_search_options: msgspec.Raw = msgspec.Raw()
    # The processing tier the client asked for (UNSET: none), whose price the operator pays: the router sends
    # a release's own instead, or none (wire.OPERATOR_FIELDS, each a field here).
    service_tier: Any = msgspec.UNSET
    # A Responses request generated after its answer (`true`: answered `queued`, polled by id): its usage never
    # reaches the router (Proxy.forward refuses one its output limit does not bound).
    background: Any = None

    def __post_init__(self) -> None:
        null_stream_is_false(self)

    def declares_tools(self) -> bool:
        """The request declares at least one tool (chat completions' or the Responses API's `tools`)."""
        return len(self.tools) > 4

    def routing_field(self) -> str | None:
        """The first ROUTING_FIELDS field the request sets (to anything but `null`), else None."""
        values = _routing_values(self)
        if not any(values):  # the usual request: one pass in C (an absent field is an empty Raw, which is false)
            return None
        return next((name for name, value in zip(ROUTING_FIELDS, values, strict=True) if value and value != _NULL),
                    None)  # `null` asks for nothing


# The most tokens one count of a call's usage may say: far above any real call (the largest context
# windows hold about 10 million tokens), far below what overflows a budget counter or a price.
MAX_CALL_TOKENS = 100_000_000


def token_count(value: Any) -> int | None:
    """An upstream's token count if it is one: a whole number from 0 to MAX_CALL_TOKENS (a float in that
    range is rounded up); None for anything else (negative, absurd, not a number)."""
    if type(value) is int:
        return value if 0 <= value <= MAX_CALL_TOKENS else None
    if type(value) is float and 0 <= value <= MAX_CALL_TOKENS:  # NaN fails the comparison
        return math.ceil(value)
    return None


class TokenUsage(NamedTuple):
    """A call's usage as the router counts it; `doubt` says why the usage is not believed (a count that is
    none, one the operation bills missing, a total that is none), "" when it is."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int
    doubt: str
    cache_write_tokens: int = 0  # prompt-cache writes inside the input (an Anthropic upstream's, anthropicwire.usage)
    cache_write_1h_tokens: int = 0  # of them, those kept an hour


def token_usage(input_name: str, input_value: Any, output_name: str, output_value: Any, details: Any,
                total: Any = msgspec.UNSET, output_billed: bool = True) -> TokenUsage:
    """Usage counts as an upstream reported them, bounded (token_count); `details` is the input count's details
    object, whose `cached_tokens` count at most the input (none is 0: the input then counts at the full rate), and
    its `cache_write_tokens` (of them `cache_write_1h_tokens`) at most the rest of it.

    Not believed (`doubt`): a count that is no token count (counted as 0), a `total` (`total_tokens`) that is
    none, and a count the operation bills that is missing (`msgspec.UNSET`; the output unless `output_billed` is
    False, as for embeddings), which taken as 0 charged a 5,200-token prompt nothing. A total above the parts
    counts its excess as output (input for embeddings): what a provider leaves out of its parts is what it
    generated unseen (reasoning), billed at the output rate, which no price book sets below the input's; a
    total below them is the parts' undercount, and the parts stand. Absent or null, a total says nothing."""
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    named = ((input_name, input_value, True), (output_name, output_value, output_billed))
    counted = [token_count(input_value), token_count(output_value)]
    bad = [f"{name}={_excerpt(value)}" for (name, value, _), n in zip(named, counted, strict=True)
           if n is None and value is not msgspec.UNSET]
    missing = [name for name, value, billed in named if value is msgspec.UNSET and billed]
    doubts: list[str] = []
    if bad:
        doubts.append(f"{'; '.join(bad)} (a token count is a whole number from 0 to {MAX_CALL_TOKENS:,}); "
                      "counted as 0")
    if missing:
        doubts.append(f"{' and '.join(missing)} missing; counted as 0")
    inputs, outputs = counted[0] or 0, counted[1] or 0
    if total is not msgspec.UNSET and total is not None:
        whole = token_count(total)
        if whole is None:
            doubts.append(f"total_tokens={_excerpt(total)} is no token count")
        elif not doubts and whole > inputs + outputs:
            if output_billed:
                outputs = whole - inputs
            else:
                inputs = whole - outputs
    cached = min(token_count(cached) or 0, inputs)
    writes, hour = _cache_writes(details, inputs - cached)
    return TokenUsage(inputs, outputs, cached, "; ".join(doubts), writes, hour)


def _cache_writes(details: Any, uncached: int) -> tuple[int, int]:
    """(prompt-cache writes, of them kept an hour) in an input count's `details`, at most its `uncached` tokens."""
    if not isinstance(details, dict):
        return 0, 0
    writes = min(token_count(details.get("cache_write_tokens")) or 0, uncached)
    return writes, min(token_count(details.get("cache_write_1h_tokens")) or 0, writes)


def _excerpt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Usage(msgspec.Struct):
    """Token counts as an upstream sent them (read through `tokens`, which bounds them; UNSET: absent); cached
    prompt tokens live in `prompt_tokens_details.cached_tokens`."""

    prompt_tokens: Any = msgspec.UNSET
    completion_tokens: Any = msgspec.UNSET
    total_tokens: Any = msgspec.UNSET
    prompt_tokens_details: Any = None

    def tokens(self, output_billed: bool = True) -> TokenUsage:
        """The counts, bounded and checked (token_usage); `output_billed` False for embeddings (input only)."""
        return token_usage("prompt_tokens", self.prompt_tokens, "completion_tokens", self.completion_tokens,
                           self.prompt_tokens_details, self.total_tokens, output_billed)


class TokenLogprob(msgspec.Struct):
    """One generated token's log probability (None when a server leaves it out)."""

    logprob: float | None = None


class Logprobs(msgspec.Struct):
    """`choices[].logprobs`: one entry per generated token."""

    content: list[TokenLogprob] | None = None


class FunctionCall(msgspec.Struct):
    """A tool call's function; streamed, `name` comes once and `arguments` in pieces."""

    name: str | None = None
    arguments: str | None = None


class ToolCall(msgspec.Struct):
    """One tool call of a message, or a piece of one in a stream delta (`index` says which)."""

    index: int | None = None
    id: str | None = None
    function: FunctionCall | None = None


class Output(msgspec.Struct):
    """A choice's `message` (complete response) or `delta` (stream chunk). `content` is a string, or a list of content
    parts (Mistral's reasoning models: `text` and `thinking` parts), read by answer_text; any other JSON is no text
    (the openai SDK reads such answers, so the router passes them on: before, a 502 charged at its worst case, probe
    p79 F4). `refusal`: the model declined (OpenAI's structured refusals); `function_call`: the one call of the legacy
    `functions` API."""

    content: Any = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None

    def text(self) -> str:
        """The answer's text: its content's (answer_text), and its refusal (after a newline when both), as the router
        records it."""
        return with_refusal(answer_text(self.content), self.refusal or "")


class Choice(msgspec.Struct):
    """One choice of a completion or a stream chunk (`text` for legacy completions)."""

    index: int = 0
    text: str | None = None
    message: Output | None = None
    delta: Output | None = None
    finish_reason: str | None = None
    logprobs: Logprobs | None = None

    def token_logprobs(self) -> tuple[float, ...] | None:
        """The generated tokens' log probabilities, or None when absent or incomplete."""
        tokens = self.logprobs.content if self.logprobs is not None else None
        values = tuple(t.logprob for t in tokens or () if t.logprob is not None)
        return values if tokens and len(values) == len(tokens) else None


class Completion(msgspec.Struct):
    """A chat completion or one stream chunk; `error` is set when the body (a 200, or a stream's event)
    is an error object instead, as servers send one after the status line went out."""

    model: str | None = ""  # null, as some servers send it: the answer names no model (the event's is the one asked for)
    choices: list[Choice] = []
    usage: Usage | None = None
    error: Any = None
    service_tier: Any = None  # the tier the provider served it at (OpenAI's), any JSON: only recorded


class ResponseContent(msgspec.Struct):
    """A content part of a Responses API output message (`output_text` carries `text`)."""

    type: str = ""
    text: str = ""
    refusal: str = ""  # a `refusal` part's text


class ResponseItem(msgspec.Struct):
    """One item of a Responses API `output`: a message, a function call, or another kind (ignored)."""

    type: str = ""
    id: Any = ""  # any JSON: only a string is an id the router claims (services/router/owners.py)
    container_id: Any = ""  # a code interpreter call's container (the account's, holding its files): claimed alike
    content: list[ResponseContent] = []
    call_id: str = ""
    name: str = ""
    arguments: str = ""


class ResponseUsage(msgspec.Struct):
    """Responses API usage as sent (read through `tokens`); cached input tokens in
    `input_tokens_details.cached_tokens`."""

    input_tokens: Any = msgspec.UNSET
    output_tokens: Any = msgspec.UNSET
    total_tokens: Any = msgspec.UNSET
    input_tokens_details: Any = None

    def tokens(self) -> TokenUsage:
        """The counts, bounded and checked (token_usage)."""
        return token_usage("input_tokens", self.input_tokens, "output_tokens", self.output_tokens,
                           self.input_tokens_details, self.total_tokens)


class Response(msgspec.Struct):
    """A Responses API response object (complete, or inside a stream's terminal event)."""

    id: Any = ""  # any JSON: only a string is an id the router claims (services/router/owners.py)
    store: Any = None  # false: the provider keeps nothing a later request could name
    model: str | None = ""
    status: str = ""
    output: list[ResponseItem] = []
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, Any] | None = None
    service_tier: Any = None  # the tier the provider served it at, any JSON: only recorded


class ResponseEvent(msgspec.Struct):
    """One Responses API stream event: `type` says which; deltas carry `delta`, terminal events `response`, an output
    item's (`response.output_item.added`, `.done`) `item`."""

    type: str = ""
    delta: str = ""
    response: Response | None = None
    item: ResponseItem | None = None


class ErrorDetail(msgspec.Struct):
    """The `error` object of an OpenAI error body."""

    message: str = ""


class ErrorBody(msgspec.Struct):
    """An error body: `{"error": {...}}`, or a bare string some servers send."""

    error: ErrorDetail | str | None = None


decode_request = msgspec.json.Decoder(ChatRequest).decode
decode_completion = msgspec.json.Decoder(Completion).decode
decode_error = msgspec.json.Decoder(ErrorBody).decode
decode_api_request = msgspec.json.Decoder(ApiRequest).decode
decode_response = msgspec.json.Decoder(Response).decode
decode_response_event = msgspec.json.Decoder(ResponseEvent).decode


def text_of(content: Any) -> str:
    """Text of a message content: a string or a list of `{"type": "text", "text": ...}` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("text"))
    return ""


def answer_text(content: Any) -> str:
    """The text of an answer's `content`: a string, or the `text` of its `text` parts (a `thinking` part is the
    model's reasoning, not its answer); anything else has none."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content
                       if isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str))
    return ""


def with_refusal(text: str, refusal: str) -> str:
    """An answer's text with its refusal: a choice's words either way (a refusal after the text, on a new line)."""
    return f"{text}\n{refusal}" if text and refusal else text or refusal


def input_text(value: Any) -> str | None:
    """The text of a `prompt` or `input`: a string, a list of strings (joined by newlines), or Responses
    API input items (the last user item's text); None for token arrays."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return "\n".join(value)
        for item in reversed(value):
            if isinstance(item, dict) and item.get("role", "user") == "user" and "content" in item:
                return text_of(item["content"])
    return None


def last_user_text(messages: list[Message]) -> str | None:
    """The last user message, or None."""
    for m in reversed(messages):
        if m.role == "user":
            return text_of(m.content)
    return None
