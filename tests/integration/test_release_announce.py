"""A release bound but not announced, through the CLI on a real nats-server: the bus refuses the announcement
(JetStream does not acknowledge it) after the name is bound, as a crash between the two leaves it. Running the same
`release create` or `apply` again announces it, once: the lineage recorder, the sink and the evaluator's queries
see it, and a run after that adds nothing."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.gitops.state import read_bindings
from lockgate.store import Store
from tests.helpers import person, recorder, sink_stored
from tests.integration.test_aliases import cli

pytestmark = pytest.mark.timeout(90)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "gitops"


@contextlib.asynccontextmanager
async def announcements_refused(bus: Bus) -> AsyncIterator[None]:
    """Within it, JetStream acknowledges no announcement of a release (no stream captures `lg.lineage.>`), while
    the releases bucket binds as ever: the bus's own error where a crash would stop `release create`."""
    events = bus.subjects.streams["events"].name
    config = (await bus.js.stream_info(events)).config
    config.subjects = [s for s in config.subjects or [] if s != f"{bus.subjects.prefix}.lineage.>"]
    await bus.js.update_stream(config)
    try:
        yield
    finally:
        await bus.ensure_topology(update=True)  # lockgate's own configuration back


async def announced(bus: Bus) -> int:
    """How many announcements of a release the events stream holds."""
    subject = bus.subjects.release_registered
    info = await bus.js.stream_info(bus.subjects.streams["events"].name, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


def _joined(text: str) -> str:
    return " ".join(text.split())


async def test_a_release_bound_but_not_announced_is_announced_once_by_release_create_again(
        run_services, bus: Bus, settings: Settings, store: Store) -> None:
    # Before: the name stayed bound and unannounced. `release create` again found it bound to the same content,
    # said "already registered" and announced nothing, so no `releases` row and no lineage edge ever named it
    # (the evaluator, lineage and provenance queries read them), and nothing told the operator.
    person(settings, "olly", "operator")
    prompt = await artifacts.register(bus, "prompt", "fg2-prompt", {"template": "{question}"})
    args = ("--as", "olly", "release", "create", "shop-fg2", "--app", "shop",
            "--artifact", f"prompt/fg2-prompt={prompt.hash}")
    async with announcements_refused(bus):
        failed = await cli(settings, *args)
    assert failed.exit_code == 1, failed.output
    assert ("release 'shop-fg2' is bound but not announced: run the same `release create` (or `apply`) again"
            in _joined(failed.output)), failed.output
    assert (await artifacts.release_of(bus, "shop-fg2"))["author"]["name"] == "olly"
    assert await announced(bus) == 0

    svcs = await run_services("sink", "lineage")
    again = await cli(settings, *args)
    assert again.exit_code == 0, again.output
    assert ("release shop-fg2 already registered (same content), authored by olly; announced again"
            in _joined(again.output)), again.output
    await sink_stored(svcs["sink"].handlers, releases=1, lineage_edges=1)
    assert store.rows("SELECT release, app, artifacts FROM releases") == [
        {"release": "shop-fg2", "app": "shop", "artifacts": {"prompt/fg2-prompt": prompt.hash}}]
    assert store.rows("SELECT src, relation, dst FROM lineage_edges") == [
        {"src": "shop-fg2", "relation": "uses", "dst": prompt.hash}]

    # Announced now: a run after it announces the same event, which JetStream drops as the duplicate it is.
    third = await cli(settings, *args)
    assert third.exit_code == 0 and "announced" not in third.output, third.output
    assert await announced(bus) == 1


async def test_a_release_apply_bound_but_did_not_announce_is_announced_once_by_apply_again(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # The same hole through GitOps: the failed apply recorded no release, so the next plan adds it again, and
    # binding the same content again announced nothing.
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    planned = await cli(settings, "plan", str(repo), "--json")
    releases = sorted(s["release"] for s in json.loads(planned.stdout)["steps"] if s["kind"] == "release")
    async with recorder(bus, settings):
        async with announcements_refused(bus):
            failed = await cli(settings, "apply", str(repo))
        assert failed.exit_code == 1 and "is bound but not announced" in _joined(failed.output), failed.output
        assert len(await read_bindings(bus, releases)) == 1  # the release apply came to first
        assert await announced(bus) == 0
        applied = await cli(settings, "apply", str(repo))
        assert applied.exit_code == 0, applied.output
    assert await announced(bus) == len(releases)
