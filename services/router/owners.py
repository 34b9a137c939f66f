"""Which tenant and app own each Responses API state, so no app continues another's through a shared upstream account.

A provider keeps a response (and a conversation) under its id, for whoever holds the account's key to continue:
`previous_response_id` or `conversation` in a request brings back every earlier turn, which the model can be asked to
repeat, and an `item_reference` input brings back one output item of a stored response (an answer, a tool call) by
the item's own id; a code interpreter tool naming a container (`cntr_...`, shown in an answer's
`output[].container_id`) runs its code among the files earlier code there read and wrote. Two tenants whose
deployments share one endpoint credential share that account, so the router, which holds the key for both, decides
who may name an id. It claims each response id it relays, and the ids of the response's output items and their
containers, for the caller's tenant and app (and the deployment it went to) before the client can see them, and a
request naming an id is served only to a key of the app that owns it whose deployment scope holds that deployment: the
app is the isolation unit elsewhere too (the response cache, gate decisions, deployment scopes). An id the router never
saw created (made outside it, or before this existed) is owned by the first app whose request naming it the
upstream answers: claimed with that answer, before the client sees any of it, so of two apps naming it at once the
loser gets nothing (and an id that does not exist yet, named to guess a provider's next one, is claimed by nobody).
A claim is a KV create (atomic across replicas) in `lg_response_owners`, keyed by the id's sha256, expiring after
`router_response_owner_ttl_s`. Its owner naming the id renews it (a compare-and-set rewrite whose life begins again),
once it has lived a quarter of that: a conversation in use stays its app's, at one write per quarter TTL.

Another tenant's or app's id gets the answer the provider gives for an id that does not exist, so it tells nothing;
the store unreachable refuses (503), as budgets fail closed: unchecked, the state would be served to anyone. A record
written before apps were recorded names its tenant alone: it serves any app of that tenant, as it did, and the first
of them to name it has it rewritten as its own (a renewal), after which it is that app's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
from aiohttp import web

from lockgate.config import Settings
from lockgate.kvcas import CasStore, KVUnavailable
from lockgate.server.apikeys import ApiKey
from lockgate.services.router.budgets import NamedState
from lockgate.services.router.wire import error_response

log = logging.getLogger("lockgate.router.owners")
T = TypeVar("T")


class Owner(msgspec.Struct, frozen=True):
    """An owner record: the tenant, when its life (Nats-TTL) last began, in epoch seconds (wall clock: replicas and
    restarts compare it), the app and the deployment the id was created (or first named) through. `app` "": written
    before apps were recorded (probe p74 F1), the tenant's every app's until one names it (`_renew`)."""

    tenant: str
    at: float = 0.0
    app: str = ""
    deployment: str = ""

    def serves(self, key: ApiKey) -> bool:
        """Whether `key` may name the id: a key of its tenant and app (any, for a record without one) that may use
        the deployment it was created through (a key scoped elsewhere is refused it as it is the deployment)."""
        return (self.tenant == key.tenant and self.app in ("", key.app)
                and (not self.deployment or key.may_use(self.deployment)))


_owner = msgspec.json.Decoder(str | Owner)
Unowned = tuple[tuple[str, str], ...]  # the ids a request names that nobody owns yet: (its field, the id)
# OpenAI's answer for an id of each field that does not exist: its status, code and what its message calls the id's.
_ABSENT = {"previous_response_id": (400, "previous_response_not_found", "Previous response"),
           "conversation": (404, "conversation_not_found", "Conversation"),
           "input": (404, None, "Item"),  # an item_reference: OpenAI's `code` is null
           # A code interpreter's container id: OpenAI's answer unconfirmed, this shape is the item's (README).
           "tools": (404, None, "Container")}
_STORE = "the Responses state owners store"
UNAVAILABLE = "response_owners_unavailable"  # the refusal's code, and the event's error type
STORE_TIMEOUT_S = 5.0  # a KV round trip under load, as budgets' store_timeout_s: past it the request is refused
AT_ONCE = 64  # a request's store round trips in flight at once: a typical request's ids all go in one
MOST_NAMED = 100  # distinct ids one request may name: each costs a KV read and, answered, a create living the TTL
RENEW_AFTER = 0.25  # of the TTL: an owner's record older than this is renewed when named (not a write per request)


def _decode_owner(raw: bytes) -> Owner:
    """A record's value; a bare tenant name (written before records were renewed) is due for renewal."""
    record = _owner.decode(raw)
    return Owner(record) if isinstance(record, str) else record


def owner_key(state_id: str) -> str:
    """The KV key of a response, item or conversation id: its sha256 (an id is the client's text, of any length and
    alphabet; a KV key is not)."""
    return hashlib.sha256(state_id.encode("utf-8", "surrogatepass")).hexdigest()


