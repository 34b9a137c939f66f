"""An approval ends only the pause step it names, on the real nats-server, chDB and the simulator: concurrent or
repeated approvals of one pause end it once (probe p9: four at once ended four pauses and put the canary at 100%),
on one replica or two, through the admin API and the CLI."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.server.apikeys import KeyStore, bootstrap
from lockgate.signing import Signer
from tests.helpers import admin_headers
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration import test_router_replicas as replica_tests
from tests.integration.test_rollout_analysis import _pass, _start

router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer
replicas = replica_tests.replicas

pytestmark = pytest.mark.timeout(120)
PAUSES = {"steps": [{"pause": {}}, {"pause": {}}, {"pause": {}}, {"pause": {}}, 100], "interval_s": 3600}
DEPLOYMENT = "/lockgate/v1/deployments/chat"


def _step1(router: Any) -> dict[str, Any]:
    """The approval of the pause the fixture's rollout waits at: its step, its canary and its attempt."""
    return {"step": 1, "canary": "same", "started_at": router.rollouts.route("chat").started_at}


async def _approve(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with http.post(f"{url}{DEPLOYMENT}/approve", json=body) as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def paused(router: Any, http: aiohttp.ClientSession, signer: Signer) -> Any:
    """`chat` rolling out `same` with four pauses before 100%, waiting for approval at step 1."""
    await _start(http, router, "same", PAUSES)
    await _pass(router, signer, "same")
    await router.rollouts.wait_for(lambda r: r["chat"].step_pause, timeout=10)
    route = router.rollouts.route("chat")
    assert (route.step, route.weight, route.paused) == (1, 0.0, True), route.reason
    return router


async def test_concurrent_approvals_of_one_pause_end_it_once(paused: Any, http: aiohttp.ClientSession) -> None:
    # Two operators approving the same pause, or a client retrying one whose answer it missed: each was applied on
    # the route the previous one left, where the next pause waited, so four ended four pauses (0% -> 100%).
    step1 = _step1(paused)
    answers = await asyncio.gather(*(_approve(http, paused.url, step1) for _ in range(4)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200, 409, 409, 409], answers
    for status, body in answers:
        if status == 409:
            assert body["error"]["code"] == "not_at_step", body
            assert body["error"]["message"].startswith(
                "refused: approval of step 1 of 'chat' not applied (already approved, or the rollout moved on): "
                "it is now at step 2 (0%), waiting for approval"), body
    route = paused.rollouts.route("chat")
    assert (route.step, route.weight, route.paused, route.step_pause, route.phase) == (2, 0.0, True, True,
                                                                                       "progressing")
    assert "approved at step 1 (0%) by " in route.reason and "step 2/5: paused until approved" in route.reason


async def test_a_stale_or_unbound_approval_is_refused_and_moves_nothing(
        paused: Any, http: aiohttp.ClientSession) -> None:
    step1 = _step1(paused)
    status, body = await _approve(http, paused.url, step1)
    assert status == 200 and body["step"] == 2, body
    held = paused.rollouts.route("chat")
    # Sequentially the same as concurrently: the approval of step 1 again (a retry, a second operator) is refused.
    for stale in (step1, {**step1, "step": 3}):
        status, body = await _approve(http, paused.url, stale)
        assert status == 409 and body["error"]["code"] == "not_at_step", body
    assert "(not reached yet): it is now at step 2" in body["error"]["message"], body
    # No step, canary or attempt: refused as malformed, naming the fields, whatever the route's state. Without
    # the attempt (probe p18 F5), an HTTP client's approval of one attempt's pause ended a retried attempt's.
    for unbound in (None, {"step": 2}, {"step": 2, "canary": "same"}):
        status, body = await _approve(http, paused.url, unbound)
        assert status == 400 and 'approve needs {"step": N, "canary": RELEASE, "started_at": T}' in \
            body["error"]["message"], body
    async with http.post(f"{paused.url}{DEPLOYMENT}/resume", json={"step": 2}) as resp:
        assert resp.status == 400 and '"step" binds an approval to its pause: resume takes none' in \
            (await resp.json())["error"]["message"]
    assert paused.rollouts.route("chat") == held
    # `resume` stays the operator's override: it ends whichever pause holds the rollout, unbound.
    async with http.post(f"{paused.url}{DEPLOYMENT}/resume") as resp:
        assert resp.status == 200, await resp.text()
    assert paused.rollouts.route("chat").step == 3


async def test_the_cli_approves_the_step_it_read_and_a_stale_step_exits_with_one_line(paused: Any) -> None:
    operator, rec = KeyStore(paused.ctx.settings.home).create("default", "ops", "operator", "on call")
    s = paused.ctx.settings
    base = ["--home", s.home, "--nats", s.nats_url, "--prefix", s.prefix, "rollout", "--router", paused.url,
            "--api-key", operator, "approve", "chat"]

    def run(*extra: str) -> Any:
        return CliRunner().invoke(cli, [*base, *extra])

    seen = paused.rollouts.route("chat")
    result = await asyncio.to_thread(run)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("approved step 1 of chat: approved at step 1 (0%) by " + rec.label), result.output
    assert paused.rollouts.route("chat").step == 2
    # An operator who saw step 1 and approves it after someone else did: refused, exit 4, one line.
    result = await asyncio.to_thread(run, "--step", "1", "--canary", "same", "--started-at", repr(seen.started_at))
    assert result.exit_code == 4, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "router refused (409): refused: approval of step 1 of 'chat' not applied" in lines[0]
    assert "it is now at step 2 (0%), waiting for approval" in lines[0], lines
    assert paused.rollouts.route("chat").step == 2


async def test_an_approval_that_lost_the_compare_and_set_to_another_replicas_is_refused(
        replicas: tuple[Any, Any], bus: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Replica a has not yet seen b's approval of step 1 (its KV watch lags): a's approval of step 1 loses the
    # compare-and-set, is recomputed on the route b wrote, and is refused there, not applied to step 2.
    a, b = replicas
    await replica_tests.canary_passed(bus, a, PAUSES)
    async with aiohttp.ClientSession(headers=admin_headers(a.ctx.settings.home)) as http:
        for r in (a, b):
            await r.rollouts.wait_for(lambda routes: "chat" in routes and routes["chat"].step_pause, timeout=10)
        monkeypatch.setattr(a.rollouts, "_on_entry", lambda entry: None)  # replica a's watch lags from here
        step1 = {"step": 1, "canary": "r2", "started_at": b.rollouts.route("chat").started_at}
        assert (await _approve(http, b.url, step1))[0] == 200
        assert a.rollouts.route("chat").step == 1  # a has not seen it
        status, answer = await _approve(http, a.url, step1)
    assert status == 409 and answer["error"]["code"] == "not_at_step", answer
    route = a.rollouts.route("chat")  # a reloaded the route it lost to
    assert (route.step, route.weight, route.paused) == (2, 0.0, True), route.reason


async def test_an_approval_ends_only_the_pause_of_the_canary_and_attempt_it_names(
        paused: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Before (probe p13): bound to the step alone, an approval meant for one canary's pause ended the same step's pause
    # of another canary swapped in meanwhile, or of a new or retried attempt, and put that one at 100%.
    seen = paused.rollouts.route("chat")
    stale = {"step": 1, "canary": "same", "started_at": seen.started_at}
    async with http.post(f"{paused.url}{DEPLOYMENT}/abort") as resp:
        assert resp.status == 200, await resp.text()
    async with http.post(f"{paused.url}{DEPLOYMENT}/retry") as resp:
        assert resp.status == 200, await resp.text()
    await paused.rollouts.wait_for(lambda r: r["chat"].step_pause and r["chat"].step == 1, timeout=10)
    status, body = await _approve(http, paused.url, stale)  # the aborted attempt's approval
    assert status == 409 and "in another rollout attempt" in body["error"]["message"], body
    status, body = await _approve(http, paused.url, {**_step1(paused), "canary": "other"})  # another canary's
    assert status == 409 and "the deployment now canaries release 'same'" in body["error"]["message"], body
    route = paused.rollouts.route("chat")
    assert (route.step, route.weight, route.paused, route.step_pause) == (1, 0.0, True, True), route.reason
    # An operator's pause over the pause step holds it: an approval no longer ends it, `resume` does.
    async with http.post(f"{paused.url}{DEPLOYMENT}/pause", json={"reason": "hold"}) as resp:
        assert resp.status == 200, await resp.text()
    status, body = await _approve(http, paused.url, _step1(paused))
    assert status == 409 and "no pause waits there" in body["error"]["message"], body
    assert paused.rollouts.route("chat").step == 1


async def test_the_clis_approval_of_what_an_operator_saw_is_refused_in_a_retried_attempt(paused: Any) -> None:
    # Before (probe p17): `rollout approve D --step 1 --canary R` sent no attempt, so run after an abort and a retry
    # it ended the new attempt's pause (nobody had approved it) and put the canary at 100%.
    s = paused.ctx.settings
    admin_key = bootstrap(s.home).admin_key
    base = ["--home", s.home, "--nats", s.nats_url, "--prefix", s.prefix, "rollout", "--router", paused.url,
            "--api-key", admin_key]

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, [*base, *args])

    shown = await asyncio.to_thread(run, "get", "chat")  # what the operator reads: the attempt is on it
    seen = paused.rollouts.route("chat")
    assert shown.exit_code == 0 and repr(seen.started_at) in shown.output, shown.output
    for action in ("abort", "retry"):  # meanwhile, another operator
        assert (await asyncio.to_thread(run, action, "chat")).exit_code == 0
    await paused.rollouts.wait_for(lambda r: r["chat"].step_pause and r["chat"].started_at != seen.started_at,
                                   timeout=10)
    retried = paused.rollouts.route("chat")
    assert (retried.step, retried.weight, retried.paused) == (1, 0.0, True), retried.reason

    # Part of what was seen is refused before anything is sent: the rest read now would be the new attempt's.
    for partial in (["--step", "1", "--canary", "same"], ["--step", "1"], ["--started-at", repr(seen.started_at)]):
        result = await asyncio.to_thread(run, "approve", "chat", *partial)
        assert result.exit_code == 2, (partial, result.output)
        assert "--step, --canary and --started-at name the pause you saw" in result.output, result.output
    assert paused.rollouts.route("chat") == retried
    result = await asyncio.to_thread(run, "approve", "chat", "--step", "1", "--canary", "same", "--started-at",
                                     repr(seen.started_at))
    assert result.exit_code == 4, result.output
    assert "router refused (409)" in result.output and "in another rollout attempt" in result.output, result.output
    assert paused.rollouts.route("chat") == retried
    # The retried attempt's own pause, as the route shows it now, is approved.
    result = await asyncio.to_thread(run, "approve", "chat", "--step", "1", "--canary", "same", "--started-at",
                                     repr(retried.started_at))
    assert result.exit_code == 0 and result.output.startswith("approved step 1 of chat"), result.output
    assert paused.rollouts.route("chat").step == 2
