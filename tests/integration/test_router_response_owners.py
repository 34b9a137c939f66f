"""Responses API state (stored responses, conversations) of one tenant, named by another, through the official `openai`
client against the router (real nats-server, the simulator).

Both tenants' requests go to one upstream with one credential (passthrough to the `default` endpoint): one provider
account, which keeps every response under its id for whoever holds the key. Before, the router passed
`previous_response_id` and `conversation` on unchecked: tenant globex, knowing an id of a response acme created
through the router, had the provider continue acme's conversation and could ask the model to repeat its earlier
turns."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
import yaml
from aiohttp import web

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.credentials import NotAllowed
from lockgate.server.apikeys import Bootstrap, KeyStore, bootstrap
from lockgate.server.natsserver import NatsServer
from lockgate.services.router.owners import Owner, Owners, owner_key
from lockgate.store import Store
from lockgate.subjects import Subjects
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import Replicas, identity_buses, served

pytestmark = pytest.mark.timeout(90)

MODEL = "m"


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    # `slow` streams its answer over a second and a half: its stream is still open when its first event is read.
    async with SimServer(SimConfig(models={MODEL: ModelSpec(default="an answer"),
                                           "slow": ModelSpec(default="one two three four five six", latency_ms=1500)})
                         ) as s:
        yield s


@pytest.fixture
async def replicas() -> AsyncIterator[Replicas]:
    r = Replicas()
    yield r
    await r.close()


async def _router(replicas: Replicas, settings: Settings, store: Store, name: str = "router-a") -> Any:
    bus = Bus(settings.nats_url, Subjects(settings.prefix), name=name)
    await bus.connect()
    return await replicas.router(bus, settings, store)


def _passthrough(settings: Settings, sim: SimServer) -> Settings:
    return settings.replace(stable_upstream=sim.url, passthrough=True, deployment="chat")


@pytest.fixture
def keys(settings: Settings) -> Bootstrap:
    """The admin key, and acme's app key."""
    return bootstrap(settings.home, tenant="acme", app="shop")


@pytest.fixture
def globex(settings: Settings) -> str:
    """Globex's app key."""
    return KeyStore(settings.home).create("globex", "books")[0]


def _client(router: Any, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0, timeout=20)


async def _create(client: openai.AsyncOpenAI, stream: bool, **ask: Any) -> str:
    """A response's id as the client reads it: the body's, or the stream's `response.created` event's."""
    return (await _answer(client, stream, **ask))[0]


async def _answer(client: openai.AsyncOpenAI, stream: bool, **ask: Any) -> tuple[str, str]:
    """A response's id and its output item's, as the client reads them: the body's, or a stream's (the response's in
    `response.created`, the item's in `response.output_item.added`), each the same in `response.completed`."""
    ask = {"model": MODEL, "input": "hi", **ask}
    if not stream:
        answer = await client.responses.create(**ask)
        assert len(answer.output) == 1
        return answer.id, answer.output[0].id  # type: ignore[union-attr]
    seen: dict[str, Any] = {}
    async for e in await client.responses.create(stream=True, **ask):
        if e.type in ("response.created", "response.completed"):
            seen.setdefault("response", []).append(e.response.id)
        if e.type == "response.output_item.added":
            seen["item"] = e.item.id
        if e.type == "response.completed":
            assert [item.id for item in e.response.output] == [seen["item"]]
    assert len(seen["response"]) == 2 and seen["response"][0] == seen["response"][1], seen
    return seen["response"][0], seen["item"]


