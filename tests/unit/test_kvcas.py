"""CasStore tells a write that may have been applied (its answer late or lost) from a failure before anything was sent."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.js.errors
import pytest

from lockgate.kvcas import CasStore, KVOutcomeUnknown, KVUnavailable


class _Entry:
    def __init__(self, value: bytes, revision: int) -> None:
        self.value, self.revision = value, revision


class _KV:
    """A bucket of one key whose `get` or `update` can hang (no answer within the timeout) or be refused."""

    def __init__(self, hang: str = "", refuse: int = 0) -> None:
        self.hang, self.refuse = hang, refuse
        self.value, self.revision, self.writes = b"1", 1, 0

    async def get(self, key: str) -> _Entry:
        if self.hang == "get":
            await asyncio.Event().wait()
        return _Entry(self.value, self.revision)

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.writes += 1
        if self.refuse:
            self.refuse -= 1
            self.revision += 1  # another replica wrote in between
            raise nats.js.errors.KeyWrongLastSequenceError()
        if self.hang == "update":  # applied; the answer never comes
            self.value, self.revision = value, self.revision + 1
            await asyncio.Event().wait()
        self.value, self.revision = value, self.revision + 1
        return self.revision


class _Bus:
    def __init__(self, kv: _KV, state: str = "connected") -> None:
        self._kv, self.state = kv, state

    async def kv(self, bucket: str) -> Any:
        return self._kv


async def _add_one(store: CasStore) -> Any:
    return await store.update("k", lambda b: int(b or b"0"), lambda n: ((n or 0) + 1, "done"), "key k")


async def test_a_write_sent_without_an_answer_may_have_been_applied() -> None:
    kv = _KV(hang="update")
    with pytest.raises(KVOutcomeUnknown) as late:
        await _add_one(CasStore(_Bus(kv), "b", timeout_s=0.05))
    assert kv.value == b"2"  # applied all the same: a caller must not send it again
    assert "it may have applied" in late.value.message


@pytest.mark.parametrize("kv,state", [(_KV(hang="get"), "connected"), (_KV(), "reconnecting")])
async def test_a_failure_before_the_write_went_out_is_plain_unavailable(kv: _KV, state: str) -> None:
    with pytest.raises(KVUnavailable) as down:
        await _add_one(CasStore(_Bus(kv, state), "b", timeout_s=0.05))
    assert not isinstance(down.value, KVOutcomeUnknown) and kv.writes == 0


async def test_a_write_refused_for_a_changed_revision_is_known_not_applied_and_read_again() -> None:
    kv = _KV(refuse=2)
    assert await _add_one(CasStore(_Bus(kv), "b", timeout_s=1.0)) == "done"
    assert kv.writes == 3 and kv.value == b"2"
