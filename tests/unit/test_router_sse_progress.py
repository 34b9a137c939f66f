"""An SSE stream's progress told from its keep-alives (h1.Progress, probe p41 F1): a data event is progress, comments,
blank lines and Anthropic's ping events are not, wherever a read of the connection splits them, chunked framing and
all."""

from __future__ import annotations

import pytest

from lockgate.services.router.h1 import Progress

pytestmark = pytest.mark.timeout(30)

KEEP_ALIVE = b": keep-alive\n\n"
OPENROUTER = b": OPENROUTER PROCESSING\r\n\r\n"
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
DATA = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
DELTA = b'event: content_block_delta\ndata: {"type": "content_block_delta"}\n\n'
PONG = b'data: {"choices": [{"delta": {"content": "ping"}}]}\n\n'  # an answer that says "ping" is one
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _split_everywhere(raw: bytes) -> list[list[bool]]:
    """For every way to split `raw` in two reads (and in reads of one byte): what each read was told."""
    told = []
    for cut in range(len(raw) + 1):
        progress = Progress()
        told.append([progress.feed(raw[:cut]), progress.feed(raw[cut:])])
    progress = Progress()
    told.append([progress.feed(raw[i:i + 1]) for i in range(len(raw))])
    return told


@pytest.mark.parametrize("raw", [KEEP_ALIVE * 3, OPENROUTER * 2, PING * 2, HEAD + _chunk(KEEP_ALIVE) + _chunk(PING)])
def test_keep_alives_are_no_progress_wherever_the_reads_split_them(raw: bytes) -> None:
    assert not any(any(reads) for reads in _split_everywhere(raw))


@pytest.mark.parametrize("raw", [DATA, KEEP_ALIVE + DATA, PING + DELTA, PING + PONG, HEAD + _chunk(KEEP_ALIVE) + _chunk(DATA)])
def test_a_data_event_is_progress_wherever_the_reads_split_it(raw: bytes) -> None:
    for reads in _split_everywhere(raw):
        assert any(reads), reads


def test_progress_is_told_by_the_read_that_brings_the_data_line() -> None:
    progress = Progress()
    assert not progress.feed(KEEP_ALIVE + b"da")
    assert progress.feed(b"ta: {")  # a data line on its way
    assert progress.feed(b'"choices": []}\n')  # still coming in
    assert not progress.feed(b"\n" + PING + b"event: pi")
    assert not progress.feed(b"ng\ndata: {}\n\n")  # a ping, its event line split
    assert progress.feed(DELTA)


def test_lines_of_a_body_are_told_one_by_one() -> None:
    progress = Progress()
    told = [progress.line(line) for line in (PING + DATA + KEEP_ALIVE + DELTA).splitlines(keepends=True)]
    assert told == [False, False, False, True, False, False, False, False, True, False]
