"""OpenAI chat completions <-> Anthropic Messages, both ways, streaming included. Pure: no I/O.

Shared by the router (which serves an `anthropic` endpoint behind the OpenAI wire) and the evaluator (which
calls it the same way, so the gate judges what the router serves).

Requests: system and developer messages become `system`; assistant tool calls become `tool_use`
blocks and `tool` messages `tool_result` blocks in a user turn; consecutive turns of one role are
merged (Anthropic wants user and assistant to alternate); `max_tokens` is required there, so a
request without one gets DEFAULT_MAX_TOKENS; `parallel_tool_calls: false` becomes the tool choice's
`disable_parallel_tool_use`. A field Messages cannot express (a `response_format` schema, `logit_bias`, the legacy
`functions`; any field not known here) is refused (Untranslatable, answered 400), never dropped: only fields without
which an answer is as valid and of the same form are (_DROPPED). Responses: text blocks joined, `tool_use` blocks become
`tool_calls`, stop reasons mapped (STOP_REASONS), usage mapped with `cache_read_input_tokens` as
`prompt_tokens_details.cached_tokens`, cache writes as its `cache_write_tokens` (of them those kept an hour as
`cache_write_1h_tokens`: lockgate's names, billed at their own rates), and every input token Anthropic counts apart
(cache reads and cache writes) added to `prompt_tokens`, as OpenAI counts cached tokens inside the prompt.
Streams: `StreamTranslator` turns Anthropic's SSE events into OpenAI chunks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec

from lockgate.errors import LockgateError
from lockgate.llmwire import token_count

VERSION = "2023-06-01"  # the `anthropic-version` header this translation is written against
DEFAULT_MAX_TOKENS = 4096
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "refusal": "content_filter"}
# The request fields request() carries over (under Anthropic's names where they differ).
_TRANSLATED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop",
               "stream", "user", "safety_identifier", "tools", "tool_choice", "parallel_tool_calls"}
# Fields dropped: Messages has none of them, and an answer without them is as valid and of the same form.
_DROPPED = {
    "stream_options",  # the stream's usage is read from Anthropic's events whatever it asks (StreamTranslator)
    # Sampling: OpenAI's seed is best effort (no promise of the same answer twice), the penalties nudge word choice.
    # A release may fix all three (shipped.PARAMS): refused, they would turn a release serving on Claude into one
    # refusing all its traffic.
    "seed", "frequency_penalty", "presence_penalty",
    "service_tier",  # the operator's price to choose (router wire.OPERATOR_FIELDS), not what is answered
    "store", "metadata",  # whether and how OpenAI keeps the completion for its dashboard
    "prediction",  # predicted output: a faster answer, the same answer
    "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",  # prompt-cache hints: cost, not answer
}
# Fields Messages cannot express, refused (HTTP 400, naming the field) unless they hold a value that asks for
# nothing (_NEUTRAL): dropping one changes the answer while the client believes it asked for it (a
# `response_format` json_schema answered in free text, which the SDK's parse() cannot read). Any other field
# not named here is refused as well: the official SDK sends only the fields its caller set.
_REFUSED = {
    "n": "return one choice: n must be 1",
    "logprobs": "do not return log probabilities",
    "top_logprobs": "do not return log probabilities",
    "audio": "do not return audio output",
    "modalities": "return text only",
    # Anthropic's own structured outputs (a JSON schema the answer keeps to) are not what this translation asks for.
    "response_format": "have no JSON mode nor response schema here: only response_format {'type': 'text'} is served",
    "logit_bias": "have no logit bias",
    "functions": "take tools, not the legacy functions: send tools and tool_choice",
    "function_call": "take tools, not the legacy functions: send tools and tool_choice",
    "web_search_options": "have no web_search_options",
    "reasoning_effort": "have no reasoning_effort",
    "verbosity": "have no verbosity setting",
}
_NEUTRAL: dict[str, tuple[Any, ...]] = {  # the values of _REFUSED fields that ask for nothing (null: left out)
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "modalities": (["text"],),
    "response_format": ({"type": "text"},), "logit_bias": ({},), "functions": ([],),
}

_encode = msgspec.json.encode


class Untranslatable(LockgateError):
    """The request asks for something Anthropic Messages cannot do (answered as HTTP 400)."""


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _content_blocks(content: Any) -> list[dict[str, Any]]:
    """An OpenAI message content (string or parts) as Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [_text_block(content)] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append(_text_block(part.get("text", "")))
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                blocks.append({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
        else:
            raise Untranslatable(f"message content part of type {kind!r} has no Anthropic Messages counterpart")
    return blocks


def _system_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content or () if isinstance(p, dict))


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return msgspec.json.decode(raw) if raw.strip() else {}
        except msgspec.DecodeError:
            raise Untranslatable(f"tool call arguments are not JSON: {raw[:80]!r}") from None
    return raw or {}


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None or choice == "auto":
        return {"type": "auto"} if choice else None
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "tool", "name": choice["function"].get("name", "")}
    raise Untranslatable(f"tool_choice {choice!r} has no Anthropic Messages counterpart")


