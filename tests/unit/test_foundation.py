"""Pure pieces of the foundation: ids, hashing, redaction, subjects, settings."""

from __future__ import annotations

import uuid

import pytest

from lockgate.config import from_env
from lockgate.errors import ConfigError
from lockgate.ids import canonical_json, content_hash, derived_ids, uuid7, uuid7_time
from lockgate.redact import redact, scrub_secrets
from lockgate.subjects import Subjects, token


def test_uuid7_is_version_7_and_time_ordered() -> None:
    ids = [uuid7() for _ in range(1000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert len(set(ids)) == 1000
    stamps = [u.int >> 80 for u in parsed]
    assert stamps == sorted(stamps)


def test_ids_made_while_decoding_a_message_derive_from_it() -> None:
    def made(seed: str) -> list[str]:
        with derived_ids(seed, 1_765_000_000_123):
            return [uuid7() for _ in range(3)]

    first = made("msg-1")
    assert made("msg-1") == first  # decoded again (another consumer, a redelivery): the same ids, in order
    assert len(set(first)) == 3 and not set(made("msg-2")) & set(first)
    parsed = [uuid.UUID(i) for i in first]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert {uuid7_time(i).timestamp() for i in first} == {1_765_000_000.123}  # the message's time
    assert uuid7() not in first and uuid7_time(uuid7()).year >= 2026  # outside it: random, now


def test_content_hash_is_canonical() -> None:
    assert content_hash({"b": 1, "a": [1, 2]}) == content_hash({"a": [1, 2], "b": 1})
    assert canonical_json({"b": 1, "a": 2}) == b'{"a":2,"b":1}'
    assert content_hash(b"x").startswith("sha256:") and len(content_hash(b"x")) == 71


@pytest.mark.parametrize(
    "secret",
    ["sk-abcdefghijklmnopqrstuvwxyz123456", "AKIAABCDEFGHIJKLMNOP", "ghp_abcdefghijklmnopqrstuvwxyz012345",
     "Bearer abcdefghijklmnopqrstuvwxyz", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abcdefghijklmnop"],
)
def test_secrets_are_scrubbed(secret: str) -> None:
    out = scrub_secrets(f"my token is {secret} ok")
    assert secret not in out and "[REDACTED]" in out and out.endswith(" ok")


def test_redaction_modes() -> None:
    assert redact("hello", "scrub") == "hello"
    assert redact("hello", "drop") is None
    assert redact("hello", "hash").startswith("sha256:")
    assert redact(None, "scrub") is None


def test_subjects_are_prefixed_and_tokens_safe() -> None:
    s = Subjects("t1")
    assert s.inference("my.app name", "acme co") == "t1.inference.acme=20co.my=2Eapp=20name"
    assert s.inference("shop") == "t1.inference.default.shop"
    assert s.gate_decided("rel*1") == "t1.gate.decided.rel=2A1"
    assert s.streams["inference"].name == "T1_INFERENCE"
    assert token("") == "="
    with pytest.raises(ConfigError):
        Subjects("bad.prefix")


def test_only_the_routers_own_subjects_are_served() -> None:
    # Found by a probe: an app named `router` publishes on `t1.inference.router`, which ended in `.router` and was
    # taken as served (its events then aborted another tenant's canary through drift, over NATS and OTLP alike).
    s = Subjects("t1")
    assert s.is_served(s.served("shop")) and s.is_served(s.served("router")) and s.is_served(s.served("a", "router"))
    assert not any(s.is_served(x) for x in (s.inference("router"), s.inference("shop"), "t1.inference.t..router",
                                            "t1.inference.shop.router", "t1.inference.a.b.c.router",
                                            "t2.inference.t.shop.router"))


def test_an_inference_subject_names_its_sender() -> None:
    # Consumers hold a message's events to the tenant and app its subject names (a per-application NATS user
    # may publish on its own subject only), so the subject must say both, one-to-one, sent or served.
    s = Subjects("t1")
    assert s.sender(s.inference("my.app", "acme co")) == ("acme co", "my.app")
    assert s.sender(s.served("shop", "t")) == ("t", "shop")
    assert s.sender(s.inference("router", "t")) == ("t", "router")
    assert not any(s.sender(x) for x in ("t1.inference.shop", "t1.inference.a.b.c", "t1.inference.a.b.c.router",
                                         "t1.inference.a=41.b", "t2.inference.a.b", "t1.eval.a.b"))


def test_settings_from_env() -> None:
    s = from_env({"LOCKGATE_ROUTER_PORT": "9999", "LOCKGATE_PREFIX": "zz"})
    assert s.router_port == 9999 and s.prefix == "zz"
    with pytest.raises(ConfigError, match="router_port"):
        from_env({"LOCKGATE_ROUTER_PORT": "many"})
