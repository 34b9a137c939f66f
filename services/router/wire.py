"""OpenAI wire shapes the router reads: only the fields it needs, decoded with msgspec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

if TYPE_CHECKING:
    from lockgate.services.router.proxy import _Record


class Message(msgspec.Struct):
    role: str = ""
    content: Any = None


class ChatRequest(msgspec.Struct):
    """The request fields routing and events need; everything else is forwarded untouched."""

    model: str = ""
    messages: list[Message] = []
    stream: bool = False
    user: str | None = None
    stream_options: dict[str, Any] | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: dict[str, Any] | None = None


class _Out(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Out | None = None
    delta: _Out | None = None
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    model: str = ""
    choices: list[_Choice] = []
    usage: _Usage | None = None


class _Error(msgspec.Struct):
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _Error | str | None = None


_completion = msgspec.json.Decoder(_Completion)
_error_body = msgspec.json.Decoder(_ErrorBody)
_encoder = msgspec.json.Encoder()


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


def patch_body(body: bytes, model: str | None, include_usage: bool, params: dict[str, Any] | None = None) -> bytes:
    """Re-encode the request with the release's model and parameters and/or stream usage requested."""
    data = msgspec.json.decode(body)
    if model:
        data["model"] = model
    if params:
        data.update(params)
    if include_usage:
        opts = data.get("stream_options") or {}
        data["stream_options"] = {**opts, "include_usage": True}
    return _encoder.encode(data)


def _usage(rec: _Record, usage: _Usage) -> None:
    rec.input_tokens = max(0, usage.prompt_tokens)
    rec.output_tokens = max(0, usage.completion_tokens)
    details = usage.prompt_tokens_details
    cached = details.get("cached_tokens") if details else None
    if isinstance(cached, int) and cached > 0:
        rec.cached_tokens = cached


def parse_completion(data: bytes, rec: _Record) -> None:
    """Fill the record from a non-streaming completion (raises msgspec.DecodeError)."""
    c = _completion.decode(data)
    rec.response_model = c.model
    if c.choices:
        first = c.choices[0]
        rec.finish_reason = first.finish_reason or ""
        if first.message is not None and first.message.content:
            rec.text = first.message.content
    if c.usage is not None:
        _usage(rec, c.usage)


def parse_chunk(data: bytes, rec: _Record, parts: list[str]) -> bool:
    """Fold one stream chunk into the record; True when it is a usage-only chunk."""
    c = _completion.decode(data)
    if c.model:
        rec.response_model = c.model
    for ch in c.choices:
        if ch.delta is not None and ch.delta.content:
            parts.append(ch.delta.content)
        if ch.finish_reason:
            rec.finish_reason = ch.finish_reason
    if c.usage is not None:
        _usage(rec, c.usage)
    return not c.choices and c.usage is not None


def openai_error(data: bytes) -> str:
    """The message of an upstream error body, or a short excerpt of it."""
    try:
        err = _error_body.decode(data).error
    except msgspec.DecodeError:
        return data[:200].decode("utf-8", "replace") or "(empty body)"
    if isinstance(err, _Error):
        return err.message or "(no message)"
    return err or "(no message)"


def error_response(status: int, message: str, type_: str, *, headers: dict[str, str] | None = None,
                   code: str | None = None) -> web.Response:
    """An OpenAI-style error body."""
    body = _encoder.encode({"error": {"message": message, "type": type_, "param": None, "code": code}})
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)
