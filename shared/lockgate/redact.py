"""Secrets never reach logs, events, spans, dead letters or ClickHouse; prompts and responses are redactable.

Scrubbing runs per event on the router's and the SDK's publish path, so it is one compiled regular
expression (an alternation of anchored, literal-prefixed patterns) and no dependency: the plain
`pip install lockgate` carries only nats-py, msgspec and cryptography. The pattern table follows
the detectors maintained by gitleaks (config/gitleaks.toml) and Yelp's detect-secrets (plugins:
aws, basic_auth, github_token, jwt, keyword, private_key, slack, stripe, ...); the source of each
row is named beside it. Context patterns (a keyword, a URL's user) keep their context and lose only
the secret, so a scrubbed text still says what was there.
"""

from __future__ import annotations

import functools
import hashlib
import re
import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from lockgate.contracts import InferenceEvent, SpanRecord

RedactMode = Literal["scrub", "hash", "drop"]
MARK = "[REDACTED]"

# (name, pattern, triggers, source). A pattern runs only when one of its trigger words is in the
# lower-cased text (a substring test costs nanoseconds; a regex pass costs microseconds), and a pattern
# may start with a group named `keep`: that part (a keyword, a URL's user) survives the scrub.
PATTERNS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("private key", r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY[A-Z ]{0,10}-----(?:[\s\S]*?-----END[A-Z0-9 ]{0,40}"
                    r"PRIVATE KEY[A-Z ]{0,10}-----|[A-Za-z0-9+/=\s\\]*)", ("private key",),
     "detect-secrets PrivateKeyDetector"),
    # `sk-` covers OpenAI (sk-, sk-proj-, sk-svcacct-, sk-admin-) and Anthropic (sk-ant-api03-).
    ("openai/anthropic", r"\bsk-[A-Za-z0-9_-]{16,}", ("sk-",), "gitleaks openai-api-key, anthropic-api-key"),
    ("stripe", r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}|\bwhsec_[A-Za-z0-9]{16,}",
     ("_live_", "_test_", "whsec_"),
     "detect-secrets StripeDetector; gitleaks stripe-access-token"),
    ("google api key", r"\bAIza[0-9A-Za-z_-]{35}", ("aiza",), "gitleaks gcp-api-key"),
    ("google oauth token", r"\bya29\.[0-9A-Za-z_-]{20,}", ("ya29.",), "gitleaks gcp oauth"),
    ("aws access key id", r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b",
     ("akia", "asia", "abia", "acca", "a3t"),
     "detect-secrets AWSKeyDetector"),
    ("github", r"\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{22,}",
     ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     "detect-secrets GitHubTokenDetector; gitleaks github-fine-grained-pat"),
    ("gitlab", r"\bglpat-[A-Za-z0-9_-]{20,}", ("glpat-",), "gitleaks gitlab-pat"),
    # lockgate's own API keys: `lg-` and 32 random bytes, base64url (server/apikeys.py).
    ("lockgate api key", r"\blg-[A-Za-z0-9_-]{40,}", ("lg-",), "lockgate apikeys.PREFIX"),
    ("hugging face", r"\bhf_[A-Za-z0-9]{30,}", ("hf_",), "gitleaks huggingface-access-token"),
    ("npm", r"\bnpm_[A-Za-z0-9]{36}", ("npm_",), "gitleaks npm-access-token"),
    ("sendgrid", r"\bSG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}", ("sg.",), "detect-secrets SendGridDetector"),
    ("slack token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}", ("xox",), "detect-secrets SlackDetector"),
    ("slack webhook", r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}", ("hooks.slack.com",),
     "detect-secrets SlackDetector"),
    ("jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", ("eyj",),
     "detect-secrets JwtTokenDetector"),
    ("bearer / basic auth", r"(?P<keep>\b(?i:bearer|basic|token|digest)\s+)[A-Za-z0-9._~+/=-]{12,}",
     ("bearer", "basic", "token", "digest"), "detect-secrets BasicAuthDetector; gitleaks authorization header"),
    ("password in a URL", r"(?P<keep>\b[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/@\"'<>]{1,128}:)[^\s@/\"'<>]{1,256}(?=@)",
     ("://",), "detect-secrets BasicAuthDetector"),
    ("keyword assignment", r"(?P<keep>(?i:\b(?:aws_?secret_?(?:access_?)?key|secret_?access_?key|password|passwd|pwd|"
                           r"secret|api[_-]?key|apikey|access[_-]?token|auth[_-]?token|client[_-]?secret|"
                           r"private[_-]?key|x-api-key|accountkey)\b)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]{6,}",
     ("pass", "pwd", "secret", "key", "token"), "detect-secrets KeywordDetector, AWSKeyDetector; Azure AccountKey="),
)
# An AWS secret key is 40 base64 characters with no prefix: caught standalone when it mixes upper,
# lower and digits (a hex digest never does). Source: gitleaks aws secret heuristic.
_BASE64_40 = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_MIXED = (re.compile("[a-z]"), re.compile("[A-Z]"), re.compile("[0-9]"))

