"""Upstream response cache in a NATS KV bucket, keyed by a hash of the exact request and of whose answer it is.

An entry is one endpoint's answer for one tenant: two allow-listed endpoints at one URL may differ in project,
organization or credential (another account, region or fine-tune), so each has its own entries, and one
tenant's answers are never another's (probe p90 F1: an endpoint was gated on another's cached answers).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import msgspec

from lockgate.endpoints import Access
from lockgate.ids import canonical_json

log = logging.getLogger("lockgate.evaluator.cache")


class Cached(msgspec.Struct, frozen=True):
    """What a cache entry holds: enough to rebuild a Completion."""

    text: str
    latency_ms: float
    input_tokens: int = 0
    output_tokens: int = 0
    logprobs: tuple[float, ...] | None = None


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """Whose answer an entry is: the tenant, and the endpoint with everything it sends besides the request."""

    tenant: str
    endpoint: str  # the id of the endpoint called (a group's member), or the URL a run named
    url: str
    provider: str
    headers: dict[str, str]  # OpenAI-Organization / OpenAI-Project
    credential: str  # the credential's fingerprint (endpoints.fingerprint), never the secret


def scope_of(access: Access, tenant: str) -> Scope:
    """The cache scope of calls to `access` for `tenant`."""
    return Scope(tenant=tenant, endpoint=access.member or access.id, url=access.base.rstrip("/"),
                 provider=access.provider, headers=dict(access.scope), credential=access.fingerprint)


def request_key(scope: Scope, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """sha256 of the canonical request (scope, model, messages, params)."""
    doc = {"scope": msgspec.to_builtins(scope), "model": model, "messages": messages, "params": params}
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