def not_found(field: str, state_id: str) -> web.Response:
    """OpenAI's answer for a `previous_response_id`, `conversation` or `input` item reference that does not exist
    (its status, words and code), given for another tenant's id alike."""
    status, code, _ = _ABSENT[field]
    return error_response(status, _not_found_message(field, state_id), "invalid_request_error", code=code, param=field)


def _not_found_message(field: str, state_id: str) -> str:
    return f"{_ABSENT[field][2]} with id '{state_id}' not found."


def too_many(api: str, named: NamedState) -> web.Response | None:
    """The 400 of a request naming more than MOST_NAMED distinct ids (`named`), which names the cap and the field
    naming the most; None within it. Before any store round trip: 20,000 item references were 20,000 reads and, once
    answered, 20,000 records kept for the TTL, before rate limits or budgets had a say (probe p49 F3)."""
    if len(named) <= MOST_NAMED:
        return None
    fields = [field for field, _ in named]
    field = max(dict.fromkeys(fields), key=fields.count)
    return error_response(400, f"invalid {api} request: it names {len(named)} distinct stored responses, "
                               f"conversations, items and containers by id; at most {MOST_NAMED} may be named in one "
                               f"request ({fields.count(field)} in {field!r})", "invalid_request_error", param=field)


def refusal(message: str) -> str:
    """Why a Responses request is refused while the owners store cannot be asked (`message`: the store's failure)."""
    return (f"the router cannot check or record which tenant owns Responses state: {message}; refusing the request "
            "(fail closed: unchecked, one tenant could continue another's stored responses and conversations through "
            "an upstream account they share)")


def unavailable(message: str) -> web.Response:
    """The 503 of a Responses request while the owners store cannot be asked."""
    return error_response(503, refusal(message), "service_unavailable", code=UNAVAILABLE)


class Withheld(NamedTuple):
    """An answer not passed on, as its ids could not be claimed: the client's answer, or a stream's error message."""

    answer: web.Response
    message: str