# Patterns whose secret is a run of 12+ token characters run only when the text has such a run:
# one str.translate and one substring test (about 3 µs per KB) spare prose every regex pass.
_NO_RUN_NEEDED = frozenset({"private key", "password in a URL", "keyword assignment"})
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "_-./+=~")
_B64_CHARS = frozenset(string.ascii_letters + string.digits + "/+")
_TOKEN_MAP = str.maketrans({chr(i): "a" if chr(i) in _TOKEN_CHARS else " " for i in range(128)})
_B64_MAP = str.maketrans({chr(i): "a" if chr(i) in _B64_CHARS else " " for i in range(128)})
_RUN_12, _RUN_40 = "a" * 12, "a" * 40

_COMPILED = tuple((re.compile(pattern), triggers, name not in _NO_RUN_NEEDED)
                  for name, pattern, triggers, _ in PATTERNS)

# Each distinct trigger word is looked for once per text (substring tests run at C speed; a regex
# alternation of them would be tried at every position and costs far more on long text).
_TRIGGERS = tuple(sorted({t for _, _, triggers, _ in PATTERNS for t in triggers}))
# The shortest text that can hold a secret any pattern matches ("pwd=" and six characters).
_MIN_SECRET = 10

# Header and attribute names whose whole value is a credential (compared lower-case).
SECRET_NAMES = re.compile(r"(?i)(?:^|[-_.])(?:authorization|auth|cookie|set-cookie|api[-_]?key|apikey|x-api-key|token|"
                          r"secret|password|passwd|credential|credentials|session[-_]?token|signature|private[-_]?key)"
                          r"(?:$|[-_.])")


def _mark(m: re.Match[str]) -> str:
    kept = m.groupdict().get("keep")
    return (kept or "") + MARK


def _mark_base64(m: re.Match[str]) -> str:
    token = m.group(0)
    return MARK if all(r.search(token) for r in _MIXED) else token


def scrub_secrets(text: str) -> str:
    """Replace API keys, tokens, passwords and private keys with a marker (context words are kept)."""
    if len(text) < _MIN_SECRET:
        return text
    # Short values (attribute values, session ids, routes) repeat across events: remember their result.
    return _scrub_short(text) if len(text) <= _SHORT else _scrub(text)


_SHORT = 256


@functools.lru_cache(maxsize=65_536)
def _scrub_short(text: str) -> str:
    return _scrub(text)


def _scrub(text: str) -> str:
    lower = text.lower()
    found = {t for t in _TRIGGERS if t in lower}
    if not found and len(text) < 40:  # no trigger, and too short for a bare AWS secret key
        return text
    long_run = _RUN_12 in text.translate(_TOKEN_MAP)
    for pattern, triggers, needs_run in _COMPILED:
        if (long_run or not needs_run) and not found.isdisjoint(triggers):
            text = pattern.sub(_mark, text)
    if long_run and _RUN_40 in text.translate(_B64_MAP):
        text = _BASE64_40.sub(_mark_base64, text)
    return text


def scrub_bytes(data: bytes) -> bytes:
    """`scrub_secrets` over raw bytes of any encoding (bytes that are not UTF-8 pass through as they are)."""
    text = data.decode("utf-8", "surrogateescape")
    scrubbed = scrub_secrets(text)
    return data if scrubbed == text else scrubbed.encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=4096)
def secret_name(name: str) -> bool:
    """Whether a header or attribute name says its value is a credential (Authorization, X-Api-Key, ...)."""
    return SECRET_NAMES.search(name) is not None


