"""API keys scoped to deployments, through the official `openai` client against the router.

Before: an app key was scoped to its tenant and app only, so any key could send traffic through every
governed deployment (its releases, upstream credentials and limits), and `GET /v1/models` listed them all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from lockgate.server.apikeys import Bootstrap, KeyStore, bootstrap
from lockgate.server.service import ServiceContext
from lockgate_dev.sim import ModelSpec, SimConfig, SimServer
from tests.helpers import register_model_release, served_events, store_pass

pytestmark = pytest.mark.timeout(90)

SIM = SimConfig(models={"m": ModelSpec(default="governed answer")})
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def sims() -> AsyncIterator[dict[str, SimServer]]:
    """One upstream per deployment, so each one's calls are counted apart."""
    async with SimServer(SIM) as support, SimServer(SIM) as billing:
        yield {"support": support, "billing": billing}


@pytest.fixture
def keys(context: ServiceContext) -> Bootstrap:
    """The admin key, and an app key with no scope (every deployment, as keys were before scopes)."""
    return bootstrap(context.settings.home, tenant="acme", app="shop")


@pytest.fixture
async def router(context: ServiceContext, run_services: Any, sims: dict[str, SimServer], keys: Bootstrap,
                 tmp_path: Any) -> Any:
    """Deployments `support` and `billing`, each served by a gated release on its own endpoint; the models
    `helpdesk` and `invoices` map to them. `chat`, the default deployment, was never rolled out."""
    (tmp_path / "endpoints.yaml").write_text(
        f"endpoints:\n  support-ep: {{url: {sims['support'].url}}}\n  billing-ep: {{url: {sims['billing'].url}}}\n"
        "models:\n  helpdesk: support\n  invoices: billing\n")
    context.settings = context.settings.replace(endpoints_file=str(tmp_path / "endpoints.yaml"), deployment="chat",
                                                app="shop", passthrough=False)
    router = (await run_services("router"))["router"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {keys.admin_key}"}) as http:
        for deployment in ("support", "billing"):
            for release in (f"{deployment}-r1", f"{deployment}-r2"):
                # The keys' tenant's: an app key is served only deployments of its own tenant's releases.
                await register_model_release(context.bus, release, "m", f"{deployment}-ep", tenant="acme")
            await store_pass(context.bus, f"{deployment}-r1", context.settings)
            # r2, never gated, waits at 0%: r1 serves everything
            async with http.put(f"{router.url}/lockgate/v1/deployments/{deployment}",
                                json={"stable_release": f"{deployment}-r1", "canary_release": f"{deployment}-r2"}
                                ) as resp:
                assert resp.status == 200, await resp.text()
    return router


def _client(router: Any, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0, timeout=20)


async def test_a_key_scoped_to_support_is_served_there_and_refused_elsewhere_before_any_upstream(
        router: Any, sims: dict[str, SimServer], keys: Bootstrap) -> None:
    plain, scoped = KeyStore(router.ctx.settings.home).create("acme", "shop", deployments=["support"])
    bus = router.ctx.bus
    served = await bus.nc.subscribe(bus.subjects.served("shop", "acme"))
    async with _client(router, plain) as client:
        # In scope: by the deployment's name, by a model mapped to it, and by header.
        for ask in ({"model": "support"}, {"model": "helpdesk"},
                    {"model": "m", "extra_headers": {"x-lockgate-deployment": "support"}}):
            answer = await client.chat.completions.with_raw_response.create(messages=HI, **ask)
            assert answer.parse().choices[0].message.content == "governed answer"
            assert "x-lockgate-release" not in answer.headers  # an app key's answer does not name it: the event does
        assert [e.release for e in await served_events(served, 3)] == ["support-r1"] * 3
        assert sims["support"].total_requests == 3

        # Out of scope: another governed deployment by header, by its name and by a mapped model, and the default
        # deployment a model nobody maps goes to; streamed or not. Refused (403), not unknown (404).
        refused = {"header": ({"model": "support", "extra_headers": {"x-lockgate-deployment": "billing"}}, "billing"),
                   "name": ({"model": "billing"}, "billing"), "mapped": ({"model": "invoices"}, "billing"),
                   "default": ({"model": "m"}, "chat")}
        for what, (ask, deployment) in refused.items():
            for stream in (False, True):
                with pytest.raises(openai.PermissionDeniedError) as caught:
                    await client.chat.completions.create(messages=HI, stream=stream, **ask)
                err = caught.value
                assert (err.status_code, err.type, err.code) == (403, "invalid_request_error", "model_not_found"), what
                assert f"deployment {deployment!r}" in err.message.lower(), (what, err.message)
                assert f"outside the scope of API key {scoped.label}: it may use support" in err.message, err.message
                assert plain not in err.message
        # Every operation takes the same path.
        for call in (client.completions.create(model="billing", prompt="hi"),
                     client.embeddings.create(model="billing", input="hi"),
                     client.responses.create(model="billing", input="hi")):
            with pytest.raises(openai.PermissionDeniedError):
                await call
        assert sims["billing"].total_requests == 0 and sims["support"].total_requests == 3  # never called

        assert {m.id async for m in client.models.list()} == {"support", "helpdesk"}
        # One model by name (models.retrieve) is limited alike: a name outside the scope is not found.
        assert (await client.models.retrieve("helpdesk")).owned_by == "lockgate:support"
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("invoices")
        assert caught.value.code == "model_not_found"

    # The same requests with a key of every deployment: `billing` is governed and served, so the refusals
    # above were the scope's.
    async with _client(router, keys.app_key) as client:
        await client.chat.completions.create(model="invoices", messages=HI)
        assert [e.release for e in await served_events(served, 1)] == ["billing-r1"]
        assert sims["billing"].total_requests == 1
        assert {m.id async for m in client.models.list()} == {"support", "helpdesk", "billing", "invoices"}


async def test_a_scope_changed_on_a_live_key_applies_from_the_next_request(router: Any, sims: dict[str, SimServer]) -> None:
    store = KeyStore(router.ctx.settings.home)
    plain, rec = store.create("acme", "shop", deployments=["support"])
    async with _client(router, plain) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="billing", messages=HI)
        store.rescope(rec.id, ["billing"])  # the router reads the key file again when it changes
        await client.chat.completions.create(model="billing", messages=HI)
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="support", messages=HI)
        assert {m.id async for m in client.models.list()} == {"billing", "invoices"}
    assert (sims["support"].total_requests, sims["billing"].total_requests) == (0, 1)


async def test_another_tenants_key_is_answered_for_a_mapped_model_as_for_one_nobody_configured(
        router: Any, sims: dict[str, SimServer]) -> None:
    # Found by a probe: the endpoints file's `models:` map is the router's, so bravo's key asking for `helpdesk`
    # got "The model 'helpdesk' maps to deployment 'support' ..." and learnt the name of acme's deployment.
    bravo, _ = KeyStore(router.ctx.settings.home).create("bravo", "shop")

    async def refusal(model: str) -> openai.NotFoundError:
        async with _client(router, bravo) as client:
            with pytest.raises(openai.NotFoundError) as caught:
                await client.chat.completions.create(model=model, messages=HI)
        return caught.value

    mapped, unknown = await refusal("helpdesk"), await refusal("nobody-maps-this")
    assert mapped.code == unknown.code == "model_not_found"
    assert mapped.message == unknown.message.replace("nobody-maps-this", "helpdesk"), (mapped.message, unknown.message)
    assert "support" not in mapped.message
    assert sims["support"].total_requests == 0
