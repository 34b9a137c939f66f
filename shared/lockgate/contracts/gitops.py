"""What `lockgate apply` did: the Git provenance of one apply and the changes it made."""

from __future__ import annotations

from typing import Literal

import msgspec

from lockgate.contracts.envelope import Event

ChangeAction = Literal["add", "change", "remove"]


class AppliedChange(msgspec.Struct, frozen=True, kw_only=True):
    """One resource an apply added, changed or pruned (`digest` is its content hash, `previous` the old one)."""

    action: ChangeAction
    kind: str
    name: str
    digest: str = ""
    previous: str = ""
    release: str = ""  # for a release: the immutable release name the change bound
    source: str = ""  # the folder file it came from, relative to the folder


class ApplyRecorded(Event, frozen=True, kw_only=True, tag="lockgate.gitops.applied"):
    """One `lockgate apply DIR`: the Git commit, author and dirty flag of the folder, and what changed."""

    directory: str
    commit: str = ""  # empty: the folder is not in a Git work tree
    author: str = ""  # the commit's author, `Name <email>`
    dirty: bool = False  # the folder had uncommitted changes when applied
    applied_by: str = ""  # the personal identity that signed the releases, if any
    changes: list[AppliedChange] = []
    unchanged: int = 0
