"""A Git folder's documents read one way to lockgate and to whoever reviews them (probe p20 F3, F8): a key given
twice, or a plain YAML scalar YAML 1.1 and 1.2 read as different values, makes `plan` and `apply` fail naming the file,
line and path, and nothing is applied; a document named `*.YAML` is read; a hidden one is not, and `plan` says so."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.gitops.state import read_state
from tests.helpers import recorder
from tests.integration.test_aliases import cli

pytestmark = pytest.mark.timeout(60)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "gitops"


def _git(repo: Path, *args: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(repo), "GIT_AUTHOR_NAME": "Bo", "GIT_AUTHOR_EMAIL": "bo@example.com",
           "GIT_COMMITTER_NAME": "Bo", "GIT_COMMITTER_EMAIL": "bo@example.com"}
    subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True, env=env)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


async def test_a_document_read_two_ways_is_refused_by_plan_and_apply_and_nothing_is_applied(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    async with recorder(bus, settings):
        assert (await cli(settings, "apply", str(repo))).exit_code == 0
    applied = await read_state(bus)
    policy = repo / "policies" / "default.yaml"
    original = policy.read_text()

    # Before (probe p20 F3): `plan` exited 2 with an ordinary `~ change policy gitshop-gate` and apply stored
    # `threshold: 0.0`, where the reviewer of the pull request read 0.8.
    _edit(policy, "threshold: 0.8}", "threshold: 0.8, threshold: 0.0}")
    said = ('document policies/default.yaml is refused: key "threshold" is given twice, on lines 8 and 8 (readers '
            "differ on which one counts) - at `$.spec.rules[0].threshold`")
    # A block mapping's second `rules:` far below the first reads the same way to no two readers.
    far = original + "\n" * 40 + "  rules: []\n"
    said_far = 'key "rules" is given twice, on lines 7 and 50'
    # YAML 1.1 reads `0300` as 192 (octal), YAML 1.2 and most reviewers as 300.
    deployment = repo / "deployments" / "gitshop-web.yaml"
    said_octal = ("document deployments/gitshop-web.yaml is refused: 0300 (line 9) is the number 192 to a YAML 1.1 "
                  "reader (lockgate's) and the number 300 to a YAML 1.2 one")
    for what, edit, expected in (("duplicate key", lambda: None, said),
                                 ("far apart", lambda: policy.write_text(far), said_far),
                                 ("octal", lambda: (policy.write_text(original),
                                                    _edit(deployment, "interval_s: 300", "interval_s: 0300")),
                                  said_octal)):
        edit()
        planned = await cli(settings, "plan", str(repo))
        assert planned.exit_code == 1, (what, planned.output)
        assert expected in " ".join(planned.output.split()), (what, planned.output)
        async with recorder(bus, settings):
            refused = await cli(settings, "apply", str(repo), "--json")
        assert refused.exit_code == 1 and expected in json.loads(refused.stdout)["error"], (what, refused.output)
        assert await read_state(bus) == applied, what  # nothing applied

    _edit(deployment, "interval_s: 0300", "interval_s: 300")
    assert (await cli(settings, "plan", str(repo))).exit_code == 0  # the folder as applied


async def test_plan_reads_an_upper_case_suffix_and_names_the_hidden_files_it_does_not_read(
        bus: Bus, settings: Settings, tmp_path: Path) -> None:
    # Before (probe p20 F8): `releases/new.YAML`, `releases/.y.yaml` and `.hidden/x.yaml`, each a valid release
    # document, committed: `plan` said "0 to add, ... 11 unchanged" and exited 0, so a pull request adding one passed
    # a "plan is clean after apply" check and its reviewer believed it applied.
    repo = Path(shutil.copytree(FIXTURE, tmp_path / "repo"))
    async with recorder(bus, settings):
        assert (await cli(settings, "apply", str(repo))).exit_code == 0
    release = (repo / "releases" / "gitshop.yaml").read_text().replace("name: gitshop\n", "name: gitshop2\n")
    (repo / "releases" / "new.YAML").write_text(release)
    (repo / "releases" / ".y.yaml").write_text(release.replace("gitshop2", "gitshop3"))
    (repo / ".hidden").mkdir()
    (repo / ".hidden" / "x.yml").write_text(release.replace("gitshop2", "gitshop4"))
    await asyncio.to_thread(_git, repo, "init", "-q")
    (repo / ".git" / "notes.yaml").write_text("version control's own: not named\n")

    planned = await cli(settings, "plan", str(repo), "--json")
    assert planned.exit_code == 2, planned.output
    plan = json.loads(planned.stdout)
    assert [(s["action"], s["name"], s["source"]) for s in plan["steps"] if s["action"] != "unchanged"] == [
        ("add", "gitshop2", "releases/new.YAML")]
    assert plan["not_read"] == [".hidden/x.yml", "releases/.y.yaml"]
    table = await cli(settings, "plan", str(repo))
    assert ("not read: 2 hidden YAML files (lockgate reads no hidden file or folder; rename one to apply it): "
            ".hidden/x.yml, releases/.y.yaml") in " ".join(table.stdout.split()), table.output


async def test_eval_run_refuses_a_policy_file_with_a_key_given_twice(bus: Bus, settings: Settings,
                                                                     tmp_path: Path) -> None:
    # Plain files read as folder documents are (probe p20 F3: `eval run --policy FILE` took the last `threshold`).
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ndataset: sha256:" + "0" * 64 + "\nprompt: {template: '{question}'}\nscorers: [exact_match]\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: p\nrules:\n  - name: acc\n    metric: exact_match\n    op: '>='\n    threshold: 0.8\n"
                      "    threshold: 0.0\n")
    result = await cli(settings, "eval", "run", str(suite), "--candidate", "r1", "--policy", str(policy),
                       "--timeout", "2")
    assert result.exit_code == 2, result.output
    assert (f'policy {policy} is refused: key "threshold" is given twice, on lines 6 and 7 (readers differ on which '
            "one counts) - at `$.rules[0].threshold`") in " ".join(result.output.split())


@pytest.mark.parametrize(("name", "text", "said"), [
    ("infcli.pol", '{"name": "p", "rules": [{"metric": "m", "op": ">=", "threshold": 1}, {"name": "per-slice", '
                   '"metric": "m", "slices": {"max_regression": 1.0e+999}}]}',
     "max_regression must be a finite number, got inf - at `$.rules[1].slices.max_regression`"),
    ("policy.json", '{"name": "p", "rules": [{"metric": "m", "non_inferiority": {"margin": 1.0e+999}}]}',
     "margin must be a finite number, got inf - at `$.rules[0].non_inferiority.margin`"),
    ("policy.yaml", "name: p\nrules: [{metric: m, relative: {max_regression: .inf}}]\nreview: {require_when: "
                    "[{metric_moved: m, by: .inf}]}\n",
     "max_regression must be a finite number, got inf - at `$.rules[0].relative.max_regression`"),
    ("policy.yaml", "name: p\nrules: [{metric: m, op: '>=', threshold: 1}]\nreview: {require_when: "
                    "[{metric_moved: m, by: .inf}]}\n",
     "by must be a finite number, got inf - at `$.review.require_when[0].by`"),
])
async def test_eval_run_refuses_a_policy_with_a_number_json_cannot_carry(
        bus: Bus, settings: Settings, tmp_path: Path, name: str, text: str, said: str) -> None:
    # Before (probe p68 F1): msgspec took `inf` for a margin that must be >= 0, a file of another suffix was stored as
    # its bytes, and the gatekeeper signed a decision whose threshold (-inf) was written null, which no reader decoded.
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ndataset: sha256:" + "0" * 64 + "\nprompt: {template: '{question}'}\nscorers: [exact_match]\n")
    policy = tmp_path / name
    policy.write_text(text)
    result = await cli(settings, "eval", "run", str(suite), "--candidate", "r1", "--policy", str(policy),
                       "--timeout", "2")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: policy {policy} is invalid: {said}"], result.output
