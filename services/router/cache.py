"""The response cache: exact match on the normalised request, per deployment by opt-in, with a TTL,
in an in-process LRU bounded in bytes. Pure: the clock is passed in, nothing here does I/O.

The key is a hash of the canonical JSON (sorted keys) of the request as the upstream would receive it
(the release's model and parameters applied), without the fields that do not change the answer
(`user`, `stream_options`, `metadata`; but for `/responses`, whose answer echoes `user` and `metadata`: _ECHOING),
together with the operation (its path), whether it streams, the tenant and app of the caller's API key, the
deployment and release: an answer is shared by the keys and users of one app, never with another app or tenant (whose keys could otherwise tell from `x-lockgate-cache: hit` what
this app's users asked), a promoted release never serves its predecessor's, and one body sent to two operations
(an embeddings request, then the same body to `/v1/responses`) never gets the other operation's answer. A
request to an operation that samples (all but embeddings) with a temperature above 0 (absent means the provider's
default of 1) is not cached unless the deployment asks for it (`any_temperature`). A body over MAX_KEYED_BYTES is
not cached at all, nor one naming state the provider keeps that changes or a tool the provider runs
(`_names_changing_state`).

Streams are cached too: the entry is the stream as the client received it (its SSE bytes, the
hidden usage chunk left out), replayed as one `text/event-stream` body on a hit. A streamed request
and the same request unstreamed have different keys (whether it streams is part of the key, so a
JSON body never answers a stream nor SSE bytes a plain request), and so do streams that differ in
`stream_options` (with or without the usage chunk).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Annotated, Any

import msgspec

from lockgate.services.router.budgets import provider_runs

Seconds = Annotated[float, msgspec.Meta(gt=0)]
# Fields that change nothing in the answer: who asks, how usage is streamed, the caller's tags.
# `stream` is keyed on its own, as a bool: `"stream": false` and no `stream` are the same request.
_IGNORED = frozenset({"user", "stream_options", "metadata", "stream"})
_IGNORED_STREAMED = frozenset({"user", "metadata", "stream"})
# Operations whose answer echoes who asks and the caller's tags: OpenAI's Response object carries the request's `user`
# and `metadata` back (its `safety_identifier` and `prompt_cache_key` too, which no key ignores). There they are part
# of the key, so a hit never hands one caller's identity and tags to another (probe p76 F1: bob got alice's answer,
# `"user": "alice@example.com"` and her metadata in it); rewriting them in a stored body (and in a stream's events)
# would be a second encoder of the answer. Chat, completions and embeddings answers echo neither: shared by all users.
_ECHOING = frozenset({"/responses"})
_ECHOED = frozenset({"user", "metadata"})
EVENT_STREAM = "text/event-stream"
# Operations that do not sample: the same input has the same answer whatever the temperature (embeddings take none:
# wire.as_released sends them no release temperature, and an absent one is not the provider's 1 there). Before
# (probe p17), an embeddings request counted as sampled and was never cached, on a deployment that opted in too.
_UNSAMPLED = frozenset({"/embeddings"})
# The key is made by decoding the whole body into objects and encoding it back sorted, on the event loop: about
# 50 ms a MiB of small objects. A larger body is not cached, so no request holds every other one of the replica
# for its size (probe p17: a 31 MB body of small objects held them 4-6 s, before its upstream call).
MAX_KEYED_BYTES = 1024 * 1024
_canonical = msgspec.json.Encoder(order="sorted")


def _names_changing_state(body: dict[str, Any]) -> bool:
    """Whether the answer depends on state the provider keeps that changes between two such requests: a Responses
    `conversation` (each turn adds to it), a stored `prompt` template without its version (its latest one is used),
    a `background` response (answered by an id to poll, each request a new one), a tool the provider runs
    (budgets.provider_runs: code in a named container, an MCP server's actions, a vector store or the live web read;
    chat's `web_search_options`). A hit would skip the call: the user's turn never added to the conversation, an old
    answer to its history as it was (probe p38 F2: the same `conversation` request was answered from the cache, with
    the first answer's response id and usage), the tool never run (probe p76 F2: the second identical request with a
    code interpreter, an MCP server or file search was a hit, and never reached the provider)."""
    prompt = body.get("prompt")
    return (body.get("conversation") is not None or body.get("background") is True
            or (isinstance(prompt, dict) and prompt.get("version") is None)
            or (body.get("tools") is not None and provider_runs(body["tools"]))
            or body.get("web_search_options") is not None)


class CacheSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One deployment's cache settings."""

    ttl_s: Seconds = 300.0
    any_temperature: bool = False  # also cache sampled answers (the same answer for every such request)
    shared: bool = False  # also keep answers in a KV bucket every router replica reads


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The gateway file's `cache` section: which deployments opted in, and the memory bound."""

    deployments: dict[str, CacheSpec] = {}
    max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 64 * 1024 * 1024


def request_key(tenant: str, app: str, deployment: str, release: str, operation: str,
                body: dict[str, Any], spec: CacheSpec) -> str | None:
    """The cache key of a request body (a decoded JSON object) an API key of `tenant`'s `app` sent to `operation`
    (its path, e.g. "/embeddings"), or None when it must not be cached."""
    if _names_changing_state(body):
        return None
    temperature = body.get("temperature", 1.0)
    sampled = operation not in _UNSAMPLED and not (isinstance(temperature, int | float) and temperature <= 0)
    if sampled and not spec.any_temperature:
        return None
    streamed = bool(body.get("stream"))
    # A stream's bytes say whether usage was included: its stream_options are part of the key.
    ignored = _IGNORED_STREAMED if streamed else _IGNORED
    if operation in _ECHOING:
        ignored = ignored - _ECHOED
    kept = {k: v for k, v in body.items() if k not in ignored}
    scope = [tenant, app, deployment, release, operation, streamed]
    return hashlib.sha256(_canonical.encode([*scope, kept])).hexdigest()


class Entry(msgspec.Struct, frozen=True):
    """A cached response body, when it expires, and the usage and cost it was charged when it was made."""

    body: bytes
    expires: float
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    content_type: str = "application/json"  # EVENT_STREAM: a stream's SSE bytes, replayed as they were sent
    # What settlement charged for the answer, in nano-USD: its price and the counts it believed (a worst case for usage
    # it did not), as the ledger books it; what a hit saves (probe p76 F3). None in one a replica from before shared.
    cost_nano: int | None = None


class Shared(msgspec.Struct, frozen=True, array_like=True):
    """An entry as replicas share it: the expiry in wall-clock seconds (monotonic clocks differ per process)."""

    entry: Entry
    expires_at: float


_shared_enc = msgspec.msgpack.Encoder()
_shared_dec = msgspec.msgpack.Decoder(Shared)


def to_shared(entry: Entry, now: float, wall: float) -> bytes:
    """An entry for the shared bucket, its expiry moved from this process's clock to the wall clock."""
    return _shared_enc.encode(Shared(entry=entry, expires_at=wall + (entry.expires - now)))


def from_shared(data: bytes, now: float, wall: float) -> Entry | None:
    """The entry of a shared value on this process's clock, or None when expired or unreadable."""
    try:
        shared = _shared_dec.decode(data)
    except msgspec.DecodeError:
        return None
    left = shared.expires_at - wall
    return msgspec.structs.replace(shared.entry, expires=now + left) if left > 0 else None


class ResponseCache:
    """An LRU of response bodies bounded by their total bytes; expired entries are misses."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def spec(self, deployment: str) -> CacheSpec | None:
        """The deployment's cache settings, None when it did not opt in."""
        return self.config.deployments.get(deployment)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> Entry | None:
        """The live entry for `key` (now most recently used), else None."""
        entry = self._entries.get(key)
        if entry is None or entry.expires <= now:
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: str, entry: Entry) -> bool:
        """Store an entry, evicting the least recently used until the bytes fit; False if it never fits."""
        size = len(entry.body)
        # One answer may take at most an eighth of the cache, so a few large ones cannot flush it.
        if size > self.config.max_bytes // 8:
            return False
        if key in self._entries:
            self._drop(key)
        while self._entries and self.bytes + size > self.config.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = entry
        self.bytes += size
        return True

    def _drop(self, key: str) -> None:
        self.bytes -= len(self._entries.pop(key).body)
