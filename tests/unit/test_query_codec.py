"""The one result encoder and the query protocol's client side, without NATS or ClickHouse."""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import json
import uuid

import pytest

from lockgate.codec import to_json
from lockgate.errors import AmbiguousReference, LockgateError, NotFound, StoreUnavailable
from lockgate.queryclient import decode_reply, error_for


@pytest.mark.parametrize(("value", "text"), [
    (dt.datetime(2024, 5, 6, 7, 8, 9, 123456), '"2024-05-06T07:08:09.123456"'),
    (dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC), '"2024-05-06T07:08:09Z"'),
    (dt.date(2024, 5, 6), '"2024-05-06"'),
    ((1, "é"), '[1,"é"]'),
    (frozenset({3}), "[3]"),
    (decimal.Decimal("1.50"), '"1.50"'),
    (uuid.UUID(int=1), '"00000000-0000-0000-0000-000000000001"'),
    (float("nan"), "null"),
    (ipaddress.ip_address("10.0.0.1"), '"10.0.0.1"'),  # anything else: its text
])
def test_one_encoder_for_every_result_value(value: object, text: str) -> None:
    assert to_json(value).decode() == text


def test_indented_output_is_the_same_json() -> None:
    rows = [{"t": dt.datetime(2024, 1, 1), "m": {"k": 1.5}}]
    assert json.loads(to_json(rows, indent=2)) == json.loads(to_json(rows))
    assert to_json(rows, indent=2).count(b"\n") > 1


@pytest.mark.parametrize(("kind", "cls"), [
    ("NotFound", NotFound), ("StoreUnavailable", StoreUnavailable), ("AmbiguousReference", AmbiguousReference),
    ("ValueError", LockgateError), ("Bus", LockgateError), ("", LockgateError),
])
def test_reply_errors_become_the_named_lockgate_error(kind: str, cls: type) -> None:
    err = error_for(kind, "because")
    assert type(err) is cls and err.message == "because"
    with pytest.raises(cls, match="because"):
        decode_reply(to_json({"error": "because", "kind": kind}), "q")


def test_reply_rows_decode_to_the_asked_type() -> None:
    assert decode_reply(b'{"rows": 3}', "q", int) == 3
    assert decode_reply(b'{"rows": null}', "q", str | None) is None
    with pytest.raises(LockgateError, match="unexpected shape"):
        decode_reply(b'{"rows": "x"}', "q", int)
    with pytest.raises(LockgateError, match="not JSON"):
        decode_reply(b"{nope", "q")
