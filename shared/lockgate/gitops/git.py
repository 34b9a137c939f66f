"""The Git provenance of a folder: the commit checked out, its author, and whether the folder has
uncommitted changes (a folder outside any Git work tree counts as dirty: no commit reproduces it).

Whether the files a plan read are the commit's is decided by their bytes, not by `git status`: the index can
be told to look away from a file (`update-index --assume-unchanged` or `--skip-worktree`), and an edit `status`
then does not report was applied as the clean commit that does not hold it (probe p40 F2).

`plan` runs this on folders that whoever wrote the repository controls (CI plans pull requests), so git
is run so that nothing a repository can configure runs a command: a folder git would take for a
Git directory of its own (a committed bare repository's `HEAD`, `config`, `objects/`, `refs/`, whose
`config` would then be obeyed, `core.fsmonitor` included) is refused, and every command git could
run from configuration on the way (the fsmonitor, hooks, signature checks, transports) is turned off.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import msgspec

from lockgate.gitops.documents import GitopsError

# Command-line configuration outranks every file, the repository's own included.
_LINK_MODE = "120000"  # a symbolic link's entry in a tree: its blob is the link's text
_MAX_LINKS = 40  # links followed on one path before it counts as a loop, as Linux's ELOOP

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
    unchanged, none untracked) and each of `reads` (paths relative to the folder: the files a plan read) holds,
    byte for byte, what the commit holds at its path, every link followed on the way included. GitopsError for a
    folder git would read as a Git directory."""
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
    prefix = found[1]  # paths in git's answers are relative to the top, not to the folder
    author = (_git(root, "log", "-1", "--format=%an <%ae>") or "").strip()
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all", "--", ".")
    # Any change or untracked file (or git failing, None) is dirty, whether or not the plan read it.
    dirty = status != "" or not _reads_committed(top, commit, {prefix + r for r in reads})
    return Provenance(commit=commit, author=author, dirty=dirty)


def _reads_committed(top: Path, commit: str, reads: set[str]) -> bool:
    """Whether reading each of `reads` (relative to `top`) gives what `commit` gives: every path it went through,
    the links followed and the file at the end, is in the commit with the same blob (one `ls-tree` for all)."""
    walked: set[str] = set()
    for path in reads:
        way = _walk(top, path)
        if way is None:
            return False
        walked.update(way)
    if not walked:
        return True
    # Literal: a file may be named `:(glob)x` or `*.yaml`, which a pathspec would read otherwise.
    listed = _git(top, "--literal-pathspecs", "ls-tree", "-r", "-z", "--full-tree", commit, "--", *sorted(walked))
    if listed is None:
        return False
    committed = {}
    for entry in filter(None, listed.split("\0")):
        meta, _, path = entry.partition("\t")
        mode, _, oid = meta.split(" ")
        committed[path] = (mode == _LINK_MODE, oid)
    sha = "sha256" if len(commit) == 64 else "sha1"  # the repository's object format, as its commit ids are
    return all(path in committed and committed[path] == _blob(top / path, sha) for path in walked)


def _walk(top: Path, path: str) -> list[str] | None:
    """The paths (relative to `top`) whose content decides what reading `path` gives, resolved one name at a time
    as the kernel does: each symbolic link on the way (in a folder of the path too) and the file reached. None if
    the way leaves `top` or loops: no commit of the work tree holds what it reads."""
    todo = list(reversed(PurePosixPath(path).parts))
    at: list[str] = []  # the folders reached so far, below `top`, none a link
    links: list[str] = []
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if not at:
                return None
            at.pop()
            continue
        here = "/".join([*at, name])
        if not os.path.islink(top / here):
            at.append(name)
            continue
        links.append(here)
        try:
            target = Path(os.readlink(top / here))
        except OSError:  # gone since: what was read is not known to be the commit's
            return None
        if len(links) > _MAX_LINKS or (target.is_absolute() and not target.is_relative_to(top)):
            return None
        if target.is_absolute():  # into the work tree: the path below `top` is read from there on
            at, target = [], target.relative_to(top)
        todo += reversed(target.parts)
    return [*links, "/".join(at)] if at else None


def _blob(path: Path, sha: str) -> tuple[bool, str] | None:
    """Whether `path` is a symbolic link, and the object id git gives what it holds (a link's text, a file's
    bytes: the hash of `blob <size>\\0` and them, as `git hash-object --no-filters`); None if it cannot be read."""
    try:
        link = path.is_symlink()
        data = os.readlink(os.fsencode(path)) if link else path.read_bytes()
    except OSError:
        return None
    return link, hashlib.new(sha, b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
