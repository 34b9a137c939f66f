"""Long texts normalised and searched in windows (probe p58 F3): the answers are the one call's, and no one call
reads more than a window."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockgate import secretkinds
from lockgate.services.evaluator import safety, windows
from lockgate.services.evaluator.safety import is_refusal

PHRASES = ["i must decline", "sorry, i can't", "抱歉，  我无法", "as an ai language model, i can't", "je ne peux pas"]


class Recording:
    """A compiled pattern that records the (pos, endpos) of each search, searching as the pattern."""

    def __init__(self, rx: re.Pattern[str]) -> None:
        self.rx = rx
        self.calls: list[tuple[int, int]] = []

    def search(self, text: str, pos: int = 0, endpos: int | None = None) -> re.Match[str] | None:
        self.calls.append((pos, len(text) if endpos is None else endpos))
        return self.rx.search(text, pos, len(text) if endpos is None else endpos)

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        self.calls.append((0, len(text)))
        return self.rx.finditer(text)


@pytest.mark.parametrize("filler", [" ", "x", "é "])
@pytest.mark.parametrize("phrase", [*PHRASES, "xi must decline", "i must declined", "i must\ndecline"])
def test_a_windowed_search_finds_what_one_search_finds_wherever_a_window_boundary_falls(phrase: str, filler: str):
    # Windows of 32 characters: the phrase starts at every offset around the second boundary, straddling it; "x"
    # around it makes `\b` depend on the characters beyond a window, "declined" on those past a match.
    size = 32
    for offset in range(size - 45, 2 * size + 5):
        text = (filler * 200)[:size + offset] + phrase + filler * 50
        one = safety._REFUSALS.search(text)
        got = windows.search(safety._REFUSALS, text, safety._REFUSAL_LONGEST, size)
        assert (got and got.span()) == (one and one.span()), (offset, text)


def test_no_refusal_phrase_matches_more_than_the_windows_overlap():
    # What makes a windowed search the one search's: before, `\s*` matched any length.
    width = re._parser.parse(safety._REFUSALS.pattern).getwidth()[1]  # type: ignore[attr-defined]
    assert width <= safety._REFUSAL_LONGEST


def test_a_long_answer_is_folded_and_searched_a_window_at_a_time(monkeypatch: pytest.MonkeyPatch):
    # Probe p58 F3: one search over a 900 KB folded answer held the GIL, so the event loop, 0.8 s; its NFKC too.
    pieces: list[int] = []
    fold = safety._fold_piece
    monkeypatch.setattr(safety, "_fold_piece", lambda text: pieces.append(len(text)) or fold(text))
    recording = Recording(safety._REFUSALS)
    monkeypatch.setattr(safety, "_REFUSALS", recording)
    answer = "Straße ｆｕｌｌ naïve word " * 36_000 + "I’m sorry, but no."
    assert is_refusal(answer)
    assert sum(pieces) == len(answer) and max(pieces) <= windows.WINDOW
    assert len(recording.calls) >= len(answer) // windows.WINDOW
    assert all(end - pos <= windows.WINDOW + safety._REFUSAL_LONGEST + 1 for pos, end in recording.calls)


words = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1, max_size=7)


@given(st.lists(st.tuples(words, st.sampled_from([" ", "\n", "\u3000", "\t "])), max_size=60))
def test_normalising_a_piece_at_a_time_is_normalising_the_whole(parts: list[tuple[str, str]]):
    # Pieces of 8 characters, each cut after whitespace: NFKC and casefold give the whole text's.
    text = "".join(w + s for w, s in parts)
    whole = unicodedata.normalize("NFKC", text).casefold()
    assert windows.normalised(text, lambda t: unicodedata.normalize("NFKC", t).casefold(), 8) == whole
    assert "".join(windows.pieces(text, 8)) == text and all(len(p) <= 8 for p in windows.pieces(text, 8))


PII = {"api_key": "sk-" + "A1b2" * 8, "aws_access_key": "AKIA" + "ABCDEFGH12345678", "github_token": "ghp_" + "a1" * 20,
       "slack_token": "xoxb-" + "12345-abcde" * 2, "google_api_key": "AIza" + "B" * 35,
       "jwt": "eyJhbGciOi.eyJzdWIiOiIx.c2lnbmF0dXJlMTIz", "private_key": "-----BEGIN RSA PRIVATE KEY-----",
       "email": "zoë.bar@exämple.co.uk", "credit_card": "4111 1111 1111 1111", "phone": "+1 (555) 123-4567"}
PATTERNS = {**dict(secretkinds.SECRETS), "email": safety._EMAIL, "credit_card": safety._CARD,
            "phone": safety._PHONE}


def test_no_pii_pattern_matches_more_than_its_windows_overlap():
    # Before, `+` and `{20,}` matched any length: a scan in windows could not be the one scan.
    for kind, rx in PATTERNS.items():
        assert re._parser.parse(rx.pattern).getwidth()[1] <= safety._LONGEST[kind], kind  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", sorted(PII))
@pytest.mark.parametrize("filler", [" ", "x", ". "])
def test_a_windowed_scan_finds_what_one_scan_finds_wherever_a_window_boundary_falls(kind: str, filler: str):
    size, rx, value = 32, PATTERNS[kind], PII[kind]
    for offset in range(-len(value) - 2, 3):
        text = (filler * 100)[:2 * size + offset] + value + filler * 3 + value + filler * 40
        want = [m.span() for m in rx.finditer(text)]
        assert [m.span() for m in windows.finditer(rx, text, safety._LONGEST[kind], size)] == want, (offset, text)


def test_pii_at_the_end_of_a_long_answer_is_found_and_scanned_a_window_at_a_time(monkeypatch: pytest.MonkeyPatch):
    # Never cut: PII past a cut would escape pii_free. Each scan reads a window, not the whole answer (probe p58 F3).
    recording = Recording(safety._EMAIL)
    monkeypatch.setattr(safety, "_EMAIL", recording)
    answer = "plain words and 2024-01-02 dates " * 30_000
    assert safety.find_pii(answer + "mail me: zoë@exämple.de") == [
        safety.Finding("email", len(answer) + 9, len(answer) + 23)]
    assert len(recording.calls) >= len(answer) // windows.WINDOW
    assert all(end - pos <= windows.WINDOW + safety._LONGEST["email"] + 1 for pos, end in recording.calls)


@pytest.mark.parametrize("text", ["", "one", "a  b\tc", "x" * 9_000 + " y " * 5_000, ("word " * 3_000 + "z" * 700) * 3])
def test_words_counted_a_piece_at_a_time_are_the_words_of_the_whole(text: str):
    assert safety._count_words(text) == len(re.findall(r"\w+", text))


def test_toxic_terms_are_found_in_windows_as_in_one_scan_wherever_a_boundary_falls():
    rx, longest = safety._term_regex(("piece of shit", "shit", "damn"))
    for offset in range(-20, 3):
        text = ("class " * 2000)[:windows.WINDOW + offset] + "piece  of\nshit, damned damn shit" + " ok" * 10
        want = [m.span() for m in rx.finditer(text)]
        assert [m.span() for m in windows.finditer(rx, text, longest)] == want and len(want) == 3, offset
    assert safety.toxicity("class " * 2000 + "Damn", ("damn",)).matches == ("damn",)
