"""Upstream response cache in a NATS KV bucket, keyed by a hash of the exact request."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import msgspec

from lockgate.ids import canonical_json

log = logging.getLogger("lockgate.evaluator.cache")


class Cached(msgspec.Struct, frozen=True):
    """What a cache entry holds: enough to rebuild a Completion."""

    text: str
    latency_ms: float
    input_tokens: int = 0
    output_tokens: int = 0
    logprobs: tuple[float, ...] | None = None


def request_key(endpoint: str, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """sha256 of the canonical request (endpoint, model, messages, params)."""
    doc = {"endpoint": endpoint.rstrip("/"), "model": model, "messages": messages, "params": params}
    return hashlib.sha256(canonical_json(doc)).hexdigest()


_decoder = msgspec.json.Decoder(Cached)


class ResponseCache:
    """get/put on the KV bucket; a cache failure is logged and treated as a miss, never a failed case."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.hits = 0
        self._pending: set[asyncio.Task[Any]] = set()

    async def get(self, key: str) -> Cached | None:
        """The cached response, or None."""
        try:
            entry = await self.kv.get(key)
        except Exception:
            return None
        if not entry.value:
            return None
        try:
            value = _decoder.decode(entry.value)
        except msgspec.DecodeError:
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: Cached) -> None:
        """Store in the background: the case does not wait for the write."""
        task = asyncio.create_task(self._put(key, msgspec.json.encode(value)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _put(self, key: str, data: bytes) -> None:
        try:
            await self.kv.put(key, data)
        except Exception as exc:
            log.debug("eval cache write failed: %r", exc)

    async def flush(self) -> None:
        """Wait for background writes (so a re-run right after sees them)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
