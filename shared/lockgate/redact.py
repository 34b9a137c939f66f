"""Secrets never reach logs, events, spans, dead letters or ClickHouse; prompts and responses are redactable.

Scrubbing runs per event on the router's and the SDK's publish path, so it is one compiled regular
expression (an alternation of anchored, literal-prefixed patterns) and no dependency: the plain
`pip install lockgate` carries only nats-py, msgspec and cryptography. The pattern table follows
the detectors maintained by gitleaks (config/gitleaks.toml) and Yelp's detect-secrets (plugins:
aws, basic_auth, github_token, jwt, keyword, private_key, slack, stripe, ...); the source of each
row is named beside it. Context patterns (a keyword, a URL's user) keep their context and lose only
the secret, so a scrubbed text still says what was there. Serialized text (JSON and its escapes) is read
by a second table made from the same rows (`_escaped`); a caller that knows a value's structure scrubs its
strings before encoding it (`scrub_value`, `scrub_json`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import operator
import re
import string
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from lockgate.contracts.names import is_name
from lockgate.errors import InvalidEvent

if TYPE_CHECKING:
    from lockgate.contracts import InferenceEvent, SpanRecord

RedactMode = Literal["scrub", "hash", "drop"]
MARK = "[REDACTED]"

# (name, pattern, triggers, source). A pattern runs only when one of its trigger words is in the
# lower-cased text (a substring test costs nanoseconds; a regex pass costs microseconds), and a pattern
# may start with a group named `keep`: that part (a keyword, a URL's user) survives the scrub.
PATTERNS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    # A key cut short (no END line) is masked to the end of its body, escaped newlines (`\n`) included. A body never
    # holds `-----`, so the search for its END line stops at the next one: before (probe p35), it ran to the end of
    # the text from every BEGIN line, and 4,000 of them (112 KB) took 8 s of one event's scrub, stalling every tenant.
    ("private key", r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY[A-Z ]{0,10}-----(?:(?:(?!-----)[\s\S])*+-----END"
                    r"[A-Z0-9 ]{0,40}PRIVATE KEY[A-Z ]{0,10}-----|(?:[A-Za-z0-9+/=\s]|\\[nrt])*+)", ("private key",),
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
    # LLM providers and the tools around them: a prefix and a long random body each (the lengths are a floor, below
    # the providers' own, so that a key's later, longer shape is still caught).
    ("groq", r"\bgsk_[A-Za-z0-9]{32,}", ("gsk_",), "gitleaks groq-api-key (gsk_ and 52)"),
    ("xai", r"\bxai-[A-Za-z0-9_]{40,}", ("xai-",), "gitleaks xai-api-key (xai- and 80)"),
    ("perplexity", r"\bpplx-[A-Za-z0-9]{32,}", ("pplx-",), "gitleaks perplexity-api-key (pplx- and 48)"),
    ("replicate", r"\br8_[A-Za-z0-9]{30,}", ("r8_",), "Replicate API tokens (r8_ and 37)"),
    ("fireworks", r"\bfw_[A-Za-z0-9]{20,}", ("fw_",), "Fireworks AI API keys (fw_ and 24)"),
    ("langsmith", r"\blsv2_(?:pt|sk)_[0-9a-f]{32}_[0-9a-f]{10}", ("lsv2_",),
     "gitleaks langsmith (lsv2_pt_ personal, lsv2_sk_ service keys)"),
    ("pinecone", r"\bpcsk_[A-Za-z0-9]{4,}_[A-Za-z0-9]{32,}", ("pcsk_",), "Pinecone API keys (pcsk_, an id, a secret)"),
    ("databricks", r"\bdapi[0-9a-f]{32}(?:-[0-9])?", ("dapi",), "gitleaks databricks-api-token"),
    ("tavily", r"\btvly-(?:[a-z]{3,4}-)?[A-Za-z0-9]{24,}", ("tvly-",), "Tavily API keys (tvly-, tvly-dev-)"),
    # lockgate's own API keys: `lg-` and 32 random bytes, base64url (server/apikeys.py).
    ("lockgate api key", r"\blg-[A-Za-z0-9_-]{40,}", ("lg-",), "lockgate apikeys.PREFIX"),
    ("hugging face", r"\bhf_[A-Za-z0-9]{30,}", ("hf_",), "gitleaks huggingface-access-token"),
    ("npm", r"\bnpm_[A-Za-z0-9]{36}", ("npm_",), "gitleaks npm-access-token"),
    ("sendgrid", r"\bSG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}", ("sg.",), "detect-secrets SendGridDetector"),
    ("slack token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}", ("xox",), "detect-secrets SlackDetector"),
    ("slack webhook", r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}", ("hooks.slack.com",),
     "detect-secrets SlackDetector"),
    # Its header segment ends at a `-eyJ` (a JWT's next possible start) and nothing is given back: before (probe p35),
    # every `eyJ` after a `-` of one long run scanned to the run's end, 1.3 s for 56 KB of `eyJ-`. A header cut there
    # leaves its start unmasked, never the payload or the signature.
    ("jwt", r"\beyJ(?:[A-Za-z0-9_]|-(?!eyJ)){8,}+\.[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}+", ("eyj",),
     "detect-secrets JwtTokenDetector"),
    ("bearer / digest auth", r"(?P<keep>\b(?i:bearer|digest)\s+)[A-Za-z0-9._~+/=-]{12,}",
     ("bearer", "digest"), "detect-secrets BasicAuthDetector; gitleaks authorization header"),
    # "basic" and "token" are common words: what follows them is a credential only when it is no plain lowercase
    # word ("a basic introduction", "token authentication" are prose; base64 and token alphabets mix in more).
    ("basic / token auth", r"(?P<keep>\b(?i:basic|token)\s+)(?![a-z]+(?![A-Za-z0-9._~+/=-]))[A-Za-z0-9._~+/=-]{12,}",
     ("basic", "token"), "detect-secrets BasicAuthDetector; gitleaks authorization header"),
    # The user may be empty: `redis://:password@cache:6379` is how Redis URLs carry a password.
    ("password in a URL", r"(?P<keep>\b[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/@\"'<>]{0,128}:)[^\s@/\"'<>]{1,256}(?=@)",
     ("://", ":\\/\\/"), "detect-secrets BasicAuthDetector"),
    # SQL sets a password with a quoted literal and no `=`: `ALTER USER bob WITH PASSWORD '...'`, `CREATE USER a
    # IDENTIFIED BY '...'` (MySQL; ClickHouse's `IDENTIFIED WITH sha256_password BY '...'`), `PASSWORD('...')`.
    # Its triggers are the statement's own spelling (one space, as written): "password" alone is common prose.
    ("sql password", r"(?P<keep>(?i:\b(?:password|identified(?:\s+with\s+\w+)?\s+by))\s*\(?\s*')[^'\n]{1,256}(?=')",
     ("password '", "password('", "by '"), "lockgate: db.statement spans (PostgreSQL, MySQL, ClickHouse)"),
    ("keyword assignment", r"(?P<keep>(?i:\b(?:aws_?secret_?(?:access_?)?key|secret_?access_?key|password|passwd|pwd|"
                           r"secret|api[_-]?key|apikey|access[_-]?token|auth[_-]?token|client[_-]?secret|"
                           r"private[_-]?key|x-api-key|accountkey|"
                           r"(?:subscription|functions|access|account|master)[_-]key)\b)[\"']?\s*[:=]\s*[\"']?)"
                           # Not a lockgate API key's label (`apikey:<12 hex id>(role@tenant/app)`, the actor that
                           # decisions, routes and the audit log name): an id, never the key.
                           r"(?![0-9a-f]{12}\()[^\s\"',;&]{6,}",
     ("pass", "pwd", "secret", "key", "token"), "detect-secrets KeywordDetector, AWSKeyDetector; Azure AccountKey="),
    # A credential header without a scheme (`Authorization: <token>`); with one, the bearer row keeps the scheme.
    ("authorization header", r"(?P<keep>(?i:\b(?:proxy-)?authorization)[\"']?\s*[:=]\s*[\"']?)"
                             r"(?!(?i:bearer|basic|token|digest)\b)[^\s\"',;&]{8,}",
     ("authorization",), "gitleaks authorization header; detect-secrets KeywordDetector"),
)
# An AWS secret key is 40 base64 characters with no prefix: caught standalone when it mixes upper,
# lower and digits (a hex digest never does). Source: gitleaks aws secret heuristic.
_BASE64_40 = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_MIXED = (re.compile("[a-z]"), re.compile("[A-Z]"), re.compile("[0-9]"))

# Patterns whose secret is a run of 12+ token characters run only when the text has such a run:
# one str.translate and one substring test (about 3 µs per KB) spare prose every regex pass.
_NO_RUN_NEEDED = frozenset({"private key", "password in a URL", "keyword assignment", "authorization header",
                            "sql password"})
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "_-./+=~")
_B64_CHARS = frozenset(string.ascii_letters + string.digits + "/+")
_TOKEN_MAP = str.maketrans({chr(i): "a" if chr(i) in _TOKEN_CHARS else " " for i in range(128)})
_B64_MAP = str.maketrans({chr(i): "a" if chr(i) in _B64_CHARS else " " for i in range(128)})
_RUN_12, _RUN_40 = "a" * 12, "a" * 40

_COMPILED = tuple((re.compile(pattern), triggers, name not in _NO_RUN_NEEDED)
                  for name, pattern, triggers, _ in PATTERNS)

# Serialized text (JSON: a dead letter's raw bytes, an attribute holding JSON; a repr in a log line) writes a
# newline or tab before a secret as `\n` or `\t`, whose letter is a word character, so `\b` sees no boundary
# there; and once JSON is nested in a JSON string, a keyword's quotes are `\"`. Text holding a backslash is
# scrubbed with a second table, made from the first by these rules (text without one pays one substring test):
# - whitespace may be written escaped, and a quote escaped once or more (`\"`, `\\\"`: JSON in JSON);
# - a secret runs on over a backslash only when it starts no escape that could end the secret (`\"` closing a
#   nested string, `\n`, `\t`, `\u...`): a mask leaves escapes whole, so valid JSON stays valid, and a password
#   holding a backslash (`Pa\\ss` in JSON, `Pa\ss` in a decoded prompt that also names a Windows path) is still
#   masked whole, unless the backslash comes before an escape's letter (`\\n` reads as JSON within JSON's newline);
# - a URL's `://` may be written `:\/\/` (PHP's and several Java and .NET encoders' default);
# - a secret starts at a word boundary that is not an escape's letter, or right after an escape. The second is a
#   pattern of its own that starts with the escape's backslash: a regex whose first character is a literal is
#   searched for at C speed, where a look-behind tried at every position made the scan three times as slow.
_ESCAPE = r"(?P<esc>\\(?:[nrtbf]|u[0-9a-fA-F]{4}))"
_STARTS = re.compile(r"\\b(?!\)|$)")  # a `\b` starting a match, not one ending it


def _escaped(pattern: str) -> tuple[re.Pattern[str], re.Pattern[str] | None]:
    """A pattern of PATTERNS as it reads serialized text (the rules above): the scan from word boundaries, and the
    one from escapes (None for a pattern that needs no boundary)."""
    pattern = re.sub(r"\\s([*+])", lambda m: r"(?:\s|\\[nrt])" + m.group(1), pattern)
    pattern = re.sub(r"\[\^((?:\\.|[^\]])*)\]", _escaped_run, pattern)
    pattern = pattern.replace(r"[\"']?", r"(?:\\*[\"'])?").replace("://", r":\\?/\\?/")
    # A mask from the boundary on must not take an escape's letter (`\npm_...`: a newline, then `pm_...`); where
    # the start is kept context (a keyword, a scheme) it is left as it was, so those scans skip the test.
    start = r"\b" if "(?P<keep>" in pattern else r"\b(?<!(?<!\\)\\)"
    scan = re.compile(_STARTS.sub(lambda _: start, pattern))
    return scan, re.compile(f"{_ESCAPE}(?:{_STARTS.sub('', pattern)})") if _STARTS.search(pattern) else None


def _escaped_run(m: re.Match[str]) -> str:
    # `[^X]`: a character that is not X, or a backslash starting no escape that ends a run: an escaped backslash
    # before none of another backslash, a quote or an escape's letter (`\\n` is a newline in JSON within JSON), or
    # a backslash before a character of neither X nor an escape's letters.
    x = m.group(1)
    return rf"(?:[^\\{x}]|\\(?:\\(?![\\\"bfnrtu])|[^\\{x}\"bfnrtu]))"


_ESCAPED = tuple((*_escaped(pattern), triggers, name not in _NO_RUN_NEEDED) for name, pattern, triggers, _ in PATTERNS)
# The bare AWS secret key may follow an escape too (`\nwJalr...`, `\/wJalr...`); a rare scan (40-character runs).
_BASE64_40_ESCAPED = re.compile(r"(?<!(?<!\\)\\)(?<!(?<!\\)(?<!\\u[0-9a-fA-F]{3})[A-Za-z0-9/+=])[A-Za-z0-9/+]{40}"
                                r"(?![A-Za-z0-9/+=])")

# Each distinct trigger word is looked for once per text (substring tests run at C speed; a regex
# alternation of them would be tried at every position and costs far more on long text).
# A trigger holding a shorter one ("password '" holds "pass"; `:\/\/` a backslash, which escaped text has) is looked
# for only once that one was found: most text pays for no more searches than it has distinct trigger families.
_ESCAPED_MARK = "\\"
_ONLY_ESCAPED = frozenset({_ESCAPED_MARK})
_TRIGGER_WORDS = sorted({_ESCAPED_MARK, *(t for _, _, triggers, _ in PATTERNS for t in triggers)}, key=len)
_WITHIN = {t: next((p for p in _TRIGGER_WORDS if len(p) < len(t) and p in t), None) for t in _TRIGGER_WORDS}
_TRIGGERS = tuple(t for t, within in _WITHIN.items() if within is None)
_NESTED_TRIGGERS = tuple((t, within) for t, within in _WITHIN.items() if within is not None)
# The shortest text that can hold a secret any pattern matches ("pwd=" and six characters).
MIN_SECRET = 10

# Header and attribute names whose whole value is a credential (compared lower-case).
_SECRET_WORDS = (r"(?:authorization|auth|cookie|set-cookie|api[-_]?key|apikey|x-api-key|token|secret|password|passwd|"
                 r"credential|credentials|session[-_]?token|signature|private[-_]?key|"
                 r"(?:subscription|access|secret|account|master)[-_]?key)")
# A header named `...-key` carries a key (`Ocp-Apim-Subscription-Key` of Azure API Management, `X-Functions-Key` of
# Azure Functions): random hex no value pattern can tell from an id. The hyphen is a header's spelling; `.key` and
# `_key` are left out (`messaging.kafka.message.key`, `sort_key` are no credentials), and so are the few headers
# named `-key` that carry none (a request's idempotency key, a WebSocket handshake's nonce).
_KEY_HEADER = r"(?<!idempotency)(?<!sec-websocket)(?<!cache)-key"
SECRET_NAMES = re.compile(rf"(?i)(?:^|[-_.]){_SECRET_WORDS}(?:$|[-_.])|{_KEY_HEADER}$")
# In a structured value (a tool call's arguments, a span attribute's map) a key names a credential only when it ends
# with the word: `password_length: 16`, `auth_type: "oauth"` or `max_token: 256` are what they say.
_SECRET_KEY = re.compile(rf"(?i)(?:^|[-_.]){_SECRET_WORDS}$|{_KEY_HEADER}$")


def _mark(m: re.Match[str]) -> str:
    groups = m.groupdict()
    return (groups.get("esc") or "") + (groups.get("keep") or "") + MARK


def _mark_base64(m: re.Match[str]) -> str:
    token = m.group(0)
    return MARK if all(r.search(token) for r in _MIXED) else token


def scrub_secrets(text: str) -> str:
    """Replace API keys, tokens, passwords and private keys with a marker (context words are kept)."""
    if len(text) < MIN_SECRET:
        return text
    # Short values (attribute values, session ids, routes) repeat across events: remember their result.
    return _scrub_short(text) if len(text) <= _SHORT else _scrub(text)


_SHORT = 256


@functools.lru_cache(maxsize=65_536)
def _scrub_short(text: str) -> str:
    return _scrub(text)


def _scrub(text: str, bare: bool = True) -> str:
    # `bare=False` leaves out the bare AWS secret key (40 mixed characters, no prefix): for an id, see `id_error`.
    text = _scrub_written(text, bare)
    return _scrub_percent(text, bare) if "%" in text else text


def _scrub_written(text: str, bare: bool = True) -> str:
    lower = text.lower()
    found = {t for t in _TRIGGERS if t in lower}
    for t, within in _NESTED_TRIGGERS:
        if within in found and t in lower:
            found.add(t)
    if found <= _ONLY_ESCAPED and len(text) < 40:  # no trigger, and too short for a bare AWS secret key
        return text
    long_run = _RUN_12 in text.translate(_TOKEN_MAP)
    if _ESCAPED_MARK in found:
        return _scrub_escaped(text, found, long_run, bare)
    for pattern, triggers, needs_run in _COMPILED:
        if (long_run or not needs_run) and not found.isdisjoint(triggers):
            text = pattern.sub(_mark, text)
    if bare and long_run and _RUN_40 in text.translate(_B64_MAP):
        text = _BASE64_40.sub(_mark_base64, text)
    return text


def _scrub_escaped(text: str, found: set[str], long_run: bool, bare: bool = True) -> str:
    for scan, after_escape, triggers, needs_run in _ESCAPED:
        if (long_run or not needs_run) and not found.isdisjoint(triggers):
            text = scan.sub(_mark, text)
            if after_escape is not None:
                text = after_escape.sub(_mark, text)
    if bare and long_run and _RUN_40 in text.translate(_B64_MAP):
        text = _BASE64_40_ESCAPED.sub(_mark_base64, text)
    return text


# Percent-encoded text (a URL in a query parameter, `url.full` and `http.target` as instrumentations record them, a
# form body) writes a separator as an escape whose last character is a hex digit, so `\b` sees no boundary before
# the secret (`key%3Dsk-...`), and `=`, `:`, `/`, `@` and spaces are not themselves. Such text is also read decoded:
# ASCII escapes only (a secret, its keyword and its separators are ASCII), one decoded character per escape, so a
# secret found in the decoded text is masked where its characters stand in the text as written, and the rest of it
# keeps its spelling. Twice-encoded text is read twice decoded (the decoded text is scrubbed the same way).
_PERCENT = re.compile(r"(%[0-7][0-9A-Fa-f])")


def _scrub_percent(text: str, bare: bool = True) -> str:
    pieces = _PERCENT.split(text)
    if len(pieces) == 1:
        return text
    spelled: list[str] = []  # how each character of the decoded text is written in `text`
    for n, piece in enumerate(pieces):
        spelled.extend((piece,) if n % 2 else piece)
    decoded = "".join(chr(int(piece[1:], 16)) if n % 2 else piece for n, piece in enumerate(pieces))
    scrubbed = _scrub(decoded, bare)
    if scrubbed == decoded:
        return text
    # The scrub only replaces runs of the decoded text with the marker: what lies between markers is found in the
    # decoded text in order, each run masked holding at least one character (the marker's own, for a marker there).
    parts = scrubbed.split(MARK)
    if not decoded.startswith(parts[0]):
        return scrubbed  # cannot happen; were it to, the decoded text, scrubbed, is what can be shown
    out, at = spelled[:len(parts[0])], len(parts[0])
    for part in parts[1:-1]:
        found = decoded.find(part, at + 1)
        if found < 0:
            return scrubbed
        out += [MARK, *spelled[found:found + len(part)]]
        at = found + len(part)
    tail = len(decoded) - len(parts[-1])
    if tail <= at or not decoded.endswith(parts[-1]):
        return scrubbed
    return "".join([*out, MARK, *spelled[tail:]])


def scrub_bytes(data: bytes, text: Callable[[str], str] = scrub_secrets) -> bytes:
    """`scrub_secrets` (or `text`) over raw bytes of any encoding (bytes that are not UTF-8 pass through as they are)."""
    decoded = data.decode("utf-8", "surrogateescape")
    scrubbed = text(decoded)
    return data if scrubbed == decoded else scrubbed.encode("utf-8", "surrogateescape")


def scrub_value(value: Any, text: Callable[[str], str] = scrub_secrets) -> Any:
    """A decoded JSON value (strings, numbers, lists, maps: structured span attributes, an answer's tool calls) with
    every string scrubbed (`text`) and what a key naming a credential (`_SECRET_KEY`) holds masked whole, at any
    depth, but for numbers, booleans and nulls, which are kept as they are. Scrub before encoding: the scrub then reads each string as it
    is, not JSON's escapes of it."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, bytes):  # an OTLP bytes value, base64 once encoded: scrubbed as the text it holds
        return scrub_bytes(value, text)
    if isinstance(value, list | tuple):
        return [scrub_value(v, text) for v in value]
    if isinstance(value, dict):
        return {text(k) if isinstance(k, str) else k: MARK if isinstance(v, str | list | tuple | dict) and
                isinstance(k, str) and _SECRET_KEY.search(k) else scrub_value(v, text) for k, v in value.items()}
    return value


def attribute_string(v: Any) -> str:
    """A span attribute's value as the Collector's exporter stores it in a Map(String, String) column: arrays and
    maps as JSON, each string in them scrubbed. One encoding for applications' spans and lockgate's own (before,
    a router span's `gen_ai.response.finish_reasons` was stored as Python's `('stop',)`, probe p23 F1)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""
    if isinstance(v, bytes):
        # Scrubbed first: base64 hides the text from every later scrub (probe p35: a bytes attribute holding an
        # `sk-proj-...` key was stored whole, as its base64).
        return base64.b64encode(scrub_bytes(v)).decode()
    if isinstance(v, int | float):
        return repr(v)
    # Each string scrubbed before encoding (bytes become base64, as msgspec writes them): the scrub of the stored
    # JSON text reads `\n` where the string had a newline, and missed a secret right after one.
    return msgspec.json.encode(scrub_value(v)).decode()


def attribute_strings(attrs: Mapping[str, Any] | None) -> dict[str, str]:
    """Every value as `attribute_string` writes it."""
    return {str(k): attribute_string(v) for k, v in (attrs or {}).items()}


def scrub_json(data: str, text: Callable[[str], str] = scrub_secrets) -> str:
    """JSON text (a tool call's arguments, an upstream's error body) with `scrub_value` applied to what it holds,
    encoded again only when that changed something; text that is not JSON is scrubbed as text."""
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return text(data)
    scrubbed = scrub_value(doc, text)
    return data if scrubbed == doc else msgspec.json.encode(scrubbed).decode()


# A URL's userinfo: a password after its user, or a token standing alone (`nats://TOKEN@host`).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]{1,20}://)(?P<user>[^\s:/@,]*)(?P<password>:[^\s@,]*)?@")


def shown_url(url: str) -> str:
    """A URL, or a list of them (`nats://a,nats://b`), as a message may show it: the password of each one's userinfo
    (or a token standing there alone) replaced by the marker, and a credential in its query (`?api-key=...`) too.
    The CLI, SDK and services name the server they could not reach, and a CI job's log keeps what they print."""
    if "@" in url:
        url = _USERINFO.sub(lambda m: (f"{m['scheme']}{m['user']}:{MARK}@" if m["password"] is not None
                                       else f"{m['scheme']}{MARK}@"), url)
    return scrub_secrets(url)


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
               "status", "finish_reason", "variant", "user_hash", "key_id", "source")
