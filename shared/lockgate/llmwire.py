"""The OpenAI chat-completions wire shapes, read once: by the router (requests, responses, stream
chunks), the evaluator (responses) and the dev simulator (requests). Only the fields lockgate uses
are declared; everything else in a body is ignored on decode and forwarded untouched by the router.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Message(msgspec.Struct):
    """One chat message; `content` is a string or a list of content parts."""

    role: str = ""
    content: Any = None


class ChatRequest(msgspec.Struct):
    """The request fields routing, events and the simulator need."""

    model: str = ""
    messages: list[Message] = []
    stream: bool = False
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


class Usage(msgspec.Struct):
    """Token counts; cached prompt tokens live in `prompt_tokens_details.cached_tokens`."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: dict[str, Any] | None = None

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the provider's cache (0 when not reported)."""
        cached = (self.prompt_tokens_details or {}).get("cached_tokens")
        return cached if isinstance(cached, int) and cached > 0 else 0


class TokenLogprob(msgspec.Struct):
    """One generated token's log probability (None when a server leaves it out)."""

    logprob: float | None = None


class Logprobs(msgspec.Struct):
    """`choices[].logprobs`: one entry per generated token."""

    content: list[TokenLogprob] | None = None


class Output(msgspec.Struct):
    """A choice's `message` (complete response) or `delta` (stream chunk)."""

    content: str | None = None


class Choice(msgspec.Struct):
    """One choice of a completion or a stream chunk."""

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
    """A chat completion or one stream chunk."""

    model: str = ""
    choices: list[Choice] = []
    usage: Usage | None = None


class ErrorDetail(msgspec.Struct):
    """The `error` object of an OpenAI error body."""

    message: str = ""


class ErrorBody(msgspec.Struct):
    """An error body: `{"error": {...}}`, or a bare string some servers send."""

    error: ErrorDetail | str | None = None


decode_request = msgspec.json.Decoder(ChatRequest).decode
decode_completion = msgspec.json.Decoder(Completion).decode
decode_error = msgspec.json.Decoder(ErrorBody).decode


def text_of(content: Any) -> str:
    """Text of a message content: a string or a list of `{"type": "text", "text": ...}` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("text"))
    return ""


def last_user_text(messages: list[Message]) -> str | None:
    """The last user message, or None."""
    for m in reversed(messages):
        if m.role == "user":
            return text_of(m.content)
    return None
