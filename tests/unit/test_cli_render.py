"""How the CLI's tables show values a sender chose: pure, no stack."""

from __future__ import annotations

import json

import pytest

from lockgate.cli.render import entries


@pytest.mark.parametrize("names", [
    ["lockgate-router,lockgate-sink,shop (otlp)"],
    ["lockgate-router (otlp)", "lockgate-sink"],
    ['lockgate-router", "lockgate-sink", "shop (otlp)'],
    ["lockgate-router\\", "shop\n(otlp)", "caf\u00e9 \x1b[8m (otlp)"],
    [],
])
def test_each_name_of_a_list_is_one_quoted_entry_whatever_it_holds(names: list[str]) -> None:
    # Probe p10 F4: joined with ',', one name holding commas read as several, only the last marked `(otlp)`.
    # The cell reads back as exactly the names it was given, each whole: no name can end another's quotes.
    cell = entries(names)
    assert json.loads(f"[{cell}]") == names
    assert "\n" not in cell and "\x1b" not in cell


@pytest.mark.parametrize("width", [60, 120, 200])
def test_numbers_and_times_are_never_folded_in_a_narrow_terminal(width: int) -> None:
    # Probe p23 F2: at 80 columns `lockgate cost` showed 0.0527395 as `0.05273` over `95`, and `lockgate drift` a
    # time over four lines: a reader took the first line for the value. Text columns fold instead, and rows too
    # wide for the terminal are shown one record at a time.
    from rich.console import Console

    from lockgate.cli import render

    row = {"tenant": "default", "app": "shop", "release": "shop-v2-rc2 with a long description to fold",
           "requests": 2637, "input_tokens": 18458, "output_tokens": 29007, "cost_usd": 0.0527395,
           "window_end": "2026-12-06T16:40:35.244683", "reference_mean": 0.125,
           "eval_run": "01a24c3a-432b-7e51-9c2f-5d2b1c0e9a77"}
    shown = Console(width=width, record=True, force_terminal=False)
    saved, render.console = render.console, shown
    try:
        render.table([row])
    finally:
        render.console = saved
    lines = shown.export_text().splitlines()
    for whole in ("0.0527395", "2026-12-06T16:40:35.244683", "reference_mean", "18458", "cost_usd",
                  "01a24c3a-432b-7e51-9c2f-5d2b1c0e9a77"):  # a UUID too (probe p24 F3: folded at 36 > 32)
        assert any(whole in line for line in lines), (whole, lines)
    assert max(len(line) for line in lines) <= width
    assert any("shop-v2-rc2" in line for line in lines)
