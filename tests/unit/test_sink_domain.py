"""The sink's pure choices: which rows of a batch are new, and insert tokens."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta

import pytest

from lockgate.codec import Codec
from lockgate.contracts import InferenceEvent
from lockgate.ids import uuid7_prefix
from lockgate.server.service import fewer_collections
from lockgate.services.sink.domain import (
    FACTS,
    ID_AHEAD_S,
    INFERENCE,
    StoredWindow,
    as_stored,
    batch_token,
    events_in,
    id_ceiling,
    id_order,
    key_strings,
    names_lockgate,
    new_rows,
    redaction,
    select,
)
from lockgate.store.tables import TABLES


@pytest.mark.parametrize(("keys", "origins", "stored", "expected"), [
    # one message's rows sharing a key (a drift report's features) are kept together
    ([("r1",), ("r1",), ("r2",)], [0, 0, 1], set(), [0, 1, 2]),
    # the same fact in a second message of the batch is dropped whole
    ([("r1",), ("r1",), ("r1",), ("r1",)], [0, 0, 1, 1], set(), [0, 1]),
    # a stored fact is dropped, the rest of its batch kept
    ([("r1",), ("r2",)], [0, 1], {("r1",)}, [1]),
    # row-level keys (eval cases): a case republished in another batch is dropped, its neighbours kept
    ([("run", "c1", 0), ("run", "c2", 0), ("run", "c2", 0), ("run", "c3", 0)], [0, 0, 1, 1], set(), [0, 1, 3]),
])
def test_new_rows(keys: list, origins: list[int], stored: set, expected: list[int]) -> None:
    assert new_rows(keys, origins, stored) == expected


@pytest.mark.parametrize(("keys", "origins", "stored", "expected"), [
    # an event listed twice in one message is stored once
    ([("e1",), ("e2",), ("e1",)], [0, 0, 0], set(), [0, 1]),
    # the same event in two messages of the batch: the first copy only, its neighbours kept
    ([("e1",), ("e2",), ("e2",), ("e3",)], [0, 0, 1, 1], set(), [0, 1, 3]),
    # stored already (a redelivery, or a re-send under another message id)
    ([("e1",), ("e2",)], [0, 1], {("e2",)}, [0]),
])
def test_new_rows_per_row(keys: list, origins: list[int], stored: set, expected: list[int]) -> None:
    assert new_rows(keys, origins, stored, per_row=True) == expected


def test_events_and_ledger_entries_are_facts_of_their_own() -> None:
    by_table = {p.table.name: p for p in (*FACTS, INFERENCE)}
    # Ids are chosen by producers: another tenant's or app's event under the same id is another fact.
    for name, key in (("inference_events", ("tenant", "app", "id")), ("cost_ledger", ("tenant", "app", "event_id"))):
        assert by_table[name].table.key == key
        assert by_table[name].per_row
        # A producer may build an event again under its id at another time: its row, and its ledger entry, are
        # looked up in a table of every stored key, whatever their time.
        assert by_table[name].within is None and by_table[name].keys_table == f"{name}_keys".replace("events", "event")


# An SDK of before wrote the envelope's default source and the old default variant on every event it sent.
_OLDER_SDK = (b'{"type":"lockgate.inference","id":"e1","source":"lockgate","time":"2026-01-02T03:04:05Z",'
              b'"tenant":"default","app":"shop","variant":"stable"}')


def test_an_application_event_names_no_arm_and_is_the_applications_unless_it_says() -> None:
    event = InferenceEvent(app="shop")
    assert (event.source, event.variant) == ("application", "")
    old = Codec(InferenceEvent).decode(_OLDER_SDK)  # what it said is read as it said it
    assert (old.source, old.variant) == ("lockgate", "stable")


@pytest.mark.parametrize(("source", "claims"), [
    ("lockgate", True), ("lockgate-router", True), ("lockgate-anything", True),
    ("application", False), ("otlp", False), ("shop-api", False), ("lockgateway", False), ("", False),
])
def test_names_lockgate(source: str, claims: bool) -> None:
    assert names_lockgate(source) is claims


def test_an_event_not_served_is_never_stored_as_lockgates() -> None:
    older = Codec(InferenceEvent).decode(_OLDER_SDK)
    posing = InferenceEvent(id="e2", app="shop", source="lockgate-router", variant="canary")
    own = InferenceEvent(id="e3", app="shop", source="shop-api", variant="blue")
    stored = as_stored([older, posing, own], served=False)
    # the source only: the variant is the application's word, and `served` (from the subject) says whose it is
    assert [(e.id, e.source, e.variant) for e in stored] == [
        ("e1", "application", "stable"), ("e2", "application", "canary"), ("e3", "shop-api", "blue")]
    assert stored[2] is own
    plain = [InferenceEvent(app="shop"), own]
    assert as_stored(plain, served=False) is plain  # nothing to change: the batch itself
    router = [InferenceEvent(app="shop", source="lockgate-router", variant="canary")]
    assert as_stored(router, served=True) is router  # the router's own, on its own subject


def test_select_and_token() -> None:
    assert select([[1, 2, 3], ["a", "b", "c"]], [0, 2]) == [[1, 3], ["a", "c"]]
    assert batch_token(["b", "a"]) == batch_token(["a", "b"]) != batch_token(["a"])


def test_key_strings_of_plain_and_tuple_keys() -> None:
    # A one-column key comes as its value (Table.keys), several columns as a tuple; the text is the same
    # as a 1-tuple's was, so an insert's token does not change with the form.
    assert key_strings(["e2", "e1", "e2"]) == ["e2", "e1"]
    assert sorted(key_strings([7, 3, 7])) == ["3", "7"]
    assert sorted(key_strings([("run", "c1", 0), ("run", "c1", 0)])) == ["run\x00c1\x000"]
    assert key_strings([("t", "e2"), ("t", "e1"), ("t", "e2")]) == ["t\x00e2", "t\x00e1"]  # arrival order


def test_every_table_but_spans_and_dead_letters_is_a_keyed_projection() -> None:
    projected = {p.table.name for p in FACTS} | {"inference_events"}
    assert projected | {"otel_traces", "dead_letters"} == {t.name for t in TABLES}
    assert all(p.table.key for p in FACTS)


def test_redaction_hides_prompts_and_responses_and_leaves_the_scrub_to_the_edge() -> None:
    # The consume edge scrubs every event's free text before any handler sees it (bus.consume): the sink keeps no
    # scrub of its own, which covered four columns of the twelve (probe p10).
    assert redaction("scrub") == {}
    assert redaction("drop")["prompt"]("anything") is None and redaction("drop")["response"](None) is None
    assert redaction("hash")["response"]("text").startswith("sha256:")


T0 = datetime(2026, 1, 2, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_stored_window_looks_up_only_rows_it_cannot_vouch_for() -> None:
    """After the horizon, a key this writer never stored is new without a lookup; a key it stored, or a
    row at or before the horizon (an earlier process's time), is looked up."""
    window = StoredWindow(horizon=_at(0))
    window.stored([("e1",), ("e2",)], [_at(1), _at(2)])
    keys = [("e1",), ("e3",), ("e4",), ("e5",)]
    assert window.to_look_up(keys, [_at(1), _at(3), _at(0), _at(-5)]) == [0, 2, 3]


def test_stored_window_forgets_oldest_first_and_raises_its_horizon_past_them() -> None:
    window = StoredWindow(horizon=_at(0), capacity=4, generations=2)  # two keys per generation
    for i in range(1, 7):
        window.stored([(f"e{i}",)], [_at(i)])
    # e1..e4 are forgotten: rows up to their latest time are looked up again, later ones are vouched for
    assert window.horizon == _at(4)
    assert window.to_look_up([("e4",), ("e5",), ("x",)], [_at(4), _at(5), _at(7)]) == [0, 1]


def test_ids_order_the_window_as_they_were_made_and_none_far_ahead_raises_its_horizon() -> None:
    now = T0.timestamp()
    made = [uuid7_prefix(int((now + s) * 1000)) + "-7abc-8def-0123456789ab" for s in (0, 1, 2)]
    keys = [("t", "a", i) for i in made]
    assert id_order(keys) == sorted(id_order(keys)) and id_order(keys)[0] == made[0][:13]
    ceiling = id_ceiling(now)
    assert id_order([("t", "a", uuid7_prefix(int((now + ID_AHEAD_S - 1) * 1000)))])[0] <= ceiling
    window = StoredWindow(horizon="", capacity=2, generations=1, ceiling=lambda: ceiling)
    # A producer's id sorting after every real one ("zzz"), stored and then forgotten, leaves the horizon where the
    # real ids put it, so a later real id is still vouched for; the far-ahead id itself is always looked up.
    window.stored([keys[0], ("t", "a", "zzzzzzzz")], [made[0][:13], "zzzzzzzz"])
    window.stored([keys[1]], [made[1][:13]])
    assert window.horizon == made[0][:13]
    assert window.to_look_up([keys[2], ("t", "a", "zzzzzzzz")], [made[2][:13], "zzzzzzzz"]) == [1]
    # Any id is sound to order by its text: one at or before the horizon is looked up.
    assert window.to_look_up([("t", "a", "00000000-0000")], ["00000000-0000"]) == [0]


def test_a_row_stored_ahead_of_the_ceiling_is_looked_up_once_now_reaches_it() -> None:
    """Found by a probe: an id timed past the ceiling when stored was left out of the horizon; once the clock had
    passed it, a re-send came after the horizon and, forgotten by the window (or after a restart), was stored again."""
    clock = [T0.timestamp()]

    def ceiling() -> str:
        return id_ceiling(clock[0])

    def made(seconds: float, tail: str = "-7abc-8def-0123456789ab") -> tuple[str, str, str]:
        return ("t", "a", uuid7_prefix(int((clock[0] + seconds) * 1000)) + tail)

    ahead = made(ID_AHEAD_S + 60)
    window = StoredWindow(horizon="", capacity=2, generations=1, ceiling=ceiling)
    window.stored([ahead], id_order([ahead]))
    assert window.to_look_up([ahead], id_order([ahead])) == [0]  # after the ceiling: looked up
    others = [made(0, "-7abc-8def-00000000000" + str(i)) for i in range(2)]
    window.stored(others, id_order(others))  # the window forgets the generation holding it
    clock[0] += 120  # now past it: the ceiling no longer makes it a lookup
    assert window.to_look_up([ahead], id_order([ahead])) == [0]
    later = made(1)
    assert window.to_look_up([later], id_order([later])) == [0]  # the horizon rose past it, for a while
    clock[0] += ID_AHEAD_S
    assert window.to_look_up([made(0)], id_order([made(0)])) == []
    # A restarted writer is given the table's orders after the ceiling: the same.
    clock[0] = T0.timestamp()
    restarted = StoredWindow(horizon="", ceiling=ceiling, ahead=[id_order([ahead])[0][:11]])
    clock[0] += 120
    assert restarted.to_look_up([ahead], id_order([ahead])) == [0]
    # Past `ahead_max` orders kept, every row from the earliest one not kept on is looked up.
    clock[0] = T0.timestamp()
    first, second = made(ID_AHEAD_S + 60), made(ID_AHEAD_S + 3600)
    bounded = StoredWindow(horizon="", ceiling=ceiling, ahead_max=1)
    bounded.stored([first, second], id_order([first, second]))
    clock[0] += 2 * 3600
    assert bounded.to_look_up([first, second], id_order([first, second])) == [0, 1]


def test_an_insert_is_sized_by_the_events_its_messages_carry() -> None:
    one = InferenceEvent(app="shop")
    assert events_in(one) == 1
    assert events_in([one, one, one]) == 3
    assert events_in([]) == 0


def test_the_collector_threshold_is_raised_never_lowered() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        fewer_collections()
        assert gc.get_threshold() == (50_000, 20, 100)
        gc.set_threshold(100_000, 50, 200)  # an operator's own, higher, setting stays
        fewer_collections()
        assert gc.get_threshold() == (100_000, 50, 200)
    finally:
        gc.set_threshold(*before)
