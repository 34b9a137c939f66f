"""The rule an eval of a release with a model config keeps to (lockgate.shipped), shared by the evaluator and
`lockgate eval run`."""

from __future__ import annotations

import pytest

from lockgate.errors import ConfigError
from lockgate.shipped import Shipped, refuse_other_endpoint, refuse_other_model, refuse_url_credentials

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


PW = "Pw9xKq2mZt7LrV4n"


@pytest.mark.parametrize(("endpoint", "shown"), [
    (f"http://evaluser:{PW}@127.0.0.1:9000/v1", "http://evaluser:[REDACTED]@127.0.0.1:9000/v1"),
    (f"https://:{PW}@sim.example/v1/", "https://:[REDACTED]@sim.example/v1/"),  # no user, as Redis URLs write it
    (f"http://{PW}@sim.example/v1", "http://[REDACTED]@sim.example/v1"),  # a token standing alone
    (f"http://evaluser:{PW[:4]}/{PW[4:]}@sim.example/v1", "http://evaluser:[REDACTED]@sim.example/v1"),
    (f"https://sim.example/v1?api-key={PW}", "https://sim.example/v1?api-key=[REDACTED]"),
])
def test_a_url_carrying_a_credential_is_refused_showing_it_masked(endpoint: str, shown: str) -> None:
    # Before (probe p10, F6): the URL was evaluated (or refused) as given, and its password was copied into the run's
    # environment and error, the signed decision, the audit log and the route's reason.
    with pytest.raises(ConfigError) as err:
        refuse_url_credentials(endpoint)
    assert err.value.message == (f"eval endpoint {shown!r} carries a credential in its URL, which every record of "
                                 "the run would keep: list the endpoint in the endpoints file "
                                 "(LOCKGATE_ENDPOINTS_FILE) with its credential named there, and give its id")
    assert PW not in err.value.message and PW[4:] not in err.value.message


@pytest.mark.parametrize("endpoint", ["", "default", "openai-prod", "http://127.0.0.1:9000/v1",
                                      "https://api.openai.com/v1/", "http://sim/v1?user=a@b"])
def test_an_id_or_a_url_without_a_credential_is_taken(endpoint: str) -> None:
    refuse_url_credentials(endpoint)


def test_another_place_is_named_with_its_password_masked() -> None:
    with pytest.raises(ConfigError) as err:
        refuse_other_endpoint(SHIPS, f"http://evaluser:{PW}@sim/v1", "http://sim/v1")
    assert PW not in err.value.message
    assert "asks for endpoint 'http://evaluser:[REDACTED]@sim/v1'" in err.value.message
