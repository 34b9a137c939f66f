"""Another tenant's deployment, through the official `openai` client against the router (real nats-server, the
simulator): to a non-admin key it is a name nobody configured.

Before: an app key of tenant acme with no deployment scope (every deployment) sent chat traffic through tenant
globex's deployment: globex's release, upstream credentials and budgets served it, `GET /v1/models` listed it, and
its requests were served evidence in globex's canary analysis, free to sink or pass globex's canary."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from lockgate.codec import Codec
from lockgate.contracts import InferenceEvent
from lockgate.server.apikeys import ApiKey, Bootstrap, KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import register_model_release, store_pass

pytestmark = pytest.mark.timeout(90)

SIM = SimConfig(models={"m": ModelSpec(default="an answer")})
HI = [{"role": "user", "content": "hi"}]
_events: Codec[list[InferenceEvent]] = Codec(list[InferenceEvent])


@pytest.fixture
async def sims() -> AsyncIterator[dict[str, SimServer]]:
    """One upstream per endpoint, so each one's calls are counted apart: acme's deployment's, globex's, and the
    `default` endpoint that passthrough sends ungoverned requests to."""
    async with SimServer(SIM) as support, SimServer(SIM) as ledger, SimServer(SIM) as default:
        yield {"support": support, "ledger": ledger, "default": default}


@pytest.fixture
def passthrough() -> bool:
    return False


@pytest.fixture
def keys(context: ServiceContext) -> Bootstrap:
    """The admin key, and acme's app key with no deployment scope (every deployment of its tenant)."""
    return bootstrap(context.settings.home, tenant="acme", app="shop")


@pytest.fixture
def globex(context: ServiceContext) -> tuple[str, ApiKey]:
    """Globex's app key, with no deployment scope either."""
    return KeyStore(context.settings.home).create("globex", "books")


