"""Pricing: cached tokens at the cached rate, unknown models unpriced, groups per message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lockgate.anthropicwire import usage as anthropic_usage
from lockgate.contracts import InferenceEvent
from lockgate.contracts.inference import BILLED_BY, ROUTER, ROUTER_BILLED
from lockgate.llmwire import Usage
from lockgate.pricebook import load_price_book
from lockgate.services.cost.domain import (
    FOLDED,
    RECORDS_MAX,
    ModelPrice,
    PriceBookError,
    distinct_events,
    event_cost,
    parse_price_book,
    price_events,
)
from lockgate.services.router.budgets import NANO, cost_of

pytestmark = pytest.mark.timeout(30)

BOOK = {
    "version": "t1",
    "currency": "USD",
    "models": {
        "m-cache": {"input_per_mtok": 2.0, "output_per_mtok": 10.0, "cached_input_per_mtok": 0.5},
        "m-plain": {"input_per_mtok": 1.0, "output_per_mtok": 3.0},
    },
}


@pytest.mark.parametrize(
    ("model", "inp", "cached", "out", "expected"),
    [
        ("m-cache", 1_000_000, 0, 0, 2.0),
        ("m-cache", 1000, 400, 200, (600 * 2.0 + 400 * 0.5 + 200 * 10.0) / 1e6),
        ("m-plain", 1000, 400, 200, (1000 * 1.0 + 200 * 3.0) / 1e6),  # no cached rate: input rate
        ("m-cache", 100, 500, 0, 100 * 0.5 / 1e6),  # cached beyond input is capped at input
    ],
)
def test_event_cost(model: str, inp: int, cached: int, out: int, expected: float) -> None:
    book = parse_price_book(BOOK)
    e = InferenceEvent(app="a", model=model, input_tokens=inp, cached_tokens=cached, output_tokens=out)
    assert event_cost(e, book.models[model]) == pytest.approx(expected, rel=1e-12)


def test_price_events_entries_and_groups() -> None:
    book = parse_price_book(BOOK)
    t0 = datetime(2025, 3, 1, tzinfo=UTC)
    events = [
        InferenceEvent(app="shop", deployment="d", model="m-cache", input_tokens=1000, cached_tokens=400,
                       output_tokens=200, time=t0),
        InferenceEvent(app="shop", deployment="d", model="m-cache", input_tokens=1000, output_tokens=0,
                       time=t0 + timedelta(seconds=5)),
        InferenceEvent(app="shop", deployment="d", model="mystery", input_tokens=99, output_tokens=9, time=t0),
        InferenceEvent(app="shop", deployment="d", model="", response_model="m-plain", input_tokens=10, time=t0,
                       tenant="acme"),
    ]
    priced = price_events(events, book)
    entries = priced.entries
    assert [x.event_id for x in entries] == [e.id for e in events]
    assert [x.priced for x in entries] == [True, True, False, True]
    assert [x.cost_usd for x in entries] == pytest.approx([0.0034, 0.002, 0.0, 0.00001])
    assert [x.model for x in entries] == ["m-cache", "m-cache", "mystery", "m-plain"]
    assert [x.tenant for x in entries] == ["default"] * 3 + ["acme"] and book.hash.startswith("sha256:")
    by_model = {(r.tenant, r.model): r for r in priced.records}
    assert set(by_model) == {("default", "m-cache"), ("default", "mystery"), ("acme", "m-plain")}
    r = by_model[("default", "m-cache")]
    assert (r.calls, r.input_tokens, r.cached_tokens, r.output_tokens) == (2, 2000, 400, 200)
    assert r.cost_usd == pytest.approx(0.0054)
    assert (r.window_start, r.window_end) == (t0, t0 + timedelta(seconds=5))
    assert by_model[("default", "mystery")].unpriced_calls == 1
    assert by_model[("default", "mystery")].cost_usd == 0.0


@pytest.mark.parametrize(("attributes", "billed"), [
    ({"lockgate.usage_unknown": "worst_case", "lockgate.charged_input_tokens": "300",
      "lockgate.charged_output_tokens": "2000"}, (300, 2000, 0)),
    ({"lockgate.charged_input_tokens": "300", "lockgate.charged_output_tokens": "2000"}, (5, 1, 2)),  # not unknown
    ({"lockgate.usage_unknown": "worst_case", "lockgate.charged_input_tokens": "-3",
      "lockgate.charged_output_tokens": "2000"}, (5, 1, 2)),  # no count: the usage it reported
    ({"lockgate.usage_unknown": "worst_case", "lockgate.charged_input_tokens": str(2**32),
      "lockgate.charged_output_tokens": "1"}, (5, 1, 2)),  # beyond what a usage field holds
], ids=["charged", "not-unknown", "negative", "too-large"])
def test_a_call_whose_usage_is_unknown_is_priced_at_what_the_router_charged(attributes: dict, billed: tuple) -> None:
    # Found by a probe: the router's budgets kept a call's worst case when it gave up on the call after sending
    # it, while the ledger priced its event's usage (none): `lockgate cost` showed half of what the budget kept.
    book = parse_price_book(BOOK)
    e = InferenceEvent(app="a", model="m-cache", input_tokens=5, output_tokens=1, cached_tokens=2,
                       attributes=attributes)
    assert e.billed_tokens == billed
    (entry,) = price_events([e], book).entries
    assert (entry.input_tokens, entry.output_tokens, entry.cached_tokens) == billed
    assert entry.cost_usd == pytest.approx(book.models["m-cache"].cost(*billed), rel=1e-12) == event_cost(
        e, book.models["m-cache"])


def test_price_book_hash_follows_content() -> None:
    a = parse_price_book(BOOK)
    b = parse_price_book({**BOOK, "version": "t2"})
    assert a.hash != b.hash and a.hash == parse_price_book(dict(BOOK)).hash


@pytest.mark.parametrize(
    "bad",
    [
        {"version": "x", "models": {"m": {"input_per_mtok": -1, "output_per_mtok": 1}}},
        {"version": "x", "models": {"m": {"input_per_mtok": 1}}},
        {"version": "x", "currency": "EUR", "models": {}},
        {"models": {}},
    ],
)
def test_malformed_price_books_are_rejected(bad: dict) -> None:
    with pytest.raises(PriceBookError):
        parse_price_book(bad)


def test_shipped_price_book_prices_the_simulator_models(tmp_path) -> None:
    book = load_price_book("")
    assert {"sim-good", "sim-bad", "sim-stable", "sim-canary", "gpt-4o"} <= set(book.models)
    assert isinstance(book.models["gpt-4o"], ModelPrice)
    with pytest.raises(PriceBookError):
        load_price_book(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("version: [unclosed")
    with pytest.raises(PriceBookError):
        load_price_book(str(tmp_path / "bad.yaml"))


def test_an_event_listed_twice_is_priced_once() -> None:
    a, b = (InferenceEvent(app="shop", model="sim-good", input_tokens=n) for n in (10, 20))
    assert distinct_events([a, b, a, b]) == [a, b]
    priced = price_events(distinct_events([a, a, b]), load_price_book(""))
    assert [e.event_id for e in priced.entries] == [a.id, b.id] and priced.records[0].calls == 2


def test_groups_past_the_cap_fold_into_one_record_and_the_ledger_keeps_every_event() -> None:
    # Probe p42 F1: a message of 5,000 events naming 5,000 models made 5,000 cost records. The busiest groups keep a
    # record each; the rest are summed under FOLDED. Every event keeps its own ledger entry, model and cost.
    book = load_price_book("")
    busy = [InferenceEvent(app="shop", deployment="web", model="sim-good", input_tokens=10) for _ in range(3)]
    made_up = [InferenceEvent(app="shop", deployment=f"d{i % 7}", model=f"made-up-{i}", input_tokens=1)
               for i in range(5000)]
    priced = price_events(busy + made_up, book)
    assert len(priced.records) == RECORDS_MAX == len(set(priced.group_keys))
    assert priced.records[-1].model == "sim-good" and priced.records[-1].calls == 3  # the busiest, kept
    folded = [r for r in priced.records if r.model == FOLDED]
    assert len(folded) == 1 and folded[0].deployment == FOLDED and folded[0].unpriced_calls == 5000 - (RECORDS_MAX - 2)
    assert sum(r.calls for r in priced.records) == 5003
    assert sum(r.input_tokens for r in priced.records) == 5030
    assert sum(r.cost_usd for r in priced.records) == pytest.approx(sum(e.cost_usd for e in priced.entries))
    assert [(e.event_id, e.model) for e in priced.entries] == [(e.id, e.model) for e in busy + made_up]
    assert price_events(list(reversed(busy + made_up)), book).group_keys == priced.group_keys  # a redelivery's ids
    few = price_events(made_up[:RECORDS_MAX], book)  # at the cap: nothing folded
    assert len(few.records) == RECORDS_MAX and FOLDED not in {r.model for r in few.records}


# Anthropic's usage of one call writing a 100,000-token cached prefix for an hour (probe p38 F3), in the API versions
# that split the writes by TTL, and in the older ones that give their total alone (5-minute writes: no 1-hour ones).
HOUR_WRITE = {"input_tokens": 50, "cache_creation_input_tokens": 100_000, "cache_read_input_tokens": 0,
              "output_tokens": 200, "cache_creation": {"ephemeral_5m_input_tokens": 0,
                                                       "ephemeral_1h_input_tokens": 100_000}}


@pytest.mark.parametrize(("usage", "writes", "hour", "usd"), [
    (HOUR_WRITE, 100_000, 100_000, (50 * 3.00 + 100_000 * 6.00 + 200 * 15.00) / 1e6),
    ({**HOUR_WRITE, "cache_creation": {"ephemeral_5m_input_tokens": 60_000, "ephemeral_1h_input_tokens": 40_000}},
     100_000, 40_000, (50 * 3.00 + 60_000 * 3.75 + 40_000 * 6.00 + 200 * 15.00) / 1e6),
    ({k: v for k, v in HOUR_WRITE.items() if k != "cache_creation"}, 100_000, 0,
     (50 * 3.00 + 100_000 * 3.75 + 200 * 15.00) / 1e6),
    ({**HOUR_WRITE, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100_000, "cache_creation": {}},
     0, 0, (50 * 3.00 + 100_000 * 0.30 + 200 * 15.00) / 1e6),
], ids=["1h-split", "5m-and-1h-split", "total-only-is-5m", "reads-only"])
def test_anthropic_cache_writes_are_priced_at_their_write_rates_by_budgets_and_the_ledger(
        usage: dict, writes: int, hour: int, usd: float) -> None:
    # Before: usage() folded the writes into prompt_tokens and nothing else, and the price book had no write
    # rate: the 1h write was charged 0.303150 USD on budgets and the ledger where Anthropic bills 0.603150.
    tokens = Usage(**anthropic_usage(usage)).tokens()
    assert (tokens.input_tokens, tokens.cache_write_tokens, tokens.cache_write_1h_tokens) == (100_050, writes, hour)
    assert not tokens.doubt
    price = load_price_book().models["claude-sonnet-4"]
    charged = cost_of(price, tokens.input_tokens, tokens.output_tokens, tokens.cached_tokens,
                      tokens.cache_write_tokens, tokens.cache_write_1h_tokens)
    assert charged.usd == pytest.approx(usd * NANO, abs=1)
    event = InferenceEvent(app="a", model="claude-sonnet-4", input_tokens=tokens.input_tokens,
                           output_tokens=tokens.output_tokens, cached_tokens=tokens.cached_tokens,
                           cache_write_tokens=tokens.cache_write_tokens, cache_write_1h_tokens=tokens.cache_write_1h_tokens)
    assert event_cost(event, price) == pytest.approx(usd)


def test_write_rates_fall_back_to_the_input_rate_and_an_hour_to_five_minutes() -> None:
    plain = ModelPrice(input_per_mtok=1.0, output_per_mtok=3.0)
    assert plain.cost(1000, 0, 0, 600, 600) == pytest.approx(1000 * 1.0 / 1e6)
    five = ModelPrice(input_per_mtok=1.0, output_per_mtok=3.0, cache_write_per_mtok=1.25)
    assert five.cost(1000, 0, 0, 600, 200) == pytest.approx((400 * 1.0 + 600 * 1.25) / 1e6)
    # Writes count inside the input, after the reads: never charged beyond it.
    both = ModelPrice(input_per_mtok=1.0, output_per_mtok=3.0, cached_input_per_mtok=0.1, cache_write_per_mtok=1.25,
                      cache_write_1h_per_mtok=2.0)
    assert both.cost(1000, 0, 700, 900, 900) == pytest.approx((700 * 0.1 + 300 * 2.0) / 1e6)


def test_the_shipped_price_book_gives_its_anthropic_models_their_write_rates() -> None:
    for name, price in load_price_book().models.items():
        if name.startswith("claude"):
            assert price.cache_write_per_mtok == pytest.approx(price.input_per_mtok * 1.25), name
            assert price.cache_write_1h_per_mtok == pytest.approx(price.input_per_mtok * 2), name


@pytest.mark.parametrize(("rate", "input_usd"), [({}, 3.0), ({"lockgate.charged_input_rate": "dearest"}, 6.0)],
                         ids=["plain", "dearest"])
def test_a_call_charged_its_worst_case_is_priced_at_the_input_rate_the_router_charged(rate: dict,
                                                                                     input_usd: float) -> None:
    # Its writes reported are none of it: the router charged the worst case's input at the input rate, or (its
    # upstream writing the prompt cache: budgets.reckoned) at the dearest, and the ledger books the same.
    e = InferenceEvent(app="a", input_tokens=10, cache_write_tokens=10, cache_write_1h_tokens=10,
                       attributes={"lockgate.usage_unknown": "x", "lockgate.charged_input_tokens": "100",
                                   "lockgate.charged_output_tokens": "5", **rate})
    assert (e.billed_tokens, e.billed_writes) == ((100, 5, 0), (0, 0))
    price = load_price_book().models["claude-sonnet-4"]
    assert event_cost(e, price) == pytest.approx((100 * input_usd + 5 * 15.0) / 1e6)


def test_the_dearest_input_rate_is_the_highest_the_price_book_gives() -> None:
    assert ModelPrice(input_per_mtok=1.0, output_per_mtok=3.0).dearest_input_per_mtok == 1.0
    assert ModelPrice(input_per_mtok=1.0, output_per_mtok=3.0, cache_write_per_mtok=1.25).dearest_input_per_mtok == 1.25
    assert ModelPrice(input_per_mtok=1.0, output_per_mtok=3.0, cache_write_per_mtok=1.25,
                      cache_write_1h_per_mtok=2.0).writing().cost(1000, 10) == pytest.approx((2000 + 30) / 1e6)
    # A book whose write rates are below its input rate (none bills so) still reserves the input rate.
    assert ModelPrice(input_per_mtok=1.0, output_per_mtok=3.0, cache_write_1h_per_mtok=0.5).dearest_input_per_mtok == 1.0


@pytest.mark.parametrize(
    ("model", "response_model", "priced_as", "cost"),
    [
        ("m-plain", "m-cache", "m-cache", 0.012),  # another model answered (an aggregator's fallback): its price
        ("m-plain", "openrouter/m-plain", "m-plain", 0.004),  # an aggregator's prefix: the same model
        ("m-plain", "mystery", "m-plain", 0.004),  # the book has no model that answered: the one asked for
        ("m-plain", "m-plain-2024-07-18", "m-plain", 0.004),  # a version of the model asked for: the same model
        ("m-plain", "", "m-plain", 0.004),
    ],
    ids=["other", "prefixed", "unknown-answerer", "dated", "none"],
)
def test_an_event_answered_by_another_model_is_priced_as_the_model_that_answered(
        model: str, response_model: str, priced_as: str, cost: float) -> None:
    # Probe p50 F1: an aggregator upstream answered with another model than the release's; the ledger priced it
    # as the release's model while the provider billed the other.
    book = parse_price_book(BOOK)
    event = InferenceEvent(app="shop", deployment="d", model=model, response_model=response_model,
                           input_tokens=1000, output_tokens=1000, time=datetime(2025, 3, 1, tzinfo=UTC))
    entry = price_events([event], book).entries[0]
    assert (entry.model, entry.priced) == (priced_as, True)
    assert entry.cost_usd == pytest.approx(cost)


def test_an_event_of_a_call_a_router_bills_is_not_booked_again() -> None:
    # Probe p61 F3: the OTLP receiver marks an application's span of a call made through a router; the router's
    # own event books it. A router's event saying so is still booked (only an application's event defers to it).
    marked = {BILLED_BY: ROUTER_BILLED}
    span = InferenceEvent(app="shop", source="otlp", model="sim-good", input_tokens=10, attributes=marked)
    served = InferenceEvent(app="shop", source=ROUTER, model="sim-good", input_tokens=10, attributes=marked)
    plain = InferenceEvent(app="shop", source="otlp", model="sim-good", input_tokens=10)
    assert distinct_events([span, served, plain]) == [served, plain]
