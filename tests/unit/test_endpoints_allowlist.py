"""The shared endpoint allow-list (lockgate.endpoints) and the evaluator's use of it: each endpoint's credential
from the environment or the secrets file, sent as its provider expects; a missing one names the endpoint and
the credential; the secret is never in a repr or a message; the evaluator calls listed ids with their key and
plain URLs (eval runs only) with none."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from lockgate.config import Settings
from lockgate.endpoints import Access, AllowList, UnknownEndpoint, auth_headers
from lockgate.errors import ConfigError
from lockgate.services.evaluator import targets
from lockgate.shipped import Shipped

pytestmark = pytest.mark.timeout(30)
FILE = """\
endpoints:
  judge: {url: 'http://judge.test/v1/', credential: JUDGE_KEY}
  claude: {url: 'http://a.test/v1', credential: ANT_KEY, provider: anthropic}
  open: {url: 'http://open.test/v1'}
  broken: {url: 'http://broken.test/v1', credential: NOWHERE_KEY}
  routed: {url: 'http://r.test/v1', retry: {attempts: 2}, fallback: open}   # the router's fields: its own to check
models: {gpt-x: chat}
"""


def _settings(tmp_path: Path, text: str = FILE, secrets: str = "JUDGE_KEY: sk-judge-secret\nANT_KEY: sk-ant-x\n"
              ) -> Settings:
    (tmp_path / "endpoints.yaml").write_text(text)
    (tmp_path / "secrets.yaml").write_text(secrets)
    return Settings(home=str(tmp_path), endpoints_file=str(tmp_path / "endpoints.yaml"),
                    secrets_file=str(tmp_path / "secrets.yaml"))


def test_each_endpoint_gets_its_own_credential_as_its_provider_expects(tmp_path: Path) -> None:
    allowed = AllowList(_settings(tmp_path))
    judge, claude, open_ = allowed.access("judge"), allowed.access("claude"), allowed.access("open")
    assert (judge.base, judge.headers) == ("http://judge.test/v1", {"Authorization": "Bearer sk-judge-secret"})
    assert (claude.provider, claude.headers) == ("anthropic", {"x-api-key": "sk-ant-x"})
    assert (open_.headers, open_.authorization) == ({}, None)
    assert "sk-" not in repr(judge) and "sk-" not in repr(claude)
    assert auth_headers("openai", "") == {}


def test_the_environment_comes_before_the_secrets_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", "sk-from-env")
    assert AllowList(_settings(tmp_path)).access("judge").headers == {"Authorization": "Bearer sk-from-env"}


def test_a_missing_credential_names_the_endpoint_and_the_credential_only_when_that_endpoint_is_used(
        tmp_path: Path) -> None:
    allowed = AllowList(_settings(tmp_path))  # `broken` lacks its key: the others are usable all the same
    with pytest.raises(ConfigError) as caught:
        allowed.access("broken")
    assert caught.value.message == ("credential 'NOWHERE_KEY' of endpoint 'broken' is neither an environment "
                                    "variable nor an entry of the secrets file (settings.secrets_file)")
    with pytest.raises(UnknownEndpoint, match=r"judge endpoint 'elsewhere' is not in the endpoint allow-list "
                                              r"\(broken, claude, judge, open, routed\)"):
        allowed.access("elsewhere", "judge endpoint")


def test_without_a_file_the_two_upstream_settings_are_listed_without_credentials(tmp_path: Path) -> None:
    s = Settings(home=str(tmp_path), stable_upstream="http://127.0.0.1:9001/v1",
                 canary_upstream="http://127.0.0.1:9002/v1")
    assert AllowList(s).access("default") == Access(id="default", base="http://127.0.0.1:9001/v1")
    assert AllowList(s).access("canary").base == "http://127.0.0.1:9002/v1"


@pytest.mark.parametrize(("text", "secrets", "error"), [
    ("endpoints:\n  a: {url: 'ftp://a.test'}\n", "", "endpoints file .* is invalid: .*https"),
    ("endpoints: [a]\n", "", "endpoints file .* is invalid"),
    (FILE, "- not a mapping\n", "secrets file .* is invalid"),
])
def test_unusable_files_are_config_errors_naming_them(tmp_path: Path, text: str, secrets: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        AllowList(_settings(tmp_path, text, secrets)).access("judge")


def test_the_evaluator_calls_ids_with_their_key_and_plain_urls_of_eval_runs_with_none(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    assert targets.of_run(s, "judge").headers == {"Authorization": "Bearer sk-judge-secret"}
    url = targets.of_run(s, "http://judge.test/v1/")  # the same URL, not named by id: no key goes there
    assert (url.base, url.headers) == ("http://judge.test/v1", {})
    claude = targets.listed(s, "claude", "judge endpoint")  # called in its own API (runner.complete)
    assert (claude.provider, claude.headers) == ("anthropic", {"x-api-key": "sk-ant-x"})
    with pytest.raises(ConfigError, match="endpoint 'nope' is not in the endpoint allow-list"):
        targets.of_run(s, "nope")
    with pytest.raises(ConfigError, match="credential 'NOWHERE_KEY' of endpoint 'broken'"):
        targets.listed(s, "broken")


def test_a_release_with_a_model_config_is_evaluated_as_it_ships(tmp_path: Path) -> None:
    # An eval asked for a strong model (or another server, by URL) while the release ships a weak one: the
    # gate judged one model and the router served another.
    s = _settings(tmp_path)
    ships = Shipped(release="r2", config="sha256:" + "c" * 64, model="weak", endpoint="judge",
                    params={"temperature": 0.2})
    for endpoint, model in (("", ""), ("judge", "weak"), ("http://judge.test/v1/", "")):
        access, evaluated, params = targets.evaluated(s, ships, endpoint, model)
        assert (access.id, access.headers, evaluated, params) == (
            "judge", {"Authorization": "Bearer sk-judge-secret"}, "weak", {"temperature": 0.2})
    with pytest.raises(ConfigError, match="release 'r2' ships model 'weak' at endpoint 'judge' .* asks for model "
                                          "'strong': the gate judges what ships"):
        targets.evaluated(s, ships, "", "strong")
    for elsewhere in ("open", "http://127.0.0.1:9/v1"):
        with pytest.raises(ConfigError, match=f"asks for endpoint '{elsewhere}'.*give 'judge'"):
            targets.evaluated(s, ships, elsewhere, "weak")
    # Without a model config (or a registered release) the run is evaluated as asked, and must say where.
    assert targets.evaluated(s, None, "open", "any")[1:] == ("any", {})
    with pytest.raises(ConfigError, match="EvalRequested.endpoint is empty"):
        targets.evaluated(s, None, "", "any")
    with pytest.raises(ConfigError, match="no model to evaluate"):
        targets.evaluated(s, None, "open", "")


def test_a_gated_run_scores_only_its_own_releases_recorded_events() -> None:
    targets.recorded("r7", "shop", "r7")  # its own traffic: fine
    with pytest.raises(ConfigError) as exc:
        targets.recorded("weak", "shop", "strong")
    assert "recorded for release 'strong'" in exc.value.message and "release 'weak'" in exc.value.message


GROUPS = """\
endpoints:
  dear: {url: 'http://dear.test/v1', credential: JUDGE_KEY, price: {input_per_mtok: 5, output_per_mtok: 15}}
  cheap: {url: 'http://cheap.test/v1', credential: ANT_KEY, price: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
  free: {url: 'http://free.test/v1'}
groups:
  by-price: {endpoints: [dear, free, cheap], choose: price}
  by-latency: {endpoints: [dear, cheap], choose: latency}
models: {gpt-x: chat}
"""


def test_a_group_is_allowed_as_its_first_choice_the_member_the_router_serves_it_from(tmp_path: Path) -> None:
    # Before (probe p31 F3): the allow-list knew no groups, so a release naming one was refused its eval.
    allowed = AllowList(_settings(tmp_path, GROUPS))
    price = allowed.access("by-price")  # the cheapest priced member; unpriced `free` ranks last
    assert (price.id, price.member, price.base, price.headers) == (
        "by-price", "cheap", "http://cheap.test/v1", {"Authorization": "Bearer sk-ant-x"})
    assert "sk-" not in repr(price)
    latency = allowed.access("by-latency")  # nothing measured yet: the first listed
    assert (latency.member, latency.base) == ("dear", "http://dear.test/v1")
    assert allowed.access("cheap").member == ""  # an endpoint named itself
    with pytest.raises(UnknownEndpoint, match=r"\(by-latency, by-price, cheap, dear, free\)"):
        allowed.access("nope")


def test_an_id_stands_for_a_named_member_and_a_groups_access_is_its_members_but_for_the_ids(
        tmp_path: Path) -> None:
    allowed = AllowList(_settings(tmp_path, GROUPS))
    found = allowed.spec("by-price")
    assert found is not None and (found.id, found.spec.url) == ("cheap", "http://cheap.test/v1")
    assert allowed.spec("cheap") == ("cheap", allowed.specs["cheap"]) and allowed.spec("nope") is None
    # Every field of the member's Access is kept, whatever fields Access gains: only the ids differ.
    assert allowed.access("by-price") == msgspec.structs.replace(allowed.access("cheap"), id="by-price",
                                                                 member="cheap")


@pytest.mark.parametrize(("groups", "error"), [
    ("  g: {endpoints: [dear, gone]}\n", "group 'g' names endpoints that are not configured: gone"),
    ("  free: {endpoints: [dear, cheap]}\n", "group 'free' has the id of an endpoint"),
])
def test_a_group_is_allowed_only_when_each_of_its_members_is(tmp_path: Path, groups: str, error: str) -> None:
    text = GROUPS.split("groups:")[0] + "groups:\n" + groups
    with pytest.raises(ConfigError, match=error):
        AllowList(_settings(tmp_path, text))


def test_the_evaluator_evaluates_a_release_naming_a_group_at_the_member_the_router_serves_it_from(
        tmp_path: Path) -> None:
    s = _settings(tmp_path, GROUPS)
    ships = Shipped(release="g1", config="sha256:" + "c" * 64, model="m", endpoint="by-price")
    for endpoint in ("", "by-price", "http://cheap.test/v1"):
        access, model, _ = targets.evaluated(s, ships, endpoint, "")
        assert (access.id, access.member, access.base, model) == ("by-price", "cheap", "http://cheap.test/v1", "m")
    with pytest.raises(ConfigError, match="asks for endpoint 'dear'"):  # a member is not what ships
        targets.evaluated(s, ships, "dear", "")
