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
