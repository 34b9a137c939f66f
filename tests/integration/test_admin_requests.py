"""The router's admin API answers each request for what it is (real nats-server, the simulator, HTTP and the CLI):
a malformed request is a 400 whatever the deployment's state, a path or method no route takes a JSON 404 or 405, a
deployment nothing serves a 404 `deployment_not_found` (CLI exit 3), and a PATCH of a finished rollout says that
it is finished.

Found by a probe: a malformed POST promote/abort/undo body or a PATCH weight of 500 was a 409 `conflict`; unknown
paths got aiohttp's plain-text "404: Not Found"; `rollout get nope` showed an invented idle route (exit 0) for a
name the proxy answers 404 `model_not_found`; and a PATCH of the weight of a promoted rollout was refused because
"canary_release must differ from stable_release", a field nobody sent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lockgate.server.apikeys import Bootstrap
from lockgate.server.service import ServiceContext
from lockgate.signing import Signer
from lockgate_dev.sim import SimServer
from tests.helpers import chat_releases
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import CANARY, STABLE, _pass, _start
from tests.integration.test_rollout_operate import _cli

http, keys, signer = analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)
BASE = "/lockgate/v1/deployments"


@pytest.fixture
def passthrough() -> bool:
    """Governed (the default): a deployment nobody rolled out is served by nothing."""
    return False


@pytest.fixture
async def router(context: ServiceContext, run_services: Any, signer: Signer, passthrough: bool) -> AsyncIterator[Any]:
    """A router whose default deployment is `chat`: r1 (stable, PASSed) and `same` (a canary release) registered,
    nothing rolled out."""
    async with SimServer(STABLE) as stable, SimServer(CANARY) as canary:
        await chat_releases(context, signer, stable.url, canary.url, ("same",), passthrough=passthrough)
        yield (await run_services("router"))["router"]


async def _raw(http: aiohttp.ClientSession, router: Any, method: str, path: str, body: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
    """Status, headers and JSON answer of one request (`path` under the router's root; a PATCH as a merge patch)."""
    if method == "PATCH":
        headers = {"Content-Type": "application/merge-patch+json", **(headers or {})}
    async with http.request(method, f"{router.url}{path}", data=body, headers=headers) as resp:
        assert resp.content_type == "application/json", (method, path, resp.status, await resp.text())
        return resp.status, dict(resp.headers), await resp.json()


def _one_line(result: Any) -> str:
    out = result.output.strip()
    assert "\n" not in out and "Traceback" not in out, out
    return out


async def test_a_malformed_admin_request_is_a_400_whatever_the_deployments_state(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    await _start(http, router, "same", {"steps": [50, 100], "interval_s": 3600})
    await _pass(router, signer, "same")
    before = router.rollouts.route("chat")
    malformed = [("POST", "/promote", b"{bad", "JSON is malformed"), ("POST", "/abort", b"[1,2]", "Expected `object`"),
                 ("POST", "/undo", b'{"to": 5}', "Expected `str | null`, got `int` - at `$.to`"),
                 ("POST", "/retry", b'{"bogus": 1}', "unknown field `bogus`"),
                 ("POST", "/pause", b"{bad", "JSON is malformed"),
                 # Truncated: said so, not refused for the unknown field msgspec met first (probe p70 H2)
                 ("POST", "/pause", b'{"x":', "Input data was truncated"),
                 ("POST", "/promote", b'{"bogus": ', "Input data was truncated"),
                 ("PUT", "", b'{"bogus": [', "Input data was truncated"),
                 ("POST", "/set-weight", b'{"weight": "x"}', "Expected `float | null`, got `str`"),
                 ("POST", "/set-weight", b"{}", 'set-weight needs {"weight": PERCENT}'),
                 ("PATCH", "", b'{"weight": 500}', "Expected `float` <= 100.0 - at `$.weight`"),
                 ("PATCH", "", b"null", "a merge patch is a non-empty JSON object"),
                 ("PATCH", "", b'{"strategy": {"steps": "x"}}', "at `$.strategy.steps`")]
    for method, action, body, why in malformed:
        status, _, answer = await _raw(http, router, method, f"{BASE}/chat{action}", body)
        assert (status, answer["error"]["type"]) == (400, "invalid_request_error"), (action, body, answer)
        assert why in answer["error"]["message"], (action, body, answer)
    assert router.rollouts.route("chat").version == before.version  # nothing changed
    # The same bodies on a finished rollout: still the request's fault, never a conflict with the state.
    async with http.post(f"{router.url}{BASE}/chat/promote") as resp:
        assert resp.status == 200, await resp.text()
    for method, action, body, _why in malformed:
        status, _, answer = await _raw(http, router, method, f"{BASE}/chat{action}", body)
        assert (status, answer["error"]["type"]) == (400, "invalid_request_error"), (action, body, answer)


async def test_a_path_or_method_no_route_takes_is_a_json_404_or_405(
        router: Any, http: aiohttp.ClientSession, keys: Bootstrap) -> None:
    for path in (f"{BASE}/chat/nosuchaction", f"{BASE}/chat/watch/more", "/lockgate/v1/nothing", "/"):
        status, _, answer = await _raw(http, router, "POST" if "chat" in path else "GET", path)
        assert (status, answer["error"]["code"]) == (404, "unknown_url"), (path, answer)
        assert "Invalid URL" in answer["error"]["message"], answer
    status, headers, answer = await _raw(http, router, "DELETE", f"{BASE}/chat")
    assert status == 405 and {"GET", "PUT", "PATCH"} <= set(headers["Allow"].split(", ")), (headers, answer)
    assert "DELETE /lockgate/v1/deployments/chat is not supported: use " in answer["error"]["message"], answer
    status, headers, answer = await _raw(http, router, "POST", "/healthz")
    assert (status, headers["Allow"]) == (405, "GET, HEAD"), (headers, answer)
    # No key needed to be told a path does not exist (nothing is read); a real admin path still asks for one.
    async with aiohttp.ClientSession() as anonymous:
        assert (await _raw(anonymous, router, "POST", f"{BASE}/chat/nosuchaction"))[0] == 404
        assert (await _raw(anonymous, router, "GET", f"{BASE}/chat"))[0] == 401
        async with anonymous.get(f"{router.url}/healthz") as resp:
            assert resp.status == 200
    # /v1/ keeps its own catch-all, in OpenAI's words.
    status, _, answer = await _raw(http, router, "GET", "/v1/nothing")
    assert status == 404 and "the router serves POST /v1/chat/completions" in answer["error"]["message"]


async def test_a_finished_rollout_has_nothing_to_patch_and_get_shows_no_canary_once_promoted(
        router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    await _start(http, router, "same", {"steps": [100], "interval_s": 3600})
    await _pass(router, signer, "same")
    # `--full`, as issue 8 and `kubectl argo rollouts` write it (probe p28: "No such option"), is promote's only way.
    assert (await _cli(router, "promote", "--full", "chat", key=keys.admin_key)).exit_code == 0
    promoted = router.rollouts.route("chat")
    assert (promoted.phase, promoted.stable.release, promoted.canary and promoted.canary.release) == (
        "promoted", "same", "same")
    for args in (["--weight", "30"], ["--patch", '{"strategy": {"interval_s": 120}}']):
        refused = await _cli(router, "patch", "chat", *args, key=keys.admin_key)
        line = _one_line(refused)
        assert refused.exit_code == 4 and "router refused (409): deployment 'chat' has no live rollout (promoted " \
            "same): PUT starts one (lockgate rollout start chat --stable same --canary RELEASE)" in line, line
        assert "canary_release" not in line, line
    # The table shows no canary; the JSON keeps the route as stored: the promoted release's target, weight 0,
    # under phase promoted.
    table = await _cli(router, "get", "chat", key=keys.admin_key)
    rows = {cells[0]: cells[1] for line in table.output.splitlines()
            if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) == 2}
    assert (rows["phase"], rows["stable"], rows["canary"]) == ("promoted", "same", "-"), table.output
    shown = await _cli(router, "get", "chat", "--json", key=keys.admin_key)
    route = json.loads(shown.output)
    assert (route["phase"], route["weight"], route["canary"]["release"]) == ("promoted", 0.0, "same")

    # An aborted rollout: the same answer, naming the aborted canary and retry.
    async with http.put(f"{router.url}{BASE}/chat", json={"stable_release": "same", "canary_release": "r1"}) as resp:
        assert resp.status == 200, await resp.text()
    assert (await _cli(router, "abort", "chat", key=keys.admin_key)).exit_code == 0
    status, _, answer = await _raw(http, router, "PATCH", f"{BASE}/chat", b'{"weight": 30}')
    assert status == 409 and answer["error"]["message"] == (
        "deployment 'chat' has no live rollout (aborted r1): PUT starts one (lockgate rollout start chat --stable "
        "same --canary RELEASE); `lockgate rollout retry chat` restarts the aborted one"), answer
    table = await _cli(router, "get", "chat", key=keys.admin_key)
    assert "aborted" in table.output and "r1" in table.output, table.output  # an aborted canary is still shown


async def test_a_deployment_nothing_serves_is_not_found_on_every_read_and_action(
        router: Any, http: aiohttp.ClientSession, keys: Bootstrap) -> None:
    # `chat` is the router's default deployment, and nothing was rolled out to it: the proxy answers its requests 404
    # model_not_found, so the admin API does not show a route for it either; `nope` is a name nobody configured.
    async with http.post(f"{router.url}/v1/chat/completions", headers={"Authorization": f"Bearer {keys.app_key}"},
                         json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    for name in ("nope", "chat"):
        said = (f"no deployment {name!r}: nothing is rolled out to it that this key may read (GET {BASE} lists those "
                f"it may; `lockgate rollout start {name} --stable RELEASE`, PUT {BASE}/{name}, gives it its first "
                "release)")
        for method, path, body in (("GET", "", None), ("GET", "/shadow", None), ("GET", "/watch", None),
                                   ("POST", "/promote", None), ("POST", "/abort", None), ("POST", "/retry", None),
                                   ("POST", "/undo", None), ("POST", "/pause", None), ("POST", "/resume", None),
                                   ("POST", "/approve", b'{"step": 1, "canary": "r2", "started_at": 1.0}'),
                                   ("POST", "/set-weight", b'{"weight": 30}'), ("PATCH", "", b'{"weight": 30}'),
                                   ("DELETE", "/break-glass", None)):
            status, _, answer = await _raw(http, router, method, f"{BASE}/{name}{path}", body)
            assert (status, answer["error"]["code"]) == (404, "deployment_not_found"), (method, path, answer)
            assert answer["error"]["message"] == said, answer
        for args in (["get", name], ["watch", name, "--timeout", "30"], ["set-weight", name, "30"],
                     ["patch", name, "--weight", "30"], ["promote", name], ["approve", name],
                     ["approve", name, "--step", "1", "--canary", "r2", "--started-at", "1"],
                     # The stored reads: no rollout event or analysis record is stored of it, and the router says
                     # why (before, an empty table, exit 0, as of a deployment with no change yet).
                     ["history", name], ["history", name, "--json"], ["analysis", name]):
            result = await _cli(router, *args, key=keys.admin_key)
            if "--json" in args:
                assert (result.exit_code, json.loads(result.stdout)) == (3, {"error": said, "exit_code": 3}), args
                continue
            assert (result.exit_code, _one_line(result)) == (3, f"error: {said}"), (args, result.output)
    assert router.rollouts.routes == {}  # and nothing was made by asking

    # Once a release is rolled out to it, it is read (its history too, though no sink stored its first change here).
    assert (await _cli(router, "start", "nope", "--stable", "r1", key=keys.admin_key)).exit_code == 0
    got = await _cli(router, "get", "nope", "--json", key=keys.admin_key)
    assert got.exit_code == 0 and json.loads(got.output)["stable"]["release"] == "r1", got.output
    for args in (["history", "nope", "--json"], ["analysis", "nope", "--json"]):
        read = await _cli(router, *args, key=keys.admin_key)
        assert (read.exit_code, json.loads(read.stdout)) == (0, []), (args, read.output)


@pytest.mark.parametrize("passthrough", [True])
async def test_with_passthrough_a_deployment_nobody_rolled_out_is_served_and_read_as_the_default_route(
        router: Any, http: aiohttp.ClientSession, keys: Bootstrap) -> None:
    # Passthrough serves every deployment nobody rolled out with the ungoverned default route (the router's default
    # deployment `chat`, or any other by header): that route is what serves it, so it is what a read shows.
    for name in ("chat", "nope"):
        async with http.post(f"{router.url}/v1/chat/completions",
                             headers={"Authorization": f"Bearer {keys.admin_key}", "x-lockgate-deployment": name},
                             json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            # No release (an admin key's answer names the one that served: none here).
            assert resp.status == 200 and resp.headers["x-lockgate-release"] == "", await resp.text()
        status, _, route = await _raw(http, router, "GET", f"{BASE}/{name}")
        assert (status, route["phase"], route["stable"]["release"], route["canary"]) == (200, "idle", "", None), route
        got = await _cli(router, "get", name, key=keys.admin_key)
        assert got.exit_code == 0 and "(default)" in got.output, got.output
        # It has no rollout to act on: the state's answer (409), not a 404.
        status, _, answer = await _raw(http, router, "POST", f"{BASE}/{name}/promote")
        assert status == 409 and "has no canary to promote" in answer["error"]["message"], answer