# What a generated event id is made of (uuid7, hex digests): such an id holds no credential, and is not scanned.
_ID_CHARS = string.hexdigits + "-"


_event_texts = operator.attrgetter(*_EVENT_TEXT)


def scrub_event(event: InferenceEvent) -> InferenceEvent:
    """The event with secrets scrubbed from its free text (`_EVENT_TEXT`) and its attributes."""
    # Each field is looked at once and only a changed one is replaced: most events have nothing to scrub. Every
    # consumer of inference events runs this on every event it decodes (and the SDK on every emit): the fields are
    # read in one call, and one too short to hold a secret (most: "stop", "openai", a user hash) costs no call.
    changed: dict[str, object] = {}
    for name, text in zip(_EVENT_TEXT, _event_texts(event), strict=True):
        if text and len(text) >= MIN_SECRET and (scrubbed := scrub_secrets(text)) != text:
            changed[name] = scrubbed
    attributes = event.attributes
    if attributes and (mapping := scrub_mapping(attributes)) is not attributes:
        changed["attributes"] = mapping
    scores = event.scores
    if scores and any(len(k) >= MIN_SECRET and scrub_secrets(k) != k for k in scores):
        changed["scores"] = {scrub_secrets(k): v for k, v in scores.items()}
    refuse_credentials(event)
    return msgspec.structs.replace(event, **changed) if changed else event


