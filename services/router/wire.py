"""How the router reads and writes the OpenAI wire (shapes in lockgate.llmwire): events from responses,
request patches, error bodies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from lockgate.llmwire import (
    ErrorDetail,
    Usage,
    decode_completion,
    decode_error,
)

if TYPE_CHECKING:
    from lockgate.services.router.proxy import _Record


_encoder = msgspec.json.Encoder()


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


def _usage(rec: _Record, usage: Usage) -> None:
    rec.input_tokens = max(0, usage.prompt_tokens)
    rec.output_tokens = max(0, usage.completion_tokens)
    if usage.cached_tokens:
        rec.cached_tokens = usage.cached_tokens


def parse_completion(data: bytes, rec: _Record) -> None:
    """Fill the record from a non-streaming completion (raises msgspec.DecodeError)."""
    c = decode_completion(data)
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
    c = decode_completion(data)
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
        err = decode_error(data).error
    except msgspec.DecodeError:
        return data[:200].decode("utf-8", "replace") or "(empty body)"
    if isinstance(err, ErrorDetail):
        return err.message or "(no message)"
    return err or "(no message)"


def error_response(status: int, message: str, type_: str, *, headers: dict[str, str] | None = None,
                   code: str | None = None) -> web.Response:
    """An OpenAI-style error body."""
    body = _encoder.encode({"error": {"message": message, "type": type_, "param": None, "code": code}})
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)

