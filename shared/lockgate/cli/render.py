"""Results as terminal tables or JSON (`--json`) for scripts."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lockgate.codec import to_json
from lockgate.errors import LockgateError

# Piped output (scripts, CI logs) gets a wide console instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def say_with(exc: BaseException, said: str) -> None:
    """Say `said` with the error that ends the command: in its one line for a LockgateError (handle_errors prints
    it), else (an interrupt, an unexpected error) as a note of its own, before it propagates."""
    if isinstance(exc, LockgateError):
        exc.message = f"{exc.message}; {said}"
    else:
        err_console.print(f"[yellow]note:[/yellow] {said}", highlight=False, soft_wrap=True)


# Control characters other than tab and newline (C0, DEL, C1): a value a sender chose (a span or service name, a
# model, a dead letter's payload) written raw could move the cursor, erase or conceal cells and retitle the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown(text: str, style: str = "") -> Text:
    """`text` as data for the terminal: never read as rich markup (`[/]` in a span name ended every operator's
    `lockgate traces` in a MarkupError traceback, `[conceal]` hid what followed), control characters escaped
    (`\\x1b`) (probe p10)."""
    return Text(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text), style=style)


def entries(values: Sequence[str]) -> str:
    """Names a sender chose, as one table cell: each a quoted string (JSON's quoting, `"` and `\\` escaped), so a
    name holding `,` is one entry, its `(otlp)` marker inside its own quotes, never several entries (probe p10)."""
    return ", ".join(json.dumps(v, ensure_ascii=False) for v in values)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.6g}"
    if isinstance(value, dt.datetime):
        # In UTC and saying so, as JSON does: a time with no zone reads as the reader's own local time.
        utc = value.astimezone(dt.UTC) if value.tzinfo else value
        return utc.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    return "" if value is None else str(value)


def emit_json(value: Any) -> None:
    """Print JSON to stdout with the one result encoder (rows, Structs, reports alike)."""
    sys.stdout.write(to_json(value, indent=2).decode() + "\n")


def table(rows: Sequence[dict[str, Any]], *, title: str | None = None, columns: Sequence[str] | None = None,
          empty: str = "nothing yet") -> None:
    """Print rows as a table."""
    if not rows:
        console.print(f"[dim]{empty}[/dim]")
        return
    cols = list(columns or rows[0].keys())
    # A Text is the command's own styling (a plan's `+ add`); every other value is data.
    cells = [[v if isinstance(v := r.get(c), Text) else shown(_cell(v)) for c in cols] for r in rows]
    whole = [_whole(c, [row[i].plain for row in cells]) for i, c in enumerate(cols)]
    words = [_word(c, [row[i].plain for row in cells]) for i, c in enumerate(cols)]
    # Each column takes 3 characters of borders and padding; a text column at least its longest word (up to _TOKEN).
    if sum(w or n for w, n in zip(whole, words, strict=True)) + 3 * len(cols) + 1 > console.width:
        _records(cols, cells, title)
        return
    t = Table(title=title, header_style="bold", show_lines=False)
    for c, w, n in zip(cols, whole, words, strict=True):
        justify = "right" if isinstance(rows[0].get(c), int | float) else "left"
        t.add_column(c, overflow="fold", justify=justify, min_width=w or n, no_wrap=bool(w))
    for row in cells:
        t.add_row(*row)
    console.print(t)


# A cell up to this long with no space in it (a number, a time, an id: a trace's 32 hex digits, a UUID's 36
# characters) is one token.
_TOKEN = 40


def _whole(header: str, column: list[str]) -> int:
    """The width a column of tokens needs to be never wrapped (0 for a text column, which folds): a narrow terminal
    folded `0.0527395` into `0.05273` over `95`, which reads as 0.05273, and a time over four lines (probe p23 F2)."""
    if not column or any(len(v) > _TOKEN or any(ch.isspace() for ch in v) for v in column):
        return 0
    return max(len(header), *(len(v) for v in column))


def _word(header: str, column: list[str]) -> int:
    """The width a text column needs to fold between words only: its longest word, at most _TOKEN (a longer one folds
    anyway)."""
    return min(_TOKEN, max(len(w) for v in [header, *column] for w in (v.split() or [""])))


def _records(cols: list[str], cells: list[list[Text]], title: str | None) -> None:
    """Rows too wide for the terminal as one record each, a column's name beside its value (psql's expanded
    display): every value whole, however narrow the terminal."""
    if title:
        console.print(title, style="bold", highlight=False)
    for n, row in enumerate(cells, 1):
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold", no_wrap=True)
        t.add_column(overflow="fold")
        for c, v in zip(cols, row, strict=True):
            t.add_row(c, v)
        console.print(f"[dim]-[ {n} ]-[/dim]")
        console.print(t)


def output(rows: Any, as_json: bool, **kwargs: Any) -> None:
    """Table or JSON depending on --json."""
    if as_json:
        emit_json(rows)
    else:
        table(rows, **kwargs)
