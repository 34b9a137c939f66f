"""Model names as providers spell them: a version suffix or an aggregator's prefix is the same model (modelnames);
the routing fields a request may not set (llmwire.ROUTING_FIELDS)."""

from __future__ import annotations

import pytest

from lockgate.llmwire import ROUTING_FIELDS, decode_api_request
from lockgate.modelnames import same_model

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(("asked", "answered"), [
    ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),  # OpenAI's dated snapshot
    ("gpt-4", "gpt-4-0613"),
    ("openai/gpt-4o", "gpt-4o-2024-08-06"),  # an aggregator's provider prefix
    ("gpt-4o-mini", "openai/gpt-4o-mini"),
    ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929"),  # Anthropic's
    ("claude-3-5-sonnet-latest", "claude-3-5-sonnet-20241022"),
    ("gemini-1.5-pro", "gemini-1.5-pro-002"),
    ("llama3", "llama3:latest"),  # Ollama's tag
    ("GPT-4o", "gpt-4o"),
    ("m", ""),  # no model in the answer: nothing to tell
])
def test_a_version_or_a_prefix_is_the_same_model(asked: str, answered: str) -> None:
    assert same_model(asked, answered) and same_model(answered, asked)


@pytest.mark.parametrize(("asked", "answered"), [
    ("m", "vendor/ungated-model"),
    ("gpt-4o", "gpt-4o-mini"),  # a word is another model, not a version
    ("gpt-4-turbo", "gpt-4-turbo-preview"),
    ("claude-sonnet-4-5", "claude-haiku-4-5-20251001"),
])
def test_another_model_is_told_apart(asked: str, answered: str) -> None:
    assert not same_model(asked, answered)


@pytest.mark.parametrize("field", ROUTING_FIELDS)
def test_every_routing_field_is_read_from_a_request_and_a_null_asks_for_nothing(field: str) -> None:
    assert decode_api_request(b'{"model": "m", "%s": ["x"]}' % field.encode()).routing_field() == field
    assert decode_api_request(b'{"model": "m", "%s": null}' % field.encode()).routing_field() is None
    # A field's name as a value, or inside a message, is no field.
    body = b'{"model": "m", "messages": [{"role": "user", "content": "%s"}], "user": "%s"}' % (field.encode(),
                                                                                           field.encode())
    assert decode_api_request(body).routing_field() is None
