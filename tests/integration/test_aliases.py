"""Aliases through the CLI on a real nats-server: `alias set` appends signed records, `history APP/ALIAS
--at T` answers what the alias pointed to then, a signed record that forks the history fails verification, and an
artifact past its sunset stops a release from being aliased (a deprecated one only warns). A record nobody trusted
signed is skipped and said (tests/integration/test_provenance_junk.py has the operator credential's junk)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import AliasChanged, AuditEntry
from lockgate.provenance import chain
from tests.helpers import person, store_decision, store_pass

pytestmark = pytest.mark.timeout(90)


def lockgate(settings: Settings, *args: str) -> Any:
    """The CLI as a user runs it against the test's stack; the click result."""
    from lockgate.cli.main import cli

    env = {"LOCKGATE_NATS_URL": settings.nats_url, "LOCKGATE_PREFIX": settings.prefix,
           "LOCKGATE_DATABASE": settings.database, "LOCKGATE_CLICKHOUSE_URL": settings.clickhouse_url,
           "LOCKGATE_HOME": settings.home}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


async def cli(settings: Settings, *args: str) -> Any:
    return await asyncio.to_thread(lockgate, settings, *args)


async def _release(bus: Bus, name: str, prompt: str, app: str = "shop") -> str:
    art = await artifacts.register(bus, "prompt", f"{name}-prompt", {"template": prompt})
    await artifacts.register_release(bus, name, app, {f"prompt/{name}-prompt": art.hash})
    return art.hash


async def test_alias_history_at_a_time_and_a_forged_record_fails(bus: Bus, settings: Settings) -> None:
    person(settings, "ann", "operator")
    for name in ("shop-v1", "shop-v2"):
        await _release(bus, name, name)
    await _release(bus, "other-v1", "x", app="other")
    audited: list[AuditEntry] = []

    async def on_audit(msg: Any) -> None:
        audited.append(msgspec.json.decode(msg.data, type=AuditEntry))

    await bus.nc.subscribe(bus.subjects.audit_all, cb=on_audit)

    first = await cli(settings, "--as", "ann", "alias", "set", "shop", "production", "shop-v1", "--reason", "launch",
                      "--json")
    assert first.exit_code == 0, first.output
    t1 = json.loads(first.stdout)["record"]["time"]
    second = await cli(settings, "--as", "ann", "alias", "set", "shop", "production", "shop-v2", "--json")
    t2 = json.loads(second.stdout)["record"]["time"]
    same = await cli(settings, "--as", "ann", "alias", "set", "shop", "production", "shop-v2")
    assert same.exit_code == 0 and "already points to shop-v2" in same.output

    def history(at: str | None) -> dict[str, Any]:
        result = lockgate(settings, "history", "shop/production", "--json", *(["--at", at] if at else []))
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    before = await asyncio.to_thread(history, (datetime.fromisoformat(t1) - timedelta(seconds=1)).isoformat())
    assert before["release"] is None and before["history"] == []
    between = await asyncio.to_thread(history, t1)  # a change at T is in force at T
    assert between["release"] == "shop-v1" and [h["signed_by"] for h in between["history"]] == ["ann"]
    now = await asyncio.to_thread(history, None)
    assert now["release"] == "shop-v2" and [h["release"] for h in now["history"]] == ["shop-v2", "shop-v1"]
    assert now["history"][0]["previous"] == "shop-v1" and t2 >= t1
    got = await cli(settings, "alias", "get", "shop", "production", "--at", t1)
    assert got.exit_code == 0 and got.output.strip() == "shop-v1"
    listed = json.loads((await cli(settings, "alias", "list", "--json")).output)
    assert [(r["app"], r["alias"], r["release"]) for r in listed] == [("shop", "production", "shop-v2")]
    await bus.nc.flush()
    assert [(a.kind, a.actor, a.target, a.details["release"]) for a in audited] == [
        ("alias", "ann", "shop/production", "shop-v1"), ("alias", "ann", "shop/production", "shop-v2")]

    # Bad input: one line, an exit code.
    wrong_app = await cli(settings, "--as", "ann", "alias", "set", "shop", "production", "other-v1")
    assert wrong_app.exit_code == 2 and "is of app 'other', not 'shop'" in wrong_app.output
    missing = await cli(settings, "--as", "ann", "alias", "set", "shop", "production", "nope")
    assert missing.exit_code == 3 and len(missing.output.strip().splitlines()) == 1
    bad_time = await cli(settings, "history", "shop/production", "--at", "yesterday")
    assert bad_time.exit_code == 2 and "not an ISO 8601 time" in bad_time.output
    # Someone the trust file does not know cannot move production.
    from lockgate.identity import create_identity

    create_identity(settings, "mallory")
    refused = await cli(settings, "--as", "mallory", "alias", "set", "shop", "production", "shop-v1")
    assert refused.exit_code == 4 and "no person's" in refused.output

    # Someone with publish rights appends a record pointing production elsewhere, reusing ann's signature: it is
    # no part of the history (skipped, and said), so production still points where ann put it.
    subject = bus.subjects.alias("shop", "production")
    last = msgspec.json.decode((await bus.js.get_last_msg(bus.subjects.streams["provenance"].name, subject)).data,
                               type=AliasChanged)
    forged = msgspec.structs.replace(last, id="forged", release="shop-v1", previous=last.release, seq=last.seq + 1,
                                     prev_digest=chain.digest(last), time=datetime.now(UTC))
    await bus.js.publish(subject, encode(forged))
    skipped = await cli(settings, "history", "shop/production")
    assert skipped.exit_code == 0 and "shop/production now: shop-v2" in skipped.stderr, skipped.output
    assert "1 record skipped: not signed by a trusted person" in skipped.stderr
    # A record a trusted person signed that forks the history (another #2 after #1) breaks it: exit 4, named ...
    oldest = await bus.js.get_msg(bus.subjects.streams["provenance"].name, 1, subject=subject, next=True)
    first_record = msgspec.json.decode(oldest.data, type=AliasChanged)
    fork = chain.seal(person(settings, "ann", "operator"),
                      msgspec.structs.replace(first_record, id="fork", release="shop-v1", time=datetime.now(UTC)),
                      first_record)
    await bus.js.publish(subject, encode(fork))
    tampered = await cli(settings, "history", "shop/production")
    assert tampered.exit_code == 4 and "change #2 (shop-v1): expected record #3 here" in tampered.output
    assert len(tampered.stderr.strip().splitlines()) == 1
    # ... and nobody can build on a history that does not check out.
    on_top = await cli(settings, "--as", "ann", "alias", "set", "shop", "production", "shop-v1")
    assert on_top.exit_code == 4


