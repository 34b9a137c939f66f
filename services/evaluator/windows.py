"""A long text normalised and searched in windows of bounded size, in a scoring thread.

NFKC, casefold and a regex search are each one C call that holds the GIL: over a whole answer of up to 16 MiB, one
such call stalled the event loop the scoring thread shares by up to a second (probe p58 F3, probe p55 F2). In
windows, the GIL can pass to the loop between calls, and the answer is the one call's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

# Characters a window holds: about a millisecond of NFKC, a few of the refusal phrases' search (16 KiB took 7-40 ms).
WINDOW = 4 * 1024
# How far back from a window's end a cut looks for whitespace (see `pieces`).
_SPACE_LOOKBACK = 256


def pieces(text: str, size: int = WINDOW) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters (together, `text`), each cut after whitespace when
    its last _SPACE_LOOKBACK characters hold some: NFKC composes nothing across whitespace and casefold reads one
    character at a time, so normalising the pieces one by one gives what normalising `text` whole would."""
    start = 0
    while len(text) - start > size:
        end = start + size
        for i in range(end - 1, max(start, end - _SPACE_LOOKBACK), -1):
            if text[i].isspace():
                end = i + 1
                break
        yield text[start:end]
        start = end
    yield text[start:]


def normalised(text: str, normalise: Callable[[str], str], size: int = WINDOW) -> str:
    """`normalise(text)` for a normalisation that works a character or a whitespace-separated run at a time (NFKC,
    casefold), applied a piece at a time (`pieces`)."""
    return "".join(normalise(piece) for piece in pieces(text, size))


def search(rx: re.Pattern[str], text: str, longest: int, size: int = WINDOW) -> re.Match[str] | None:
    """`rx.search(text)` as searches of windows of `size` characters, each looking `longest` + 1 characters past its
    window, for a pattern no match of which is longer than `longest` characters.

    The same first match as one search: a window's search starts at its window (seeing the characters before, for
    `\\b`), and a match starting in the window ends, and is decided, before the window's search stops reading; one
    starting later is the next window's."""
    for start in range(0, max(len(text), 1), size):
        m = rx.search(text, start, start + size + longest + 1)
        if m is not None and m.start() < start + size:
            return m
    return None


def finditer(rx: re.Pattern[str], text: str, longest: int, size: int = WINDOW) -> Iterator[re.Match[str]]:
    """`rx.finditer(text)` as searches of windows of `size` characters from where the last match ended, each looking
    `longest` + 1 characters past its window, for a pattern that matches no empty text and none longer than
    `longest` characters: the same matches (see `search`), the GIL free between one window and the next."""
    pos = 0
    while pos < len(text):
        end = pos + size
        m = rx.search(text, pos, end + longest + 1)
        if m is None or m.start() >= end:
            pos = end
            continue
        yield m
        pos = max(m.end(), m.start() + 1)  # past an empty match, whatever the pattern
