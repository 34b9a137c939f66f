"""Which personal identity signs what the CLI writes, through the CLI on a real nats-server: with several under the
home and none chosen, `artifact register`, `release create` and `apply` refuse before anything is written."""

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
from tests.helpers import person
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
