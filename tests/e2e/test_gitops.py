"""`lockgate plan` and `apply` as a CI job runs them, on a running stack with auth on, over a Git repo made
from tests/fixtures/gitops."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import test_cli
from tests.e2e.test_cli import run

pytestmark = pytest.mark.timeout(300)

stack = test_cli.stack  # the same module-scoped `lockgate dev up`, started once for this module

FIXTURE = Path(__file__).parents[1] / "fixtures" / "gitops"
GIT_ENV = {"GIT_AUTHOR_NAME": "Ann", "GIT_AUTHOR_EMAIL": "ann@example.com", "GIT_COMMITTER_NAME": "Ann",
           "GIT_COMMITTER_EMAIL": "ann@example.com"}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(repo), **GIT_ENV}).stdout.strip()


def _plan(stack: dict[str, str], repo: Path, *extra: str) -> tuple[int, dict]:
    proc = run("plan", str(repo), "--json", *extra, env=stack, check=False)
    assert proc.returncode in (0, 2), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_plan_apply_plan_is_idempotent_and_edits_show_as_changes(stack: dict[str, str], tmp_path: Path) -> None:
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "the truth")
    head = _git(repo, "rev-parse", "HEAD")

    # A fresh stack: everything is new, and CI sees exit 2.
    code, plan = _plan(stack, repo)
    assert code == 2 and plan["summary"]["add"] == 11 and {s["action"] for s in plan["steps"]} == {"add"}
    table = run("plan", str(repo), env=stack, check=False)
    assert table.returncode == 2 and "+ add" in table.stdout and "11 to add, 0 to change" in table.stdout
    assert f"commit {head[:10]}" in table.stdout

    applied = run("apply", str(repo), env=stack)
    assert "applied: 11 changes" in applied.stdout
    # The folder's budget document is desired state only: `budget list` says which budgets the router enforces
    # (before: "no budgets declared", right after apply had recorded one).
    budgets = " ".join(run("budget", "list", env=stack).stdout.split())  # as one line, however the terminal wraps
    assert "no budget counters this period" in budgets and "sets no gateway file" in budgets, budgets
    assert "GitOps `kind: budget`" in budgets, budgets

    # Applied: nothing to do, and every entry names the commit that applied it, clean.
    code, plan = _plan(stack, repo)
    assert code == 0 and plan["summary"]["unchanged"] == 11
    assert {(s["commit"], s["dirty"]) for s in plan["steps"]} == {(head, False)}
    assert plan["git"] == {"commit": head, "author": "Ann <ann@example.com>", "dirty": False}
    assert "nothing to do" in run("apply", str(repo), env=stack).stdout
    release = {s["name"]: s["release"] for s in plan["steps"] if s["kind"] == "release"}
    assert release["gitshop-base"] == "gitshop-v1" and release["gitshop"].startswith("gitshop@")
    _gate_and_canary(stack, repo, release["gitshop"], {s["kind"]: s["digest"] for s in plan["steps"]
                                                       if s["kind"] in ("suite", "policy")})

    # An edited prompt: one artifact changes, its release line gets a new version, the deployment follows.
    _edit(repo / "prompts" / "answer.yaml", "no punctuation.", "no punctuation at all.")
    code, plan = _plan(stack, repo)
    changes = {(s["kind"], s["name"]): s for s in plan["steps"] if s["action"] == "change"}
    assert code == 2 and set(changes) == {("prompt", "gitshop-answer"), ("release", "gitshop"),
                                          ("deployment", "gitshop-web")}
    new = changes[("release", "gitshop")]
    assert new["previous_release"] == release["gitshop"] and new["release"] not in ("", release["gitshop"])
    assert plan["git"]["dirty"] is True
    assert "~ change" in run("plan", str(repo), env=stack, check=False).stdout

    run("apply", str(repo), env=stack)
    code, plan = _plan(stack, repo)
    _settled(code, plan, release["gitshop"])
    prompt = next(s for s in plan["steps"] if s["name"] == "gitshop-answer")
    assert (prompt["commit"], prompt["dirty"]) == (head, True)  # applied from uncommitted changes: said so
    # The new version is a bound, immutable release like any other.
    [model] = [s for s in plan["steps"] if s["kind"] == "model_config"]
    rebind = run("release", "create", new["release"], "--app", "gitshop", "--artifact",
                 f"model_config/other={model['digest']}", env=stack, check=False)
    assert rebind.returncode != 0 and "already registered with other content" in rebind.stderr

    # A pinned release name cannot take other content: plan and apply fail, nothing is applied.
    _edit(repo / "prompts" / "system.yaml", "Be brief.", "Be very brief.")
    refused = run("plan", str(repo), env=stack, check=False)
    assert refused.returncode == 1
    assert "releases/gitshop-base.yaml" in refused.stderr and "'gitshop-v1' is already bound" in refused.stderr
    not_applied = run("apply", str(repo), env=stack, check=False)
    assert not_applied.returncode == 1 and "nothing was applied" in not_applied.stderr
    _edit(repo / "prompts" / "system.yaml", "Be very brief.", "Be brief.")
    _settled(*_plan(stack, repo), release["gitshop"])

    # An invalid file: exit 1, one line naming the file and the path inside it.
    (repo / "deployments" / "bad.yaml").write_text(
        "kind: deployment\nname: bad\napp: gitshop\nstable: gitshop-base\nrollout: {steps: [10, fifty]}\n")
    bad = run("plan", str(repo), env=stack, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "deployments/bad.yaml" in bad.stderr and "$.rollout.steps[1]" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    (repo / "deployments" / "bad.yaml").unlink()

    # What left the folder is kept (and said so) unless pruned.
    (repo / "budgets" / "gitshop.yaml").unlink()
    code, plan = _plan(stack, repo)
    _settled(code, plan, release["gitshop"])
    assert plan["summary"]["orphan"] == 1
    code, plan = _plan(stack, repo, "--prune")
    assert code == 2 and [(s["action"], s["name"]) for s in plan["steps"] if s["action"] == "remove"] == [
        ("remove", "gitshop-monthly")]
    run("apply", str(repo), "--prune", env=stack)
    code, plan = _plan(stack, repo)
    _settled(code, plan, release["gitshop"])
    assert plan["summary"]["orphan"] == 0 and plan["summary"]["unchanged"] == 10


def _settled(code: int, plan: dict, named: str) -> None:
    """Nothing for apply to do. The router steps the canary the folder named before its prompt was edited (`named`)
    on its own: while it rolls out, the route's canary is not the one the folder names now (drift on `canary`), and
    once promoted gitshop-web serves it as stable, which the folder no longer names (drift on `stable`); the plan
    shows that drift (exit 2), and no other."""
    drift = [s for s in plan["steps"] if s["drift"]]
    assert all((s["kind"], s["name"]) == ("deployment", "gitshop-web") for s in drift), drift
    assert all((d["field"], d["live"].split()[0]) in {("stable", named), ("canary", named)}
               for s in drift for d in s["differences"]), drift
    assert plan["summary"]["drift"] == len(drift) and not plan["errors"]
    assert code == (2 if drift else 0) and not any(plan["summary"][a] for a in ("add", "change", "remove"))


def _gate_and_canary(stack: dict[str, str], repo: Path, canary: str, applied: dict[str, str]) -> None:
    """README's GitOps flow after `apply`: gate the base release with the folder's suite and policy documents, roll
    it out, gate the release line's version against it, start the canary. Found by a new user: the documents were
    refused ("unknown field `kind`"), and the simulator `dev up` starts answered 5 of the suite's 20 cases (BLOCK)."""
    suite, policy = str(repo / "suites" / "qa.yaml"), str(repo / "policies" / "default.yaml")

    def gate(*args: str) -> dict:
        proc = run("eval", "run", suite, *args, "--policy", policy, "--json", env=stack, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result = json.loads(proc.stdout)
        assert result["decision"]["decision"] == "PASS" and result["metrics"]["exact_match"] == 1.0, result
        return result

    base = gate("--candidate", "gitshop-v1")
    # The run judged the artifacts apply registered (the dataset named by its document), nothing registered anew.
    [row] = json.loads(run("sql", f"SELECT suite, policy FROM eval_runs WHERE run_id = '{base['run_id']}'", "--json",
                           env=stack).stdout)
    assert row == {"suite": applied["suite"], "policy": applied["policy"]}
    run("rollout", "start", "gitshop-web", "--stable", "gitshop-v1", env=stack)
    gate("--candidate", canary, "--baseline", "gitshop-v1")
    started = run("rollout", "start", "gitshop-web", "--stable", "gitshop-v1", "--canary", canary, "--json", env=stack)
    route = json.loads(started.stdout)
    assert (route["stable"]["release"], route["canary"]["release"]) == ("gitshop-v1", canary), route
    _rolls_out_as_the_folder_says(stack, repo, canary, started)

    # A document edited since the apply is not what the releases bind: refused before anything runs, in one line.
    _edit(repo / "suites" / "qa.yaml", "[exact_match, token_f1]", "[exact_match]")
    stale = run("eval", "run", suite, "--candidate", canary, env=stack, check=False)
    assert stale.returncode == 2 and len(stale.stderr.strip().splitlines()) == 1, stale.stderr
    assert "is not the suite its folder applied" in stale.stderr and f"apply {repo} first" in stale.stderr
    _edit(repo / "suites" / "qa.yaml", "[exact_match]", "[exact_match, token_f1]")


def _rolls_out_as_the_folder_says(stack: dict[str, str], repo: Path, canary: str, started: Any) -> None:
    """The canary runs the applied document's `rollout:` (deployments/gitshop-web.yaml: steps 10, 50, 100 every 300 s),
    says so, and `plan` is clean; an option over it is said to differ from the folder, and `plan` shows it. Found by a
    probe (p23 F4): `rollout start` sent no strategy, and the canary ran the router's 10, 25, 50, 100 every second."""
    route = json.loads(run("rollout", "get", "gitshop-web", "--json", env=stack).stdout)
    assert route["canary"]["release"] == canary and route["weight"] in (0.0, 10.0), route
    assert route["strategy"] and (route["strategy"]["steps"], route["strategy"]["interval_s"]) == (
        [10.0, 50.0, 100.0], 300.0), route
    commit = _git(repo, "rev-parse", "HEAD")[:10]
    said = " ".join(started.stderr.split())  # on stderr: --json keeps stdout the route's JSON
    assert ("gitshop-web: steps 10, 50, 100 every 300 s, from the applied document deployments/gitshop-web.yaml at "
            f"commit {commit}") in said, said
    assert "steps 10, 50, 100 every 300 s" in run("rollout", "get", "gitshop-web", env=stack).stdout
    code, plan = _plan(stack, repo)
    assert code == 0 and not plan["summary"]["drift"], plan

    # --steps over the document: said, and the plan shows the steps the route runs against the folder's.
    other = run("rollout", "start", "gitshop-web", "--stable", "gitshop-v1", "--canary", canary, "--steps", "20,100",
                env=stack)
    said = " ".join(other.stdout.split())
    assert ("gitshop-web: steps 20, 100 every 300 s, by --steps over the applied document "
            f"deployments/gitshop-web.yaml at commit {commit}, which says steps 10, 50, 100 every 300 s: the live route "
            "differs from the folder") in said, said
    code, plan = _plan(stack, repo)
    [step] = [s for s in plan["steps"] if s["kind"] == "deployment"]
    assert code == 2 and step["differences"] == [{"field": "steps", "live": "20, 100", "folder": "10, 50, 100"}], step
    run("rollout", "start", "gitshop-web", "--stable", "gitshop-v1", "--canary", canary, env=stack)  # as the folder says
    assert _plan(stack, repo)[0] == 0


def test_plan_without_a_stack_fails_fast_for_ci(tmp_path: Path) -> None:
    env = {**os.environ, "LOCKGATE_HOME": str(tmp_path), "LOCKGATE_NATS_URL": "nats://127.0.0.1:1"}
    proc = run("plan", str(FIXTURE), env=env, check=False)
    assert proc.returncode == 1 and "no lockgate stack answers" in proc.stderr and "Traceback" not in proc.stderr


def _no_stack(home: Path) -> dict[str, str]:
    return {**os.environ, "LOCKGATE_HOME": str(home), "LOCKGATE_NATS_URL": "nats://127.0.0.1:1"}


@pytest.mark.parametrize("folder", ["deploy", "deploy/prompts"])
def test_plan_refuses_a_folder_git_would_read_as_a_bare_repository_and_runs_nothing(tmp_path: Path,
                                                                                   folder: str) -> None:
    # Found by a probe: a bare repository's files committed beside the documents (HEAD, config, objects/, refs/)
    # made git take the folder for a Git directory and obey its `config`: `plan` (viewer, run by CI on pull
    # requests) ran its `core.fsmonitor` command.
    marker = tmp_path / "PWNED"
    repo = tmp_path / "repo"
    deploy = repo / "deploy"
    shutil.copytree(FIXTURE / "prompts", deploy / "prompts")
    (deploy / "objects").mkdir()
    (deploy / "refs" / "heads").mkdir(parents=True)
    (deploy / "objects" / ".keep").write_text("")
    (deploy / "refs" / "heads" / ".keep").write_text("")
    (deploy / "HEAD").write_text("ref: refs/heads/main\n")
    (deploy / "config").write_text(f'[core]\n\trepositoryformatversion = 0\n\tbare = false\n\tworktree = .\n'
                                   f'\tfsmonitor = "echo pwned > {marker}; false"\n')
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "a bare repository's files beside the documents")
    proc = run("plan", str(repo / folder), env=_no_stack(tmp_path / "home"), check=False)
    assert not marker.exists()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "holds a Git directory's files" in proc.stderr, proc.stderr


