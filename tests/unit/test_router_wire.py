"""Router wire helpers: request patching, completion and chunk parsing, error excerpts."""

from __future__ import annotations

import msgspec
import pytest

from lockgate.llmwire import Message, last_user_text
from lockgate.services.router.proxy import _Record
from lockgate.services.router.wire import (
    openai_error,
    parse_chunk,
    parse_completion,
    patch_body,
)

pytestmark = pytest.mark.timeout(30)


def test_patch_body_overrides_model_and_requests_usage() -> None:
    body = b'{"model":"a","stream":true,"stream_options":{"x":1},"messages":[]}'
    out = msgspec.json.decode(patch_body(body, "b", True))
    assert out["model"] == "b" and out["stream_options"] == {"x": 1, "include_usage": True}


def test_last_user_text_handles_content_parts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"text": "b"}]
    msgs = [Message(role="user", content="first"), Message(role="assistant", content="x"),
            Message(role="user", content=parts)]
    assert last_user_text(msgs) == "a b"
    assert last_user_text([Message(role="system", content="s")]) is None


def test_parse_completion_and_chunks() -> None:
    rec = _Record("ok")
    parse_completion(b'{"model":"m-1","choices":[{"message":{"content":"hi"},"finish_reason":"length"}],'
                     b'"usage":{"prompt_tokens":3,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":2}}}',
                     rec)
    assert (rec.response_model, rec.text, rec.finish_reason) == ("m-1", "hi", "length")
    assert (rec.input_tokens, rec.output_tokens, rec.cached_tokens) == (3, 1, 2)
    rec, parts = _Record("ok"), []
    assert not parse_chunk(b'{"model":"m","choices":[{"delta":{"content":"he"}}]}', rec, parts)
    assert not parse_chunk(b'{"choices":[{"delta":{},"finish_reason":"stop"}]}', rec, parts)
    assert parse_chunk(b'{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}', rec, parts)
    assert (parts, rec.finish_reason, rec.output_tokens) == (["he"], "stop", 2)


@pytest.mark.parametrize(
    ("data", "want"),
    [(b'{"error":{"message":"boom"}}', "boom"), (b'{"error":"flat"}', "flat"), (b"<html>oops", "<html>oops"),
     (b"", "(empty body)")],
)
def test_openai_error_excerpt(data: bytes, want: str) -> None:
    assert openai_error(data) == want