def _refuse_untranslated(body: dict[str, Any]) -> None:
    """Raise Untranslatable for the first field that asks for what the translation would lose (_REFUSED), or
    that it does not know."""
    for name, value in body.items():
        if name in _TRANSLATED or name in _DROPPED or value is None or value in _NEUTRAL.get(name, ()):
            continue
        why = _REFUSED.get(name)
        if why is None:
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise Untranslatable(f"Anthropic Messages endpoints have no counterpart of the request field {shown!r}")
        raise Untranslatable(f"Anthropic Messages endpoints {why} ({name!r})")


def _tools(tools: list[Any]) -> list[dict[str, Any]]:
    """OpenAI function tools as Anthropic tools (another kind of tool is refused, not left out)."""
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise Untranslatable(f"tools of type {t.get('type')!r} have no Anthropic Messages counterpart")
        fn = t["function"]
        # `strict: true` promises arguments that keep to the schema (the SDK's pydantic_function_tool sets it and
        # parse() relies on it); Messages here gives no such promise, so it is refused as _REFUSED fields are.
        if fn.get("strict") not in (None, False):
            raise Untranslatable(f"Anthropic Messages endpoints do not hold a tool's arguments to its schema here: "
                                 f"only strict false or absent is served ('tools[{i}].function.strict')")
        out.append({"name": fn["name"], "description": fn.get("description", ""),
                    "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}})
    return out


def request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat-completions request body as an Anthropic Messages request body."""
    _refuse_untranslated(body)
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for m in body.get("messages") or ():
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_system_text(m.get("content")))
        elif role == "user":
            add("user", _content_blocks(m.get("content")))
        elif role == "assistant":
            blocks = _content_blocks(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id", ""), "name": fn.get("name", ""),
                               "input": _arguments(fn.get("arguments"))})
            add("assistant", blocks)
        elif role == "tool":
            content = m.get("content")
            add("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id", ""),
                          "content": content if isinstance(content, str) else _content_blocks(content)}])
        else:
            raise Untranslatable(f"message role {role!r} has no Anthropic Messages counterpart")
    out: dict[str, Any] = {
        "model": body.get("model", ""),
        "messages": turns,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS,
    }
    if system:
        out["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    user = body.get("safety_identifier") or body.get("user")  # the newer name of the end user's id first
    if user:
        out["metadata"] = {"user_id": user}
    tools = body.get("tools")
    if tools:
        out["tools"] = _tools(tools)
    choice = _tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and tools and (choice or {}).get("type") != "none":
        # At most one tool call: Messages says it inside tool_choice (auto, OpenAI's default with tools, if unset).
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice
    return out


def usage(u: Any) -> dict[str, Any]:
    """Anthropic usage as OpenAI usage (cached tokens inside the prompt count, as OpenAI reports them). A
    count that is no token count (llmwire.token_count: negative, absurd, not a number) is passed on as it
    came in the sum's place, and `input_tokens` or `output_tokens` missing (or null) leaves its OpenAI count
    and the total out, for the router's reading of usage to refuse to believe it, never added up nor taken
    for 0 (a missing input count charged a long prompt nothing). Cache writes are also told apart in the details
    (cache_writes), as the reads are, for their own rates."""
    u = u if isinstance(u, dict) else {}
    cached = u.get("cache_read_input_tokens") or 0
    written = u.get("cache_creation_input_tokens") or 0
    out: dict[str, Any] = {}
    if u.get("input_tokens") is not None:
        out["prompt_tokens"] = _add(u["input_tokens"], cached, written)
    if u.get("output_tokens") is not None:
        out["completion_tokens"] = u["output_tokens"]
    if len(out) == 2:
        out["total_tokens"] = _add(out["prompt_tokens"], out["completion_tokens"])
    details: dict[str, Any] = {"cached_tokens": cached}
    writes, hour = cache_writes(written, u.get("cache_creation"))
    if writes:  # only then: an answer that wrote no cache keeps OpenAI's shape
        details.update(cache_write_tokens=writes, cache_write_1h_tokens=hour)
    return {**out, "prompt_tokens_details": details}


def cache_writes(total: Any, split: Any) -> tuple[int, int]:
    """(cache writes, of them kept an hour) from Anthropic's `cache_creation_input_tokens` (`total`) and, since the
    1-hour TTL came, its `cache_creation` split (`ephemeral_5m_input_tokens`, `ephemeral_1h_input_tokens`). A total
    without the split is billed as 5-minute writes: Anthropic sends the split with every answer since 1-hour writes
    exist, so a usage without it comes from an API (or a proxy of it) that has none; and this translation never
    asks for a TTL (it sends no `cache_control`), whose default is 5 minutes. Counts that are none count 0."""
    split = split if isinstance(split, dict) else {}
    five = token_count(split.get("ephemeral_5m_input_tokens")) or 0
    hour = token_count(split.get("ephemeral_1h_input_tokens")) or 0
    # The total counts every write; a split that adds up to more (the total missing) stands for it.
    return max(token_count(total) or 0, five + hour), hour


def _add(*counts: Any) -> Any:
    """The sum of token counts, or the first value that is none."""
    bounded = [token_count(c) for c in counts]
    for count, n in zip(counts, bounded, strict=True):
        if n is None:
            return count
    return sum(n for n in bounded if n is not None)


def finish_reason(stop_reason: str | None) -> str | None:
    """An Anthropic stop reason as an OpenAI finish reason (unknown ones pass as they are)."""
    return STOP_REASONS.get(stop_reason, stop_reason) if stop_reason else None


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    return {"id": block.get("id", ""), "type": "function",
            "function": {"name": block.get("name", ""), "arguments": _encode(block.get("input") or {}).decode()}}


def response(msg: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    """An Anthropic message as an OpenAI chat completion."""
    blocks = msg.get("content") or []
    text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": msg.get("id", ""),
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": msg.get("model", ""),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(msg.get("stop_reason"))}],
        "usage": usage(msg.get("usage") or {}),
    }


def error(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic error body ({"type": "error", "error": {type, message}}) in OpenAI's shape."""
    err = body.get("error") if isinstance(body.get("error"), dict) else {}
    return {"error": {"message": err.get("message", "") or "(no message)", "type": err.get("type", "api_error"),
                      "param": None, "code": None}}


class StreamTranslator:
    """Anthropic stream events in, OpenAI chat-completion chunks out (as dicts, in order).

    Tool calls are numbered by their order among tool_use blocks (OpenAI's `tool_calls[].index`),
    not by Anthropic's content block index, which counts text blocks too. Usage arrives in two
    parts (input in message_start, output in message_delta) and goes out in one usage-only chunk
    after the finish, when `include_usage` asked for it, as OpenAI sends it.
    """

    def __init__(self, include_usage: bool, created: int | None = None) -> None:
        self.include_usage = include_usage
        self.created = created if created is not None else int(time.time())
        self.id = ""
        self.model = ""
        self.usage: dict[str, Any] = {}
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self.finished = False

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The OpenAI chunks one Anthropic event becomes (none for pings and block stops).

        Raises Untranslatable with the upstream's message for an `error` event."""
        kind = event.get("type")
        if kind == "message_start":
            msg = event.get("message") or {}
            self.id, self.model = msg.get("id", ""), msg.get("model", "")
            self.usage = dict(msg.get("usage") or {})
            return [self._delta({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                n = self._tools[event.get("index", 0)] = len(self._tools)
                return [self._delta({"tool_calls": [{"index": n, "id": block.get("id", ""), "type": "function",
                                                     "function": {"name": block.get("name", ""),
                                                                  "arguments": ""}}]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._delta({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._delta({"content": delta.get("text", "")})]
            if delta.get("type") == "input_json_delta":
                n = self._tools.get(event.get("index", 0), 0)
                return [self._delta({"tool_calls": [{"index": n, "function": {
                    "arguments": delta.get("partial_json", "")}}]})]
            return []  # thinking and signature deltas have no chat-completions counterpart
        if kind == "message_delta":
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            reason = finish_reason((event.get("delta") or {}).get("stop_reason"))
            return [self._delta({}, reason or "stop")]
        if kind == "message_stop":
            self.finished = True
            return [self._chunk([], usage=usage(self.usage))] if self.include_usage else []
        if kind == "error":
            raise Untranslatable(error(event)["error"]["message"])
        return []  # ping, content_block_stop, and event types added later


# Anthropic's rate-limit headers under the names OpenAI (and so the client's SDK and dashboards) use.
_RATE_LIMITS = {f"anthropic-ratelimit-{kind}-{what}": f"x-ratelimit-{what}-{kind}"
                for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")}


def returned_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Anthropic's request id (`request-id`, what its support asks for) as `x-request-id`, and its
    `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` as `x-ratelimit-{limit,remaining,reset}-
    {requests,tokens}`, values as they came (a reset is a time there, a duration at OpenAI)."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low == "request-id":
            out["x-request-id"] = value
        elif (mapped := _RATE_LIMITS.get(low)) is not None:
            out[mapped] = value
    return out


def sse(chunk: dict[str, Any]) -> bytes:
    """One OpenAI stream event line."""
    return b"data: " + _encode(chunk) + b"\n"
