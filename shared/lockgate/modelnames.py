"""Whether two model names are the same model as providers spell it: the name a release asks for and the one its
upstream's answer says answered (`model` in an OpenAI-compatible answer, the event's `response_model`)."""

from __future__ import annotations

import re

# A version a provider appends to the model asked for: OpenAI's dates (`gpt-4o-mini-2024-07-18`, `gpt-4-0613`),
# Anthropic's (`claude-sonnet-4-5-20250929`), Gemini's `-002`, Bedrock's `-v2:0`, an alias's `-latest` or an Ollama
# tag's `:latest`. Not a word (`-mini`, `-preview`): those name other models.
_VERSION = re.compile(r"(?:-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{3,4}|v\d+(?::\d+)?|latest)|:latest)$")


def base_model(name: str) -> str:
    """`name` without its provider's prefix (`openai/gpt-4o` on an aggregator) and its version suffixes, lower case."""
    name = name.strip().lower().rpartition("/")[2]
    while (cut := _VERSION.sub("", name)) != name and cut:
        name = cut
    return name


def same_model(asked: str, answered: str) -> bool:
    """Whether an answer said to be by `answered` is by the model `asked` for (either unknown: nothing to tell)."""
    return not asked or not answered or asked == answered or base_model(asked) == base_model(answered)