async def _refused(client: openai.AsyncOpenAI, stream: bool, **ask: Any) -> openai.APIStatusError:
    ask = {"model": MODEL, "input": "what did I say before?", **ask}
    with pytest.raises(openai.APIStatusError) as caught:
        answer = await client.responses.create(stream=stream, **ask)
        if stream:
            _ = [event async for event in answer]  # type: ignore[union-attr]
    return caught.value


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_another_tenants_response_is_answered_as_one_that_does_not_exist(
        settings: Settings, store: Store, replicas: Replicas, sim: SimServer, keys: Bootstrap, globex: str,
        stream: bool) -> None:
    router = await _router(replicas, _passthrough(settings, sim), store)
    acme, other = _client(router, keys.app_key), _client(router, globex)
    mine = await _create(acme, stream)
    assert mine.startswith("resp_") and sim.total_requests == 1

    # Globex names it: OpenAI's answer for an id that does not exist, and no upstream call.
    err = await _refused(other, stream, previous_response_id=mine)
    assert isinstance(err, openai.BadRequestError)
    assert (err.code, err.param, err.type) == ("previous_response_not_found", "previous_response_id",
                                               "invalid_request_error")
    assert err.body["message"] == f"Previous response with id '{mine}' not found."  # type: ignore[index]
    assert sim.total_requests == 1

    # Acme's own goes on (and its answer is acme's in turn); an admin key may name any tenant's.
    following = await _create(acme, stream, previous_response_id=mine)
    assert sim.total_requests == 2
    assert (await _refused(other, stream, previous_response_id=following)).code == "previous_response_not_found"
    await _create(_client(router, keys.admin_key), stream, previous_response_id=mine)
    assert sim.total_requests == 3

    # The claim is in the bucket every replica reads: another replica refuses globex alike.
    second = await _router(replicas, _passthrough(settings, sim), store, "router-b")
    err = await _refused(_client(second, globex), stream, previous_response_id=mine)
    assert err.code == "previous_response_not_found" and sim.total_requests == 3


async def test_a_streamed_response_is_claimed_before_the_client_reads_its_id(
        settings: Settings, store: Store, replicas: Replicas, sim: SimServer, keys: Bootstrap, globex: str) -> None:
    router = await _router(replicas, _passthrough(settings, sim), store)
    other = _client(router, globex)
    events = await _client(router, keys.app_key).responses.create(model="slow", input="hi", stream=True)
    async for event in events:
        if event.type == "response.created":
            # The answer is still being generated: its id, the first thing the client reads, is acme's already.
            err = await _refused(other, False, previous_response_id=event.response.id)
            assert err.code == "previous_response_not_found"
            assert sim.requests == {"slow": 1}
    assert event.type == "response.completed"


def _referring(item_id: str, typed: bool = True) -> list[dict[str, Any]]:
    """An input bringing back one stored output item by its own id: an `item_reference` (its type left out, as OpenAI
    reads an item of neither type nor role, or not), then a question about it."""
    return [{"type": "item_reference", "id": item_id} if typed else {"id": item_id},
            {"role": "user", "content": "repeat that word for word"}]


TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}, "strict": False}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_another_tenants_output_item_is_answered_as_one_that_does_not_exist(
        settings: Settings, store: Store, replicas: Replicas, sim: SimServer, keys: Bootstrap, globex: str,
        stream: bool) -> None:
    """Before, an `item_reference` was passed on unchecked: globex, knowing the id of an output item of an answer acme
    created through the router (its text, a tool call), had the provider bring it into globex's own request."""
    router = await _router(replicas, _passthrough(settings, sim), store)
    acme, other = _client(router, keys.app_key), _client(router, globex)
    _, message = await _answer(acme, stream)
    _, call = await _answer(acme, stream, tools=[TOOL])
    assert message.startswith("msg_") and call.startswith("fc_") and sim.total_requests == 2

    # Globex names either: OpenAI's answer for an item that does not exist, and no upstream call.
    for item in (message, call):
        for typed in (True, False):
            err = await _refused(other, stream, input=_referring(item, typed))
            assert isinstance(err, openai.NotFoundError), (item, typed)
            assert (err.code, err.param, err.type) == (None, "input", "invalid_request_error")
            assert err.body["message"] == f"Item with id '{item}' not found."  # type: ignore[index]
    assert sim.total_requests == 2

    # Acme's own are served (and its answer's item is acme's in turn); an admin key may name any tenant's.
    _, following = await _answer(acme, stream, input=_referring(message))
    assert sim.total_requests == 3
    assert isinstance(await _refused(other, stream, input=_referring(following)), openai.NotFoundError)
    await _answer(_client(router, keys.admin_key), stream, input=_referring(call, typed=False))
    assert sim.total_requests == 4

    # Another replica reads the same claims.
    second = await _router(replicas, _passthrough(settings, sim), store, "router-b")
    assert isinstance(await _refused(_client(second, globex), stream, input=_referring(message)), openai.NotFoundError)
    assert sim.total_requests == 4


