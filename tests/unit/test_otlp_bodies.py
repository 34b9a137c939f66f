"""How the OTLP/HTTP receiver shares its body slots between tenants, and how long a body may take (bodies.py)."""

from __future__ import annotations

import pytest

from lockgate.server.httpguard import HttpLimits
from lockgate.services.otlp.bodies import BodySlots, otlp_limits


def test_a_tenant_takes_its_share_and_the_rest_stays_for_the_others() -> None:
    slots = BodySlots(slots=4, per_tenant=2)
    with slots.holding("acme"), slots.holding("acme"):
        assert "tenant acme already has 2" in (slots.refusal("acme") or "")
        assert slots.refusal("bravo") is None
        with slots.holding("bravo"), slots.holding("globex"):
            assert slots.refusal("initech") == "too many OTLP exports being received; retry shortly"
    assert not slots.held and slots.refusal("acme") is None


@pytest.mark.parametrize(("slots", "per_tenant", "share"), [(8, 4, 4), (1, 1, 1), (2, 5, 2), (3, 0, 1)])
def test_a_share_is_at_least_one_slot_and_at_most_all(slots: int, per_tenant: int, share: int) -> None:
    assert BodySlots(slots, per_tenant).per_tenant == share


def test_otlp_bodies_take_the_servers_limits_with_shorter_times() -> None:
    server = HttpLimits(head_s=75, body_grace_s=10, body_min_rate=16384, body_max_s=300, body_bytes=1 << 28,
                        max_connections=0)
    otlp = otlp_limits(server)
    assert (otlp.body_max_s, otlp.body_grace_s, otlp.body_min_rate, otlp.body_bytes) == (30.0, 5.0, 16384, 1 << 28)
    tighter = otlp_limits(HttpLimits(**{**{f: getattr(server, f) for f in server.__struct_fields__},
                                        "body_max_s": 10, "body_grace_s": 1}))
    assert (tighter.body_max_s, tighter.body_grace_s) == (10, 1)  # an operator's tighter ones stand
