"""The online judge's shared budget ledger (pure): a call reserves its largest cost before it starts and settles
to its real cost after, so calls in flight never take the day past its limit; calls per minute are counted in
the same ledger; each UTC day has its own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lockgate.pricebook import ModelPrice
from lockgate.services.evaluator import judge, judgeledger
from lockgate.services.evaluator.judgeledger import NANO, Ledger, Refused, reserve, settle

pytestmark = pytest.mark.timeout(30)
NOON = datetime(2026, 12, 3, 12, 0, 5, tzinfo=UTC)


def test_reservations_in_flight_count_against_the_limit_and_settling_frees_the_rest() -> None:
    state, refused = reserve(None, 4 * NANO // 10, 1.0, 60, NOON)  # 0.4 USD of a 1 USD day
    assert refused is None and state == Ledger(spent=4 * NANO // 10, minute=int(NOON.timestamp() // 60), calls=1)
    state, _ = reserve(state, 4 * NANO // 10, 1.0, 60, NOON)
    full, refused = reserve(state, 4 * NANO // 10, 1.0, 60, NOON)  # a third call in flight would pass the limit
    assert full is None and isinstance(refused, Refused) and refused.wait_s == 0
    assert "1 USD is spent or reserved (0.800000 USD; a call may cost up to 0.400000 USD)" in refused.reason
    state = settle(state, 4 * NANO // 10, NANO // 10)  # the first call cost 0.1 USD
    assert state.spent == 5 * NANO // 10
    state, refused = reserve(state, 4 * NANO // 10, 1.0, 60, NOON)
    assert refused is None and state.spent == 9 * NANO // 10  # exactly up to the limit is allowed


def test_calls_per_minute_wait_for_the_next_minute() -> None:
    state, _ = reserve(None, 1, 1.0, 2, NOON)
    state, _ = reserve(state, 1, 1.0, 2, NOON)
    full, refused = reserve(state, 1, 1.0, 2, NOON + timedelta(seconds=10))
    assert full is None and refused is not None and refused.wait_s == pytest.approx(45)
    state, refused = reserve(state, 1, 1.0, 2, NOON + timedelta(minutes=1))
    assert refused is None and state.calls == 1


def test_each_utc_day_and_deployment_has_its_own_ledger_key_apart_from_gateway_budgets() -> None:
    assert judgeledger.key("chat", NOON) == "_judge.chat.2026-12-03"
    assert judgeledger.key("shop.v2", NOON + timedelta(hours=12)) == "_judge.shop=2Ev2.2026-12-04"


def test_the_largest_cost_bounds_what_the_provider_can_bill() -> None:
    price = ModelPrice(input_per_mtok=2.0, output_per_mtok=8.0)
    params = judge.JudgeParams(model="m", rubric="polite?")
    msgs = judge.messages(params, "hello there", "héllo back", None)
    largest = judgeledger.largest_cost(price, msgs, 256)
    prompt_bytes = sum(len(m["content"].encode()) for m in msgs)
    assert largest >= judgeledger.cost(price, prompt_bytes, 256) > judgeledger.cost(price, prompt_bytes // 4, 20)
    assert judgeledger.cost(ModelPrice(input_per_mtok=0, output_per_mtok=1000), 0, 16) == 16_000_000  # no float noise


def test_a_stray_jetstream_acknowledgement_is_no_ledger_at_zero() -> None:
    import msgspec

    from lockgate.services.evaluator.judgeledger import Ledger

    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(b'{"stream":"LG_INFERENCE","seq":132}', type=Ledger)
