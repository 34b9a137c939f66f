"""Two CLI commands changing one document of the home at once (`keys create` with `keys revoke`, `gate trust --person`
with `gate revoke --person`): each keeps the other's change.

Each command runs in a process of its own, the CLI invoked as a user invokes it; a barrier releases the two together
once per trial, on a home whose document holds a few thousand entries (so reading and writing it takes a while, as in
an install that has run for long). Before (probe p37 F5), both said they succeeded and one change was lost in most
trials: a revoked key kept authenticating, a revoked person's key stayed trusted."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lockgate.server.apikeys import ApiKey, AuthError, KeyStore
from lockgate.signing import Person, Signer, TrustFile, key_id, public_pem, read_trust_file

pytestmark = pytest.mark.timeout(60)

TRIALS = 20
ENTRIES = 2000  # without the lock, a change was lost in 20 of 20 trials of keys and 10 of 20 of the trust file
# Nothing listens on port 1: the commands' audit records say at once that no stack answers, and the change is made.
NO_STACK = {"LOCKGATE_NATS_URL": "nats://127.0.0.1:1"}

Command = tuple[list[str], dict[str, str]]  # CLI arguments, environment


def _run(side: int, commands: list[Command], barrier: Any, results: Any) -> None:
    """Run one side's commands, one per trial, each as soon as the barrier releases both sides."""
    from click.testing import CliRunner

    from lockgate.cli.main import cli

    for trial, (args, env) in enumerate(commands):
        barrier.wait(timeout=30)
        done = CliRunner().invoke(cli, args, env=env)
        results.put((trial, side, done.exit_code, done.output))


def at_once(first: list[Command], second: list[Command]) -> list[tuple[tuple[int, str], tuple[int, str]]]:
    """Run first[i] and second[i] together for each trial i; each trial's (exit code, output) of both."""
    ctx = multiprocessing.get_context("spawn")  # not fork: the test process may hold threads and locks
    barrier, results = ctx.Barrier(2), ctx.Queue()
    sides = [ctx.Process(target=_run, args=(side, commands, barrier, results))
             for side, commands in enumerate((first, second))]
    for process in sides:
        process.start()
    outcomes: dict[tuple[int, int], tuple[int, str]] = {}
    try:
        for _ in range(2 * len(first)):
            trial, side, code, output = results.get(timeout=45)
            outcomes[trial, side] = code, output
    finally:
        for process in sides:
            process.join(timeout=10)
            process.kill()
    return [(outcomes[trial, 0], outcomes[trial, 1]) for trial in range(len(first))]


def test_a_key_revoked_while_another_is_created_stays_revoked_and_both_are_kept(tmp_path: Path) -> None:
    pad = [ApiKey(id=f"pad{i:05}", hash=f"{i:064x}", tenant="acme", app=f"pad{i}", created_at=1.0)
           for i in range(ENTRIES)]
    padded = msgspec.json.encode({"keys": pad})
    homes, leaked = [], []
    for trial in range(TRIALS):
        home = tmp_path / f"home{trial}"
        home.mkdir()
        (home / "apikeys.json").write_bytes(padded)
        leaked.append(KeyStore(home).create("acme", "support", description="leaked"))
        homes.append(home)
    revokes = [(["keys", "--home", str(home), "revoke", rec.id], NO_STACK)
               for home, (_, rec) in zip(homes, leaked, strict=True)]
    creates = [(["keys", "--home", str(home), "create", "--tenant", "ci", "--app", "job"], NO_STACK) for home in homes]

    ran = zip(homes, leaked, at_once(revokes, creates), strict=True)
    lost = []
    for trial, (home, (plain, rec), ((revoked, said), (created, shown))) in enumerate(ran):
        assert (revoked, created) == (0, 0), (said, shown)
        assert f"revoked key {rec.id}" in said
        keys = KeyStore(home)
        if _authenticates(keys, plain):
            lost.append(f"trial {trial}: the revoked key still authenticates")
        if not _authenticates(keys, shown.splitlines()[-1]):  # the key `keys create` printed
            lost.append(f"trial {trial}: the key created is gone")
    assert lost == []


def _authenticates(keys: KeyStore, plain: str) -> bool:
    try:
        keys.authenticate(plain)
    except AuthError:
        return False
    return True


def test_a_person_revoked_while_another_is_trusted_stays_revoked_and_both_are_kept(tmp_path: Path) -> None:
    def person(signer: Signer) -> Person:
        return Person(key_id=signer.key_id, key=public_pem(signer.public).decode(), roles=["approver"])

    mallory, bob = Signer.generate(), Signer.generate()
    people = {f"p{i}": person(Signer.generate()) for i in range(ENTRIES)} | {"mallory": person(mallory)}
    padded = msgspec.json.format(msgspec.json.encode(TrustFile(people=people)))
    (tmp_path / "bob.pub").write_bytes(public_pem(bob.public))
    homes = []
    for trial in range(TRIALS):
        home = tmp_path / f"home{trial}"
        home.mkdir()
        (home / "trust.json").write_bytes(padded)
        homes.append(home)
    env = [{**NO_STACK, "LOCKGATE_HOME": str(home), "LOCKGATE_TRUST_FILE": ""} for home in homes]
    revokes = [(["gate", "revoke", "--person", "mallory"], e) for e in env]
    trusts = [(["gate", "trust", "--person", "bob", "--role", "approver", str(tmp_path / "bob.pub")], e) for e in env]

    ran = zip(homes, at_once(revokes, trusts), strict=True)
    lost = []
    for trial, (home, ((revoked, said), (trusted, told))) in enumerate(ran):
        assert (revoked, trusted) == (0, 0), (said, told)
        data = read_trust_file(home / "trust.json")
        if mallory.key_id not in data.revoked:
            lost.append(f"trial {trial}: mallory's key is not revoked")
        if "bob" not in data.people:
            lost.append(f"trial {trial}: bob is not trusted")
    assert lost == []
    assert data.people["bob"].key_id == key_id(bob.public) and len(data.people) == ENTRIES + 2


def test_the_documents_are_written_whole_and_the_lock_beside_them_is_the_owners_only(tmp_path: Path) -> None:
    KeyStore(tmp_path).create("acme", "shop")
    lock = tmp_path / ".apikeys.json.lock"
    assert lock.is_file() and oct(lock.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".apikeys.json.lock", "apikeys.json"]  # no temporary left
    assert oct(os.stat(tmp_path / "apikeys.json").st_mode & 0o777) == "0o600"
