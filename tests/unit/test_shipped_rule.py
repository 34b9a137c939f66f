"""The rule an eval of a release with a model config keeps to (lockgate.shipped), shared by the evaluator and
`lockgate eval run`."""

from __future__ import annotations

import pytest

from lockgate.errors import ConfigError
from lockgate.shipped import Shipped, refuse_other_endpoint, refuse_other_model

SHIPS = Shipped(release="r1", config="sha256:" + "c" * 64, model="good", endpoint="default")
WHERE = f"release 'r1' ships model 'good' at endpoint 'default' (sha256:{'c' * 64})"


@pytest.mark.parametrize(("endpoint", "base"), [("", None), ("default", None), ("http://sim/v1", "http://sim/v1"),
                                                ("http://sim/v1/", "http://sim/v1")])
def test_what_ships_is_taken(endpoint: str, base: str | None) -> None:
    refuse_other_endpoint(SHIPS, endpoint, base)
    refuse_other_model(SHIPS, "")
    refuse_other_model(SHIPS, "good")


@pytest.mark.parametrize(("endpoint", "base"), [("canary", "http://sim/v1"), ("http://localhost/v1", "http://sim/v1"),
                                                ("http://sim/v1", None)])  # None: the URL is not known here
def test_another_place_is_refused_saying_what_to_pass(endpoint: str, base: str | None) -> None:
    with pytest.raises(ConfigError) as err:
        refuse_other_endpoint(SHIPS, endpoint, base)
    assert err.value.message == (f"{WHERE}, but the eval asks for endpoint {endpoint!r}: the gate judges what ships; "
                                 "omit the endpoint or give 'default'")


def test_another_model_is_refused_naming_who_asked() -> None:
    with pytest.raises(ConfigError) as err:
        refuse_other_model(SHIPS, "bad", by="suite s.yaml")
    assert err.value.message == (f"{WHERE}, but suite s.yaml asks for model 'bad': the gate judges what ships; "
                                 "omit the model or give 'good'")
