"""The commands `lockgate dev up --demo` ends with name the stack's home unless it is the default one (the e2e
test in tests/e2e/test_cli.py pastes them against a stack with another home)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockgate_dev.demo import look_deeper


def test_the_default_home_is_not_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for home in (".lockgate", "./.lockgate", str(tmp_path / ".lockgate")):
        assert look_deeper(home, ["ab" * 16])[:5] == [
            "lockgate gate explain shop-v2-rc1", "lockgate decisions", "lockgate lineage shop-v2-rc2",
            "lockgate traces --release shop-v2-rc2", f"lockgate traces {'ab' * 16}"]


def test_another_home_is_named_as_a_shell_reads_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert all(c.startswith(f"lockgate --home {tmp_path}/other ") for c in look_deeper("other", []))
    assert look_deeper(str(tmp_path / "my home"), [])[1] == f"lockgate --home '{tmp_path}/my home' decisions"
