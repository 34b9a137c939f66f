"""GitOps without a stack: folder documents resolve to content-hashed resources, and the plan against an
applied state says what apply would add, change, leave or remove (and refuses to rebind a release)."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest

from lockgate import artifacts
from lockgate.errors import ConfigError
from lockgate.gitops.documents import GitopsError, load_folder
from lockgate.gitops.plan import Difference, Serving, StateEntry, diff, differences
from lockgate.gitops.resolve import Resource, resolve

pytestmark = pytest.mark.timeout(10)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "gitops"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "repo"))


def _applied(desired: list[Resource]) -> dict[str, StateEntry]:
    return {r.key: StateEntry(kind=r.kind, name=r.name, digest=r.digest, release=r.release, commit="abc")
            for r in desired}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_fresh_stack_gets_everything_added(folder: Path) -> None:
    plan = diff(resolve(load_folder(folder)), {}, {})
    assert {s.action for s in plan.steps} == {"add"} and plan.count("add") == 11
    assert plan.exit_code == 2
    kinds = [s.kind for s in plan.steps]  # dependency order: artifacts, then releases, then what names them
    assert kinds.index("release") > kinds.index("policy") and kinds.index("deployment") > kinds.index("release")


def test_the_same_folder_again_is_nothing_to_do(folder: Path) -> None:
    desired = resolve(load_folder(folder))
    again = resolve(load_folder(folder))
    assert [r.digest for r in desired] == [r.digest for r in again]  # a pure function of the content
    plan = diff(again, _applied(desired), {r.release: r.digest for r in desired if r.kind == "release"})
    assert plan.exit_code == 0 and plan.count("unchanged") == 11 and not plan.changes
    assert all(s.commit == "abc" for s in plan.steps)  # what applied the current state


def test_formatting_and_key_order_do_not_change_content(folder: Path) -> None:
    desired = resolve(load_folder(folder))
    path = folder / "models" / "sim-stable.yaml"
    path.write_text("# reordered\nkind: model_config\nname: gitshop-sim-stable\n"
                    "spec: {temperature: 0, endpoint: default, model: sim-stable}\n")
    assert diff(resolve(load_folder(folder)), _applied(desired), {}).exit_code == 0


def test_an_edited_prompt_is_one_change_and_a_new_release_version(folder: Path) -> None:
    before = resolve(load_folder(folder))
    _edit(folder / "prompts" / "answer.yaml", "no punctuation.", "no punctuation at all.")
    plan = diff(resolve(load_folder(folder)), _applied(before), {})
    changed = {(s.kind, s.name) for s in plan.changes}
    # the prompt, the release line that names it (a new version) and the deployment whose canary follows it
    assert changed == {("prompt", "gitshop-answer"), ("release", "gitshop"), ("deployment", "gitshop-web")}
    release = next(s for s in plan.changes if s.kind == "release")
    assert release.previous_release.startswith("gitshop@") and release.release.startswith("gitshop@")
    assert release.release != release.previous_release
    assert sum(1 for s in plan.changes if s.kind not in ("release", "deployment")) == 1
    assert plan.exit_code == 2


def test_a_pinned_release_bound_to_other_content_is_an_error(folder: Path) -> None:
    before = resolve(load_folder(folder))
    bound = {r.release: r.digest for r in before if r.kind == "release"}
    _edit(folder / "prompts" / "system.yaml", "Be brief.", "Be very brief.")
    plan = diff(resolve(load_folder(folder)), _applied(before), bound)
    assert plan.exit_code == 1
    [error] = plan.errors
    assert "releases/gitshop-base.yaml" in error and "'gitshop-v1' is already bound" in error
    assert "`$.release`" in error


def test_what_left_the_folder_is_kept_unless_pruned(folder: Path) -> None:
    desired = resolve(load_folder(folder))
    (folder / "budgets" / "gitshop.yaml").unlink()
    now = resolve(load_folder(folder))
    kept = diff(now, _applied(desired), {})
    assert [(s.action, s.kind) for s in kept.steps if s.action != "unchanged"] == [("orphan", "budget")]
    assert kept.exit_code == 0
    pruned = diff(now, _applied(desired), {}, prune=True)
    assert [(s.action, s.name) for s in pruned.changes] == [("remove", "gitshop-monthly")]
    assert pruned.exit_code == 2


@pytest.mark.parametrize(("path", "text", "names"), [
    ("deployments/bad.yaml", "kind: deployment\nname: d\napp: gitshop\nstable: gitshop-base\n"
                             "rollout: {steps: [10, fifty]}\n", "`$.rollout.steps[1]`"),
    ("prompts/bad.yaml", "kind: prompt\nname: p\n", "`$.spec`"),
    ("prompts/bad.yaml", "kind: promt\nname: p\nspec: {}\n", "`$.kind`"),
    ("prompts/bad.yaml", "kind: prompt\nname: 'has space'\nspec: {}\n", "`$.name`"),
    ("releases/bad.yaml", "kind: release\nname: r\napp: gitshop\nartifacts: [prompt/missing]\n", "`$.artifacts[0]`"),
    ("deployments/bad.yaml", "kind: deployment\nname: d\napp: gitshop\nstable: nope\n", "`$.stable`"),
    ("deployments/bad.yaml", "kind: deployment\nname: d\napp: other\nstable: gitshop\n", "`$.stable`"),
    ("suites/bad.yaml", "kind: suite\nname: s\nspec: {name: s, prompt: {template: x}, dataset: nope, "
                        "scorers: [exact_match]}\n", "`$.spec.dataset`"),
    ("suites/bad.yaml", "kind: suite\nname: s\nspec: {name: s, prompt: {template: x}, dataset: gitshop-qa, "
                        "scorers: [exact_match], repeats: 0}\n", "`$.spec.repeats`"),
    ("policies/bad.yaml", "kind: policy\nname: p\nspec: {name: p, rules: [{name: a, metric: m, op: '>=', "
                          "threshold: x}]}\n", "`$.spec.rules[0].threshold`"),
    ("prompts/bad.yaml", "kind: prompt\nname: gitshop-answer\nspec: {}\n", "already defined in prompts/answer.yaml"),
    ("datasets/bad.yaml", "kind: dataset\nname: d\nfile: ../../outside.jsonl\n", "`$.file`"),
    ("datasets/bad.yaml", "kind: dataset\nname: d\nfile: missing.jsonl\n", "`$.file`"),
    ("prompts/bad.yaml", "kind: prompt\nname: p\nspec: [unclosed\n", "not valid YAML"),
    # The bounds of the registration a document becomes, at `plan` (before, an `apply` stopped half-way there).
    ("prompts/bad.yaml", "kind: prompt\nname: p\nspec: {}\nlabels: {team: " + "x" * 2000 + "}\n", "`$.labels[...]`"),
    ("prompts/bad.yaml", "kind: prompt\nname: p\nspec: {}\ndescription: " + "x" * 5000 + "\n", "`$.description`"),
])
def test_an_invalid_document_names_its_file_and_the_path_inside_it(folder: Path, path: str, text: str,
                                                                    names: str) -> None:
    (folder / path).write_text(text)
    with pytest.raises(GitopsError) as err:
        resolve(load_folder(folder))
    assert path in err.value.message and names in err.value.message, err.value.message
    assert err.value.exit_code == 1


def test_hidden_folders_are_not_documents(folder: Path) -> None:
    (folder / ".git").mkdir()
    (folder / ".git" / "config.yaml").write_text("not: a document\n")
    assert len(resolve(load_folder(folder))) == 11


def test_an_alias_moved_outside_git_is_drift_to_undo(folder: Path) -> None:
    (folder / "aliases").mkdir()
    (folder / "aliases" / "prod.yaml").write_text("kind: alias\nname: production\napp: gitshop\nrelease: gitshop-base\n")
    desired = resolve(load_folder(folder))
    [alias] = [r for r in desired if r.kind == "alias"]
    assert diff(desired, _applied(desired), {}, live={alias.name: alias.release}).exit_code == 0
    plan = diff(desired, _applied(desired), {}, live={alias.name: "gitshop-rogue"})
    [step] = plan.changes
    assert (step.action, step.drift, step.previous_release, step.release) == ("change", True, "gitshop-rogue",
                                                                             alias.release)
    assert plan.exit_code == 2
    # Never set live (or set by this folder's first apply): the applied state decides, as before.
    assert diff(desired, {}, {}, live={}).count("add") == 12


def test_a_deployment_whose_live_route_serves_another_app_or_stable_is_drift_apply_does_not_carry_out(
        folder: Path) -> None:
    desired = resolve(load_folder(folder))
    applied = _applied(desired)
    assert diff(desired, applied, {}, serving={"gitshop-web": Serving(stable="gitshop-v1", app="gitshop")}).exit_code == 0
    # A route stored before the router recorded the app: the stable release alone is compared.
    assert diff(desired, applied, {}, serving={"gitshop-web": Serving(stable="gitshop-v1")}).exit_code == 0
    # The folder's canary, promoted: what the folder asked to roll out.
    [line] = [r.release for r in desired if r.name == "gitshop" and r.kind == "release"]
    assert diff(desired, applied, {}, serving={"gitshop-web": Serving(stable=line, app="gitshop")}).exit_code == 0
    for live in (Serving(stable="shop-v1", app="shop"), Serving(stable="gitshop-v1", app="shop"), Serving(stable="x")):
        plan = diff(desired, applied, {}, serving={"gitshop-web": live})
        [step] = [s for s in plan.steps if s.kind == "deployment"]
        assert (step.action, step.drift, step.previous_release, step.release, step.live_app, step.app) == (
            "unchanged", True, live.stable, "gitshop-v1", live.app, "gitshop")
        assert plan.exit_code == 2 and plan.changes == []  # apply moves no traffic
    # An unreadable route is said, compared with nothing, and fails nothing.
    plan = diff(desired, applied, {}, serving={"gitshop-web": Serving(unread="its record is unreadable")})
    [step] = [s for s in plan.steps if s.kind == "deployment"]
    assert (step.drift, step.unread, plan.exit_code) == (False, "its record is unreadable", 0)


SPEC = {"app": "shop", "stable": "s1", "canary": "c2",
        "rollout": {"strategy": "canary", "steps": [10.0, 50.0], "interval_s": 300.0}}
LIVE = Serving(stable="s1", app="shop", canary="c2", phase="progressing", weight=50.0, strategy="canary",
               steps=("10", "50", "100"), interval_s=300.0)


def _live(**changes: object) -> Serving:
    return msgspec.structs.replace(LIVE, **changes)


@pytest.mark.parametrize("live", [
    LIVE,  # the document's rollout on its steps ([10, 50] runs as 10, 50, 100, as the router normalises it)
    _live(weight=0.0, phase="idle"), _live(weight=100.0),  # waiting for a decision; the last step
    _live(strategy="", steps=(), interval_s=0.0, weight=25.0),  # the router's own steps: held by no route
    _live(steps=(), interval_s=0.0, weight=25.0),  # a strategy of its own without steps or interval (an analysis)
    Serving(stable="s1", app="shop", canary="old", phase="aborted"),  # an earlier rollout, finished
    Serving(stable="s1", app="shop"),  # the document's canary not started yet
    Serving(stable="c2", app="shop", canary="c2", phase="promoted", reason="promoted c2: all 3 steps done at 100%"),
], ids=["stepping", "idle", "last step", "router steps", "no steps", "earlier aborted", "not started", "promoted"])
def test_a_live_rollout_of_the_documents_canary_on_its_steps_is_not_drift(live: Serving) -> None:
    assert differences(SPEC, live) == []


@pytest.mark.parametrize(("live", "field", "live_value", "folder_value"), [
    (_live(weight=30.0), "weight", "30%", "0% or a step: 10, 50, 100"),
    (_live(steps=("100",), weight=100.0), "steps", "100", "10, 50, 100"),
    (_live(steps=("10", "pause until approved", "100")), "steps", "10, pause until approved, 100", "10, 50, 100"),
    (_live(interval_s=5.0), "interval_s", "5", "300"),
    (_live(strategy="blue_green", steps=(), weight=0.0), "strategy", "blue_green", "canary"),
    (_live(canary="x9", weight=10.0), "canary", "x9 (progressing at 10%)", "c2"),
    (_live(phase="aborted", weight=0.0, reason="aborted c2: by operator ann"), "canary",
     "c2 aborted: aborted c2: by operator ann", "c2 rolled out"),
    (Serving(stable="c2", app="shop", canary="c2", phase="promoted", reason="promoted c2: by operator ann"), "canary",
     "c2 promoted by hand: promoted c2: by operator ann", "c2 promoted by its steps"),
    (Serving(stable="c2", app="shop", canary="c2", phase="promoted", reason="promoted c2: BREAK-GLASS by root: x"),
     "canary", "c2 promoted by hand: promoted c2: BREAK-GLASS by root: x", "c2 promoted by its steps"),
    (_live(override="override by root for c2 (canary up to 10%): x"), "break-glass",
     "override by root for c2 (canary up to 10%): x", "none"),
], ids=["set-weight", "steps", "pause step", "interval", "strategy", "other canary", "aborted", "promoted by hand",
        "break-glass promote", "break-glass"])
def test_a_field_of_the_document_changed_live_is_one_difference(live: Serving, field: str, live_value: str,
                                                                 folder_value: str) -> None:
    assert differences(SPEC, live) == [Difference(field=field, live=live_value, folder=folder_value)]


def test_a_canary_started_where_the_document_names_none_and_a_blue_green_promoted_by_hand() -> None:
    plain = {**SPEC, "canary": ""}
    assert differences(plain, _live()) == [Difference(field="canary", live="c2 (progressing at 50%)", folder="none")]
    assert differences(plain, Serving(stable="s1", app="shop", canary="c2", phase="aborted")) == []
    # A blue-green preview (or a shadow-only rollout) is promoted by hand by design.
    blue = {**SPEC, "rollout": {**SPEC["rollout"], "strategy": "blue_green"}}
    promoted = Serving(stable="c2", app="shop", canary="c2", phase="promoted", reason="promoted c2: by operator ann")
    assert differences(blue, promoted) == []
    assert differences(blue, _live(strategy="blue_green", steps=(), weight=0.0)) == []


def test_the_plan_reads_the_routers_record_as_the_router_wrote_it() -> None:
    from lockgate.gitops.state import _route, _serving
    from lockgate.services.router.domain import Override, Route, Target
    from lockgate.services.router.strategy import BlueGreen, Pause, ShadowSpec, Step, Strategy

    def read(route: Route) -> Serving:
        return _serving(_route.decode(msgspec.json.encode(route)))

    base = Route(deployment="d", stable=Target(release="s1", app="shop"), canary=Target(release="c2", app="shop"),
                 phase="progressing", weight=50, reason="step 2/3: canary at 50%")
    assert read(base) == Serving(stable="s1", app="shop", canary="c2", phase="progressing", weight=50.0,
                                 reason="step 2/3: canary at 50%")
    program = Strategy(steps=[10, Step(pause=Pause()), Step(set_weight=60), Step(pause=Pause(duration_s=30))],
                       interval_s=5)
    assert (read(msgspec.structs.replace(base, strategy=program)).steps, read(msgspec.structs.replace(
        base, strategy=program)).interval_s) == (("10", "pause until approved", "60", "pause 30s"), 5.0)
    weights = read(msgspec.structs.replace(base, strategy=Strategy(steps=[50, Step(set_weight=10)])))
    assert (weights.strategy, weights.steps) == ("canary", ("10", "50", "100"))  # as the router runs them
    assert read(msgspec.structs.replace(base, strategy=Strategy(blue_green=BlueGreen()))).strategy == "blue_green"
    assert read(msgspec.structs.replace(base, strategy=Strategy(shadow=ShadowSpec()))).strategy == "shadow"
    glass = Override(release="c2", action="promote", actor="root", reason="outage", at=1.0)
    assert read(msgspec.structs.replace(base, override=glass)).override == "override by root for c2 (promote): outage"


def _release_doc(folder: Path, name: str, pinned: str, parent: str) -> None:
    (folder / "releases" / f"{name}.yaml").write_text(
        f"kind: release\nname: {name}\nrelease: {pinned}\napp: gitshop\nparent: {parent}\n"
        "artifacts: [prompt/gitshop-system]\n")


def test_a_release_parent_must_be_bound_or_of_the_folder_and_binds_first(folder: Path) -> None:
    # Before: `parent:` was taken as written: a typo or a cycle planned as an addition, and a parent of the
    # folder could be bound after its child (by name order), so apply failed half-way.
    _release_doc(folder, "a-child", "kin-child", "kin-parent")
    _release_doc(folder, "z-parent", "kin-parent", "gitshop-v1")
    plan = diff(resolve(load_folder(folder)), {}, {})
    assert plan.errors == []
    order = [s.release for s in plan.steps if s.kind == "release"]
    assert order.index("kin-parent") < order.index("kin-child")
    _release_doc(folder, "orphan", "kin-orphan", "kin-typo")
    _release_doc(folder, "p1", "kin-p1", "kin-p2")
    _release_doc(folder, "p2", "kin-p2", "kin-p1")
    errors = diff(resolve(load_folder(folder)), {}, {}).errors
    assert errors == [
        "document releases/orphan.yaml: parent 'kin-typo' is neither a release document of the folder (by its "
        "`name:`), the `release:` of one, nor a registered release - at `$.parent`",
        "document releases/p1.yaml: the parents of release 'kin-p1' form a cycle (kin-p1 -> kin-p2 -> kin-p1) - at "
        "`$.parent`",
        "document releases/p2.yaml: the parents of release 'kin-p2' form a cycle (kin-p2 -> kin-p1 -> kin-p2) - at "
        "`$.parent`"]
    desired = resolve(load_folder(folder))
    p1 = next(r.digest for r in desired if r.release == "kin-p1")  # bound already (before parents were checked)
    assert diff(desired, {}, {"kin-typo": "sha256:x", "kin-p1": p1}).errors == []
    _release_doc(folder, "self", "kin-self", "kin-self")
    with pytest.raises(GitopsError, match=r"release 'kin-self' cannot be its own parent - at `\$.parent`"):
        resolve(load_folder(folder))


def _line_doc(folder: Path, name: str, parent: str, prompt: str = "gitshop-system") -> None:
    (folder / "releases" / f"{name}.yaml").write_text(
        f"kind: release\nname: {name}\napp: gitshop\nparent: {parent}\nartifacts: [prompt/{prompt}]\n")


def test_a_release_parent_may_name_a_release_document_as_stable_and_canary_do(folder: Path) -> None:
    # Found by a probe: `parent: gitshop-base` (the document's name, as a deployment's `stable:` takes it) was
    # refused with "no release of the folder is named so"; only its release, `gitshop-v1`, was taken. A release
    # line's name (`gitshop@<12 hex>`) changes with its content, so one line could not name another as parent.
    _release_doc(folder, "by-doc", "kin-by-doc", "gitshop-base")  # a pinned document: its release
    _line_doc(folder, "child-line", "gitshop")  # a release line: its current version
    _line_doc(folder, "grandchild-line", "child-line", "gitshop-answer")
    desired = {r.name: r for r in resolve(load_folder(folder)) if r.kind == "release"}
    assert desired["by-doc"].bundle["parent"] == "gitshop-v1"
    assert desired["child-line"].bundle["parent"] == desired["gitshop"].release
    assert desired["grandchild-line"].bundle["parent"] == desired["child-line"].release
    plan = diff(list(desired.values()), {}, {})
    assert plan.errors == []
    order = [s.name for s in plan.steps]
    assert order.index("gitshop") < order.index("child-line") < order.index("grandchild-line")
    # Release names still work, and name the same release as the document's name does.
    _release_doc(folder, "by-release", "kin-by-release", "gitshop-v1")
    assert next(r for r in resolve(load_folder(folder)) if r.name == "by-release").bundle["parent"] == "gitshop-v1"

    # The parent line gets a new version: so does the child line, whose bundle names it.
    _edit(folder / "prompts" / "answer.yaml", "no punctuation.", "no punctuation at all.")
    again = {r.name: r for r in resolve(load_folder(folder)) if r.kind == "release"}
    assert again["child-line"].bundle["parent"] == again["gitshop"].release != desired["gitshop"].release
    assert again["child-line"].release != desired["child-line"].release


@pytest.mark.parametrize(("docs", "message"), [
    ([("ra", "rb"), ("rb", "ra")], "document releases/rb.yaml is invalid: the parents of release document 'rb' form "
                                   "a cycle (rb -> ra -> rb) - at `$.parent`"),
    ([("self", "self")], "release document 'self' cannot be its own parent - at `$.parent`"),
])
def test_release_documents_whose_parents_loop_are_refused_naming_them(folder: Path, docs: list[tuple[str, str]],
                                                                     message: str) -> None:
    for name, parent in docs:
        _line_doc(folder, name, parent)
    with pytest.raises(GitopsError) as info:
        resolve(load_folder(folder))
    assert message in str(info.value)


def test_a_parent_that_names_one_document_and_another_ones_release_is_refused(folder: Path) -> None:
    _release_doc(folder, "kin-a", "kin-b", "gitshop-v1")  # document kin-a is release kin-b ...
    _release_doc(folder, "kin-b", "kin-b2", "gitshop-v1")  # ... and document kin-b is another release
    _line_doc(folder, "child", "kin-b")
    with pytest.raises(GitopsError, match=r"parent 'kin-b' is both a release document's name and the release of "
                                          r"document 'kin-a': rename one of them - at `\$.parent`"):
        resolve(load_folder(folder))


def _line(desired: list[Resource]) -> Resource:
    return next(r for r in desired if r.kind == "release" and r.name == "gitshop")


def test_a_pinned_release_may_take_a_line_version_name_only_with_its_own_contents_12_hex(folder: Path) -> None:
    # Probe p8 (F2): a pin took the name a line derives for other content, so the line could never bind it.
    line = _line(resolve(load_folder(folder))).release
    pin = folder / "releases" / "gitshop-base.yaml"
    _edit(pin, "release: gitshop-v1", f"release: {line}")
    with pytest.raises(GitopsError) as refused:
        resolve(load_folder(folder))
    message = refused.value.message
    assert message.startswith(f"document releases/gitshop-base.yaml is invalid: release name {line!r} has the form "
                              "of a release line's version")
    assert message.endswith("- at `$.release`") and "\n" not in message
    # Its own content's version: the very bundle a line of that content binds, so nobody else's name is taken.
    _edit(pin, f"release: {line}", "release: gitshop-v1")
    own = next(r for r in resolve(load_folder(folder)) if r.name == "gitshop-base")
    version = artifacts.line_version(own.bundle["app"], own.bundle["artifacts"])
    _edit(pin, "release: gitshop-v1", f"release: gitshop-base@{version}")
    pinned = next(r for r in resolve(load_folder(folder)) if r.name == "gitshop-base")
    _edit(pin, f"release: gitshop-base@{version}\n", "")
    unpinned = next(r for r in resolve(load_folder(folder)) if r.name == "gitshop-base")
    assert pinned.release == unpinned.release == f"gitshop-base@{version}" and pinned.digest == unpinned.digest


@pytest.mark.parametrize("name", ["shop@0123456789ab", "a@b@ffffffffffff"])
def test_a_name_of_a_lines_form_binds_only_its_own_contents_version(name: str) -> None:
    bundle = artifacts.release_bundle(name, "shop", {"prompt/p": "sha256:" + "1" * 64})
    with pytest.raises(ConfigError, match="has the form of a release line's version"):
        artifacts.check_line_name(bundle)
    own = f"{name.rpartition('@')[0]}@{artifacts.line_version('shop', bundle['artifacts'])}"
    artifacts.check_line_name({**bundle, "release": own})
    for other in ("shop-v1", "shop@0123456789AB", "shop@0123456789a", "shop@0123456789abc"):  # not a line's form
        artifacts.check_line_name({**bundle, "release": other})
    acme = artifacts.release_bundle(own, "shop", bundle["artifacts"], tenant="acme")  # another tenant: other content
    with pytest.raises(ConfigError):
        artifacts.check_line_name(acme)


def test_a_line_whose_version_name_is_bound_to_other_content_is_told_so_without_a_release_field(folder: Path) -> None:
    desired = resolve(load_folder(folder))
    line = _line(desired)
    [error] = diff(desired, {}, {line.release: "sha256:" + "0" * 64}).errors
    assert error.startswith(f"document releases/gitshop.yaml: release line 'gitshop' names its content "
                            f"{line.release!r}, a name already bound to other content")
    assert "`$.release`" not in error and error.endswith("- at `$.name`")