async def test_a_streamed_output_item_is_claimed_before_the_client_reads_its_id(
        settings: Settings, store: Store, replicas: Replicas, sim: SimServer, keys: Bootstrap, globex: str) -> None:
    router = await _router(replicas, _passthrough(settings, sim), store)
    other = _client(router, globex)
    events = await _client(router, keys.app_key).responses.create(model="slow", input="hi", stream=True)
    added = []
    async for event in events:
        if event.type == "response.output_item.added":
            # The answer is still being generated: its item's id, as the client reads it, is acme's already.
            added.append(event.item.id)
            assert isinstance(await _refused(other, False, input=_referring(event.item.id)), openai.NotFoundError)
            assert sim.requests == {"slow": 1}
    assert event.type == "response.completed" and len(added) == 1


async def test_an_item_the_router_never_saw_created_is_the_first_tenant_s_to_use_it(
        settings: Settings, store: Store, replicas: Replicas, sim: SimServer, keys: Bootstrap, globex: str) -> None:
    router = await _router(replicas, _passthrough(settings, sim), store)
    acme, other = _client(router, keys.app_key), _client(router, globex)
    # Made outside the router (another client of the account): globex names it first, and the upstream answers.
    await _create(other, False, input=_referring("msg_made_elsewhere"))
    assert sim.total_requests == 1
    # It is globex's now, however acme spells the reference.
    for stream in (False, True):
        for typed in (True, False):
            err = await _refused(acme, stream, input=_referring("msg_made_elsewhere", typed))
            assert isinstance(err, openai.NotFoundError) and err.param == "input", (stream, typed)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http, http.post(
            f"{router.url}/v1/responses", headers={"Content-Type": "application/json"},
            data=b'{"model": "m", "input": [{"type": "item_reference", "\\u0069d": "msg_made_elsewhere"}]}') as resp:
        assert resp.status == 404 and (await resp.json())["error"]["param"] == "input"
    assert sim.total_requests == 1
    await _create(other, True, input=_referring("msg_made_elsewhere"))
    assert sim.total_requests == 2

    # A reference without an id is refused rather than passed on unchecked.
    err = await _refused(acme, False, input=[{"type": "item_reference", "id": 7}])
    assert isinstance(err, openai.BadRequestError) and err.param == "input"
    assert "item_reference" in err.message
    assert sim.total_requests == 2


async def test_an_id_the_router_never_saw_created_is_the_first_tenant_s_to_use_it(
        settings: Settings, store: Store, replicas: Replicas, sim: SimServer, keys: Bootstrap, globex: str) -> None:
    router = await _router(replicas, _passthrough(settings, sim), store)
    acme, other = _client(router, keys.app_key), _client(router, globex)
    # Made outside the router (another client of the account): globex names each first, and the upstream answers.
    await _create(other, False, previous_response_id="resp_made_elsewhere")
    await _create(other, True, conversation="conv_made_elsewhere")
    assert sim.total_requests == 2
    # They are globex's now, however acme spells them.
    err = await _refused(acme, False, previous_response_id="resp_made_elsewhere")
    assert err.code == "previous_response_not_found"
    for spelled in ("conv_made_elsewhere", {"id": "conv_made_elsewhere"}):
        for stream in (False, True):
            err = await _refused(acme, stream, conversation=spelled)
            assert isinstance(err, openai.NotFoundError) and err.param == "conversation", spelled
            assert err.body["message"] == "Conversation with id 'conv_made_elsewhere' not found."  # type: ignore[index]
    # A JSON escape does not hide the name: `previous_response_\u0069d` is previous_response_id to every parser.
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.app_key}"}) as http, http.post(
            f"{router.url}/v1/responses", headers={"Content-Type": "application/json"},
            data=b'{"model": "m", "input": "hi", "previous_response_\\u0069d": "resp_made_elsewhere"}') as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "previous_response_not_found"
    assert sim.total_requests == 2
    await _create(other, False, previous_response_id="resp_made_elsewhere", conversation="conv_made_elsewhere")
    assert sim.total_requests == 3

    # A value that is no id is refused rather than passed on unchecked.
    err = await _refused(acme, False, previous_response_id=["resp_made_elsewhere"])  # type: ignore[arg-type]
    assert isinstance(err, openai.BadRequestError) and err.param == "previous_response_id"
    assert sim.total_requests == 3