async def test_sunset_artifacts_refuse_an_alias_and_deprecated_ones_warn(bus: Bus, settings: Settings) -> None:
    person(settings, "ann", "operator")
    old = await _release(bus, "shop-v1", "old")
    new = await _release(bus, "shop-v2", "new")
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()

    deprecated = await cli(settings, "--as", "ann", "artifact", "deprecate", new, "--sunset", later, "--reason", "v3")
    assert deprecated.exit_code == 0, deprecated.output
    warned = await cli(settings, "--as", "ann", "alias", "set", "shop", "production", "shop-v2")
    assert warned.exit_code == 0 and "warning:" in warned.output and "is deprecated" in warned.output

    sunset = await cli(settings, "--as", "ann", "artifact", "deprecate", old, "--successor", new, "--sunset", past)
    assert sunset.exit_code == 0, sunset.output
    refused = await cli(settings, "--as", "ann", "alias", "set", "shop", "production", "shop-v1")
    assert refused.exit_code == 4 and "uses sunset artifacts" in refused.output
    assert f"use its successor {new}" in refused.output
    now = await cli(settings, "alias", "get", "shop", "production")
    assert now.output.strip() == "shop-v2"  # nothing was appended

    unknown = await cli(settings, "--as", "ann", "artifact", "deprecate", "sha256:" + "0" * 64)
    assert unknown.exit_code == 3


def _aliased_repo(settings: Settings, tmp_path: Any) -> Any:
    """The gitops fixture folder with `gitshop/production` declared on release gitshop-base, and ann, an operator
    identity, to sign its moves."""
    import shutil
    from pathlib import Path

    repo = Path(shutil.copytree(Path(__file__).parents[1] / "fixtures" / "gitops", tmp_path / "repo"))
    (repo / "aliases").mkdir()
    (repo / "aliases" / "production.yaml").write_text(
        "kind: alias\nname: production\napp: gitshop\nrelease: gitshop-base\n")
    person(settings, "ann", "operator")
    return repo


