"""The Git provenance of a folder: the commit checked out, its author, and whether the folder has
uncommitted changes (a folder outside any Git work tree counts as dirty: no commit reproduces it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec


class Provenance(msgspec.Struct, frozen=True, kw_only=True):
    """Commit (empty outside Git), its author `Name <email>`, and the dirty flag."""

    commit: str = ""
    author: str = ""
    dirty: bool = True


def _git(folder: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance(folder: str | Path) -> Provenance:
    """Where the folder stands in Git; `dirty` looks only at the folder (`git status --porcelain -- .`)."""
    root = Path(folder)
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return Provenance()
    author = _git(root, "log", "-1", "--format=%an <%ae>") or ""
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", ".")
    return Provenance(commit=commit, author=author, dirty=status is None or bool(status))