def refuse_credentials(event: InferenceEvent) -> None:
    """Raise InvalidEvent, as `scrub_event` does, if the event's id or names read as a credential (none scrubbed)."""
    if error := _refused(event, "$"):
        raise InvalidEvent(error)


def _refused(event: InferenceEvent, at: str) -> str:
    """Why `event` (at path `at`: `$`, `$[3]`) is refused for a credential in its id or its names, "" if it is not."""
    # The id is the event's identity (stored once per id): masked, two events would become one. One that reads as a
    # credential is refused instead (probe p13: an app's own event kept a key whole in its id). So are a deployment
    # and a release, names that key rows, windows and routes, which no scrub may change (probe p35: an OTLP span's
    # `lockgate.release` of `sk-proj-...` and a gRPC event's deployment `AKIA...` were stored whole, and `lockgate
    # cost` printed them).
    if error := id_error(event.id, f"{at}.id"):
        return error
    if field := _credential_name(event.deployment, event.release):
        return (f"invalid inference event: its {field} holds what reads as a credential (a {field} names a "
                f"deployment or release, never a key) - at `{at}.{field}`")
    return ""


@functools.lru_cache(maxsize=4096)
def _credential_name(deployment: str, release: str) -> str:
    """Which of an event's names reads as a credential ("" if none): every event is asked on every decode, and its
    names repeat, so the answer for a pair is remembered."""
    return next((field for field, name in (("deployment", deployment), ("release", release))
                 if _name_holds_credential(name)), "")


