"""The embedded store's directory is its user's alone, whatever the umask: it holds every tenant's prompts,
responses, spans and audit log, which no credential protects once the files can be copied.

Before (probe p10, F8): under umask 022 the directory and chDB's parts were 0755/0644, while the rest of the home is
0700/0600; another local account copied them and read every tenant's events with chDB. Each case runs in a process of
its own: chDB opens one data directory per process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

OPEN = "import sys; from lockgate.store import open_store; open_store('chdb://' + sys.argv[1], 'lg').close()"


def _open(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", OPEN, str(path)], capture_output=True, text=True, timeout=100,
                          preexec_fn=lambda: os.umask(0o022))


def _others(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode) & 0o077


def test_a_new_store_directory_is_made_private_and_an_open_one_closed(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh" / "clickhouse"
    opened = _open(fresh)
    assert opened.returncode == 0, opened.stderr
    assert _others(fresh) == 0 and any(fresh.iterdir())  # chDB wrote its data inside, closed to others

    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)  # as a store made before this fix was left
    reopened = _open(old)
    assert reopened.returncode == 0, reopened.stderr
    assert _others(old) == 0