async def test_owners_store_down_fails_closed(settings: Settings, store: Store, replicas: Replicas, sim: SimServer,
                                             tmp_path: Path) -> None:
    own = NatsServer(tmp_path / "own-nats")  # this test stops its bus, so not the session's server
    await own.start()
    try:
        s = _passthrough(settings.replace(nats_url=own.url), sim)
        keys = bootstrap(s.home, tenant="acme", app="shop")
        router = await _router(replicas, s, store)
        acme = _client(router, keys.app_key)
        mine, item = await _answer(acme, False)
        await asyncio.to_thread(own.stop)
        for stream in (False, True):
            for ask in ({}, {"previous_response_id": mine}, {"input": _referring(item)}):
                err = await _refused(acme, stream, **ask)
                assert isinstance(err, openai.InternalServerError) and err.status_code == 503, ask
                assert err.code == "response_owners_unavailable"
                assert "cannot check or record which tenant owns Responses state" in err.message
                assert "fail closed" in err.message
        assert sim.total_requests == 1  # nothing more reached the upstream
        # Chat keeps no state by id: served as before.
        answer = await acme.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "an answer"
    finally:
        await own.start()  # back on its port, so the router stops cleanly
        await replicas.close()
        own.stop()


async def test_a_claim_is_keyed_by_the_ids_hash_and_expires(settings: Settings, store: Store, replicas: Replicas,
                                                           sim: SimServer, keys: Bootstrap) -> None:
    s = _passthrough(settings, sim).replace(router_response_owner_ttl_s=3600.0)
    router = await _router(replicas, s, store)
    mine = await _create(_client(router, keys.app_key), False)
    bus = router.ctx.bus
    kv = await bus.kv(bus.subjects.kv_response_owners)
    entry = await kv.get(owner_key(mine))
    record = msgspec.json.decode(entry.value, type=Owner)
    assert (record.tenant, record.app, record.deployment) == ("acme", "shop", "chat")
    assert time.time() - 60 < record.at <= time.time()
    msg = await bus.js.get_msg(f"KV_{bus.subjects.kv_response_owners}", entry.revision)
    assert (msg.headers or {}).get("Nats-TTL") in ("3600", "3600s")
    # Named by its owner while young: no write (a record is renewed once it has lived a quarter of its TTL).
    await _create(_client(router, keys.app_key), False, previous_response_id=mine)
    assert (await kv.get(owner_key(mine))).revision == entry.revision

    # A record written before records were renewed (the bare tenant name) is read, and renewed when its owner names
    # it: a new value, carrying its TTL again.
    old = await kv.create(owner_key("resp_old"), b'"acme"', msg_ttl=3600)
    await _create(_client(router, keys.app_key), False, previous_response_id="resp_old")
    entry = await kv.get(owner_key("resp_old"))
    assert entry.revision != old and msgspec.json.decode(entry.value, type=Owner).tenant == "acme"
    msg = await bus.js.get_msg(f"KV_{bus.subjects.kv_response_owners}", entry.revision)
    assert (msg.headers or {}).get("Nats-TTL") in ("3600", "3600s")

    # A record written before apps were recorded (its tenant alone, however young) serves any app of that tenant, as
    # it did, and the first to name it has it rewritten as its own: the tenant's other apps are refused it since.
    await kv.create(owner_key("resp_tenants"), msgspec.json.encode({"tenant": "acme", "at": time.time()}),
                    msg_ttl=3600)
    other = _client(router, KeyStore(s.home).create("acme", "other")[0])
    await _create(other, False, previous_response_id="resp_tenants", extra_headers={"x-lockgate-deployment": "web2"})
    record = msgspec.json.decode((await kv.get(owner_key("resp_tenants"))).value, type=Owner)
    assert (record.tenant, record.app, record.deployment) == ("acme", "other", "web2")
    err = await _refused(_client(router, keys.app_key), False, previous_response_id="resp_tenants")
    assert err.code == "previous_response_not_found"


