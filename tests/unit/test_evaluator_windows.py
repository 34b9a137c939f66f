"""Long texts normalised and searched in windows (probe p58 F3): the answers are the one call's, and no one call
reads more than a window."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
