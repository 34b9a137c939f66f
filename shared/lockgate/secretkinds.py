"""The secrets online `pii_free` looks for, by kind: the shapes of known credentials (provider key prefixes, AWS key
ids, GitHub and Slack tokens, JWTs, private keys). One definition for the evaluator, which finds them in an answer,
and the router, which counts them in the answer it serves (its every choice's text and tool call) before its scrub
masks them (`lockgate.secrets_masked`, "kind:count,..."), so the count is what `pii_free` would have found in the
answer.

The scrub (`redact`) is broader on purpose: it also masks whatever a keyword names (`password="password"`,
`api_key="YOUR_API_KEY"`, a URL's `user:pass@`), so that no credential of any shape reaches a log or a table. A count
of its masks scored an answer of placeholder code as a leak (probe p71 F3), so the count is of these shapes alone.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

# Each pattern is bounded in length (a token's run at 255-2,048 characters), so the evaluator scans an answer in
# windows (`windows.finditer` there) that find what one scan would: LONGEST is how far a window's scan looks past it.
SECRETS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("api_key", re.compile(r"(?<![\w-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,255}")),
    ("aws_access_key", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])")),
    ("github_token", re.compile(r"(?<!\w)(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})")),
    ("slack_token", re.compile(r"(?<!\w)xox[baprs]-[A-Za-z0-9-]{10,255}")),
    ("google_api_key", re.compile(r"(?<!\w)AIza[0-9A-Za-z_-]{35}")),
    ("jwt", re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{5,2048}\.eyJ[A-Za-z0-9_-]{5,2048}\.[A-Za-z0-9_-]{10,2048}")),
    ("private_key", re.compile(r"-----BEGIN (?:[A-Z]{1,16} )?PRIVATE KEY-----")),
)
LONGEST = {"api_key": 263, "aws_access_key": 20, "github_token": 266, "slack_token": 260, "google_api_key": 39,
           "jwt": 6152, "private_key": 44}
KINDS = frozenset(kind for kind, _ in SECRETS)
# The literal text each kind's every match holds: a pattern runs only on a text holding one of its words. A substring
# test costs well under a millisecond on 900 KB, where each pattern's scan of prose took 30-70 ms: the router looks
# for these in every answer its scrub masked something in, on the event loop.
_TRIGGERS = {"api_key": ("sk-",), "aws_access_key": ("AKIA", "ASIA"),
             "github_token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), "slack_token": ("xox",),
             "google_api_key": ("AIza",), "jwt": ("eyJ",), "private_key": ("PRIVATE KEY-----",)}

# How a pattern's matches are searched for in a text whose longest match is `longest` characters.
Finditer = Callable[[re.Pattern[str], str, int], Iterator[re.Match[str]]]
# A count as the attribute carries it: at most 18 digits, so any reader's integer holds it.
_COUNT_DIGITS = 18


def _finditer(rx: re.Pattern[str], text: str, longest: int) -> Iterator[re.Match[str]]:
    return rx.finditer(text)


def find(text: str, finditer: Finditer = _finditer) -> list[tuple[int, int, str]]:
    """The secrets in `text` as (start, end, kind), ordered by start: found kind by kind in SECRETS' order (the most
    specific first), each one overlapping none found before it."""
    taken: list[tuple[int, int, str]] = []  # ordered and disjoint, so ordered by their ends too
    for kind, rx in SECRETS:
        if not any(word in text for word in _TRIGGERS[kind]):
            continue
        new, i = [], 0
        for m in finditer(rx, text, LONGEST[kind]):
            start, end = m.span()
            # One pass along `taken` per kind, its matches coming in order: an answer of thousands of secrets costs
            # the router no test of each one against every other.
            while i < len(taken) and taken[i][1] <= start:
                i += 1
            if i == len(taken) or end <= taken[i][0]:
                new.append((start, end, kind))
        if new:
            taken = sorted(taken + new)
    return taken


def counted(text: str) -> dict[str, int]:
    """How many secrets of each kind `text` holds (`find`): none, an empty mapping."""
    return dict(Counter(kind for _, _, kind in find(text)))


def encode(counts: Mapping[str, int]) -> str:
    """`counts` as the attribute carries them: "kind:count,..." ordered by kind."""
    return ",".join(f"{kind}:{n}" for kind, n in sorted(counts.items()))


def decode(value: str) -> dict[str, int]:
    """The counts `encode` wrote; an empty mapping for a value that is not such counts, whole (a kind of no secret,
    no count, a count of none)."""
    counts: dict[str, int] = {}
    for part in value.split(",") if value else ():
        kind, _, n = part.partition(":")
        if kind not in KINDS or kind in counts or not (n.isascii() and n.isdigit() and len(n) <= _COUNT_DIGITS):
            return {}
        if not (count := int(n)):
            return {}
        counts[kind] = count
    return counts