async def test_aliases_declared_in_the_gitops_folder_are_planned_and_applied_signed(
        bus: Bus, settings: Settings, tmp_path: Any, run_services: Any) -> None:
    repo = _aliased_repo(settings, tmp_path)

    await run_services("lineage")  # the applied state's writer
    planned = await cli(settings, "plan", str(repo), "--json")
    assert planned.exit_code == 2
    [step] = [s for s in json.loads(planned.output)["steps"] if s["kind"] == "alias"]
    assert (step["action"], step["name"], step["release"]) == ("add", "gitshop/production", "gitshop-v1")

    applied = await cli(settings, "--as", "ann", "apply", str(repo))
    assert applied.exit_code == 0, applied.output
    now = json.loads((await cli(settings, "history", "gitshop/production", "--json")).output)
    assert now["release"] == "gitshop-v1" and now["history"][0]["origin"] == "gitops"  # not a Git repo here
    assert now["history"][0]["signed_by"] == "ann"
    assert (await cli(settings, "plan", str(repo))).exit_code == 0

    # Pointing it at the other release line is one change, applied as a second signed record.
    (repo / "aliases" / "production.yaml").write_text(
        "kind: alias\nname: production\napp: gitshop\nrelease: gitshop\n")
    assert (await cli(settings, "plan", str(repo))).exit_code == 2
    assert (await cli(settings, "--as", "ann", "apply", str(repo))).exit_code == 0
    now = json.loads((await cli(settings, "history", "gitshop/production", "--json")).output)
    assert now["release"].startswith("gitshop@") and [h["seq"] for h in now["history"]] == [2, 1]
    folder_release = now["release"]

    # Moved by hand outside Git: plan shows the drift as a change, apply points it back, then nothing to do.
    assert (await cli(settings, "--as", "ann", "alias", "set", "gitshop", "production", "gitshop-v1")).exit_code == 0
    drifted = await cli(settings, "plan", str(repo))
    assert drifted.exit_code == 2, drifted.output
    assert f"~ alias gitshop/production: live gitshop-v1, folder {folder_release}" in drifted.output
    [step] = [s for s in json.loads((await cli(settings, "plan", str(repo), "--json")).output)["steps"]
              if s["kind"] == "alias"]
    assert (step["action"], step["drift"], step["previous_release"], step["release"]) == (
        "change", True, "gitshop-v1", folder_release)
    back = await cli(settings, "--as", "ann", "apply", str(repo))
    assert back.exit_code == 0 and "applied: 1 change" in back.output, back.output
    now = json.loads((await cli(settings, "history", "gitshop/production", "--json")).output)
    assert now["release"] == folder_release and [h["seq"] for h in now["history"]] == [4, 3, 2, 1]
    assert (await cli(settings, "plan", str(repo))).exit_code == 0

    # An alias naming a release the folder does not hold: the file and the path inside it.
    (repo / "aliases" / "production.yaml").write_text("kind: alias\nname: production\napp: gitshop\nrelease: nope\n")
    bad = await cli(settings, "plan", str(repo))
    assert bad.exit_code == 1 and "aliases/production.yaml" in bad.output and "$.release" in bad.output


async def test_an_alias_moved_to_a_release_the_gate_does_not_admit_is_said(bus: Bus, settings: Settings) -> None:
    # Probe p23 F10: `production` moved to a release a person had just rejected (or one never gated) without a word,
    # while an application fetching its prompt by the alias serves it from then on.
    from lockgate.contracts import GateDecided
    from lockgate.signing import Signer, trust_file_path, trust_key

    person(settings, "ann", "operator")
    for name in ("shop-v1", "shop-v2", "shop-v3"):
        await _release(bus, name, name)
    await store_pass(bus, "shop-v1", settings)
    signer = Signer.generate()
    trust_key(trust_file_path(settings), signer.public)
    await store_decision(bus, signer.sign(GateDecided(release="shop-v2", rules=[], decision="BLOCK", artifacts={})))

    ok = await cli(settings, "--as", "ann", "alias", "set", "shop", "production", "shop-v1", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["admitted"] is True and "warning" not in ok.stderr
    for release, said in (("shop-v2", "is a BLOCK: a BLOCK admits nothing"), ("shop-v3", "shop-v3 has no gate decision")):
        moved = await cli(settings, "--as", "ann", "alias", "set", "shop", "production", release, "--json")
        assert moved.exit_code == 0, moved.output  # said, not refused: the change is made and signed
        doc = json.loads(moved.stdout)
        assert doc["changed"] is True and doc["admitted"] is False and said in doc["not_admitted"]
        assert said in moved.stderr and "an application reading shop/production now gets content" in moved.stderr


async def test_apply_says_what_alias_set_says_of_a_move(bus: Bus, settings: Settings, tmp_path: Any,
                                                        run_services: Any) -> None:
    # Probe p29 F6: apply moved `production` to a release with no gate decision, and to one using a deprecated
    # artifact, saying only "applied: 1 change" (`alias set` warned of both).
    repo = _aliased_repo(settings, tmp_path)
    await run_services("lineage")  # the applied state's writer

    ungated = "gitshop-v1 has no gate decision; an application reading gitshop/production now gets content the gate " \
              "does not admit"
    applied = await cli(settings, "--as", "ann", "apply", str(repo), "--json")
    assert applied.exit_code == 0, applied.output
    assert json.loads(applied.stdout)["warnings"] == [ungated]
    assert f"warning: {ungated}" in " ".join(applied.stderr.split())

    # Gated now, but its prompt deprecated; moved away by hand, then back by apply: the deprecation alone is said.
    await store_pass(bus, "gitshop-v1", settings)
    prompt = (await artifacts.release_of(bus, "gitshop-v1"))["artifacts"]["prompt/gitshop-system"]
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    assert (await cli(settings, "--as", "ann", "artifact", "deprecate", prompt, "--sunset", later)).exit_code == 0
    await _release(bus, "gitshop-v9", "other", app="gitshop")
    assert (await cli(settings, "--as", "ann", "alias", "set", "gitshop", "production", "gitshop-v9")).exit_code == 0
    back = await cli(settings, "--as", "ann", "apply", str(repo))
    assert back.exit_code == 0 and "applied: 1 change" in back.stdout, back.output
    said = " ".join(back.stderr.split())
    assert f"warning: prompt/gitshop-system {prompt[:19]} is deprecated" in said, said
    assert "does not admit" not in said
