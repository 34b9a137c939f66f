"""How the OTLP/HTTP receiver shares its body slots between tenants, and how long a body may take (bodies.py)."""

from __future__ import annotations

import pytest

from lockgate.services.otlp.bodies import BodyPace, BodySlots


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


@pytest.mark.parametrize(("arrived", "due"), [(0, 5.0), (16 * 1024, 6.0), (160 * 1024, 15.0), (10**9, 30.0)])
def test_each_16_kib_buys_a_second_past_the_grace_up_to_the_total(arrived: int, due: float) -> None:
    assert BodyPace(total_s=30.0, grace_s=5.0, min_rate=16 * 1024).due(arrived) == pytest.approx(due)
