"""`apply` on a real nats-server: what it registers carries the folder's Git provenance, the applied
state records it, and the apply is announced once (ApplyRecorded); applying again announces nothing."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import msgspec
import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.contracts import ApplyRecorded, ArtifactRegistered
from lockgate.gitops.documents import load_folder
from lockgate.gitops.git import provenance
from lockgate.gitops.plan import diff
from lockgate.gitops.resolve import resolve
from lockgate.gitops.state import apply, read_bindings, read_state

pytestmark = pytest.mark.timeout(60)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "gitops"


def _git(repo: Path, *args: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(repo), "GIT_AUTHOR_NAME": "Bo", "GIT_AUTHOR_EMAIL": "bo@example.com",
           "GIT_COMMITTER_NAME": "Bo", "GIT_COMMITTER_EMAIL": "bo@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


async def _plan_and_apply(bus: Bus, repo: Path) -> tuple[object, ApplyRecorded]:
    desired = resolve(load_folder(repo))
    plan = diff(desired, await read_state(bus), await read_bindings(bus, [r.release for r in desired if r.release]))
    return plan, await apply(bus, plan, desired, provenance(repo), directory=str(repo))


async def test_apply_records_git_provenance_and_announces_itself_once(bus: Bus, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    await asyncio.to_thread(_git, repo, "init", "-q")
    await asyncio.to_thread(_git, repo, "add", ".")
    await asyncio.to_thread(_git, repo, "commit", "-qm", "x")
    head = await asyncio.to_thread(_git, repo, "rev-parse", "HEAD")
    applied: asyncio.Queue[ApplyRecorded] = asyncio.Queue()
    registered: list[ArtifactRegistered] = []

    async def on_apply(msg: object) -> None:
        await applied.put(msgspec.json.decode(msg.data, type=ApplyRecorded))  # type: ignore[attr-defined]

    async def on_artifact(msg: object) -> None:
        registered.append(msgspec.json.decode(msg.data, type=ArtifactRegistered))  # type: ignore[attr-defined]

    await bus.nc.subscribe(bus.subjects.apply_recorded, cb=on_apply)
    await bus.nc.subscribe(bus.subjects.artifact_registered, cb=on_artifact)

    plan, event = await _plan_and_apply(bus, repo)
    got = await asyncio.wait_for(applied.get(), 10)
    assert got.id == event.id and (got.commit, got.author, got.dirty) == (head, "Bo <bo@example.com>", False)
    assert len(got.changes) == 11 and {c.action for c in got.changes} == {"add"}
    assert {(a.name, a.labels["git.commit"], a.labels["git.dirty"]) for a in registered} == {
        (c.name, head, "false") for c in got.changes if c.kind not in ("release", "deployment", "budget")}
    # The bytes are in the object store under the hash the plan showed, and the pinned release is bound.
    prompt = next(c for c in got.changes if c.name == "gitshop-answer")
    assert b"no punctuation" in await artifacts.load(bus, prompt.digest)
    assert (await artifacts.release_of(bus, "gitshop-v1"))["app"] == "gitshop"
    state = await read_state(bus)
    assert {(e.commit, e.dirty) for e in state.values()} == {(head, False)} and len(state) == 11

    again, event = await _plan_and_apply(bus, repo)
    assert again.exit_code == 0 and event.changes == [] and event.unchanged == 11  # type: ignore[attr-defined]
    await bus.nc.flush()
    assert applied.empty()  # an apply that changed nothing announces nothing