@pytest.fixture
async def router(context: ServiceContext, run_services: Any, sims: dict[str, SimServer], keys: Bootstrap,
                 passthrough: bool, tmp_path: Any) -> Any:
    """Deployment `support` serves acme's gated release, `ledger` globex's, each on its own endpoint. `chat`, the
    default deployment, was never rolled out."""
    (tmp_path / "endpoints.yaml").write_text(
        "endpoints:\n" + "".join(f"  {name}: {{url: {sim.url}}}\n" for name, sim in sims.items()))
    context.settings = context.settings.replace(endpoints_file=str(tmp_path / "endpoints.yaml"), deployment="chat",
                                                app="shop", passthrough=passthrough)
    router = (await run_services("router"))["router"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http:
        for deployment, tenant, app in (("support", "acme", "shop"), ("ledger", "globex", "books")):
            await register_model_release(context.bus, f"{deployment}-r1", "m", deployment, app=app, tenant=tenant)
            await store_pass(context.bus, f"{deployment}-r1", context.settings)
            async with http.put(f"{router.url}/lockgate/v1/deployments/{deployment}",
                                json={"stable_release": f"{deployment}-r1"}) as resp:
                assert resp.status == 200, await resp.text()
    return router


def _client(router: Any, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0, timeout=20)


async def _answer(router: Any, key: str, model: str, **headers: str) -> tuple[int, dict[str, Any], str]:
    """The status, body and serving release (x-lockgate-release: named to admin keys only) of one chat request,
    raw: compared whole."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{router.url}/v1/chat/completions", json={"model": model, "messages": HI},
            headers={"Authorization": f"Bearer {key}", **headers}) as resp:
        return resp.status, await resp.json(), resp.headers.get("x-lockgate-release", "")


def _named(answer: tuple[int, dict[str, Any], str], name: str) -> str:
    """What an answer tells, with `name` taken out, to compare it with the answer for another name: a refusal's
    whole body, or who served an answer and what it said (its id and time are its own)."""
    status, body, release = answer
    told = body["choices"][0]["message"]["content"] if status == 200 else body
    return f"{status} {release!r} {told}".replace(name, "NAME")


@pytest.mark.parametrize("passthrough", [False, True], ids=["governed", "passthrough"])
async def test_another_tenants_deployment_is_answered_as_a_name_nobody_configured(
        router: Any, sims: dict[str, SimServer], keys: Bootstrap, passthrough: bool) -> None:
    for ask in ({}, {"x-lockgate-deployment": "{name}"}):  # by the deployment's name as the model, and by header
        def answer(name: str, ask: dict[str, str] = ask) -> Any:
            headers = {h: v.format(name=name) for h, v in ask.items()}
            return _answer(router, keys.app_key, "m" if headers else name, **headers)

        theirs, nobodys = await answer("ledger"), await answer("nowhere")
        assert _named(theirs, "ledger") == _named(nobodys, "nowhere"), ask  # its existence is not told
        status, body, _ = theirs
        if not passthrough:
            assert (status, body["error"]["code"]) == (404, "model_not_found"), body
    # Never globex's release: refused, or (passthrough) the ungoverned default route, as for the name nobody has
    # (by name, the default endpoint's own 404 for a model it does not have; by header, its answer).
    assert sims["ledger"].total_requests == 0
    assert sims["default"].requests == ({"m": 2} if passthrough else {})


@pytest.mark.parametrize("passthrough", [False, True], ids=["governed", "passthrough"])
async def test_models_lists_only_the_keys_own_tenants_deployments(
        router: Any, keys: Bootstrap, globex: tuple[str, ApiKey], passthrough: bool) -> None:
    upstream = {"m"} if passthrough else set()  # the default deployment passes the default endpoint's names through
    listed = {}
    for who, key in (("acme", keys.app_key), ("globex", globex[0]), ("admin", keys.admin_key)):
        async with _client(router, key) as client:
            listed[who] = {m.id async for m in client.models.list()}
    assert listed == {"acme": {"support"} | upstream, "globex": {"ledger"} | upstream,
                      "admin": {"support", "ledger"} | upstream}
    async with _client(router, keys.app_key) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("ledger")
        assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("passthrough", [False, True], ids=["governed", "passthrough"])
async def test_only_the_tenants_own_requests_are_served_evidence_of_its_release(
        router: Any, keys: Bootstrap, globex: tuple[str, ApiKey], passthrough: bool) -> None:
    # Canary analysis counts the served events (subjects.served) that name the deployment and one of its
    # releases: acme's requests must leave none naming globex's release, whatever they were answered.
    bus = router.ctx.bus
    served = await bus.nc.subscribe(bus.subjects.served("books", "globex"))
    for _ in range(3):
        await _answer(router, keys.app_key, "ledger")
        await _answer(router, keys.app_key, "m", **{"x-lockgate-deployment": "ledger"})
    status, body, _ = await _answer(router, globex[0], "ledger")
    assert status == 200, body
    # An event is added after its answer is sent: once globex's has arrived, a flush publishes any that acme's
    # earlier requests added.
    (event,) = _events.decode((await served.next_msg(timeout=10)).data)
    assert (event.key_id, event.release) == (globex[1].id, "ledger-r1")
    await served.unsubscribe()
    await router.batcher.flush()
    stream = bus.subjects.streams["inference"].name
    events = [e for _, _, data in [m async for m in bus.stored_since(stream, bus.subjects.served_all, 0)]
              for e in _events.decode(data)]
    assert [(e.key_id, e.deployment) for e in events if e.release == "ledger-r1"] == [(globex[1].id, "ledger")]


async def test_the_tenants_own_key_and_an_admin_key_are_still_served(
        router: Any, sims: dict[str, SimServer], keys: Bootstrap, globex: tuple[str, ApiKey]) -> None:
    for key in (globex[0], keys.admin_key):
        async with _client(router, key) as client:
            for ask in ({"model": "ledger"}, {"model": "m", "extra_headers": {"x-lockgate-deployment": "ledger"}}):
                answer = await client.chat.completions.with_raw_response.create(messages=HI, **ask)
                if key == keys.admin_key:  # the serving release is named to admin keys only
                    assert answer.headers["x-lockgate-release"] == "ledger-r1"
                assert answer.parse().choices[0].message.content == "an answer"
    # acme's key is served its own tenant's deployment as before.
    async with _client(router, keys.app_key) as client:
        answer = await client.chat.completions.with_raw_response.create(model="support", messages=HI)
        assert answer.headers.get("x-lockgate-release") is None and answer.parse().choices
    assert (sims["ledger"].total_requests, sims["support"].total_requests, sims["default"].total_requests) == (4, 1, 0)