def _name_holds_credential(name: str) -> bool:
    """Whether a lockgate name reads as a credential of a known shape (a provider's prefix, a JWT): as for an id, a
    bare 40-character mix is a name (`AcmeCorporationInternationalHoldings2024`), never taken for an AWS secret key."""
    return len(name) >= MIN_SECRET and _scrub(name, bare=False) != name


def id_error(event_id: str, at: str) -> str:
    """Why an event id is refused as a credential ("" when it is not), `at` its path (`$.id`, `$[3].id`)."""
    # Only a credential of a known shape (a provider's prefix, a JWT, a keyword pair) refuses an id: a bare 40-character
    # mix of letters and digits is the shape of an AWS secret key, but also of any random base62 or base64 request id,
    # and every event of an application using those was refused (probe p16).
    if not event_id.strip(_ID_CHARS) or len(event_id) < MIN_SECRET or _scrub(event_id, bare=False) == event_id:
        return ""
    return ("invalid inference event: its id holds what reads as a credential (an id is an opaque token, such as a "
            f"uuid) - at `{at}`")


def scrub_events(value: InferenceEvent | list[InferenceEvent]
                 ) -> tuple[InferenceEvent | list[InferenceEvent], list[tuple[int, str]]]:
    """`scrub_event` over one decoded inference message (an event or a list of them), and the [(index, reason)] of the
    events of a list refused for their id: those stay in the list unscrubbed, for the caller to leave out and letter.
    A single event so refused raises `InvalidEvent`."""
    if not isinstance(value, list):
        return scrub_event(value), []
    # One event's id refuses that event alone, never its neighbours (probe p16: its whole message was lettered).
    events: list[InferenceEvent] = []
    refused: list[tuple[int, str]] = []
    for i, event in enumerate(value):
        try:
            events.append(scrub_event(event))
        except InvalidEvent:
            events.append(event)
            refused.append((i, _refused(event, f"$[{i}]")))
    return events, refused