def scrub_mapping(values: Mapping[str, str]) -> Mapping[str, str]:
    """Keys and values scrubbed (the same mapping back when nothing changed); the value of a
    credential-named key is masked whole."""
    if not values:
        return values
    try:
        # The same keys (route, region) and values come with event after event: two subset tests in C
        # clear the usual mapping without a call per entry.
        if values.keys() <= _clean_keys and _clean_values.issuperset(values.values()):
            return values
    except TypeError:  # an unhashable value: not text, so never clean; the loop below leaves it be
        return _scrub_items(values)
    for key, value in values.items():
        if not (_clean_key(key) and _clean_value(value)):
            return _scrub_items(values)
    return values


def _scrub_items(values: Mapping[str, str]) -> Mapping[str, str]:
    # A value that is not text is left as it is, for the contract's decoder to refuse by name.
    def clean(value: object) -> object:
        return scrub_secrets(value) if isinstance(value, str) else value

    out: dict[str, str] = {}
    for key, value in values.items():
        out[clean(key)] = MARK if secret_name(str(key)) else clean(value)  # type: ignore[index,assignment]
    return out


# Keys and values seen clean: a key that names no credential and holds no secret, a value that holds no
# secret (a mapping is clean when all its keys and values are). Only short strings enter and the sets are
# bounded, so their memory stays small; a flood of distinct ones costs the scrub each time, never memory.
_clean_keys: set[str] = set()
_clean_values: set[str] = set()
_CLEAN_MAX = 16_384


def _clean_key(key: object) -> bool:
    if key in _clean_keys:
        return True
    if type(key) is not str or secret_name(key) or scrub_secrets(key) != key:
        return False
    if len(key) <= _SHORT and len(_clean_keys) < _CLEAN_MAX:
        _clean_keys.add(key)
    return True


def _clean_value(value: object) -> bool:
    if type(value) is not str:  # checked first: an unhashable value cannot be looked up
        return False
    if value in _clean_values:
        return True
    if scrub_secrets(value) != value:
        return False
    if len(value) <= _SHORT and len(_clean_values) < _CLEAN_MAX:
        _clean_values.add(value)
    return True


# An event's free text: every field a producer writes as it likes (a name field follows the name grammar).
_EVENT_TEXT = ("prompt", "response", "session_id", "error_type", "model", "response_model", "provider", "operation",
               "status", "finish_reason", "variant", "user_hash")


def scrub_event(event: InferenceEvent) -> InferenceEvent:
    """The event with secrets scrubbed from its free text (`_EVENT_TEXT`) and its attributes."""
    # Each field is looked at once and only a changed one is replaced: most events have nothing to scrub.
    changed: dict[str, object] = {}
    for name in _EVENT_TEXT:
        text = getattr(event, name)
        if text and (scrubbed := scrub_secrets(text)) != text:
            changed[name] = scrubbed
    attributes = event.attributes
    if attributes and (mapping := scrub_mapping(attributes)) is not attributes:
        changed["attributes"] = mapping
    return msgspec.structs.replace(event, **changed) if changed else event


def _scrub_text(text: str) -> str:
    return scrub_secrets(text) if text else text


def scrub_span(span: SpanRecord) -> SpanRecord:
    """The span with secrets scrubbed from its free text: name, status message, service name, trace state,
    scope name and version, and the attributes of the span, its resource, its events and its links (and
    the links' trace state): an exported span carries whatever its instrumentation recorded (request
    headers, database statements, prompts), and every one of these is a column of `otel_traces`."""
    changed: dict[str, object] = {}
    for name in ("name", "status_message", "service", "trace_state", "scope_name", "scope_version"):
        text = getattr(span, name)
        if text and (scrubbed := _scrub_text(text)) != text:
            changed[name] = scrubbed
    for name in ("attributes", "resource"):
        values = getattr(span, name)
        if values and (mapping := scrub_mapping(values)) is not values:
            changed[name] = dict(mapping)
    if span.events:
        events = [(at, _scrub_text(name), dict(scrub_mapping(attrs))) for at, name, attrs in span.events]
        if events != span.events:
            changed["events"] = events
    if span.links:
        links = [(trace, span_id, _scrub_text(state), dict(scrub_mapping(attrs)))
                 for trace, span_id, state, attrs in span.links]
        if links != span.links:
            changed["links"] = links
    return msgspec.structs.replace(span, **changed) if changed else span


def redact(text: str | None, mode: RedactMode) -> str | None:
    """Apply a redaction mode to prompt or response text; secrets are always scrubbed."""
    if text is None or mode == "drop":
        return None
    if mode == "hash":
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return scrub_secrets(text)