def test_plan_runs_no_command_the_repository_configures(tmp_path: Path) -> None:
    # A work tree whose own .git/config names a command (a folder handed over with its .git): git runs none.
    marker = tmp_path / "PWNED"
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "x")
    _git(repo, "config", "core.fsmonitor", f"echo fsmonitor >> {marker}; false")
    proc = run("plan", str(repo), env=_no_stack(tmp_path / "home"), check=False)
    assert proc.returncode == 1 and "no lockgate stack answers" in proc.stderr  # it got as far as the stack
    assert not marker.exists(), marker.read_text()


def test_plan_refuses_a_document_linked_from_outside_the_folder(tmp_path: Path) -> None:
    # Found by a probe: a committed symbolic link to a document outside the repository was applied under the
    # commit with `git.dirty=false`, and again, with other content, after the outside file changed.
    outside = tmp_path / "outside.yaml"
    outside.write_text("kind: prompt\nname: gitshop-ext\nspec: {system: outside the repository}\n")
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    (repo / "prompts" / "ext.yaml").symlink_to(outside)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "x")
    proc = run("plan", str(repo), env=_no_stack(tmp_path / "home"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "prompts/ext.yaml is refused: it is a symbolic link" in proc.stderr and "outside the folder" in proc.stderr


@pytest.mark.parametrize("value", ["1", "2.5", "true", "'text'"])
def test_plan_refuses_a_scalar_inline_spec_in_one_line(tmp_path: Path, value: str) -> None:
    # Found by a probe: `spec: 1` (2.5, true) printed a 45-line traceback from hashing the content.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.yaml").write_text(f"kind: policy\nname: p\nspec: {value}\n")
    proc = run("plan", str(tmp_path / "docs"), env=_no_stack(tmp_path / "home"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "document x.yaml is invalid: inline content is a mapping or a list" in proc.stderr
    assert "at `$.spec`" in proc.stderr
