"""Free text cut to a bound so what carries it fits one bus message: the router's served events (`fit.py` in the
router) and the evaluator's case results share the cut, its bound and its marker.

A text is cut on a character boundary, never mid-character, and whatever holds it says what was cut and how large it
was under TRUNCATED ("field:bytes,..." in UTF-8 bytes before the cut), so a reader knows it holds a prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

TRUNCATED = "lockgate.truncated"  # "field:bytes,..." the fields cut and their sizes (UTF-8 bytes) before the cut
TEXT_BYTES = 64 * 1024  # what each free-text field keeps, in UTF-8 bytes
STRIPPED_BYTES = 256  # what a text keeps where even TEXT_BYTES of each is too much for the message


def cut(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes, cut on a character boundary (the same text when it fits)."""
    if len(text) * 4 <= limit:  # no character takes more than 4 bytes: no need to encode it to know
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    # "ignore" leaves out the character the cut split (its first bytes only are kept), nothing else.
    return data[:limit].decode("utf-8", "ignore")


def size(text: str) -> int:
    """`text`'s size in UTF-8 bytes (as TRUNCATED reports it)."""
    return len(text.encode("utf-8", "surrogatepass"))


def marker(sizes: Mapping[str, int]) -> str:
    """TRUNCATED's value for the fields cut and their sizes before the cut."""
    return ",".join(f"{k}:{n}" for k, n in sizes.items())
