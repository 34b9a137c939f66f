"""`apply` on a real nats-server: what it registers carries the folder's Git provenance, the applied
state records it, and the apply is announced once (ApplyRecorded); applying again announces nothing.
The lineage recorder is the state's only writer: it audits each apply, refuses a request that does not
hold together, and the operator identity can no longer write the bucket itself."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.codec import to_json
from lockgate.config import Settings
from lockgate.contracts import (
    AppliedChange,
    ApplyRecorded,
    ApplyReply,
    ApplyRequest,
    ArtifactRegistered,
    AuditEntry,
    StateEntry,
)
from lockgate.credentials import NotAllowed
from lockgate.errors import NotFound
from lockgate.gitops.documents import GitopsError, load_folder
from lockgate.gitops.git import provenance
from lockgate.gitops.plan import diff
from lockgate.gitops.resolve import resolve
from lockgate.gitops.state import apply, read_bindings, read_state, state_key
from lockgate.ids import canonical_json, content_hash
from lockgate.subjects import token
from tests.helpers import apply_folder, person, recorder
from tests.integration.test_aliases import cli
from tests.integration.test_nats_auth import _bus, secured  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(60)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "gitops"


def _git(repo: Path, *args: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(repo), "GIT_AUTHOR_NAME": "Bo", "GIT_AUTHOR_EMAIL": "bo@example.com",
           "GIT_COMMITTER_NAME": "Bo", "GIT_COMMITTER_EMAIL": "bo@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


async def test_apply_records_git_provenance_and_announces_itself_once(bus: Bus, settings: Settings,
                                                                      tmp_path: Path) -> None:
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

    plan, event = await apply_folder(bus, settings, repo)
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

    again, event = await apply_folder(bus, settings, repo)
    assert again.exit_code == 0 and event.changes == [] and event.unchanged == 11  # type: ignore[attr-defined]
    await bus.nc.flush()
    assert applied.empty()  # an apply that changed nothing announces nothing


async def test_every_apply_is_audited_by_the_recorder_naming_who_applied_and_the_commit(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    audited: asyncio.Queue[AuditEntry] = asyncio.Queue()

    async def on_audit(msg: object) -> None:
        await audited.put(msgspec.json.decode(msg.data, type=AuditEntry))  # type: ignore[attr-defined]

    await bus.nc.subscribe(bus.subjects.audit("lineage"), cb=on_audit)
    _, event = await apply_folder(bus, settings, repo)
    entry = await asyncio.wait_for(audited.get(), 10)
    assert (entry.kind, entry.action, entry.actor, entry.target, entry.id) == (
        "apply", "apply", "operator", str(repo), event.id)
    assert entry.details["identity"] == "operator" and "add deployment/gitshop-web" in entry.details["changes"]


def _deployment_entry(spec: dict, digest: str | None = None) -> StateEntry:
    return StateEntry(kind="deployment", name="chat", digest=digest or content_hash(spec), spec=spec)


SPEC = {"app": "shop", "stable": "r1", "canary": "", "rollout": {"strategy": "canary", "steps": [10.0, 100.0],
                                                                 "interval_s": 60.0}}


@pytest.mark.parametrize(("request_", "why"), [
    # An entry the folder could not have produced: its digest is not its spec's (what `plan` compares).
    (ApplyRequest(directory="d", changes=[AppliedChange(action="add", kind="deployment", name="chat", digest="x")],
                  entries=[_deployment_entry(SPEC, "x")]), "is not the hash of its spec"),
    # An online_eval the evaluator cannot use (an unknown field where a scorer list belongs).
    (ApplyRequest(directory="d", changes=[AppliedChange(action="add", kind="deployment", name="chat",
                                                        digest=content_hash({**SPEC, "online_eval": {"scorer": 1}}))],
                  entries=[_deployment_entry({**SPEC, "online_eval": {"scorer": 1}})]), "online_eval"),
    # Entries slipped in beside the changes, which no audit row would name.
    (ApplyRequest(directory="d", entries=[_deployment_entry(SPEC)]), "belong to no change"),
    # Another provenance on an entry than the apply's (the audit row would name the wrong commit).
    (ApplyRequest(directory="d", commit="abc", changes=[AppliedChange(action="add", kind="deployment", name="chat",
                                                                      digest=content_hash(SPEC))],
                  entries=[_deployment_entry(SPEC)]), "Git provenance"),
])
async def test_the_recorder_refuses_an_apply_that_does_not_hold_together_and_records_nothing(
        bus: Bus, settings: Settings, request_: ApplyRequest, why: str) -> None:
    async with recorder(bus, settings) as lineage:
        msg = await bus.request(bus.subjects.gitops_apply("operator"), to_json(request_), timeout_s=10)
        assert lineage.applied.answered.count == 1
    reply = msgspec.json.decode(msg.data, type=ApplyReply)
    assert reply.recorded is None and why in reply.error, reply.error
    assert await read_state(bus) == {}


async def test_apply_without_a_lineage_recorder_says_so_and_records_nothing(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))

    desired = resolve(load_folder(repo))
    plan = diff(desired, {}, {})
    with pytest.raises(GitopsError, match="no lineage recorder answers applies"):
        await apply(bus, plan, desired, provenance(repo, reads=()), directory=str(repo))
    assert await read_state(bus) == {}


async def test_the_recorder_checks_an_applys_signer_before_anything_is_bound(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Found by probe p23 (F3): apply bound the folder's releases first and only then asked the recorder, which refused
    # the signer (an approver): the release names stayed taken by an apply nothing recorded. The recorder is asked
    # first now, whatever trust file the caller read; with no recorder, nothing is bound either.
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    desired = resolve(load_folder(repo))
    releases = [r.release for r in desired if r.kind == "release"]
    alice = person(settings, "alice", "approver")
    with pytest.raises(GitopsError, match="no lineage recorder answers applies .*: nothing was registered"):
        await apply(bus, diff(desired, {}, {}), desired, provenance(repo, reads=()), directory=str(repo))
    async with recorder(bus, settings):
        with pytest.raises(GitopsError, match="is signed by alice, who has role\\(s\\) approver; it needs operator"):
            await apply(bus, diff(desired, {}, {}), desired, provenance(repo, reads=()), directory=str(repo),
                        author=alice, settings=settings)
    for name in releases:
        with pytest.raises(NotFound):
            await artifacts.release_of(bus, name)
    assert await read_state(bus) == {}


async def test_the_operator_identity_applies_through_the_recorder_and_cannot_write_the_state_itself(
        secured: tuple, tmp_path: Path) -> None:  # noqa: F811
    _, settings, admin = secured
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    operator, lineage, app = (await _bus(settings, "operator"), await _bus(settings, "lineage"),
                              await _bus(settings, "app"))
    try:
        _, event = await apply_folder(operator, settings, repo, lineage=lineage)
        assert len(event.changes) == 11 and len(await read_state(operator)) == 11
        key = state_key("deployment", "gitshop-web")
        # Before: the operator identity put entries itself, skipping the audit row and the recorder's checks.
        kv = await operator.kv(operator.subjects.kv_gitops)
        with pytest.raises(Exception):  # noqa: B017 - refused by the server (a permissions violation)
            await asyncio.wait_for(kv.put(key, b'{"kind": "deployment"}'), 5)
        assert operator.refused(f"$KV.{operator.subjects.kv_gitops}.{key}") is not None
        with pytest.raises(Exception):  # noqa: B017 - nor delete one
            await asyncio.wait_for(kv.delete(key), 5)
        # An application may not ask for an apply, in its own name or the operator's.
        for identity in ("app", "operator"):
            with pytest.raises(NotAllowed):
                await app.request(app.subjects.gitops_apply(identity), to_json(ApplyRequest(directory="d")),
                                  timeout_s=5)
        assert (await read_state(admin))["deployment/gitshop-web"].digest == next(
            c.digest for c in event.changes if c.kind == "deployment")
    finally:
        for b in (operator, lineage, app):
            await b.close()


async def test_a_release_belongs_to_the_tenant_its_document_or_release_create_names(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Recorded evals and gRPC decision reads keep to a release's tenant (its binding): releases of tenants other
    # than `default` must be possible to make, from a folder and from the CLI.
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    line = repo / "releases" / "gitshop.yaml"
    line.write_text(line.read_text() + "tenant: acme\n")
    _, event = await apply_folder(bus, settings, repo)
    names = [c.release for c in event.changes if c.kind == "release"]
    assert {(await artifacts.release_of(bus, n))["tenant"] for n in names} >= {"acme"}
    acme = next(n for n in names if n.startswith("gitshop@"))
    assert (await artifacts.release_of(bus, acme))["tenant"] == "acme"
    default = resolve(load_folder(FIXTURE))  # the same line of the default tenant is another release
    assert acme not in {r.release for r in default if r.kind == "release"}

    prompt = next(c.digest for c in event.changes if c.name == "gitshop-answer")
    made = await cli(settings, "release", "create", "acme-r1", "--app", "shop", "--tenant", "acme",
                     "--artifact", f"prompt/gitshop-answer={prompt}")
    assert made.exit_code == 0, made.output
    assert (await artifacts.release_of(bus, "acme-r1"))["tenant"] == "acme"
    refused = await cli(settings, "release", "create", "bad-r1", "--app", "shop", "--tenant", "a b",
                        "--artifact", f"prompt/gitshop-answer={prompt}")
    assert refused.exit_code == 2 and "invalid tenant 'a b'" in refused.output, refused.output  # invalid input
    with pytest.raises(NotFound):  # nothing was bound under the refused tenant
        await artifacts.release_of(bus, "bad-r1")


async def test_an_apply_names_a_person_only_with_their_signature(bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Found by a probe: an unsigned request saying applied_by "alice" (nobody in the trust file) was recorded and
    # its audit row named alice as the actor.
    audited: asyncio.Queue[AuditEntry] = asyncio.Queue()

    async def on_audit(msg: object) -> None:
        await audited.put(msgspec.json.decode(msg.data, type=AuditEntry))  # type: ignore[attr-defined]

    await bus.nc.subscribe(bus.subjects.audit("lineage"), cb=on_audit)
    change = AppliedChange(action="add", kind="deployment", name="chat", digest=content_hash(SPEC))
    claimed = ApplyRequest(directory="d", applied_by="alice", changes=[change],
                           entries=[StateEntry(kind="deployment", name="chat", digest=content_hash(SPEC), spec=SPEC,
                                               applied_by="alice")])
    async with recorder(bus, settings):
        msg = await bus.request(bus.subjects.gitops_apply("operator"), to_json(claimed), timeout_s=10)
        reply = msgspec.json.decode(msg.data, type=ApplyReply)
        assert reply.recorded is None and "is not signed by a person" in reply.error, reply.error
        assert await read_state(bus) == {}
        # Signed by a trusted operator, the row names them.
        ann = person(settings, "ann", "operator")
        repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
        desired = resolve(load_folder(repo))
        plan = diff(desired, await read_state(bus), await read_bindings(bus, [r.release for r in desired if r.release]))
        event = await apply(bus, plan, desired, provenance(repo, reads=()), directory=str(repo), author=ann, settings=settings)
    assert event.applied_by == "ann"
    entry = await asyncio.wait_for(audited.get(), 10)
    assert (entry.actor, entry.details["identity"]) == ("ann", "operator")


@pytest.mark.parametrize(("body", "why"), [
    # A directory of a million characters: its audit row could not be sealed (over NATS' max payload), while the
    # state was recorded and reported recorded: a change without a row.
    (lambda: to_json(ApplyRequest(directory="d" * 1_000_000)), "Expected `str` of length <= 4096"),
    # Nested beyond Python's recursion limit where a spec takes any JSON: answered, never left to time out.
    (lambda: b'{"directory": "d", "entries": [{"kind": "deployment", "name": "n", "digest": "x", "spec": {"a": '
     + b"[" * 200_000 + b"]" * 200_000 + b"}}]}", "nested too deeply"),
])
async def test_an_apply_request_beyond_its_bounds_is_refused_with_the_reason(
        bus: Bus, settings: Settings, body: Any, why: str) -> None:
    async with recorder(bus, settings):
        msg = await bus.request(bus.subjects.gitops_apply("operator"), body(), timeout_s=10)
    reply = msgspec.json.decode(msg.data, type=ApplyReply)
    assert reply.recorded is None and why in reply.error, reply.error
    assert await read_state(bus) == {}


async def test_an_apply_row_stands_for_every_change_even_when_its_list_is_cut(bus: Bus, settings: Settings) -> None:
    # Found by a probe: 20 budget changes with 300-character names pushed a deployment change (with its online_eval)
    # past the row's cut: the row never named it. The row now carries the count and digest of the whole list, and
    # a name that reads as more of the list (`x, add deployment/y`) is refused at the edge.
    audited: asyncio.Queue[AuditEntry] = asyncio.Queue()

    async def on_audit(msg: object) -> None:
        await audited.put(msgspec.json.decode(msg.data, type=AuditEntry))  # type: ignore[attr-defined]

    await bus.nc.subscribe(bus.subjects.audit("lineage"), cb=on_audit)
    budgets = [StateEntry(kind="budget", name=f"b{i}-" + "x" * 290, digest=f"sha256:{i}") for i in range(20)]
    entries = [*budgets, StateEntry(kind="deployment", name="hidden", digest=content_hash(SPEC), spec=SPEC)]
    changes = [AppliedChange(action="add", kind=e.kind, name=e.name, digest=e.digest) for e in entries]
    request = ApplyRequest(directory="d", changes=changes, entries=entries)
    sneaky = b'{"directory": "d", "changes": [{"action": "add", "kind": "budget", "name": "x, add deployment/y"}]}'
    async with recorder(bus, settings):
        reply = msgspec.json.decode((await bus.request(bus.subjects.gitops_apply("operator"), sneaky,
                                                       timeout_s=10)).data, type=ApplyReply)
        assert reply.recorded is None and "$.changes[0].name" in reply.error, reply.error
        msg = await bus.request(bus.subjects.gitops_apply("operator"), to_json(request), timeout_s=10)
    assert msgspec.json.decode(msg.data, type=ApplyReply).recorded is not None
    row = await asyncio.wait_for(audited.get(), 10)
    assert "deployment/hidden" not in row.details["changes"] and row.details["changes"].endswith("[cut here]")
    assert row.details["changes_count"] == "21"
    assert row.details["changes_digest"] == content_hash(msgspec.to_builtins(changes))


async def test_a_document_git_ignores_is_applied_as_dirty_through_the_cli(bus: Bus, settings: Settings,
                                                                          tmp_path: Path) -> None:
    # Found by a probe: a gitignored policy document was read and applied under the commit, `git.dirty=false` on
    # its registration, the applied state and the apply's audit row, while no commit held it.
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    (repo / ".gitignore").write_text("policies/loose.yaml\n")
    for args in (("init", "-q"), ("add", "."), ("commit", "-qm", "x")):
        await asyncio.to_thread(_git, repo, *args)
    clean = await cli(settings, "plan", str(repo), "--json")
    assert clean.exit_code == 2 and json.loads(clean.stdout)["git"]["dirty"] is False, clean.output
    (repo / "policies" / "loose.yaml").write_text(
        (repo / "policies" / "default.yaml").read_text().replace("gitshop-gate", "gitshop-loose"))
    assert await asyncio.to_thread(_git, repo, "status", "--porcelain") == ""  # git itself sees nothing

    planned = await cli(settings, "plan", str(repo), "--json")
    assert planned.exit_code == 2 and json.loads(planned.stdout)["git"]["dirty"] is True, planned.output
    audited: asyncio.Queue[AuditEntry] = asyncio.Queue()

    async def on_audit(msg: object) -> None:
        await audited.put(msgspec.json.decode(msg.data, type=AuditEntry))  # type: ignore[attr-defined]

    await bus.nc.subscribe(bus.subjects.audit("lineage"), cb=on_audit)
    async with recorder(bus, settings):
        applied = await cli(settings, "apply", str(repo))
    assert applied.exit_code == 0, applied.output
    row = await asyncio.wait_for(audited.get(), 10)
    assert row.kind == "apply" and row.details["dirty"] == "true"
    assert (await read_state(bus))["policy/gitshop-loose"].dirty is True


@pytest.mark.parametrize(("flag", "path", "old", "new"), [
    ("--skip-worktree", "policies/default.yaml", "threshold: 0.8", "threshold: 0.01"),
    ("--assume-unchanged", "policies/default.yaml", "threshold: 0.8", "threshold: 0.01"),
    ("--skip-worktree", "datasets/qa.jsonl", "Paris", "Lyon"),  # bytes read through a document's `file:`
])
async def test_a_file_git_status_is_told_to_pass_over_is_applied_as_dirty_through_the_cli(
        bus: Bus, settings: Settings, tmp_path: Path, flag: str, path: str, old: str, new: str) -> None:
    # Found by probe p40 (F2): a policy committed at 0.8, edited to 0.01 and hidden from `git status` by
    # `update-index --skip-worktree` (or `--assume-unchanged`), was applied as the commit, `git.dirty=false`, which
    # holds 0.8. And `apply --json` said `"exit_code": 2` (the plan's) while the process exited 0.
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    for args in (("init", "-q"), ("add", "."), ("commit", "-qm", "x")):
        await asyncio.to_thread(_git, repo, *args)
    clean = await cli(settings, "plan", str(repo), "--json")
    assert clean.exit_code == 2 and json.loads(clean.stdout)["git"]["dirty"] is False, clean.output
    text = (repo / path).read_text()
    assert old in text
    (repo / path).write_text(text.replace(old, new))
    await asyncio.to_thread(_git, repo, "update-index", flag, path)
    assert await asyncio.to_thread(_git, repo, "status", "--porcelain") == ""  # git itself sees nothing

    planned = await cli(settings, "plan", str(repo), "--json")
    assert planned.exit_code == 2 and json.loads(planned.stdout)["git"]["dirty"] is True, planned.output
    async with recorder(bus, settings):
        applied = await cli(settings, "apply", str(repo), "--json")
    said = json.loads(applied.stdout)
    assert (applied.exit_code, said["exit_code"], said["applied"], said["git"]["dirty"]) == (0, 0, True, True), \
        applied.output
    assert {e.dirty for e in (await read_state(bus)).values()} == {True}


async def test_links_are_followed_to_what_the_commit_holds_through_the_cli(bus: Bus, settings: Settings,
                                                                          tmp_path: Path) -> None:
    # What a plan reads through committed links (a folder that is a link, a `file:` naming a link to a link) is the
    # commit's: clean. A link on the way changed and hidden from `git status` reads other bytes: dirty.
    repo = tmp_path / "repo"
    shutil.copytree(FIXTURE, repo / "real")
    (repo / "deploy").symlink_to("real")
    (repo / "real" / "datasets" / "cases.jsonl").symlink_to("qa.jsonl")
    (repo / "real" / "datasets" / "data.jsonl").symlink_to("cases.jsonl")
    (repo / "real" / "datasets" / "other.jsonl").write_text(
        (repo / "real" / "datasets" / "qa.jsonl").read_text().replace("Paris", "Lyon"))
    qa = repo / "real" / "datasets" / "qa.yaml"
    qa.write_text(qa.read_text().replace("file: qa.jsonl", "file: data.jsonl"))
    for args in (("init", "-q"), ("add", "."), ("commit", "-qm", "x")):
        await asyncio.to_thread(_git, repo, *args)
    clean = await cli(settings, "plan", str(repo / "deploy"), "--json")
    assert clean.exit_code == 2 and json.loads(clean.stdout)["git"]["dirty"] is False, clean.output

    (repo / "real" / "datasets" / "cases.jsonl").unlink()
    (repo / "real" / "datasets" / "cases.jsonl").symlink_to("other.jsonl")
    await asyncio.to_thread(_git, repo, "update-index", "--skip-worktree", "real/datasets/cases.jsonl")
    assert await asyncio.to_thread(_git, repo, "status", "--porcelain") == ""
    planned = await cli(settings, "plan", str(repo / "deploy"), "--json")
    assert planned.exit_code == 2 and json.loads(planned.stdout)["git"]["dirty"] is True, planned.output


async def test_a_release_parent_named_by_its_document_is_planned_and_applied_through_the_cli(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Found by a probe: `parent: rb`, the name of a release document of the folder (as `stable:` and an alias's
    # `release:` name one), was refused: "parent release 'rb' is not registered and no release of the folder is
    # named so". Now it binds to that document's release, here a release line's current `rb@<12 hex>`.
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    (repo / "releases" / "rb.yaml").write_text("kind: release\nname: rb\napp: gitshop\n"
                                               "artifacts: [prompt/gitshop-system]\n")
    (repo / "releases" / "ra.yaml").write_text("kind: release\nname: ra\napp: gitshop\nparent: rb\n"
                                               "artifacts: [prompt/gitshop-answer]\n")
    planned = await cli(settings, "plan", str(repo), "--json")
    assert planned.exit_code == 2, planned.output
    release = {s["name"]: s["release"] for s in json.loads(planned.stdout)["steps"] if s["kind"] == "release"}
    assert release["rb"].startswith("rb@") and release["ra"].startswith("ra@")
    async with recorder(bus, settings):
        applied = await cli(settings, "apply", str(repo))
    assert applied.exit_code == 0, applied.output
    assert (await artifacts.release_of(bus, release["ra"]))["parent"] == release["rb"]

    # A parent that is neither a document nor a release: one line that says what `parent:` may name.
    (repo / "releases" / "ra.yaml").write_text("kind: release\nname: ra\napp: gitshop\nparent: rc\n"
                                               "artifacts: [prompt/gitshop-answer]\n")
    refused = await cli(settings, "plan", str(repo))
    assert refused.exit_code == 1
    assert ("document releases/ra.yaml: parent 'rc' is neither a release document of the folder (by its `name:`), "
            "the `release:` of one, nor a registered release - at `$.parent`") in refused.output


def _joined(text: str) -> str:
    """The CLI's output as one line (the terminal's wrapping undone)."""
    return " ".join(text.split())


SQUAT = ("kind: release\nname: squat\nrelease: {name}\napp: gitshop\n"
         "artifacts: [prompt/gitshop-system, model_config/gitshop-sim-stable]\n")


async def test_a_release_lines_next_version_name_cannot_be_taken_by_other_content_through_the_cli(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Found by probe p8 (F2): `plan` printed the line's next version, `gitshop@<12 hex>`; another folder pinned
    # `release:` to that name with other artifacts, applied first, and the line could then never apply its
    # content (its error told it to rename a `release:` field it does not have). Such a name is now refused to
    # any content whose own 12 hex it does not carry, from a folder and from `release create`.
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    async with recorder(bus, settings):
        assert (await cli(settings, "apply", str(repo))).exit_code == 0
        answer = repo / "prompts" / "answer.yaml"
        answer.write_text(answer.read_text().replace("no punctuation.", "no punctuation, please."))
        planned = await cli(settings, "plan", str(repo), "--json")
        steps = json.loads(planned.stdout)["steps"]
        following = next(s["release"] for s in steps if s["kind"] == "release" and s["name"] == "gitshop")
        system = next(s["digest"] for s in steps if s["name"] == "gitshop-system")

        squat = tmp_path / "squat"
        squat.mkdir()
        for doc in ("prompts/system.yaml", "models/sim-stable.yaml"):
            shutil.copy(repo / doc, squat)
        (squat / "squat.yaml").write_text(SQUAT.format(name=following))
        refused = await cli(settings, "apply", str(squat))
        assert refused.exit_code == 1, refused.output
        assert (f"document squat.yaml is invalid: release name {following!r} has the form of a release line's "
                f"version") in _joined(refused.output) and "- at `$.release`" in refused.output, refused.output
        created = await cli(settings, "release", "create", following, "--app", "gitshop",
                            "--artifact", f"prompt/gitshop-system={system}")
        assert created.exit_code == 2 and len(created.output.strip().splitlines()) == 1, created.output
        assert f"release name {following!r} has the form of a release line's version" in created.output
        with pytest.raises(NotFound):
            await artifacts.release_of(bus, following)

        applied = await cli(settings, "apply", str(repo))
        assert applied.exit_code == 0, applied.output
    bound = await artifacts.release_of(bus, following)
    assert bound["artifacts"]["prompt/gitshop-answer"] == next(s["digest"] for s in steps
                                                               if s["name"] == "gitshop-answer")
    # Bound, the name is refused other content as any bound name is: taken.
    rebind = await cli(settings, "release", "create", following, "--app", "gitshop",
                       "--artifact", f"prompt/gitshop-system={system}")
    assert rebind.exit_code == 1 and "is already registered with other content" in rebind.output, rebind.output


async def test_a_release_line_whose_version_name_is_bound_to_other_content_says_so_without_a_release_field(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # A binding made before such names were refused (or two contents of a line whose 12 hex agree): the line's
    # error named `$.release`, a field its document does not have, and told it to rename it.
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    planned = await cli(settings, "plan", str(repo), "--json")
    line = next(s["release"] for s in json.loads(planned.stdout)["steps"] if s["name"] == "gitshop")
    kv = await bus.kv(bus.subjects.kv_releases)
    await kv.create(token(line), canonical_json(artifacts.release_bundle(line, "gitshop", {})))
    refused = await cli(settings, "apply", str(repo))
    assert refused.exit_code == 1, refused.output
    error = _joined(refused.output)
    assert (f"document releases/gitshop.yaml: release line 'gitshop' names its content {line!r}, a name already "
            "bound to other content") in error, error
    assert "`$.release`" not in error and "- at `$.name`" in error and "nothing was applied" in error


async def test_release_create_of_a_bound_name_and_the_same_content_names_its_first_author_and_is_announced_once(
        bus: Bus, settings: Settings) -> None:
    # Found by probe p8 (F4): ann's `release create` of olly's release with the same content printed "authored by
    # ann" while the binding keeps olly (whom forbid_self_approval reads), and a second ReleaseRegistered gave
    # the `releases` table a second row. It is announced again now (a lost announcement needs it:
    # test_release_announce.py), as the same event, which the stream holds once.
    from tests.integration.test_release_announce import announced

    person(settings, "olly", "operator")
    person(settings, "ann", "admin", "operator")
    prompt = await artifacts.register(bus, "prompt", "p8-prompt", {"template": "{question}"})
    args = ("release", "create", "shop-p8", "--app", "shop", "--artifact", f"prompt/p8-prompt={prompt.hash}")
    first = await cli(settings, "--as", "olly", *args)
    assert first.exit_code == 0 and "release shop-p8 recorded with 1 artifacts, authored by olly" in first.output
    again = await cli(settings, "--as", "ann", *args)
    assert again.exit_code == 0, again.output
    assert _joined(again.output) == "release shop-p8 already registered (same content), authored by olly"
    assert await announced(bus) == 1  # olly's registration alone
    assert (await artifacts.release_of(bus, "shop-p8"))["author"]["name"] == "olly"


async def test_a_line_version_name_bound_to_other_content_by_a_raw_kv_create_binds_nothing_for_any_reader(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Found by probe p14 (F2): the operator identity may create any key of the releases bucket (it is how `release
    # create` binds), and only the client refused a line's version name with another content's 12 hex. Bound by a
    # raw KV create, `shopline2@<rc2's 12 hex>` held shop-v1's content, and the gate signed a PASS for it: a rollout
    # of that version name would serve other content than its name says. Every reader now makes the check again.
    prompt = await artifacts.register(bus, "prompt", "p14-prompt", {"template": "{question}"})
    other = await artifacts.register(bus, "prompt", "p14-other", {"template": "Q: {question}"})
    mine = {"prompt/p14-prompt": prompt.hash}
    name = f"shopline@{artifacts.line_version('shop', mine)}"
    kv = await bus.kv(bus.subjects.kv_releases)
    await kv.create(token(name), canonical_json(artifacts.release_bundle(name, "shop", {"prompt/p14-other": other.hash})))

    with pytest.raises(NotFound, match="binds a release line's version name to other content"):
        await artifacts.release_of(bus, name)
    person(settings, "ann", "operator")
    shown = await cli(settings, "--as", "ann", "attest", "release", name)
    assert shown.exit_code != 0 and "binds a release line's version name to other content" in _joined(shown.output), \
        shown.output
    # The name's own content is refused: the key binds nothing, and is taken all the same (write-once).
    created = await cli(settings, "release", "create", name, "--app", "shop", "--artifact",
                        f"prompt/p14-prompt={prompt.hash}")
    assert created.exit_code == 1 and "its key is taken all the same: register the release under a new name" in \
        _joined(created.output), created.output


async def test_a_deployment_whose_live_route_serves_another_app_or_stable_is_drift_through_the_cli(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Found by a probe (p20 F8): `rollout start gitshop-web --stable shop-v1` (app shop) outside Git, and `plan` said
    # "unchanged", exit 0, while the folder's gitshop-web serves gitshop-base (gitshop-v1) of app gitshop: deployments
    # were desired state only, never compared with what the router serves (an alias moved outside Git was).
    from lockgate.services.router.domain import Route, Target

    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    async with recorder(bus, settings):
        assert (await cli(settings, "apply", str(repo))).exit_code == 0
    assert (await cli(settings, "plan", str(repo))).exit_code == 0  # no route yet: nothing served to compare
    routes = await bus.kv(bus.subjects.kv_routes)

    async def served(route: Route | bytes) -> None:  # the router's record, as `rollout start` leaves it
        await routes.put(token("gitshop-web"), route if isinstance(route, bytes) else msgspec.json.encode(route))

    await served(Route(deployment="gitshop-web", stable=Target(release="shop-v1", app="shop"), phase="aborted"))
    drifted = await cli(settings, "plan", str(repo))
    assert drifted.exit_code == 2, drifted.output
    assert ("~ deployment gitshop-web: live route serves shop-v1 of app shop, folder says gitshop-v1 of app gitshop"
            in _joined(drifted.output)), drifted.output
    assert "1 deployment whose live route differs from the folder" in _joined(drifted.output)
    planned = json.loads((await cli(settings, "plan", str(repo), "--json")).output)
    [step] = [s for s in planned["steps"] if s["kind"] == "deployment"]
    assert (step["action"], step["drift"], step["previous_release"], step["release"], step["live_app"], step["app"]) == (
        "unchanged", True, "shop-v1", "gitshop-v1", "shop", "gitshop")
    assert planned["exit_code"] == 2 and planned["summary"]["drift"] == 1
    # apply moves no traffic: it says so, and the next plan still shows the drift.
    async with recorder(bus, settings):
        applied = await cli(settings, "apply", str(repo))
    assert applied.exit_code == 0 and "~ deployment gitshop-web: live route serves shop-v1" in _joined(applied.output)
    assert (await cli(settings, "plan", str(repo))).exit_code == 2

    # Same stable release, another app (a route of the release's name under another app): drift too.
    await served(Route(deployment="gitshop-web", stable=Target(release="gitshop-v1", app="shop")))
    assert (await cli(settings, "plan", str(repo))).exit_code == 2
    # Serving the folder's stable: nothing to do; with a canary the folder does not name under way, drift (every
    # field the document declares is compared: test_every_field_of_a_deployment_changed_live_outside_git_...).
    await served(Route(deployment="gitshop-web", stable=Target(release="gitshop-v1", app="gitshop")))
    assert (await cli(settings, "plan", str(repo))).exit_code == 0
    await served(Route(deployment="gitshop-web", stable=Target(release="gitshop-v1", app="gitshop"),
                       canary=Target(release="other-v2", app="gitshop"), phase="progressing"))
    other = await cli(settings, "plan", str(repo))
    assert other.exit_code == 2 and "~ deployment gitshop-web: canary: live other-v2 (progressing at 0%)" in _joined(
        other.output), other.output
    # A record that is no route: said in the table and below it, never a failed plan.
    await served(b'{"not": "a route"}')
    unread = await cli(settings, "plan", str(repo))
    assert unread.exit_code == 0, unread.output
    assert "? deployment gitshop-web: its live route was not compared with the folder" in _joined(unread.output)


async def test_plan_reads_a_deployments_live_route_with_the_viewer_identity(
        secured: tuple, tmp_path: Path) -> None:  # noqa: F811
    # CI runs `plan` as the viewer: its credentials read the routes KV (a refused read would leave every route
    # "not compared", the drift unseen).
    from lockgate.services.router.domain import Route, Target

    _, settings, admin = secured
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    operator, lineage = await _bus(settings, "operator"), await _bus(settings, "lineage")
    try:
        await apply_folder(operator, settings, repo, lineage=lineage)
    finally:
        for b in (operator, lineage):
            await b.close()
    routes = await admin.kv(admin.subjects.kv_routes)
    await routes.put(token("gitshop-web"), msgspec.json.encode(
        Route(deployment="gitshop-web", stable=Target(release="shop-v1", app="shop"), phase="aborted")))
    drifted = await cli(settings, "plan", str(repo))
    assert drifted.exit_code == 2, drifted.output
    assert "~ deployment gitshop-web: live route serves shop-v1 of app shop" in _joined(drifted.output), drifted.output


async def test_every_field_of_a_deployment_changed_live_outside_git_is_drift_row_by_row_through_the_cli(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Found by a probe: `plan` compared a deployment's live route with its document on its stable release and app
    # only. A canary started, set to another weight, aborted or promoted by hand, a strategy PATCHed or a
    # break-glass override, all outside Git, planned as "unchanged", exit 0.
    from lockgate.services.router.domain import Override, Route, Target
    from lockgate.services.router.strategy import BlueGreen, Strategy

    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    async with recorder(bus, settings):
        assert (await cli(settings, "apply", str(repo))).exit_code == 0
    planned = json.loads((await cli(settings, "plan", str(repo), "--json")).output)
    line = next(s["release"] for s in planned["steps"] if (s["kind"], s["name"]) == ("release", "gitshop"))
    routes = await bus.kv(bus.subjects.kv_routes)
    stable, canary = Target(release="gitshop-v1", app="gitshop"), Target(release=line, app="gitshop")
    # The folder's rollout as its document declares it (gitshop-web.yaml: steps 10, 50, 100 every 300 s).
    own = Strategy(steps=[10.0, 50.0, 100.0], interval_s=300.0)
    rolling = Route(deployment="gitshop-web", stable=stable, canary=canary, phase="progressing", weight=10.0,
                    strategy=own, admitted="d1")

    async def plan(route: Route, drifted: bool = True) -> tuple[Any, list[dict]]:
        await routes.put(token("gitshop-web"), msgspec.json.encode(route))
        shown = await cli(settings, "plan", str(repo))
        assert shown.exit_code == (2 if drifted else 0), (route, shown.output)
        [step] = [s for s in json.loads((await cli(settings, "plan", str(repo), "--json")).output)["steps"]
                  if s["kind"] == "deployment"]
        assert step["drift"] is drifted and bool(step.get("differences")) is drifted, step
        return shown, step.get("differences", [])

    # The rollout the document names, stepping on its own steps: the weight moving is the rollout working.
    for route in (rolling, msgspec.structs.replace(rolling, weight=50.0),
                  msgspec.structs.replace(rolling, phase="idle", weight=0.0, admitted=""),
                  msgspec.structs.replace(rolling, strategy=None, weight=25.0),  # the router's own steps
                  Route(deployment="gitshop-web", stable=canary, canary=canary, phase="promoted", previous=stable,
                        strategy=own, reason=f"promoted {line}: canary held 100% for one interval"),
                  Route(deployment="gitshop-web", stable=stable, phase="promoted")):  # not started yet
        await plan(route, drifted=False)

    cases = {
        "weight": (msgspec.structs.replace(rolling, weight=30.0, reason="weight set to 30% (was 10%) by ann"),
                   "30%", "0% or a step: 10, 50, 100"),
        "steps": (msgspec.structs.replace(rolling, strategy=Strategy(steps=[100.0], interval_s=300.0), weight=100.0),
                  "100", "10, 50, 100"),
        "interval_s": (msgspec.structs.replace(rolling, strategy=Strategy(steps=[10.0, 50.0, 100.0], interval_s=5.0)),
                       "5", "300"),
        "strategy": (msgspec.structs.replace(rolling, strategy=Strategy(blue_green=BlueGreen()), weight=0.0),
                     "blue_green", "canary"),
        "canary": (msgspec.structs.replace(rolling, canary=Target(release="gitshop-v1-hotfix", app="gitshop")),
                   "gitshop-v1-hotfix (progressing at 10%)", line),
        "break-glass": (msgspec.structs.replace(rolling, override=Override(
            release=line, action="canary", actor="root", reason="hotfix", at=1.0, weight=10.0)),
            f"override by root for {line} (canary up to 10%): hotfix", "none"),
    }
    for field, (route, live, folder) in cases.items():
        shown, differences = await plan(route)
        assert differences == [{"field": field, "live": live, "folder": folder}], (field, differences)
        out = _joined(shown.output)
        assert f"~ deployment gitshop-web: {field}: live {live}, folder says {folder}" in out, out
        assert "1 deployment whose live route differs from the folder" in out
    # Aborted or promoted by hand outside Git: the document still asks for its canary rolled out by its steps.
    aborted = msgspec.structs.replace(rolling, phase="aborted", weight=0.0, reason=f"aborted {line}: by operator ann")
    assert (await plan(aborted))[1] == [{"field": "canary", "live": f"{line} aborted: aborted {line}: by operator ann",
                                        "folder": f"{line} rolled out"}]
    by_hand = Route(deployment="gitshop-web", stable=canary, canary=canary, phase="promoted", previous=stable,
                    strategy=own, reason=f"promoted {line}: by operator ann")
    assert (await plan(by_hand))[1] == [{"field": "canary", "live": f"{line} promoted by hand: promoted {line}: by "
                                                                    "operator ann",
                                         "folder": f"{line} promoted by its steps"}]
    # Several fields at once: one row each, in the table and below it.
    shown, differences = await plan(msgspec.structs.replace(
        rolling, stable=Target(release="shop-v1", app="shop"), weight=30.0, strategy=Strategy(steps=[10.0, 50.0,
                                                                                                   100.0])))
    assert [d["field"] for d in differences] == ["app", "stable", "weight"], differences
    assert "~ deployment gitshop-web: live route serves shop-v1 of app shop, folder says gitshop-v1 of app gitshop" \
        in _joined(shown.output)
    assert _joined(shown.output).count("~ drift") == 3, shown.output
