"""The endpoints file: providers, their credential headers, operation URLs and the model map."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockgate import endpoints as allowlist
from lockgate.config import Settings
from lockgate.endpoints import AllowList
from lockgate.errors import ConfigError
from lockgate.services.router import endpoints as router_endpoints
from lockgate.services.router.endpoints import Endpoints, EndpointSpec
from lockgate.services.router.upstream import Upstream

pytestmark = pytest.mark.timeout(30)
PRICED = """\
endpoints:
  dear: {url: 'http://d.test/v1', price: {input_per_mtok: 5, output_per_mtok: 15}}
  cheap: {url: 'http://c.test/v1', price: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
groups:
  g: {endpoints: [dear, cheap]}
"""


def _load(tmp_path: Path, text: str) -> Endpoints:
    (tmp_path / "endpoints.yaml").write_text(text)
    (tmp_path / "secrets.yaml").write_text("OAI: sk-o\nANT: sk-a\n")
    return Endpoints(Settings(home=str(tmp_path), endpoints_file=str(tmp_path / "endpoints.yaml"),
                              secrets_file=str(tmp_path / "secrets.yaml")))


def test_providers_credentials_and_model_map(tmp_path: Path) -> None:
    eps = _load(tmp_path, "endpoints:\n  o: {url: 'http://o.test/v1/', credential: OAI}\n"
                          "  a: {url: 'http://a.test/v1', credential: ANT, provider: anthropic}\n"
                          "models:\n  claude-x: support\n")
    o, a = eps.get("o"), eps.get("a")
    assert (o.provider, o.auth_headers, str(o.url)) == ("openai", {"Authorization": "Bearer sk-o"},
                                                         "http://o.test/v1/chat/completions")
    assert str(o.url_for("/embeddings")) == "http://o.test/v1/embeddings"
    assert (a.provider, a.auth_headers, str(a.url_for("/messages"))) == (
        "anthropic", {"x-api-key": "sk-a"}, "http://a.test/v1/messages")
    assert eps.models == {"claude-x": "support"}
    assert "sk-" not in repr(a)


def test_unknown_provider_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="provider"):
        _load(tmp_path, "endpoints:\n  g: {url: 'http://g.test/v1', provider: gemini}\n")


def test_groups_name_configured_endpoints_only(tmp_path: Path) -> None:
    eps = _load(tmp_path, "endpoints:\n  a: {url: 'http://a.test/v1', price: {input_per_mtok: 1, output_per_mtok: 2}}\n"
                          "  b: {url: 'http://b.test/v1'}\n"
                          "groups:\n  any: {endpoints: [b, a], choose: latency}\n")
    assert eps.groups["any"].choose == "latency" and eps.get("any").id == "b"  # a release may name the group
    assert eps.get("a").price is not None and eps.get("a").price.output_per_mtok == 2
    with pytest.raises(ConfigError, match="group 'g' names endpoints that are not configured: c"):
        _load(tmp_path, "endpoints:\n  a: {url: 'http://a.test/v1'}\ngroups:\n  g: {endpoints: [a, c]}\n")
    with pytest.raises(ConfigError, match="group 'a' has the id of an endpoint"):
        _load(tmp_path, "endpoints:\n  a: {url: 'http://a.test/v1'}\n  b: {url: 'http://b.test/v1'}\n"
                        "groups:\n  a: {endpoints: [a, b]}\n")
    with pytest.raises(ConfigError, match="length"):  # one member is no choice
        _load(tmp_path, "endpoints:\n  a: {url: 'http://a.test/v1'}\ngroups:\n  g: {endpoints: [a]}\n")


def test_the_router_and_the_evaluators_allow_list_agree_on_a_groups_member(tmp_path: Path) -> None:
    eps = _load(tmp_path, PRICED)
    allowed = AllowList(Settings(home=str(tmp_path), endpoints_file=str(tmp_path / "endpoints.yaml")))
    assert eps.get("g").id == "cheap" == allowed.access("g").member
    assert Upstream(draw=lambda: 1.0).members(eps, "g") == ["cheap", "dear"]  # every request's order


def test_without_a_file_the_router_reads_its_own_types(tmp_path: Path) -> None:
    s = Settings(home=str(tmp_path), stable_upstream="http://127.0.0.1:9001/v1")
    file = allowlist.read(s, router_endpoints._File)  # the router's reading, its fields at their defaults
    assert type(file) is router_endpoints._File and file.models == {} and file.groups == {}
    assert {k: type(v) for k, v in file.endpoints.items()} == {"default": EndpointSpec, "canary": EndpointSpec}
    eps = Endpoints(s)
    assert (str(eps.get("default").url), eps.get("canary").fallback, eps.models) == (
        "http://127.0.0.1:9001/v1/chat/completions", None, {})


def test_a_groups_first_choice_is_ranked_once_at_start_not_per_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    eps = _load(tmp_path, PRICED)

    def ranked(*_: object) -> str:
        raise AssertionError("a request ranked the group again")

    monkeypatch.setattr(allowlist, "first_choice", ranked)  # prices are declared: nothing to rank per request
    assert eps.get("g").id == "cheap" and eps.get("dear").id == "dear"
