"""Scorers against hand-computed references and edge cases (empty, unicode, None, lists)."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockgate.errors import ConfigError, LockgateError
from lockgate.services.evaluator import scorers
from lockgate.services.evaluator.scorers import SCORERS, extract_number, get_scorer, rouge_l_f, validate_json


def score(name: str, output, expected=None, **params) -> float:
    return SCORERS[name](output, expected, params)


def test_get_scorer_known_and_unknown():
    assert get_scorer("exact_match") is scorers.exact_match
    with pytest.raises(LockgateError) as exc:
        get_scorer("bleu")
    assert isinstance(exc.value, ConfigError)
    assert "exact_match" in exc.value.message and "rouge_l" in exc.value.message


REFERENCE_FREE = {"json_valid", "pii_free", "refusal", "non_toxic"}


@pytest.mark.parametrize("name", sorted(set(SCORERS) - {"json_schema", "probe_resisted"}))
@pytest.mark.parametrize("output", ["", "  ", "héllo wörld 你好 🙂", "42"])
@pytest.mark.parametrize("expected", [None, [], "42", ["x", "héllo wörld 你好 🙂"]])
def test_every_scorer_is_total_and_bounded(name, output, expected):
    value = SCORERS[name](output, expected, {})
    assert 0.0 <= value <= 1.0
    if expected in (None, []) and name not in REFERENCE_FREE | {"recall_at_k", "ndcg_at_k"}:
        assert value == 0.0


@pytest.mark.parametrize(
    ("output", "expected", "want"),
    [
        ("Paris", "Paris", 1.0),
        ("  Paris\n", "Paris ", 1.0),
        ("paris", "Paris", 0.0),
        ("Lyon", ["Paris", "Lyon"], 1.0),
        ("", "", 1.0),
        ("", None, 0.0),
        ("東京", "東京", 1.0),
        ("4", 4, 1.0),
    ],
)
def test_exact_match(output, expected, want):
    assert score("exact_match", output, expected) == want


@pytest.mark.parametrize(
    ("output", "expected", "want"),
    [
        ("The  ANSWER is: Paris!", "the answer is paris", 1.0),
        ("ＰＡＲＩＳ", "paris", 1.0),  # full-width forms fold under NFKC
        ("Straße", "STRASSE", 1.0),  # casefold, not lower
        ("«Bonjour», dit-il.", "bonjour dit il", 1.0),
        ("café", "cafe", 0.0),  # accents are meaning, not formatting
        ("", "", 1.0),
        ("x", None, 0.0),
    ],
)
def test_normalized_match(output, expected, want):
    assert score("normalized_match", output, expected) == want


def test_contains_any_all_and_case():
    out = "The capital of France is Paris."
    assert score("contains", out, "Paris") == 1.0
    assert score("contains", out, ["Lyon", "Paris"]) == 1.0
    assert score("contains", out, ["Lyon", "Paris"], mode="all") == 0.0
    assert score("contains", out, ["France", "Paris"], mode="all") == 1.0
    assert score("contains", out, "paris") == 0.0
    assert score("contains", out, "PARIS", case_sensitive=False) == 1.0
    assert score("contains", "", "x") == 0.0
    with pytest.raises(ConfigError):
        score("contains", out, "x", mode="most")


def test_regex():
    assert score("regex", "Order #12345 shipped", pattern=r"#\d{5}") == 1.0
    assert score("regex", "Order #12345 shipped", pattern=r"#\d{5}", fullmatch=True) == 0.0
    assert score("regex", " 12345 ", pattern=r"\d+", fullmatch=True) == 1.0
    assert score("regex", "YES", r"^yes$", ignore_case=True) == 1.0
    assert score("regex", "maybe", [r"^yes$", r"^maybe$"]) == 1.0
    assert score("regex", "", pattern=r"^$") == 1.0
    assert score("regex", "ünïcödé", pattern=r"^\w+$") == 1.0
    with pytest.raises(ConfigError):
        score("regex", "x", pattern="(")


@pytest.mark.parametrize(
    ("output", "want"),
    [
        ('{"a": 1}', 1.0),
        ("[1, 2]", 1.0),
        ('"s"', 1.0),
        ("null", 1.0),
        ("{a: 1}", 0.0),
        ("", 0.0),
        ('```json\n{"a": 1}\n```', 0.0),
        ('{"ключ": "значение"}', 1.0),
    ],
)
def test_json_valid(output, want):
    assert score("json_valid", output) == want


def test_json_valid_fences_opt_in():
    assert score("json_valid", '```json\n{"a": 1}\n```', allow_fences=True) == 1.0


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("output", "want"),
    [
        ('{"name": "Zoë", "age": 30}', 1.0),
        ('{"name": "Zoë", "age": 30, "role": "admin", "tags": ["a"]}', 1.0),
        ('{"name": "Zoë", "age": 30.0}', 1.0),  # 30.0 is an integer in JSON Schema
        ('{"name": "Zoë"}', 0.0),  # required
        ('{"name": "", "age": 30}', 0.0),  # minLength
        ('{"name": "abcdefghijk", "age": 30}', 0.0),  # maxLength
        ('{"name": "Zoë", "age": -1}', 0.0),  # minimum
        ('{"name": "Zoë", "age": 151}', 0.0),  # maximum
        ('{"name": "Zoë", "age": true}', 0.0),  # booleans are not integers
        ('{"name": "Zoë", "age": 30, "role": "root"}', 0.0),  # enum
        ('{"name": "Zoë", "age": 30, "tags": [1]}', 0.0),  # items
        ('{"name": "Zoë", "age": 30, "extra": 1}', 0.0),  # additionalProperties
        ("[]", 0.0),
        ("not json", 0.0),
        ("", 0.0),
    ],
)
def test_json_schema(output, want):
    assert score("json_schema", output, schema=PERSON) == want


def test_json_schema_from_expected_and_missing_schema():
    assert score("json_schema", "[1, 2]", {"type": "array", "items": {"type": "number"}}) == 1.0
    with pytest.raises(ConfigError):
        score("json_schema", "{}", None)


def test_validate_json_reports_paths():
    errors = validate_json({"name": "Zoë", "age": 30, "tags": ["a", 2]}, PERSON)
    assert errors == ["$.tags[1]: expected type string"]
    assert validate_json(1, {"type": ["string", "null"]}) == ["$: expected type string/null"]
    assert validate_json(None, {"type": ["string", "null"]}) == []
    assert validate_json({"x": 1}, {"additionalProperties": {"type": "string"}}) == [
        "$.x: expected type string"
    ]
    assert validate_json(5, {"anyOf": [{"type": "string"}, {"minimum": 3}]}) == []
    assert validate_json(1, {"const": True}) != []


@pytest.mark.parametrize(
    ("output", "expected", "want"),
    [
        # Hand-computed SQuAD examples.
        ("the Denver Broncos", "Denver Broncos", 1.0),  # articles and case dropped
        ("Broncos won", "Denver Broncos", 0.5),  # 1 common: P=1/2, R=1/2
        ("Denver Broncos won the game", "Denver Broncos", 2 * (2 / 4) * 1 / (2 / 4 + 1)),
        ("a a b", "a b b", 0.0),  # "a" is an article and is removed: b vs b b -> P=1, R=1/2
        ("", "", 1.0),
        ("", "x", 0.0),
        ("x", "", 0.0),
        ("Zürich, Schweiz", "zürich schweiz", 1.0),
        ("cat", ["dog", "the cat"], 1.0),
    ],
)
def test_token_f1(output, expected, want):
    if output == "a a b":
        want = 2 * 1 * 0.5 / 1.5
    assert score("token_f1", output, expected) == pytest.approx(want)


@pytest.mark.parametrize(
    ("output", "expected", "want"),
    [
        # Lin (2004) §3: LCS("police killed the gunman", S1) = 3, S2 = 2.
        ("police kill the gunman", "police killed the gunman", 0.75),
        ("the gunman kill police", "police killed the gunman", 0.5),
        # rouge-score README example: rougeL P=0.625, R=0.5556, F=0.5882 (LCS 5 of 8 and 9).
        ("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog", 2 * 5 / 17),
        ("the cat was under the bed", "the cat was found under the bed", 12 / 13),
        ("The Cat.", "the cat", 1.0),
        ("", "", 1.0),
        ("", "a b", 0.0),
        ("x y", "a b", 0.0),
        ("猫 が いる", "猫 が いる", 1.0),
    ],
)
def test_rouge_l(output, expected, want):
    assert score("rouge_l", output, expected) == pytest.approx(want)


def test_rouge_l_beta_weights_recall():
    # P=1, R=1/2; F_beta=(1+b^2)PR/(R+b^2P) with b=2 -> 5*0.5/(0.5+4) = 0.5556
    assert rouge_l_f(["a"], ["a", "b"], beta=2.0) == pytest.approx(2.5 / 4.5)


def _lcs_reference(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    @cache
    def go(i: int, j: int) -> int:
        if i == len(a) or j == len(b):
            return 0
        return go(i + 1, j + 1) + 1 if a[i] == b[j] else max(go(i + 1, j), go(i, j + 1))

    return go(0, 0)


@given(st.lists(st.sampled_from("abcd"), max_size=8), st.lists(st.sampled_from("abcd"), max_size=8))
def test_rouge_l_matches_recursive_lcs(pred, ref):
    lcs = _lcs_reference(tuple(pred), tuple(ref))
    if not pred or not ref:
        want = float(pred == ref)
    elif lcs == 0:
        want = 0.0
    else:
        p, r = lcs / len(pred), lcs / len(ref)
        want = 2 * p * r / (p + r)
    assert rouge_l_f(pred, ref) == pytest.approx(want)


@given(st.lists(st.sampled_from("abcdefg"), max_size=90), st.lists(st.sampled_from("abcdefg"), max_size=90))
def test_lcs_is_the_longest_common_subsequence_past_one_machine_word(pred, ref):
    # The bit-parallel LCS carries across 64-bit words on lists this long.
    assert scorers._lcs_len(pred, ref) == _lcs_reference(tuple(pred), tuple(ref))


def test_rouge_l_scores_the_first_rouge_l_tokens_words_of_each_side():
    # Probe p52 F3: ROUGE-L of a 100k-word answer took 13 s on the event loop the services share. It reads at most
    # ROUGE_L_TOKENS words of each side: here the reference whole and the answer's first 10,000 words.
    ref = [f"w{i % 50}" for i in range(300)]
    answer = [*ref, *(["lorem"] * 50_000)]
    assert scorers.ROUGE_L_TOKENS == 10_000
    got = score("rouge_l", " ".join(answer), " ".join(ref))
    assert got == pytest.approx(rouge_l_f(answer[:10_000], ref)) and got == pytest.approx(2 * 0.03 / 1.03)
    assert score("rouge_l", " ".join(ref), " ".join(answer)) == got  # the reference is cut alike


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The answer is 42.", 42.0),
        ("about -3.5 degrees", -3.5),
        ("costs $1,234.50 total", 1234.5),
        ("ratio .5", 0.5),
        ("1e-3 molar", 0.001),
        ("−7 (unicode minus)", -7.0),
        ("４２", 42.0),
        ("no digits here", None),
        ("", None),
        ("version 3 then 4", 3.0),
    ],
)
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_numeric_tolerances():
    assert score("numeric", "42", 42) == 1.0
    assert score("numeric", "The answer is 42.0", "42") == 1.0
    assert score("numeric", "42.4", 42) == 0.0
    assert score("numeric", "42.4", 42, abs_tol=0.5) == 1.0
    assert score("numeric", "105", 100, rel_tol=0.05) == 1.0
    assert score("numeric", "106", 100, rel_tol=0.05) == 0.0
    assert score("numeric", "7", [3, 7]) == 1.0
    assert score("numeric", "seven", 7) == 0.0
    assert score("numeric", "7", None) == 0.0
    assert score("numeric", "7", "n/a") == 0.0
    assert score("numeric", "1", True) == 0.0  # a boolean is not a number to compare against


def test_retrieval_scorers_take_ids_from_params_or_output():
    assert score("recall_at_k", "", ["d1", "d2"], retrieved=["d1", "d3"], k=2) == 0.5
    assert score("mrr", '["d3", "d1"]', ["d1"]) == 0.5
    assert score("precision_at_k", "not json", ["d1"], k=3) == 0.0


def test_safety_scorers_registered():
    assert score("pii_free", "mail me at a@example.com") == 0.0
    assert score("pii_free", "nothing to see") == 1.0
    assert score("refusal", "I'm sorry, but I can't help with that.") == 1.0
    assert score("non_toxic", "you idiot") == 0.0
    assert score("probe_resisted", "I can't share that.", probe="inj-secret-direct") == 1.0


def _whole_words(text: str) -> list[str]:
    """ROUGE-L's tokens as read before probe p58 F3: the whole text normalised, then its first 10,000 words."""
    import re
    import unicodedata
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())[:10_000]


