"""The Git provenance of a folder: the commit checked out, its author, and whether the folder has
uncommitted changes (a folder outside any Git work tree counts as dirty: no commit reproduces it).

`plan` runs this on folders that whoever wrote the repository controls (CI plans pull requests), so git
is run so that nothing a repository can configure runs a command: a folder git would take for a
Git directory of its own (a committed bare repository's `HEAD`, `config`, `objects/`, `refs/`, whose
`config` would then be obeyed, `core.fsmonitor` included) is refused, and every command git could
run from configuration on the way (the fsmonitor, hooks, signature checks, transports) is turned off.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import msgspec

from lockgate.gitops.documents import GitopsError

# Command-line configuration outranks every file, the repository's own included.
_SAFE_CONFIG = (
    "core.fsmonitor=false",  # `status` runs a configured fsmonitor command
    "core.hooksPath=/dev/null",  # no hook (post-index-change, ...) runs
    "safe.bareRepository=explicit",  # git >= 2.38: never discover a bare repository by walking into it
    "log.showSignature=false",  # `log` would run gpg.program to check a signed commit
    "protocol.allow=never",  # no transport, so no core.sshCommand, gitProxy, credential helper or lazy fetch
)


class Provenance(msgspec.Struct, frozen=True, kw_only=True):
    """Commit (empty outside Git), its author `Name <email>`, and the dirty flag."""

    commit: str = ""
    author: str = ""
    dirty: bool = True


def _environment() -> dict[str, str]:
    # The folder alone says where its repository is: no GIT_DIR, GIT_WORK_TREE, GIT_CONFIG_* ... of the caller
    # (a hook running lockgate has GIT_DIR set to its own repository); no system configuration either.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return {**env, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}


def _git(folder: Path, *args: str) -> str | None:
    config = [arg for item in _SAFE_CONFIG for arg in ("-c", item)]
    try:
        proc = subprocess.run(["git", *config, "-C", str(folder), *args], capture_output=True, text=True,
                              errors="surrogateescape",  # as Python spells paths that are not UTF-8
                              timeout=30, check=False, env=_environment(), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _is_git_dir(folder: Path) -> bool:
    """What git would take for a Git directory (setup.c `is_git_directory`), counted broadly: `HEAD` beside
    `objects/` and `refs/`, or beside a `commondir` file naming where they are."""
    return (folder / "HEAD").exists() and (
        ((folder / "objects").is_dir() and (folder / "refs").is_dir()) or (folder / "commondir").exists())


def work_tree(folder: str | Path) -> Path | None:
    """The top of the work tree holding `folder` (None outside Git), found as git discovers it: at each
    folder upwards `.git` first, then the folder itself as a Git directory, which is refused (GitopsError)."""
    here = Path(folder).expanduser().resolve()
    for candidate in (here, *here.parents):
        if (candidate / ".git").exists():
            return candidate
        if _is_git_dir(candidate):
            where = "it" if candidate == here else str(candidate)
            raise GitopsError(f"{folder} is refused: {where} holds a Git directory's files (HEAD, objects/, refs/), "
                              "which git would read as a repository obeying their `config` (commands included); "
                              "plan a folder of a work tree")
    return None


def provenance(folder: str | Path, *, reads: Iterable[str]) -> Provenance:
    """Where the folder stands in Git. `dirty` unless every file of the folder is as committed (tracked,
    unchanged, none untracked) and none of `reads` (paths relative to the folder: the files a plan read)
    is ignored by Git, whose content no commit holds either. GitopsError for a folder git would read as a
    Git directory."""
    root = Path(folder).expanduser().resolve()
    top = work_tree(folder)
    if top is None:
        return Provenance()
    commit = (_git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}") or "").strip()
    if not commit:
        return Provenance()
    # git must have found the work tree vetted above (not one its own discovery reached otherwise, say past a
    # `.git` it did not take for a repository) before `status` reads anything of it.
    found = (_git(root, "rev-parse", "--show-toplevel", "--show-prefix") or "").split("\n")
    if len(found) < 2 or not found[0] or Path(found[0]).resolve() != top:
        raise GitopsError(f"{folder} is refused: git reads it as part of {found[0] or 'no work tree'}, not of the "
                          f"work tree at {top}")
    prefix = found[1]  # porcelain paths are relative to the top, not to the folder
    author = (_git(root, "log", "-1", "--format=%an <%ae>") or "").strip()
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all", "--ignored", "--", ".")
    if status is None:
        return Provenance(commit=commit, author=author, dirty=True)
    return Provenance(commit=commit, author=author, dirty=_dirty(status, {prefix + r for r in reads}))


def _dirty(status: str, read: set[str]) -> bool:
    """Any change, untracked file, or ignored file that is read (`git status --porcelain -z --ignored`)."""
    entries = iter(status.split("\0"))
    for entry in entries:
        if not entry:
            continue
        code, path = entry[:2], entry[3:]
        if code[0] in "RC":
            next(entries, None)  # a rename's or copy's source path follows
        if code != "!!":
            return True
        if path in read or (path.endswith("/") and any(r.startswith(path) for r in read)):
            return True
    return False
