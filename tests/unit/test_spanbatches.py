"""Spans cut into bus messages by encoded bytes (lockgate.spanbatches): each message within its bound, every span
once and in order, ids a function of sender and spans."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from lockgate.codec import Codec, encode
from lockgate.contracts import SpanBatch, SpanRecord
from lockgate.spanbatches import BATCH_SPANS, span_batches

_batch = Codec(SpanBatch)


def _span(i: int, pad: int = 700) -> SpanRecord:
    return SpanRecord(timestamp=datetime(2026, 12, 6, tzinfo=UTC), trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}",
                      parent_span_id="", trace_state="", name=f"chat {i}", kind="Server", service="lockgate-router",
                      resource={}, scope_name="lockgate.router", scope_version="1", attributes={"pad": "x" * pad},
                      duration_ns=1, status_code="Unset", status_message="")


def test_a_batch_that_fits_is_one_message_encoded_once() -> None:
    spans = [_span(i) for i in range(10)]
    [message], too_large = span_batches(spans, source="lockgate")
    assert too_large == [] and message.spans == 10
    batch = _batch.decode(message.data)
    assert batch.spans == spans and batch.id == message.id and batch.source == "lockgate"


@pytest.mark.parametrize(("count", "max_bytes"), [(2000, 1_048_576 - 4096), (50, 3000), (7, 1700), (2500, 10**9)])
def test_a_batch_over_the_bound_is_cut_into_messages_within_it(count: int, max_bytes: int) -> None:
    spans = [_span(i) for i in range(count)]
    messages, too_large = span_batches(spans, source="lockgate", max_bytes=max_bytes)
    assert too_large == []
    batches = [_batch.decode(m.data) for m in messages]
    assert [s for b in batches for s in b.spans] == spans  # every span once, in order
    assert [m.spans for m in messages] == [len(b.spans) for b in batches]
    assert all(len(b.spans) <= BATCH_SPANS for b in batches)
    # The spans' bytes within the bound; the envelope is the room the caller keeps beside it.
    assert all(len(m.data) - len(encode(SpanBatch(id=b.id, source=b.source, time=b.time, spans=[]))) <= max_bytes
               for m, b in zip(messages, batches, strict=True))
    assert len({m.id for m in messages}) == len(messages)


def test_ids_are_a_function_of_the_sender_and_the_spans() -> None:
    spans = [_span(i) for i in range(50)]
    first, _ = span_batches(spans, source="lockgate", max_bytes=3000)
    again, _ = span_batches(spans, source="lockgate", max_bytes=3000)
    assert [m.id for m in again] == [m.id for m in first]
    other, _ = span_batches(spans, source="otlp", tenant="acme", app="shop", max_bytes=3000)
    assert not {m.id for m in other} & {m.id for m in first}


def test_a_span_over_the_bound_alone_is_returned_apart() -> None:
    spans = [_span(0), _span(1, pad=5000), _span(2)]
    messages, too_large = span_batches(spans, source="lockgate", max_bytes=3000)
    assert too_large == [spans[1]]
    assert [s for m in messages for s in _batch.decode(m.data).spans] == [spans[0], spans[2]]
    assert span_batches([spans[1]], source="lockgate", max_bytes=3000) == ([], [spans[1]])
    assert span_batches([], source="lockgate") == ([], [])