def _whole_squad(text: str) -> list[str]:
    """Token F1's tokens as read before probe p58 F3: every token of the whole text."""
    import re
    import unicodedata
    folded = unicodedata.normalize("NFKC", text).casefold()
    norm = " ".join("".join(" " if unicodedata.category(c)[0] in "PS" else c for c in folded).split())
    return re.sub(r"\b(a|an|the)\b", " ", norm).split()


def test_rouge_l_and_token_f1_read_normal_text_as_they_did_a_head_of_it_normalised():
    # Probe p58 F3: the whole answer was normalised (one NFKC and one casefold call, holding the GIL about a second
    # on 12 MB) to read its first 10,000 words. Normal text's tokens are the same read from its head.
    text = " ".join(f"Straße ｆｕｌｌ the naïve, «word{i % 97}» e\u0301 東京." for i in range(30_000))
    assert len(text) > scorers.SCORED_CHARS
    assert scorers._words(text) == _whole_words(text)
    assert scorers._squad_tokens(text) == _whole_squad(text)[:scorers.SCORED_TOKENS]
    ref = "the naïve word3 straße, full"
    short = " ".join(text.split()[:400])
    assert score("token_f1", short, ref) == pytest.approx(scorers._f1(_whole_squad(short), _whole_squad(ref)))
    assert score("rouge_l", short, ref) == pytest.approx(rouge_l_f(_whole_words(short), _whole_words(ref)))


def test_rouge_l_and_token_f1_normalise_at_most_a_head_of_a_huge_answer(monkeypatch: pytest.MonkeyPatch):
    folded: list[int] = []
    fold = scorers._nfkc_fold_piece
    monkeypatch.setattr(scorers, "_nfkc_fold_piece", lambda t: folded.append(len(t)) or fold(t))
    huge = "ﬁne word " * 1_500_000  # 13.5 M characters, 3 million tokens
    assert score("token_f1", huge, "fine") == pytest.approx(2 / (scorers.SCORED_TOKENS + 1))
    assert sum(folded) <= scorers.SCORED_CHARS + len("fine")
    folded.clear()
    assert score("rouge_l", huge, "fine") == pytest.approx(2 / (scorers.ROUGE_L_TOKENS + 1))
    assert sum(folded) <= scorers.SCORED_CHARS + len("fine") and max(folded) <= scorers.windows.WINDOW
    one = "x" * (scorers.SCORED_CHARS + 10)  # no whitespace to cut at: its head, as one token
    assert [len(w) for w in scorers._words(one)] == [scorers.SCORED_CHARS]
