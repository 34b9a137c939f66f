"""Names: one grammar at every edge, and a one-to-one mapping to subject tokens and KV keys."""

from __future__ import annotations

import re

import msgspec
import pytest

from lockgate.codec import Codec, encode
from lockgate.contracts import GateDecided, InferenceEvent, RolloutState
from lockgate.contracts.names import check_name, is_name
from lockgate.errors import ConfigError, InvalidEvent, InvalidName
from lockgate.subjects import token, untoken

# The names of the attack in issue 7: all four used to share one key.
COLLIDING = ["shop.v3", "shop_v3", "shop v3", "shop*v3", "shop>v3", "shop=v3", "shop=2Ev3", "", "=", "_"]
# What a NATS subject token and a KV key (nats-py's pattern) both accept.
_SUBJECT_TOKEN = re.compile(r"[^.*>\s]+")
_KV_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")


def test_tokens_are_one_to_one_and_reversible() -> None:
    tokens = [token(v) for v in COLLIDING]
    assert len(set(tokens)) == len(COLLIDING), dict(zip(COLLIDING, tokens, strict=True))
    for value, tok in zip(COLLIDING, tokens, strict=True):
        assert _SUBJECT_TOKEN.fullmatch(tok) and _KV_KEY.fullmatch(tok), tok
        assert untoken(tok) == value


@pytest.mark.parametrize("value", ["r1", "shop-v2", "shop/v1.2", "a_b", "é-release", "x" * 300])
def test_untoken_reverses_any_string(value: str) -> None:
    assert untoken(token(value)) == value


def test_names_made_only_of_safe_characters_keep_their_token() -> None:
    # Existing KV keys and subjects for plain names stay where they were.
    assert token("shop_v3") == "shop_v3" and token("rel-2") == "rel-2"


@pytest.mark.parametrize("tok", ["=41", "a.b", "=2", "x=", "=2e"])
def test_untoken_refuses_what_token_never_produces(tok: str) -> None:
    with pytest.raises(ConfigError):
        untoken(tok)


@pytest.mark.parametrize("name", ["r1", "shop.v3", "shop_v3", "shop/v1.2", "shop@v3", "app:1+2", "a" * 128])
def test_valid_names(name: str) -> None:
    assert is_name(name) and check_name(name) == name


@pytest.mark.parametrize("name", ["", "shop v3", "shop*v3", "a*b", "a>b", ".hidden", "-x", "a\nb", "a" * 129,
                                  "naïve", None, 3])
def test_invalid_names_are_refused_with_the_rule(name: object) -> None:
    assert not is_name(name)
    with pytest.raises(InvalidName, match="invalid release .*letters, digits"):
        check_name(name, "release")


def test_contracts_refuse_invalid_names_when_decoded_or_made() -> None:
    # Every consumer and edge that decodes a contract refuses them, naming the field.
    def wire(type_: str, **fields: str) -> bytes:
        return encode({"type": type_, **fields})

    with pytest.raises(InvalidEvent, match=r"\$.release"):
        Codec(GateDecided).decode(wire("lockgate.gate.decided", release="shop*v3", decision="PASS", rules=[]))
    with pytest.raises(InvalidEvent, match=r"\$.deployment"):
        Codec(RolloutState).decode(wire("lockgate.rollout.state", deployment="a*b", stable_release="r1"))
    with pytest.raises(InvalidEvent, match=r"\$.tenant"):
        Codec(InferenceEvent).decode(wire("lockgate.inference", app="a", tenant="t 1"))
    with pytest.raises(InvalidEvent, match=r"\$\[0\]\.app"):
        Codec(list[InferenceEvent]).decode(b"[" + wire("lockgate.inference", app="a" * 129) + b"]")
    # ...and so does making one in code.
    with pytest.raises(ValueError, match=r"invalid release 'shop\*v3'.*\$.release"):
        GateDecided(release="shop*v3", decision="PASS", rules=[])
    with pytest.raises(ValueError, match=r"\$.app"):
        InferenceEvent(app=["not", "a", "name"])  # type: ignore[arg-type]
    ok = InferenceEvent(app="shop", deployment="", release="")  # empty optional references stay valid
    assert Codec(InferenceEvent).decode(encode(ok)).app == "shop"
    assert msgspec.json.decode(encode(GateDecided(release="shop.v3", decision="PASS", rules=[])),
                               type=GateDecided).release == "shop.v3"


def test_a_name_known_good_in_one_field_never_lets_a_bad_one_through_another() -> None:
    # Names seen valid are remembered and checked all at once; a bad one among them still fails alone.
    InferenceEvent(app="shop", tenant="acme", deployment="checkout", release="r1")
    with pytest.raises(ValueError, match=r"invalid release 'r 1'.*\$.release"):
        InferenceEvent(app="shop", tenant="acme", deployment="checkout", release="r 1")
    with pytest.raises(ValueError, match=r"\$.deployment"):
        InferenceEvent(app="shop", tenant="acme", deployment={"not": "hashable"}, release="r1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\$.tenant"):
        InferenceEvent(app="shop", tenant="", release="r1")  # empty: only an optional reference may be
    assert InferenceEvent(app="shop", tenant="acme", deployment="", release="r1").deployment == ""


def test_names_seen_together_are_remembered_per_type() -> None:
    """A tuple of names cleared for one type (an empty optional deployment) never clears another type whose
    field at that position must not be empty, and a remembered tuple clears only exactly those names."""
    from lockgate.contracts import InferenceScored

    for _ in range(2):  # the second time from the remembered tuples
        assert InferenceEvent(app="shop", tenant="acme", deployment="", release="").deployment == ""
        InferenceScored(event_id="e", app="shop", tenant="acme", deployment="", release="")
    with pytest.raises(ValueError, match=r"\$.app"):
        InferenceEvent(app="", tenant="acme", deployment="", release="")
    with pytest.raises(InvalidEvent, match=r"release .r\*1.* at `\$\.release` - at `\$\[1\]`"):
        ok = encode(InferenceEvent(app="shop", tenant="acme", release="r1"))
        Codec(list[InferenceEvent]).decode(b"[" + ok + b"," + ok.replace(b'"r1"', b'"r*1"') + b"]")


def test_names_checked_per_decoded_batch_are_checked_everywhere_else_as_events_are_made() -> None:
    """A list of events has its names checked once per distinct value after decoding; the deferral is this
    thread's and ends with the decode, even a failed one, so events made meanwhile or later are checked."""
    import threading

    from lockgate.contracts import names

    bad = encode(InferenceEvent(app="shop")).replace(b'"shop"', b'"sh op"')
    with pytest.raises(InvalidEvent, match=r"invalid app 'sh op'.* - at `\$\.app` - at `\$\[0\]`"):
        Codec(list[InferenceEvent]).decode(b"[" + bad + b"]")
    with pytest.raises(InvalidEvent, match=r"invalid app 'sh op'.* - at `\$\.app`$"):
        Codec(InferenceEvent).decode(bad)
    with pytest.raises(ValueError, match=r"\$\.app"):
        InferenceEvent(app="sh op")  # the failed decode left nothing deferred
    errors: list[Exception] = []

    def make() -> None:
        try:
            InferenceEvent(app="sh op")
        except ValueError as exc:
            errors.append(exc)

    with names.deferred():
        other = threading.Thread(target=make)
        other.start()
        other.join()
    assert len(errors) == 1  # another thread's event is checked while this one decodes
