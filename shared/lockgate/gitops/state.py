"""The stack's side of GitOps: read the applied state and the release bindings, and carry out a plan.

The applied state lives in KV `{prefix}_gitops`, one entry per resource (`<kind>.<name token>`), with
history, so earlier applies stay visible. Artifacts go to the content-addressed object store and are
announced as `lockgate artifact register` does; releases are bound create-only as `release create`
does (signed by the personal identity when there is one). Deployments and budgets are recorded as
desired state only: apply never moves traffic, since the router admits a release only with a gate
decision that allows it (start a canary with the router's admin API once the gate has decided).
Pruning deletes a resource's state entry; the artifact and release stay (content-addressed and
immutable, lineage and audit keep naming them).
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import ApplyRecorded
from lockgate.contracts.gitops import AppliedChange
from lockgate.errors import NotFound
from lockgate.gitops.documents import GitopsError
from lockgate.gitops.git import Provenance
from lockgate.gitops.plan import Plan, StateEntry
from lockgate.gitops.resolve import ARTIFACT_KIND, Resource
from lockgate.identity import Identity, bundle_content
from lockgate.ids import content_hash
from lockgate.provenance import aliases
from lockgate.subjects import token

_entry = msgspec.json.Decoder(StateEntry)


def state_key(kind: str, name: str) -> str:
    """The KV key of a resource's entry (names mapped one-to-one by `token`)."""
    return f"{kind}.{token(name)}"


async def read_state(bus: Bus) -> dict[str, StateEntry]:
    """Every resource the last applies recorded, by `kind/name`."""
    out = {}
    for value in (await bus.kv_entries(bus.subjects.kv_gitops)).values():
        if value:
            state = _entry.decode(value)
            out[state.key] = state
    return out


async def read_bindings(bus: Bus, names: list[str]) -> dict[str, str]:
    """The content hash each of these release names is bound to (unbound names are left out)."""
    out = {}
    for name in names:
        try:
            bundle = await artifacts.release_of(bus, name)
        except NotFound:
            continue
        out[name] = content_hash(bundle_content(bundle))
    return out


async def read_aliases(bus: Bus, settings: Settings, desired: list[Resource]) -> dict[str, str]:
    """The release each of the folder's aliases points to now (`app/alias` -> release), from its verified
    history; aliases never set are left out."""
    out = {}
    for res in desired:
        if res.kind == "alias":
            current, _, _ = await aliases.pointed_at(bus, settings, res.spec["app"], res.spec["alias"])
            if current is not None:
                out[res.name] = current.release
    return out


def _labels(res: Resource, prov: Provenance) -> dict[str, str]:
    # On the registration itself, so the artifacts table says which commit brought each version.
    return {**res.labels, "gitops.source": res.source, "git.commit": prov.commit, "git.author": prov.author,
            "git.dirty": str(prov.dirty).lower()}


async def apply(bus: Bus, plan: Plan, desired: list[Resource], prov: Provenance, *, directory: str,
                author: Identity | None = None, settings: Settings | None = None,
                audit_as: str = "operator") -> ApplyRecorded:
    """Carry out the plan's changes in dependency order, record each entry, then announce the apply.

    An alias is moved with a record signed by `author` and checked against `settings`' trust file, so a
    folder with aliases needs both; apply refuses before changing anything if they are missing."""
    if any(s.kind == "alias" and s.action != "remove" for s in plan.changes) and (author is None or settings is None):
        raise GitopsError("the folder moves aliases, and every alias change is signed: apply with a personal "
                          "identity (`--as NAME`, `lockgate identity create NAME`)")
    by_key = {r.key: r for r in desired}
    kv = await bus.kv(bus.subjects.kv_gitops)
    now = datetime.now(UTC).isoformat()
    who = author.name if author else ""
    done: list[AppliedChange] = []
    for step in plan.changes:
        if step.action == "remove":
            await kv.delete(state_key(step.kind, step.name))
            done.append(AppliedChange(action="remove", kind=step.kind, name=step.name, previous=step.previous,
                                      release=step.previous_release, source=step.source))
            continue
        res = by_key[f"{step.kind}/{step.name}"]
        if res.kind == "release":
            b = res.bundle
            await artifacts.register_release(bus, res.release, b["app"], b["artifacts"], parent=b["parent"],
                                             description=res.description or f"applied from {res.source}",
                                             author=author)
        elif res.kind == "alias":
            assert author is not None and settings is not None
            await aliases.set_alias(bus, settings, author, res.spec["app"], res.spec["alias"], res.release,
                                    reason=res.description or f"applied from {res.source}",
                                    origin=f"gitops {prov.commit}".strip(), audit_as=audit_as)
        elif res.kind in ARTIFACT_KIND:
            await artifacts.register(bus, ARTIFACT_KIND[res.kind], res.name, res.content,  # type: ignore[arg-type]
                                     media_type=res.media_type, labels=_labels(res, prov), signer=author)
        entry = StateEntry(kind=res.kind, name=res.name, digest=res.digest, release=res.release, source=res.source,
                           spec=res.spec, commit=prov.commit, author=prov.author, dirty=prov.dirty,
                           applied_at=now, applied_by=who)
        await kv.put(state_key(res.kind, res.name), msgspec.json.encode(entry))
        done.append(AppliedChange(action=step.action, kind=res.kind, name=res.name,  # type: ignore[arg-type]
                                  digest=res.digest, previous=step.previous, release=res.release, source=res.source))
    event = ApplyRecorded(directory=directory, commit=prov.commit, author=prov.author, dirty=prov.dirty,
                          applied_by=who, changes=done, unchanged=plan.count("unchanged"))
    if done:  # an apply that changed nothing leaves no trace: it did nothing
        await bus.publish(bus.subjects.apply_recorded, event)
    return event
