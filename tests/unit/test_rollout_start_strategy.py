"""Which strategy `rollout start` sends for a canary: the applied deployment document's `rollout:`, options over it,
or none (the router's configured steps), and the sentence that says which (probe p23 F4: the document's `rollout:`
was recorded and never sent)."""

from __future__ import annotations

import click
import pytest

from lockgate.cli.rollout import _weights, chosen, described, strategy_of, summary
from lockgate.contracts import StateEntry
from lockgate.errors import ConfigError
from lockgate.services.router.strategy import Strategy


def _entry(rollout: dict, commit: str = "0123456789abcdef", dirty: bool = False) -> StateEntry:
    spec = {"app": "gitshop", "stable": "gitshop-v1", "canary": "gitshop@7a8d747e6fb5", "rollout": rollout}
    return StateEntry(kind="deployment", name="gitshop-web", digest="sha256:d", source="deployments/gitshop-web.yaml",
                      spec=spec, commit=commit, dirty=dirty)


DOC = {"strategy": "canary", "steps": [10.0, 50.0, 100.0], "interval_s": 300.0}


def test_a_canary_of_an_applied_deployment_runs_its_documents_steps_and_interval_and_says_from_where() -> None:
    strategy, said = chosen("gitshop-web", _entry(DOC), {})
    assert strategy == {"steps": [10.0, 50.0, 100.0], "interval_s": 300.0}
    assert said == ("gitshop-web: steps 10, 50, 100 every 300 s, from the applied document deployments/gitshop-web.yaml "
                    "at commit 0123456789")
    assert "at commit 0123456789 (dirty)" in chosen("gitshop-web", _entry(DOC, dirty=True), {})[1]
    assert "at no commit (not in Git)" in chosen("gitshop-web", _entry(DOC, commit=""), {})[1]
    Strategy(**strategy)  # what the router's PUT takes


def test_options_over_the_document_are_sent_and_said_to_differ_from_the_folder() -> None:
    strategy, said = chosen("gitshop-web", _entry(DOC), {"steps": [20.0, 100.0]})
    assert strategy == {"steps": [20.0, 100.0], "interval_s": 300.0}
    assert said == ("gitshop-web: steps 20, 100 every 300 s, by --steps over the applied document "
                    "deployments/gitshop-web.yaml at commit 0123456789, which says steps 10, 50, 100 every 300 s: the "
                    "live route differs from the folder, and `lockgate plan` shows it")
    # Options that run as the document does (the router adds the final 100) differ from nothing.
    same, said = chosen("gitshop-web", _entry(DOC), {"steps": [50.0, 10.0], "interval_s": 300.0})
    assert same == {"steps": [50.0, 10.0], "interval_s": 300.0} and "differs" not in said


def test_a_blue_green_or_shadow_document_starts_that_kind_of_rollout() -> None:
    strategy, said = chosen("gitshop-web", _entry({**DOC, "strategy": "blue_green"}), {})
    assert strategy == {"blue_green": {}, "interval_s": 300.0} and "blue-green, interval 300 s, from" in said
    Strategy(**strategy)
    assert chosen("gitshop-web", _entry({**DOC, "strategy": "shadow"}), {})[0] == {"shadow": {}, "interval_s": 300.0}
    strategy, said = chosen("gitshop-web", _entry(DOC), {"strategy": "blue_green"})
    assert strategy == {"blue_green": {}, "interval_s": 300.0} and "by --strategy over" in said and "differs" in said
    with pytest.raises(ConfigError, match="--steps are a canary's"):
        chosen("gitshop-web", _entry(DOC), {"strategy": "blue_green", "steps": [10.0]})


def test_a_deployment_no_applied_folder_declares_runs_the_routers_steps_unless_options_say_otherwise() -> None:
    assert chosen("chat", None, {}) == (None, "chat: no applied folder declares it, so the router's configured steps "
                                              "and interval run the canary")
    strategy, said = chosen("chat", None, {"interval_s": 30.0})
    assert strategy == {"interval_s": 30.0}
    assert said == ("chat: the router's configured steps every 30 s, by --interval-s (no applied folder declares "
                    "it)")


def test_rollout_get_shows_the_steps_and_interval_the_route_runs() -> None:
    def shown(strategy: dict | None) -> str:
        route = {"deployment": "chat", "phase": "progressing", "stable": {"release": "r1"}, "strategy": strategy}
        return next(r["value"] for r in summary(route) if r["field"] == "strategy")

    assert shown({"steps": [10.0, {"pause": {"duration_s": 60}}, 100.0], "interval_s": 300.0}) == \
        "steps 10, pause 60s, 100 every 300 s"
    assert shown(None) == "the router's configured steps at the router's configured interval"
    assert shown({"blue_green": {}}) == "blue-green, interval as the router is configured"
    assert described(strategy_of("canary", [10, 100], None)) == "steps 10, 100 at the router's configured interval"


@pytest.mark.parametrize("given", ["10,fifty", "0,100", "10,101", ""])
def test_steps_given_on_the_command_line_are_weights_in_percent(given: str) -> None:
    with pytest.raises(click.BadParameter):
        _weights(None, None, given)  # type: ignore[arg-type]
    assert _weights(None, None, "10, 50,100") == [10.0, 50.0, 100.0]  # type: ignore[arg-type]
