"""Which personal identity signs what the CLI writes, through the CLI on a real nats-server: with several under the
home and none chosen, `artifact register`, `release create` and `apply` refuse before anything is written; `apply`
signs only with an identity the trust file lets apply (the only one under the home otherwise goes unused)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts import ArtifactRegistered
from lockgate.errors import NotFound
from lockgate.gitops.state import read_state
from lockgate.identity import create_identity, load_identity
from tests.helpers import person, recorder
from tests.integration.test_aliases import cli

pytestmark = pytest.mark.timeout(60)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "gitops"
SEVERAL = "error: several personal identities (alice, ann): choose one with --as NAME (or LOCKGATE_IDENTITY)\n"


async def test_with_several_personal_identities_none_chosen_is_refused_before_anything_is_written(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Before (q1 probe, finding 6): with alice and ann under the home, `release create` said "(no author: no
    # personal identity, see --as)" and bound the release unsigned for good (a release name binds once), and
    # `artifact register` and `apply` went unsigned the same way.
    registered: asyncio.Queue[ArtifactRegistered] = asyncio.Queue()

    async def on_artifact(msg: Any) -> None:
        await registered.put(msgspec.json.decode(msg.data, type=ArtifactRegistered))

    await bus.nc.subscribe(bus.subjects.artifact_registered, cb=on_artifact)
    prompt, other = tmp_path / "p.txt", tmp_path / "q.txt"
    prompt.write_text("Answer briefly.")
    other.write_text("Answer in one word.")

    # With none, the work goes unsigned, as before.
    [plain] = json.loads((await cli(settings, "artifact", "register", "prompt", str(prompt), "--json")).stdout)
    assert plain["key_id"] == ""
    assert (await asyncio.wait_for(registered.get(), 10)).hash == plain["hash"]
    made = await cli(settings, "release", "create", "solo-r1", "--app", "shop", "--artifact",
                     f"prompt/p={plain['hash']}")
    assert made.exit_code == 0 and "(no author: no personal identity, see --as)" in made.output, made.output

    person(settings, "alice", "operator")
    person(settings, "ann", "operator")
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    for args, code in ((("artifact", "register", "prompt", str(other)), 2),
                       (("release", "create", "duo-r1", "--app", "shop", "--artifact", f"prompt/p={plain['hash']}"), 2),
                       (("apply", str(repo)), 1)):  # apply exits 1 on every error (2 is "changes planned")
        refused = await cli(settings, *args)
        assert (refused.exit_code, refused.stderr) == (code, SEVERAL), (args, refused.output)
    with pytest.raises(NotFound):
        await artifacts.release_of(bus, "duo-r1")
    assert await read_state(bus) == {}  # apply recorded nothing

    # Chosen, the same work is signed; the next registration anyone announced is this one.
    [signed] = json.loads((await cli(settings, "--as", "ann", "artifact", "register", "prompt", str(other),
                                     "--json")).stdout)
    assert signed["key_id"] and (await asyncio.wait_for(registered.get(), 10)).hash == signed["hash"]
    made = await cli(settings, "--as", "ann", "release", "create", "duo-r1", "--app", "shop", "--artifact",
                     f"prompt/p={plain['hash']}")
    assert made.exit_code == 0 and "authored by ann" in made.output, made.output


def _one_line(text: str) -> str:
    assert text.endswith("\n") and "\n" not in text[:-1], text
    return text


async def test_an_identity_the_trust_file_does_not_let_apply_binds_nothing_and_signs_only_when_it_may(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Found by probe p23 (F3): after README's reviewer setup (`identity create alice`, trusted as approver), every
    # `lockgate apply` signed as alice, the only identity under the home, and the recorder refused it ("it needs
    # operator or admin", exit 1) after apply had bound and announced the folder's releases: their names were taken
    # by an apply nobody recorded, and plan still showed them to add.
    person(settings, "alice", "approver")
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    planned = await cli(settings, "plan", str(repo), "--json")
    releases = [s["release"] for s in json.loads(planned.stdout)["steps"] if s["kind"] == "release"]
    assert planned.exit_code == 2 and len(releases) == 2, planned.output

    async with recorder(bus, settings):
        # Chosen with --as, an identity that may not apply is refused before anything is bound, saying what to do.
        chosen = await cli(settings, "--as", "alice", "apply", str(repo))
        assert chosen.exit_code == 1, chosen.output
        for name in releases:
            with pytest.raises(NotFound):
                await artifacts.release_of(bus, name)
        assert await read_state(bus) == {}
        assert "is signed by alice, who has role(s) approver; it needs operator or admin" in _one_line(chosen.stderr)
        assert "`lockgate gate trust --person alice --role approver --role operator " in chosen.stderr
        assert "or apply with --as the identity of an operator or admin" in chosen.stderr

        # Only one under the home and not chosen, it is not used: apply goes on unsigned, as with none, and says so.
        implicit = await cli(settings, "apply", str(repo), "--json")
        assert implicit.exit_code == 0, implicit.output
        assert "not signed by alice, the only identity under the home" in _one_line(implicit.stderr)
        assert {s.applied_by for s in (await read_state(bus)).values()} == {""}
        for name in releases:
            assert "author" not in await artifacts.release_of(bus, name)

        # An identity the trust file does not know: its key is named, with what to do.
        create_identity(settings, "bob")
        (repo / "prompts" / "answer.yaml").write_text(
            (repo / "prompts" / "answer.yaml").read_text().replace("Answer", "Reply"))
        before = {s["release"] for s in json.loads((await cli(settings, "plan", str(repo), "--json")).stdout)["steps"]
                  if s["kind"] == "release" and s["action"] != "unchanged"}
        unknown = await cli(settings, "--as", "bob", "apply", str(repo))
        bob = load_identity(settings, "bob")
        assert unknown.exit_code == 1 and f"is signed by key {bob.key_id!r}, which is no person's in" in _one_line(
            unknown.stderr), unknown.output
        assert "`lockgate gate trust --person NAME --role operator " in unknown.stderr
        for name in before:
            with pytest.raises(NotFound):
                await artifacts.release_of(bus, name)

        # Trusted as operator too, alice signs the apply she is chosen for.
        person(settings, "alice", "approver", "operator")
        signed = await cli(settings, "--as", "alice", "apply", str(repo), "--json")
        assert signed.exit_code == 0 and signed.stderr == "", signed.output
    for name in before:
        assert (await artifacts.release_of(bus, name))["author"]["name"] == "alice"
    assert (await read_state(bus))["prompt/gitshop-answer"].applied_by == "alice"
