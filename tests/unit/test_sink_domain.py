"""The sink's pure choices: which rows of a batch are new, and insert tokens."""

from __future__ import annotations

import pytest

from lockgate.services.sink.domain import FACTS, RecentTokens, batch_token, new_rows, redaction, select
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


def test_select_and_token() -> None:
    assert select([[1, 2, 3], ["a", "b", "c"]], [0, 2]) == [[1, 3], ["a", "c"]]
    assert batch_token(["b", "a"]) == batch_token(["a", "b"]) != batch_token(["a"])


def test_every_table_but_spans_and_dead_letters_is_a_keyed_projection() -> None:
    projected = {p.table.name for p in FACTS} | {"inference_events"}
    assert projected | {"otel_traces", "dead_letters"} == {t.name for t in TABLES}
    assert all(p.table.key for p in FACTS)


def test_redaction_scrubs_prompts_and_responses() -> None:
    scrub = redaction("scrub")
    assert "sk-" not in scrub["prompt"]("key sk-abcdefghijklmnopqrstuvwx") and scrub["response"](None) is None
    assert redaction("drop")["prompt"]("anything") is None


def test_recent_tokens_remember_the_last_n_in_order() -> None:
    recent = RecentTokens(size=3)
    recent.add_all(["a", "b", "a", "c"])
    assert all(t in recent for t in "abc")
    recent.add_all(["d"])  # "a", the oldest, leaves
    assert "a" not in recent and all(t in recent for t in "bcd")
