"""Pure scorers: each maps (output, expected, params) to a score in [0, 1].

`expected` may be a single answer or a list of acceptable answers; reference-based scorers
return the best score over the list. A missing reference (None or []) scores 0, never an error,
so one bad dataset row cannot abort a run.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any

import msgspec

from lockgate.errors import ConfigError

from . import judge, retrieval, safety, semantic, windows

Scorer = Callable[[str, Any, Mapping[str, Any]], float]


class UnknownScorer(ConfigError):
    """A suite names a scorer this build does not provide."""


class ScorerParamError(ConfigError):
    """A scorer was given parameters it cannot use (bad regex, missing schema...)."""


def _answers(expected: Any) -> list[Any]:
    if expected is None:
        return []
    if isinstance(expected, (list, tuple)):
        return [e for e in expected if e is not None]
    return [expected]


def _best(output: str, expected: Any, one: Callable[[str, Any], float]) -> float:
    return max((one(output or "", e) for e in _answers(expected)), default=0.0)


def _nfkc_fold_piece(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _nfkc_fold(text: str) -> str:
    # A piece at a time: one NFKC call over a long answer holds the GIL, so the event loop (probe p58 F3).
    return windows.normalised(text, _nfkc_fold_piece)


def _strip_punct(text: str) -> str:
    # Unicode categories rather than string.punctuation, so «», ¿ and 、 are dropped too.
    return "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)


def normalize_text(text: str) -> str:
    """NFKC, casefold, drop punctuation and symbols, collapse whitespace."""
    return " ".join(_strip_punct(_nfkc_fold(text)).split())


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _squad_tokens(text: str, remove_articles: bool = True) -> list[str]:
    """The first SCORED_TOKENS normalised tokens of `text`, read from its head (`_head`)."""
    norm = normalize_text(_head(text))
    if remove_articles:
        norm = _ARTICLES.sub(" ", norm)
    return norm.split(maxsplit=SCORED_TOKENS)[:SCORED_TOKENS]


def exact_match(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """1.0 when the stripped output equals a stripped expected answer."""
    return _best(output, expected, lambda o, e: float(o.strip() == str(e).strip()))


def normalized_match(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """1.0 when output and an expected answer agree after normalize_text."""
    return _best(output, expected, lambda o, e: float(normalize_text(o) == normalize_text(str(e))))


def contains(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """1.0 when the output contains any (params mode="any") or all (mode="all") expected substrings."""
    needles = [str(e) for e in _answers(expected)]
    if not needles:
        return 0.0
    mode = params.get("mode", "any")
    if mode not in ("any", "all"):
        raise ScorerParamError(f"contains: mode must be 'any' or 'all', got {mode!r}")
    hay = output or ""
    if params.get("case_sensitive", True) is False:
        hay, needles = _nfkc_fold(hay), [_nfkc_fold(n) for n in needles]
    hits = [n in hay for n in needles]
    return float(all(hits) if mode == "all" else any(hits))


def _compile(pattern: Any, params: Mapping[str, Any]) -> re.Pattern[str]:
    flags = (re.IGNORECASE if params.get("ignore_case") else 0) | (re.DOTALL if params.get("dotall") else 0)
    try:
        return re.compile(str(pattern), flags)
    except re.error as exc:
        raise ScorerParamError(f"regex: invalid pattern {pattern!r}: {exc}") from None


def regex(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """1.0 when params["pattern"] (else an expected pattern) matches; fullmatch=True anchors it."""
    patterns = _answers(params["pattern"]) if "pattern" in params else _answers(expected)
    full = bool(params.get("fullmatch", False))
    text = output or ""
    for p in patterns:
        rx = _compile(p, params)
        if (rx.fullmatch(text.strip()) if full else rx.search(text)) is not None:
            return 1.0
    return 0.0


_FENCE = re.compile(r"^\s*```[\w-]*\s*\n(.*?)\n?\s*```\s*$", re.DOTALL)


def _parse_json(output: str, params: Mapping[str, Any]) -> tuple[bool, Any]:
    text = output or ""
    if params.get("allow_fences", False):
        # Chat models often wrap JSON in a ```json fence; opt-in so strict suites stay strict.
        m = _FENCE.match(text)
        if m:
            text = m.group(1)
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def json_valid(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """1.0 when the output parses as JSON (params allow_fences=True accepts a ``` fence)."""
    return float(_parse_json(output, params)[0])


# A focused JSON Schema subset (draft 2020-12 semantics for the keywords it knows); unknown
# keywords are ignored, as the spec requires, so richer schemas degrade rather than fail.
_TYPES: dict[str, Callable[[Any], bool]] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
    ),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _json_eq(a: Any, b: Any) -> bool:
    # JSON equality: True is not 1, but 1 == 1.0.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def validate_json(value: Any, schema: Mapping[str, Any] | bool, path: str = "$") -> list[str]:
    """Violations of `schema` by `value`, as 'path: reason' strings (empty when valid)."""
    if schema is True:
        return []
    if schema is False:
        return [f"{path}: no value is allowed here"]
    errs: list[str] = []
    if "type" in schema:
        types = _answers(schema["type"])
        if not any(_TYPES.get(t, lambda _: False)(value) for t in types):
            return [f"{path}: expected type {'/'.join(map(str, types))}"]
    if "enum" in schema and not any(_json_eq(value, e) for e in schema["enum"]):
        errs.append(f"{path}: not one of the enum values")
    if "const" in schema and not _json_eq(value, schema["const"]):
        errs.append(f"{path}: not equal to const")
    if _TYPES["number"](value):
        for key, bad in (
            ("minimum", lambda v, lim: v < lim),
            ("maximum", lambda v, lim: v > lim),
            ("exclusiveMinimum", lambda v, lim: v <= lim),
            ("exclusiveMaximum", lambda v, lim: v >= lim),
        ):
            if key in schema and bad(value, schema[key]):
                errs.append(f"{path}: violates {key} {schema[key]}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errs.append(f"{path}: shorter than minLength {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.append(f"{path}: longer than maxLength {schema['maxLength']}")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            errs.append(f"{path}: does not match pattern")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errs.append(f"{path}: fewer than minItems {schema['minItems']}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.append(f"{path}: more than maxItems {schema['maxItems']}")
        items = schema.get("items")
        if isinstance(items, (Mapping, bool)):
            for i, item in enumerate(value):
                errs += validate_json(item, items, f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errs.append(f"{path}: missing required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                errs += validate_json(item, props[key], f"{path}.{key}")
            elif extra is not True:
                errs += validate_json(item, extra, f"{path}.{key}")
    for sub in schema.get("allOf", []):
        errs += validate_json(value, sub, path)
    if "anyOf" in schema and all(validate_json(value, s, path) for s in schema["anyOf"]):
        errs.append(f"{path}: matches none of anyOf")
    if "oneOf" in schema and sum(not validate_json(value, s, path) for s in schema["oneOf"]) != 1:
        errs.append(f"{path}: does not match exactly one of oneOf")
    return errs


def json_schema(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """1.0 when the output is JSON conforming to params["schema"] (or a dict expected)."""
    schema = params.get("schema", expected if isinstance(expected, Mapping) else None)
    if not isinstance(schema, Mapping):
        raise ScorerParamError("json_schema: params.schema must be a JSON Schema object")
    ok, value = _parse_json(output, params)
    return float(ok and not validate_json(value, schema))


def _f1(pred: list[str], gold: list[str]) -> float:
    # SQuAD convention: if either side is empty, it is right only when both are.
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


def token_f1(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """SQuAD-style bag-of-tokens F1 after normalisation (articles dropped unless disabled), over the first
    SCORED_TOKENS tokens of each side."""
    arts = bool(params.get("remove_articles", True))
    return _best(output, expected, lambda o, e: _f1(_squad_tokens(o, arts), _squad_tokens(str(e), arts)))


def _lcs_len(a: list[str], b: list[str]) -> int:
    """The length of the longest common subsequence of two token lists, bit-parallel (Allison and Dix 1986, in
    Hyyrö's form): one big-integer step per token of the longer list over a bit per token of the shorter, about
    len(a) * len(b) / 64 machine words instead of a Python step per pair (probe p52 F3: 13 s for a 100k-word answer)."""
    if len(a) < len(b):
        a, b = b, a
    where: dict[str, int] = {}  # each token of `b`: the bits of its positions
    for i, token in enumerate(b):
        where[token] = where.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full  # a 0 bit per position that ends a common subsequence one longer than the one before
    for token in a:
        if u := v & where.get(token, 0):
            v = ((v + u) | (v - u)) & full
    return len(b) - v.bit_count()


_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    """The first ROUGE_L_TOKENS casefolded word tokens of `text`, read from its head (`_head`)."""
    return [m.group() for m in islice(_WORD.finditer(_nfkc_fold(_head(text))), ROUGE_L_TOKENS)]


def rouge_l_f(pred: list[str], ref: list[str], beta: float = 1.0) -> float:
    """ROUGE-L F-measure of two token lists (Lin 2004), beta weighting recall."""
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_len(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    b2 = beta * beta
    return (1 + b2) * p * r / (r + b2 * p)


# The tokens of each side ROUGE-L reads: the first ROUGE_L_TOKENS words of the answer and of the reference. Far
# above a summary's length (ROUGE-L's use), and it bounds one score's work to ROUGE_L_TOKENS² / 64 word operations
# (about 20 ms), whatever an endpoint answers. Token F1 reads as many (SQuAD's answers are a few words).
ROUGE_L_TOKENS = SCORED_TOKENS = 10_000
# What of a text those tokens are read from: its first SCORED_CHARS characters, cut back to the last whitespace in
# them, before it is normalised. NFKC and casefold are one C call each that holds the GIL, so over a whole 12 MB answer
# they stalled the event loop the scoring thread shares by up to 1.9 s (probe p58 F3). 64 characters a token is
# several times a word with its spacing in any script, so the first SCORED_TOKENS tokens of a text lie before the cut;
# and a cut at whitespace leaves the tokens before it as the whole text's (NFKC composes nothing across a space).
SCORED_CHARS = SCORED_TOKENS * 64


def _head(text: str) -> str:
    """`text` as far as its first SCORED_CHARS characters reach, cut back to their last whitespace (unless they have
    none): its tokens are the first tokens of `text`."""
    if len(text) <= SCORED_CHARS:
        return text
    head = text[:SCORED_CHARS]
    if head[-1].isspace() or text[SCORED_CHARS].isspace():
        return head
    cut = len(head) - len(head.rsplit(maxsplit=1)[-1])  # where its last, unfinished word starts
    return head[:cut] if cut else head


def rouge_l(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """ROUGE-L (LCS) F-measure over casefolded word tokens, the first ROUGE_L_TOKENS of each side; params beta
    (default 1)."""
    beta = float(params.get("beta", 1.0))

    def one(o: str, e: Any) -> float:
        return rouge_l_f(_words(o), _words(str(e)), beta)

    return _best(output, expected, one)


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")


def extract_number(text: str) -> float | None:
    """The first number in text (accepts 1,234.5, -3, .5, 1e-3, full-width digits, U+2212)."""
    norm = windows.normalised(text or "", lambda piece: unicodedata.normalize("NFKC", piece)).replace("\u2212", "-")
    for m in _NUMBER.finditer(norm):
        s = m.group(0)
        if not any(c.isdigit() for c in s.split("e")[0].split("E")[0]):
            continue
        try:
            value = float(s.replace(",", ""))
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    return None


def numeric(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    """1.0 when the first number in the output is within abs_tol or rel_tol of expected."""
    got = extract_number(output)
    if got is None:
        return 0.0
    abs_tol = float(params.get("abs_tol", 0.0))
    rel_tol = float(params.get("rel_tol", 0.0))

    def one(_: str, e: Any) -> float:
        want = float(e) if isinstance(e, (int, float)) and not isinstance(e, bool) else extract_number(str(e))
        if want is None:
            return 0.0
        return float(abs(got - want) <= max(abs_tol, rel_tol * abs(want)))

    return _best(output, expected, one)


def _retrieval_scorer(metric: Callable[..., float]) -> Scorer:
    # Retrieved ids come from params["retrieved"] or, failing that, a JSON list in the output.
    def score(output: str, expected: Any, params: Mapping[str, Any]) -> float:
        retrieved = params.get("retrieved")
        if retrieved is None:
            ok, parsed = _parse_json(output, params)
            retrieved = parsed if ok and isinstance(parsed, list) else []
        relevant = expected if isinstance(expected, Mapping) else _answers(expected)
        kwargs = {"k": int(params["k"])} if "k" in params else {}
        return metric([str(r) for r in retrieved], relevant, **kwargs)

    score.__doc__ = f"{metric.__name__} of retrieved ids against expected relevant ids."
    return score


SCORERS: dict[str, Scorer] = {
    "exact_match": exact_match,
    "normalized_match": normalized_match,
    "contains": contains,
    "regex": regex,
    "json_valid": json_valid,
    "json_schema": json_schema,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "numeric": numeric,
    "pii_free": safety.pii_free,
    "refusal": safety.refusal,
    "non_toxic": safety.non_toxic,
    "probe_resisted": safety.probe_resisted,
    "recall_at_k": _retrieval_scorer(retrieval.recall_at_k),
    "precision_at_k": _retrieval_scorer(retrieval.precision_at_k),
    "mrr": _retrieval_scorer(retrieval.mrr),
    "ndcg_at_k": _retrieval_scorer(retrieval.ndcg_at_k),
}


def _judge_placeholder(output: str, expected: Any, params: Mapping[str, Any]) -> float:
    raise ScorerParamError("llm_judge makes calls: the runner scores it, not domain.score")


# Kept apart from SCORERS (the pure, always-available, total ones): these need an extra or make calls.
EXTRA_SCORERS: dict[str, Scorer] = {"semantic_similarity": semantic.semantic_similarity,
                                    judge.NAME: _judge_placeholder}
# Scorers that call out (the runner awaits them); domain.score skips them.
ASYNC_SCORERS = frozenset({judge.NAME})


def check_scorer(name: str, params: Mapping[str, Any]) -> None:
    """Fail at suite load, before any call, when a scorer cannot run with these params here.

    Raises a LockgateError, or msgspec.ValidationError whose path is within `params` (the suite places it).
    """
    if name == "semantic_similarity":
        semantic.check_available(params)
    elif name == judge.NAME:
        msgspec.convert(params, judge.JudgeParams)


def get_scorer(name: str) -> Scorer:
    """Return the scorer called `name` or raise UnknownScorer listing the known names."""
    try:
        return SCORERS[name] if name in SCORERS else EXTRA_SCORERS[name]
    except KeyError:
        known = ", ".join(sorted([*SCORERS, *EXTRA_SCORERS]))
        raise UnknownScorer(f"unknown scorer {name!r}; known scorers: {known}") from None