async def test_an_id_in_use_stays_its_owners_past_the_ttl(settings: Settings, store: Store, replicas: Replicas,
                                                           sim: SimServer, keys: Bootstrap, globex: str) -> None:
    """Before (probe p43 F2), a record expired its TTL after its claim however often its owner named it, and another
    tenant naming the id then (each refusal free) took it over: its owner was refused its own conversation."""
    ttl_s = 2.0
    s = _passthrough(settings, sim).replace(router_response_owner_ttl_s=ttl_s)
    router = await _router(replicas, s, store)
    acme, other = _client(router, keys.app_key), _client(router, globex)
    await _create(acme, False, conversation="conv_acme")  # named first by acme: acme's
    began = time.monotonic()
    while time.monotonic() - began < 3 * ttl_s:  # well past the first claim's TTL
        # Globex asks first each round: the instant a record expires, the next to name the id owns it.
        assert isinstance(await _refused(other, False, conversation="conv_acme"), openai.NotFoundError)
        await _create(acme, False, conversation="conv_acme")
        await asyncio.sleep(ttl_s / 4)  # acme's pace of use (time passing, not synchronisation)


async def test_under_auth_the_router_claims_and_an_app_cannot_touch_the_owners(tmp_path: Path, unique: str) -> None:
    async with identity_buses(tmp_path, unique) as (settings, buses):
        owners = Owners(settings, buses["router"])
        store = KeyStore(settings.home)
        acme, globex = store.create("acme", "shop")[1], store.create("globex", "books")[1]
        assert await owners.claim(acme, "chat", (), ("resp_1",)) is None  # the router identity creates claims
        assert await owners.admit(acme, "chat", (("previous_response_id", "resp_1"),)) == ()
        refused = await owners.admit(globex, "chat", (("previous_response_id", "resp_1"),))
        assert isinstance(refused, web.Response) and refused.status == 400
        app = buses["app"]
        with pytest.raises(NotAllowed):  # an application cannot claim an id, nor take one over
            await app.publish(f"$KV.{app.subjects.kv_response_owners}.{owner_key('resp_1')}", b'"globex"', msg_id="x")


