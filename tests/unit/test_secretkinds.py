"""The secrets online pii_free looks for, by kind (lockgate.secretkinds): found, counted, carried as an attribute."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockgate import secretkinds

KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123456789"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"


def _naive(text: str) -> list[tuple[int, int, str]]:
    # Each match tested against every one found before it: what find must give, in one pass per kind.
    found: list[tuple[int, int, str]] = []
    for kind, rx in secretkinds.SECRETS:
        found += [(m.start(), m.end(), kind) for m in rx.finditer(text)
                  if not any(m.start() < e and s < m.end() for s, e, _ in found)]
    return sorted(found)


@pytest.mark.parametrize("text", [
    "", "no secrets here", f"{KEY} and {KEY}", f"sk-AKIAIOSFODNN7EXAMPLE{'x' * 20} AKIAIOSFODNN7EXAMPLE",
    f"{JWT}.{KEY} -----BEGIN RSA PRIVATE KEY----- xoxb-1234567890-abc ghp_{'a1B2' * 9} AIza{'B' * 35}",
    " ".join(["AKIAIOSFODNN7EXAMPLE", KEY] * 50),
])
def test_find_is_each_kind_in_turn_overlapping_none_found_before(text: str) -> None:
    assert secretkinds.find(text) == _naive(text)


def test_an_aws_key_id_inside_a_provider_key_is_the_provider_key() -> None:
    text = "sk-AKIAIOSFODNN7EXAMPLEabcdef"
    assert [kind for _, _, kind in secretkinds.find(text)] == ["api_key"]
    assert re.search(dict(secretkinds.SECRETS)["aws_access_key"], text)  # which it holds, and is not counted apart


@pytest.mark.parametrize("text", [
    'client = OpenAI(api_key="YOUR_API_KEY")', 'api_key = "sk-..."', 'password = "hunter2"',
    'headers = {"X-Api-Key": "abc123"}', "postgres://user:pass@localhost:5432/db", 'secret_key = "change-me"',
    'curl -H "Authorization: Bearer $TOKEN"', "sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
])
def test_placeholders_and_keyword_pairs_are_no_secret_of_a_known_shape(text: str) -> None:
    assert secretkinds.counted(text) == {}


def test_counts_round_trip_the_attribute_by_kind() -> None:
    counts = secretkinds.counted(f"{KEY} {JWT} {KEY} AKIAIOSFODNN7EXAMPLE")
    assert counts == {"api_key": 2, "jwt": 1, "aws_access_key": 1}
    assert secretkinds.encode(counts) == "api_key:2,aws_access_key:1,jwt:1"
    assert secretkinds.decode(secretkinds.encode(counts)) == counts
    assert secretkinds.decode("") == {}



@pytest.mark.parametrize("kind", sorted(secretkinds.KINDS))
def test_every_match_of_a_kind_holds_one_of_its_trigger_words(kind: str) -> None:
    # A kind is looked for only in a text holding one of its words: none of its matches may lack them all.
    rx = dict(secretkinds.SECRETS)[kind]

    @settings(max_examples=50, deadline=None)
    @given(st.from_regex(rx, fullmatch=True))
    def holds_a_trigger(match: str) -> None:
        assert any(word in match for word in secretkinds._TRIGGERS[kind]), match

    holds_a_trigger()
