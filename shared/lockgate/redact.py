"""Secrets never reach logs, events or ClickHouse; prompts and responses are redactable."""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from lockgate.contracts import InferenceEvent

RedactMode = Literal["scrub", "hash", "drop"]

_SECRETS = re.compile(
    r"(?:sk-[A-Za-z0-9_-]{16,}"  # OpenAI-style keys
    r"|AKIA[0-9A-Z]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{20,}"  # GitHub tokens
    r"|xox[baprs]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWTs
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/-]{16,})"
)


def scrub_secrets(text: str) -> str:
    """Replace API keys and tokens with a marker."""
    return _SECRETS.sub("[REDACTED]", text)


def scrub_event(event: InferenceEvent) -> InferenceEvent:
    """The event with secrets scrubbed from its prompt and response (the same object if none)."""
    prompt = scrub_secrets(event.prompt) if event.prompt else event.prompt
    response = scrub_secrets(event.response) if event.response else event.response
    if prompt == event.prompt and response == event.response:
        return event
    return msgspec.structs.replace(event, prompt=prompt, response=response)


def redact(text: str | None, mode: RedactMode) -> str | None:
    """Apply a redaction mode to prompt or response text; secrets are always scrubbed."""
    if text is None or mode == "drop":
        return None
    if mode == "hash":
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return scrub_secrets(text)