class Interpreter:
    """An upstream whose answers ran code in a code interpreter container: the one a request's tool names by id, else
    a new one (`cntr_<n>`). Streamed, it waits after `response.output_item.added` until `go` is set (the test has
    looked at the item meanwhile: the stream is still open)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.go = asyncio.Event()
        self.go.set()

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        n = len(self.seen)
        named = [t["container"] for t in body.get("tools", ()) if isinstance(t.get("container"), str)]
        call = {"type": "code_interpreter_call", "id": f"ci_{n}", "status": "completed", "outputs": [],
                "container_id": named[0] if named else f"cntr_{n}", "code": "print(open('/mnt/data/a.csv').read())"}
        answer = {"id": f"resp_{n}", "object": "response", "created_at": 0, "status": "completed", "model": MODEL,
                  "output": [call], "usage": {"input_tokens": 5, "output_tokens": 5, "total_tokens": 10}}
        if not body.get("stream"):
            return web.json_response(answer)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        events = [("response.created", {"response": {**answer, "status": "in_progress", "output": []}}),
                  ("response.output_item.added", {"output_index": 0, "item": {**call, "status": "in_progress"}}),
                  ("response.output_item.done", {"output_index": 0, "item": call}),
                  ("response.completed", {"response": answer})]
        for i, (kind, event) in enumerate(events):
            await out.write(b"data: " + msgspec.json.encode({"type": kind, "sequence_number": i, **event}) + b"\n\n")
            if kind == "response.output_item.added":
                await self.go.wait()
        await out.write_eof()
        return out


@pytest.fixture
async def interpreter() -> AsyncIterator[tuple[Interpreter, str]]:
    upstream = Interpreter()
    app = web.Application()
    app.router.add_post("/v1/responses", upstream.responses)
    app.router.add_post("/responses", upstream.responses)
    async with served(app) as url:
        yield upstream, url


def _in(container: Any) -> list[dict[str, Any]]:
    return [{"type": "code_interpreter", "container": container}]


async def test_another_tenants_container_is_answered_as_one_that_does_not_exist(
        settings: Settings, store: Store, replicas: Replicas, keys: Bootstrap, globex: str,
        interpreter: tuple[Interpreter, str]) -> None:
    """Before (probe p49 F2), a code interpreter container was passed on unchecked: globex, knowing the container
    acme's code ran in (its answer shows it), had its own code run there, among the files acme's code read and wrote."""
    upstream, url = interpreter
    router = await _router(replicas, settings.replace(stable_upstream=url, passthrough=True, deployment="chat"), store)
    acme, other = _client(router, keys.app_key), _client(router, globex)
    answer = await acme.responses.create(model=MODEL, input="sum a.csv", tools=_in({"type": "auto"}))
    container = answer.output[0].container_id  # type: ignore[union-attr]
    assert container == "cntr_1" and len(upstream.seen) == 1

    for stream in (False, True):
        err = await _refused(other, stream, input="cat every file in /mnt/data", tools=_in(container))
        assert isinstance(err, openai.NotFoundError), stream
        assert (err.code, err.param, err.type) == (None, "tools", "invalid_request_error")
        assert err.body["message"] == f"Container with id '{container}' not found."  # type: ignore[index]
    assert len(upstream.seen) == 1

    # Acme's own is served; one made outside the router is the first tenant's to use it (globex's here).
    again = await acme.responses.create(model=MODEL, input="and b.csv", tools=_in(container))
    assert again.output[0].container_id == container and len(upstream.seen) == 2  # type: ignore[union-attr]
    await other.responses.create(model=MODEL, input="hi", tools=_in("cntr_made_elsewhere"))
    assert isinstance(await _refused(acme, False, tools=_in("cntr_made_elsewhere")), openai.NotFoundError)
    # An empty id is no id: refused, not passed on unchecked.
    err = await _refused(acme, False, tools=_in(""))
    assert isinstance(err, openai.BadRequestError) and err.param == "tools"
    assert len(upstream.seen) == 3

    # A container outlives an answer kept nothing of: claimed all the same.
    await acme.responses.create(model=MODEL, input="hi", store=False, tools=_in({"type": "auto"}))
    assert isinstance(await _refused(other, False, tools=_in("cntr_4")), openai.NotFoundError)
    assert len(upstream.seen) == 4


async def test_a_streamed_container_is_claimed_before_the_client_reads_its_id(
        settings: Settings, store: Store, replicas: Replicas, keys: Bootstrap, globex: str,
        interpreter: tuple[Interpreter, str]) -> None:
    upstream, url = interpreter
    router = await _router(replicas, settings.replace(stable_upstream=url, passthrough=True, deployment="chat"), store)
    other = _client(router, globex)
    upstream.go.clear()
    events = await _client(router, keys.app_key).responses.create(model=MODEL, input="hi", stream=True,
                                                                  tools=_in({"type": "auto"}))
    added = []
    async for event in events:
        if event.type == "response.output_item.added":
            # The stream waits on the upstream: the container, as the client reads it, is acme's already.
            added.append(event.item.container_id)  # type: ignore[union-attr]
            err = await _refused(other, False, tools=_in(event.item.container_id))  # type: ignore[union-attr]
            assert isinstance(err, openai.NotFoundError) and err.param == "tools"
            assert len(upstream.seen) == 1
            upstream.go.set()
    assert event.type == "response.completed" and added == ["cntr_1"]


async def test_a_request_naming_too_many_ids_is_refused_before_the_store(
        settings: Settings, store: Store, replicas: Replicas, sim: SimServer, keys: Bootstrap, globex: str) -> None:
    """Before (probe p49 F3), a request's every distinct id cost a KV read and, answered, a record kept 30 days:
    20,000 item references were 20,000 of each, for one request, before rate limits and budgets."""
    router = await _router(replicas, _passthrough(settings, sim), store)
    other = _client(router, globex)
    await _create(other, False)
    bus = router.ctx.bus
    records = await bus.kv_entries(bus.subjects.kv_response_owners)
    assert len(records) == 2 and sim.total_requests == 1  # the response and its item

    many = [{"type": "item_reference", "id": f"msg_{i}"} for i in range(101)]
    for stream in (False, True):
        err = await _refused(other, stream, input=many)
        assert isinstance(err, openai.BadRequestError) and err.param == "input", stream
        assert "at most 100 may be named in one request" in err.message and "101" in err.message
    assert await bus.kv_entries(bus.subjects.kv_response_owners) == records and sim.total_requests == 1

    await _create(other, False, input=many[:100])  # at the cap: served, its ids globex's
    assert len(await bus.kv_entries(bus.subjects.kv_response_owners)) == 2 + 100 + 2


async def test_the_owners_are_asked_after_rate_limits_and_a_refusal_gives_its_reservation_back(
        settings: Settings, store: Store, replicas: Replicas, sim: SimServer, keys: Bootstrap, globex: str,
        tmp_path: Path) -> None:
    """Before (probe p49 F3), the owners were asked before rate limits and budgets: a key over its limit still cost
    the store a read per id it named."""
    # Room for one reservation of 4,000 output tokens (and 1,000 for the stored response) at a time, and 4 requests.
    gateway = tmp_path / "gateway.yaml"
    gateway.write_text(yaml.safe_dump({"stored_input_tokens": 1000,
                                       "rate_limits": [{"tenant": "globex", "rpm": 4, "tpm": 8000}]}))
    router = await _router(replicas, _passthrough(settings, sim).replace(gateway_file=str(gateway)), store)
    router.admission.clock = lambda: 1000.0  # no refill while the test runs
    acme, other = _client(router, keys.app_key), _client(router, globex)
    mine = await _create(acme, False)
    for _ in range(3):  # each refusal gives its 4,000 tokens back: the next fits
        err = await _refused(other, False, previous_response_id=mine, max_output_tokens=4000)
        assert err.code == "previous_response_not_found"
    await _create(other, False, max_output_tokens=4000)
    assert sim.total_requests == 2
    # The minute's requests spent: the rate limit answers, before the owners are asked.
    assert isinstance(await _refused(other, False, previous_response_id=mine), openai.RateLimitError)
    assert sim.total_requests == 2


def _on(deployment: str) -> dict[str, Any]:
    return {"extra_headers": {"x-lockgate-deployment": deployment}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_another_apps_ids_are_answered_as_ones_that_do_not_exist(
        settings: Settings, store: Store, replicas: Replicas, sim: SimServer, keys: Bootstrap, globex: str,
        stream: bool) -> None:
    """Before (probe p74 F1), owners were recorded by tenant alone: a key of app `other` (scoped to deployment `web2`)
    named a response, an output item or a conversation app `shop` created through `shop-web` (a deployment the key is
    refused), and the shared upstream account continued shop's conversation for it."""
    router = await _router(replicas, _passthrough(settings, sim), store)
    made = KeyStore(settings.home)
    shop = _client(router, made.create("acme", "shop", deployments=["shop-web"])[0])
    apps = {"another app": _client(router, made.create("acme", "other", deployments=["web2"])[0]),
            "its app's key scoped elsewhere": _client(router, made.create("acme", "shop", deployments=["web2"])[0])}
    mine, item = await _answer(shop, stream, **_on("shop-web"))
    await _create(shop, stream, conversation="conv_shop", **_on("shop-web"))  # named first by shop: shop's
    assert sim.total_requests == 2

    # Each is answered exactly as another tenant's id (and as an id that does not exist): nothing tells it exists.
    asks = {"previous_response_id": {"previous_response_id": mine}, "input": {"input": _referring(item)},
            "conversation": {"conversation": "conv_shop"}}
    for field, ask in asks.items():
        unknown = await _refused(_client(router, globex), stream, **ask, **_on("web2"))
        for who, client in apps.items():
            err = await _refused(client, stream, **ask, **_on("web2"))
            assert (err.status_code, err.body) == (unknown.status_code, unknown.body), (who, field, err.body)
            assert err.param == field
    assert sim.total_requests == 2

    # The app's key of every deployment is served on any of them, and an admin key may name any app's.
    await _create(_client(router, keys.app_key), stream, previous_response_id=mine, **_on("web2"))
    await _create(_client(router, keys.admin_key), stream, input=_referring(item), **_on("web2"))
    assert sim.total_requests == 4
