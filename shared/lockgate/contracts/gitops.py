"""What `lockgate apply` did: the Git provenance of one apply, the changes it made, and the applied state.

The CLI does not write the applied state (KV `{prefix}_gitops`) itself: it sends an `ApplyRequest` to the
lineage recorder, the bucket's only writer, which checks it, records its entries, appends an audit row
and announces the apply (`ApplyRecorded`). So no change of the state (a deployment's `online_eval`, which
feeds canary analysis, for one) escapes the audit log."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from lockgate.contracts.bounds import Id
from lockgate.contracts.envelope import Event
from lockgate.contracts.names import OptName, check_names

ChangeAction = Literal["add", "change", "remove"]
Kind = Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,32}$")]
# A document's name, or an alias's `app/alias`: the name grammar, so no name can read as more of a change list
# (`x, remove deployment/y`) where changes are written out, as in an apply's audit row.
ResourceName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,299}$")]


class AppliedChange(msgspec.Struct, frozen=True, kw_only=True):
    """One resource an apply added, changed or pruned (`digest` is its content hash, `previous` the old one)."""

    action: ChangeAction
    kind: Kind
    name: ResourceName
    digest: Id = ""
    previous: Id = ""
    release: Id = ""  # for a release: the immutable release name the change bound
    source: Annotated[str, msgspec.Meta(max_length=4096)] = ""  # the folder file it came from, relative to the folder


class StateEntry(msgspec.Struct, frozen=True, kw_only=True):
    """What one apply recorded for a resource: its content hash and the Git provenance of that apply."""

    kind: Kind
    name: ResourceName
    digest: str
    release: str = ""
    source: str = ""
    spec: dict = {}
    commit: str = ""
    author: str = ""
    dirty: bool = False
    applied_at: str = ""
    applied_by: str = ""

    @property
    def key(self) -> str:
        """`kind/name`."""
        return f"{self.kind}/{self.name}"


class ApplyRecorded(Event, frozen=True, kw_only=True, tag="lockgate.gitops.applied"):
    """One `lockgate apply DIR`: the Git commit, author and dirty flag of the folder, and what changed."""

    directory: str
    commit: str = ""  # empty: the folder is not in a Git work tree
    author: str = ""  # the commit's author, `Name <email>`
    dirty: bool = False  # the folder had uncommitted changes when applied
    applied_by: str = ""  # the personal identity that signed the releases, if any
    changes: list[AppliedChange] = []
    unchanged: int = 0


Text = Annotated[str, msgspec.Meta(max_length=1024)]


class ApplyRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What `lockgate apply` asks the lineage recorder to record (on `Subjects.gitops_apply(identity)`):
    the changes it carried out, and the state entry of each change that is not a removal.

    `applied_by` is a person only with their signature (`key_id`, `signature` over the request without it),
    which the recorder checks against the trust file; unsigned, the apply is the NATS identity's. Bounded, so
    that what the recorder records always fits in its audit row."""

    directory: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    commit: Annotated[str, msgspec.Meta(max_length=128)] = ""
    author: Text = ""
    dirty: bool = False
    applied_by: OptName = ""
    changes: Annotated[list[AppliedChange], msgspec.Meta(max_length=10_000)] = []
    entries: Annotated[list[StateEntry], msgspec.Meta(max_length=10_000)] = []
    unchanged: Annotated[int, msgspec.Meta(ge=0)] = 0
    key_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    signature: Annotated[str, msgspec.Meta(max_length=256)] = ""

    def __post_init__(self) -> None:
        check_names(self)


class ApplyReply(msgspec.Struct, frozen=True, kw_only=True):
    """The lineage recorder's answer: the announced apply, or why nothing was recorded."""

    recorded: ApplyRecorded | None = None
    error: str = ""