class Owners:
    """The owners of the Responses state the router's tenants create and name (one bucket for every replica)."""

    def __init__(self, settings: Settings, bus: Any) -> None:
        self.ttl_s = settings.router_response_owner_ttl_s
        self.store = CasStore(bus, bus.subjects.kv_response_owners if bus is not None else "",
                              timeout_s=STORE_TIMEOUT_S, what=_STORE)

    async def admit(self, key: ApiKey, deployment: str, named: NamedState) -> web.Response | Unowned:
        """Before a Responses request's upstream call: the refusal when `key` may not name the state `named`
        (another tenant's or app's id, or one created through a deployment outside the key's scope, answered as one
        that does not exist: Owner.serves; an admin key may name any), else the ids nobody
        owns yet, for `claim` to claim with the answer. The store is asked for every request, as its answer's ids
        will be claimed: while it is unreachable the 503 comes before any upstream call (with the bucket's handle
        held and the bus connected, a request naming no state costs no round trip). `deployment`: the request's, which
        a record without an app renewed now records. The ids named are read at once
        (a request may reference many items): one round trip, not one per id."""
        try:
            await self.store.kv()
            if key.tenants is None:
                return ()
            ids = [(field, state_id) for field, state_id in dict.fromkeys(named) if state_id is not None]
            owners = await _together(self._owner(state_id) for _, state_id in ids)
            for (field, state_id), owner in zip(ids, owners, strict=True):
                if owner is not None and not owner.serves(key):
                    return not_found(field, state_id)
            await _together(self._renew(key, deployment, state_id)
                            for (_, state_id), owner in zip(ids, owners, strict=True)
                            if owner is not None and self._due(owner))
        except KVUnavailable as exc:  # KVUnreadable too: a value that is no tenant's name is no owner to trust
            return unavailable(exc.message)
        return tuple(named_id for named_id, owner in zip(ids, owners, strict=True) if owner is None)

    async def claim(self, key: ApiKey, deployment: str, unowned: Unowned, kept: Sequence[str]) -> Withheld | None:
        """Once the upstream answered a Responses request, before the client sees any of it: claim for `key`'s tenant
        and app, and the `deployment` the request went to,
        the ids it named that nobody owned (`admit`), and the ids the provider keeps its answer under (`kept`: the
        response's and its output items', none when it keeps nothing), all at once (one round trip, not one per id).
        None when all are `key`'s, else the answer to give instead: another app's claim of a named id won meanwhile
        (that app's state, answered as an id that does not exist), or the store failed."""
        record = Owner(key.tenant, 0.0, key.app, deployment)
        try:
            won = await _together(self._claimed(key, record, state_id) for state_id in
                                  (*(state_id for _, state_id in unowned), *kept))
        except KVUnavailable as exc:
            return Withheld(unavailable(exc.message), refusal(exc.message))
        for (field, state_id), mine in zip(unowned, won, strict=False):
            if not mine:
                return Withheld(not_found(field, state_id), _not_found_message(field, state_id))
        if lost := [state_id for state_id, mine in zip(kept, won[len(unowned):], strict=True) if not mine]:
            # Only a provider whose ids can be guessed, and another app naming one in the instant between its
            # creation and this claim: that app was served it, so this answer is not passed on.
            log.warning("ids %s of an answer created for %s were claimed first by another app", lost, key.label)
            return Withheld(unavailable("an id of its answer is another app's"),
                            "an id of its answer is another app's")
        return None

    async def _owner(self, state_id: str) -> Owner | None:
        """The record of the app that owns `state_id`, None when nobody does (read, never written)."""
        def step(owner: Owner | None) -> tuple[None, Owner | None]:
            return None, owner

        return await self.store.update(owner_key(state_id), _decode_owner, step, f"the owner of {state_id!r}")

    def _due(self, owner: Owner) -> bool:
        """Whether `owner` is renewed when named: it has lived a quarter of its TTL, or names no app (written before
        apps were recorded: the app naming it has it, so the tenant's other apps are refused it from then on)."""
        return not owner.app or time.time() - owner.at >= self.ttl_s * RENEW_AFTER

    async def _renew(self, key: ApiKey, deployment: str, state_id: str) -> None:
        """Begin again the life of the record of `state_id`, which `key` (served it) named: an id in use stays its
        owner's (else it expired a TTL after its claim however often named, and another app naming it then took
        it); a record without an app becomes `key`'s app's, through `deployment`. A failure is logged, not the
        request's: the record still stands."""
        def step(owner: Owner | None) -> tuple[Owner | None, None]:
            # Not renewed meanwhile by another replica, nor taken over since it was read.
            if owner is None or not owner.serves(key) or not self._due(owner):
                return None, None
            now = time.time()
            renewed = msgspec.structs.replace(owner, at=now) if owner.app else Owner(key.tenant, now, key.app, deployment)
            return renewed, None

        try:
            await self.store.update(owner_key(state_id), _decode_owner, step, f"the owner of {state_id!r}",
                                    ttl_s=self.ttl_s)
        except KVUnavailable as exc:
            log.warning("the owner record of %r (%s) was not renewed: %s; it stands until it expires",
                        state_id, key.label, exc.message)

    async def _claimed(self, key: ApiKey, record: Owner, state_id: str) -> bool:
        """Whether `key` may name `state_id` now: it could, or nobody owned it and its create (of `record`, now) won
        (another replica's concurrent create makes the store read again)."""
        def step(owner: Owner | None) -> tuple[Owner | None, bool]:
            if owner is None:
                return msgspec.structs.replace(record, at=time.time()), True
            return None, owner.serves(key)

        return bool(await self.store.update(owner_key(state_id), _decode_owner, step, f"the owner of {state_id!r}",
                                            ttl_s=self.ttl_s))


async def _together(calls: Iterable[Awaitable[T]]) -> list[T]:
    """The results of `calls` run at once (the store's round trips overlap), at most AT_ONCE of them in flight (a body
    may reference thousands of items: one request does not flood the bus); the first failure raised once all end, so
    none is left running unawaited."""
    gate = asyncio.Semaphore(AT_ONCE)

    async def gated(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    results = await asyncio.gather(*map(gated, calls), return_exceptions=True)
    if failed := next((r for r in results if isinstance(r, BaseException)), None):
        raise failed
    return results  # type: ignore[return-value]


class Claims:
    """The claims of one Responses answer's ids as the answer shows them: the first (its whole body, or a stream's
    first event) claims the ids its request named that nobody owned, with the ids shown so far; each later one the
    ids shown since (a stream's output items, as each appears), before the client sees the event naming them."""

    def __init__(self, owners: Owners, key: ApiKey, deployment: str, unowned: Unowned) -> None:
        self.owners, self.key, self.deployment, self.unowned = owners, key, deployment, unowned
        self.begun = False
        self.done = 0  # how many of the answer's ids are claimed

    async def __call__(self, kept: Sequence[str]) -> Withheld | None:
        """Claim those of `kept` (the ids the provider keeps the answer under so far, in the order shown) not claimed
        yet: None when they are the caller's app's now, else what to give instead (Owners.claim)."""
        if self.begun and len(kept) == self.done:
            return None
        unowned, self.unowned, self.begun = self.unowned, (), True
        fresh, self.done = kept[self.done:], len(kept)
        return await self.owners.claim(self.key, self.deployment, unowned, fresh)