def _scrub_text(text: str) -> str:
    return scrub_secrets(text) if text else text


# Span attributes whose value is a lockgate name (a tenant, an app, a deployment, a release: identifiers of the name
# grammar, never free text). The OTLP receiver stamps the API key's tenant and app on the resource and refuses a span
# naming others; lockgate's own spans name the tenant, app and release of an event it checked. A name the patterns
# take for a key (`AcmeCorporationInternationalHoldings2024`, 40 mixed characters) was stored as the marker: its
# tenant's spans were nobody's, and two such tenants one. A value off the grammar is free text, and scrubbed.
SPAN_NAMES = ("lockgate.tenant", "lockgate.app", "lockgate.deployment", "lockgate.release")


def _names_kept(values: Mapping[str, str], scrubbed: Mapping[str, str]) -> dict[str, str]:
    out = dict(scrubbed)
    for key in SPAN_NAMES:
        name = values.get(key)
        if name is not None and name != out.get(key) and is_name(name) and not _name_holds_credential(name):
            out[key] = name
    return out


def scrub_span(span: SpanRecord) -> SpanRecord:
    """The span with secrets scrubbed from its free text: name, status message, service name, trace state,
    scope name and version, and the attributes of the span, its resource, its events and its links (and
    the links' trace state): an exported span carries whatever its instrumentation recorded (request
    headers, database statements, prompts), and every one of these is a column of `otel_traces`. The lockgate
    names of its attributes and resource (`SPAN_NAMES`) are kept as they are."""
    changed: dict[str, object] = {}
    for name in ("name", "status_message", "service", "trace_state", "scope_name", "scope_version"):
        text = getattr(span, name)
        if text and (scrubbed := _scrub_text(text)) != text:
            changed[name] = scrubbed
    for name in ("attributes", "resource"):
        values = getattr(span, name)
        if values and (mapping := scrub_mapping(values)) is not values:
            changed[name] = _names_kept(values, mapping)
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
