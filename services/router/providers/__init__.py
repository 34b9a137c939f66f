"""How the router speaks to each kind of upstream, chosen by the endpoint's `provider`.

`openai` (OpenAI-compatible): every operation, bodies and stream bytes pass through untouched.
`anthropic` (Anthropic Messages): chat completions only, translated both ways by the pure
`lockgate.anthropicwire` module (shared: the evaluator calls Anthropic endpoints through it too); the
client always sees the OpenAI wire. upstream.py moves bytes, these translate them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping
from typing import Any

import msgspec

from lockgate import anthropicwire as anthropic
from lockgate.codec import UNDECODABLE
from lockgate.errors import LockgateError
from lockgate.services.router.wire import CHAT, Operation, error_body

PROVIDERS = ("openai", "anthropic")


class Unsupported(LockgateError):
    """The endpoint's provider does not serve this operation, or not this request (answered as HTTP 400)."""


class OpenAI:
    """An OpenAI-compatible upstream: the request, the answer and the stream pass as they are."""

    name = "openai"
    headers: dict[str, str] = {}
    # Whether its answers may report prompt-cache writes, billed dearer than input (budgets.reckoned): OpenAI's cache
    # writes for free and its usage names none, so an OpenAI-compatible call is reserved at the input rate.
    writes_cache = False

    def path(self, op: Operation) -> str:
        return op.path

    def request(self, op: Operation, body: bytes) -> bytes:
        return body

    def response(self, data: bytes) -> bytes:
        return data

    def error(self, data: bytes) -> bytes:
        return data

    def lines(self, content: AsyncIterable[bytes], include_usage: bool) -> AsyncIterable[bytes]:
        return content

    def returned(self, headers: Mapping[str, str], passed: dict[str, str]) -> dict[str, str]:
        """The headers for the client: `passed` (upstream.returned_headers, OpenAI's names) as they are."""
        return passed


class Anthropic:
    """An Anthropic Messages upstream behind the OpenAI chat-completions wire."""

    name = "anthropic"
    headers = {"anthropic-version": anthropic.VERSION}
    writes_cache = True  # a write kept an hour is billed 2x input (anthropicwire.usage counts them)

    def path(self, op: Operation) -> str:
        if op is not CHAT:
            raise Unsupported(f"this deployment's endpoint speaks Anthropic Messages, which has no "
                              f"{op.api} operation; use /v1/chat/completions")
        return "/messages"

    def request(self, op: Operation, body: bytes) -> bytes:
        try:
            return msgspec.json.encode(anthropic.request(msgspec.json.decode(body)))
        except (anthropic.Untranslatable, *UNDECODABLE, KeyError, TypeError, AttributeError) as exc:
            msg = exc.message if isinstance(exc, LockgateError) else f"request cannot be translated: {exc!r}"
            raise Unsupported(msg) from None

    def response(self, data: bytes) -> bytes:
        """A 200 answer as a chat completion (raises msgspec.DecodeError when it is no message)."""
        msg = msgspec.json.decode(data)
        if not isinstance(msg, dict) or msg.get("type") != "message":
            raise msgspec.DecodeError("not an Anthropic message")
        with _malformed():
            return msgspec.json.encode(anthropic.response(msg))

    def error(self, data: bytes) -> bytes:
        try:
            body = msgspec.json.decode(data)
        except UNDECODABLE:
            return data
        return msgspec.json.encode(anthropic.error(body)) if isinstance(body, dict) else data

    def returned(self, headers: Mapping[str, str], passed: dict[str, str]) -> dict[str, str]:
        """The headers for the client: `passed` plus Anthropic's request id and rate limits under OpenAI's names
        (only `retry-after` shares a name, so the rest was dropped)."""
        passed.update(anthropic.returned_headers(headers))
        return passed

    async def lines(self, content: AsyncIterable[bytes], include_usage: bool) -> AsyncIterator[bytes]:
        """Anthropic SSE lines in, OpenAI SSE lines out; an `error` event goes out as an OpenAI error
        event, then raises UpstreamStreamError so the event records it."""
        tr = anthropic.StreamTranslator(include_usage)
        async for line in content:
            if not line.startswith(b"data:"):
                continue  # `event:` lines repeat the data's type; blank lines are re-made below
            try:
                event: Any = msgspec.json.decode(line[5:])
                with _malformed():
                    chunks = tr.feed(event)
            except anthropic.Untranslatable as exc:
                yield b"data: " + error_body(exc.message, "upstream_error") + b"\n\n"
                raise UpstreamStreamError(exc.message) from None
            for chunk in chunks:
                yield anthropic.sse(chunk)
                yield b"\n"
        if tr.finished:
            yield b"data: [DONE]\n"
            yield b"\n"


@contextlib.contextmanager
def _malformed() -> Iterator[None]:
    """JSON of the wrong shape from the upstream (`data: 42`, a `usage` that is a string, a content block
    that is no object) as a DecodeError: the proxy answers it as any body or chunk it cannot read (a 502,
    or the stream ended with `stream_interrupted`), not as a crash of its own."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise msgspec.DecodeError(f"not an Anthropic Messages answer: {exc!r}") from None


class UpstreamStreamError(LockgateError):
    """The upstream reported an error in the middle of a stream."""


_BY_NAME: dict[str, Any] = {"openai": OpenAI(), "anthropic": Anthropic()}


def provider(name: str) -> OpenAI | Anthropic:
    """The provider adapter for an endpoint's `provider` (validated when endpoints load)."""
    return _BY_NAME[name]
