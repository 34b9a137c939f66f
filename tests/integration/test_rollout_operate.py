"""Operating a rollout through the admin API and the CLI on the real nats-server, chDB and the simulator:
`watch` follows a rollout live until it completes, `retry` restarts an aborted one, a PATCH changes one
field and nothing else (the issue's attack: a re-PUT without canary_upstream silently repointed the
canary), and every analysis measurement is a signed, stored record that `rollout analysis` checks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from typing import Any

import aiohttp
import msgspec
import pytest
from click.testing import CliRunner

from lockgate.cli.main import cli
from lockgate.codec import Codec
from lockgate.contracts import AuditEntry, GateDecided, RolloutState
from lockgate.server.apikeys import Bootstrap, KeyStore
from lockgate.services.router.domain import Route
from lockgate.signing import Signer
from lockgate.subjects import token
from tests.helpers import judged, store_decision
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import ERRORS, _pass, _start, _traffic_until

router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)
_states: Codec[RolloutState] = Codec(RolloutState)
_audit: Codec[AuditEntry] = Codec(AuditEntry)


def _base(router: Any) -> list[str]:
    s = router.ctx.settings
    return ["--home", s.home, "--nats", s.nats_url, "--prefix", s.prefix, "--database", s.database,
            "rollout", "--router", router.url]


async def _cli(router: Any, *args: str, key: str | None = None) -> Any:
    env = {"LOCKGATE_CLICKHOUSE_URL": router.ctx.settings.clickhouse_url}
    extra = ["--api-key", key] if key else []
    base = _base(router)
    return await asyncio.to_thread(CliRunner().invoke, cli, [*base[:-2], *base[-2:], *extra, *args], env=env)


async def _next_state(sub: Any) -> RolloutState:
    return _states.decode((await sub.next_msg(timeout=10)).data)


async def _unsubscribe(*subs: Any) -> None:
    """Messages left unread in a subscription hold the bus's drain at teardown for its whole timeout (30 s)."""
    for sub in subs:
        await sub.unsubscribe()


async def test_watch_follows_a_rollout_through_every_step_until_it_completes(router: Any, http: aiohttp.ClientSession,
                                                                             signer: Signer, keys: Bootstrap) -> None:
    await _start(http, router, "same", {"steps": [20, 50, 100], "interval_s": 0.3})
    # The CLI in its own process, as an operator runs it: one JSON line per change, pushed by the router.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lockgate.cli", *_base(router), "--api-key", keys.admin_key, "watch", "chat", "--json",
        "--timeout", "60", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LOCKGATE_CLICKHOUSE_URL": router.ctx.settings.clickhouse_url})
    assert proc.stdout is not None
    first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
    assert (first["phase"], first["weight"], first["canary"]) == ("idle", 0.0, "same")  # waiting for its decision
    await _pass(router, signer, "same")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    views = [first, *(json.loads(line) for line in out.decode().splitlines())]
    progressing = [(v["step"], v["weight"]) for v in views if v["phase"] == "progressing"]
    assert progressing == [(1, 20.0), (2, 50.0), (3, 100.0)]
    assert views[-1]["phase"] == "promoted" and views[-1]["stable"] == "same"
    assert all(v["decision_id"] for v in views[1:])  # the decision that admitted it, shown with every change


async def test_watch_stops_with_its_own_exit_code_on_abort_and_after_its_timeout(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    await _start(http, router, "same", {"steps": [50, 100], "interval_s": 3600})
    timed_out = await _cli(router, "watch", "chat", "--timeout", "0.5")
    assert timed_out.exit_code == 5 and "still idle after 0.5 s" in timed_out.output
    # Its progress lines' time says it is UTC.
    assert re.match(r"\d\d:\d\d:\d\dZ idle ", timed_out.output), timed_out.output
    # A paused rollout waits for a person, not for time: said so, with why (probe p22 F4: "still progressing").
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/pause") as resp:
        assert resp.status == 200
    paused = await _cli(router, "watch", "chat", "--timeout", "0.5")
    assert paused.exit_code == 5 and "chat is paused, waiting for a person (`lockgate rollout resume chat`" in \
        paused.output, paused.output
    async with http.post(f"{router.url}/lockgate/v1/deployments/chat/abort") as resp:
        assert resp.status == 200
    aborted = await _cli(router, "watch", "chat")
    assert aborted.exit_code == 6 and "aborted same: by operator" in aborted.output


async def test_watch_ends_with_exit_6_when_another_rollout_replaces_the_one_it_follows(
        router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    # Probe p20 F10: a pipeline's `watch` of its canary exited 0 when another canary of the deployment, started by
    # someone else, was promoted: the exit code said "some rollout finished", not "mine did".
    await _start(http, router, "same", {"steps": [50, 100], "interval_s": 3600})
    elsewhere = await _cli(router, "watch", "chat", "--release", "other", "--timeout", "5")
    assert elsewhere.exit_code == 6 and "chat is rolling out same, not other" in elsewhere.output, elsewhere.output
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lockgate.cli", *_base(router), "--api-key", keys.admin_key, "watch", "chat", "--json",
        "--release", "same", "--timeout", "60", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LOCKGATE_CLICKHOUSE_URL": router.ctx.settings.clickhouse_url})
    assert proc.stdout is not None
    assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))["canary"] == "same"  # the watch is open
    await _start(http, router, "bad", {"steps": [100], "interval_s": 0.2})
    await _pass(router, signer, "bad")
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 6, err.decode()
    assert "rollout of same on chat was replaced by one of bad" in err.decode()


async def test_start_of_a_canary_the_gate_refuses_exits_6(router: Any, http: aiohttp.ClientSession,
                                                           signer: Signer) -> None:
    # Probe p20 F4: the router takes a BLOCKed canary and aborts it at once (200, phase aborted); `rollout start`
    # exited 0, which a pipeline reads as "canary started".
    await store_decision(router.ctx.bus, signer.sign(GateDecided(release="same", rules=[], decision="BLOCK",
                                                                reason="toxicity")))
    started = await _cli(router, "start", "chat", "--stable", "r1", "--canary", "same", "--json")
    assert started.exit_code == 6, started.output
    assert json.loads(started.stdout) == {
        "error": "rollout of same on chat aborted at once: aborted same: gate BLOCK: toxicity", "exit_code": 6}


async def test_start_of_a_canary_no_folder_declares_says_which_steps_run_and_sends_the_options_given(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # Probe p23 F4: `rollout start` sent no strategy and said nothing of the steps the canary would run. Of a deployment
    # no applied folder declares, the router's configured steps run, said so; --steps and --interval-s are sent.
    started = await _cli(router, "start", "chat", "--stable", "r1", "--canary", "same")
    assert started.exit_code == 0, started.output
    assert ("chat: no applied folder declares it, so the router's configured steps and interval run the canary"
            in " ".join(started.output.split())), started.output
    assert router.rollouts.route("chat").strategy is None
    chosen = await _cli(router, "start", "chat", "--stable", "r1", "--canary", "same", "--steps", "20,100",
                        "--interval-s", "3600", "--json")
    assert chosen.exit_code == 0, chosen.output
    route = json.loads(chosen.stdout)
    assert (route["strategy"]["steps"], route["strategy"]["interval_s"]) == ([20.0, 100.0], 3600.0), route
    assert "chat: steps 20, 100 every 3600 s, by --steps, --interval-s (no applied folder declares it)" in " ".join(
        chosen.stderr.split()), chosen.stderr
    first = await _cli(router, "start", "chat", "--stable", "r1", "--steps", "20,100")  # a first release has no steps
    assert first.exit_code == 2 and "--steps is a canary's" in first.output, first.output
    # Whether a folder declares the deployment unknown (NATS away): nothing starts, since the router's steps might run
    # where a folder declares others.
    base = _base(router)
    base[base.index("--nats") + 1] = "nats://127.0.0.1:1"
    unread = await asyncio.to_thread(CliRunner().invoke, cli, [*base, "start", "chat", "--stable", "r1", "--canary",
                                                                "bad"])
    assert unread.exit_code == 1 and ("nothing started: cannot read whether an applied folder declares the rollout of "
                                      "chat") in " ".join(unread.output.split()), unread.output
    assert router.rollouts.route("chat").canary.release == "same"


async def test_watch_whose_key_is_revoked_ends_saying_so(router: Any, http: aiohttp.ClientSession) -> None:
    # The router ends a watch once its key is revoked; the CLI took that end for a timeout (exit 5, "still idle
    # after 60 s"). It asks again and shows the refusal.
    await _start(http, router, "same", {"steps": [50, 100], "interval_s": 3600})
    viewer, rec = KeyStore(router.ctx.settings.home).create("default", "ops", "viewer", "dashboard")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lockgate.cli", *_base(router), "--api-key", viewer, "watch", "chat", "--json",
        "--timeout", "60", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LOCKGATE_CLICKHOUSE_URL": router.ctx.settings.clickhouse_url})
    assert proc.stdout is not None
    assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))["phase"] == "idle"  # the watch is open
    KeyStore(router.ctx.settings.home).revoke(rec.id)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 4, err.decode()
    assert "router refused (401)" in err.decode() and "revoked" in err.decode()


async def test_retry_restarts_an_aborted_rollout_from_step_zero_and_is_refused_otherwise(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    await _start(http, router, "same", {"steps": [10, 50, 100], "interval_s": 3600})
    await _pass(router, signer, "same")
    # The gatekeeper keeps each release's current decision in KV: what a retry is admitted by.
    kv = await router.ctx.bus.kv(router.ctx.bus.subjects.kv_gates)
    await kv.put(token("same"), msgspec.json.encode(signer.sign(GateDecided(
        release="same", rules=[], decision="PASS", artifacts=await judged(router.ctx.bus, "same")))))
    operator, rec = KeyStore(router.ctx.settings.home).create("default", "ops", "operator", "on call")
    refused = await _cli(router, "retry", "chat", key=operator)
    assert refused.exit_code == 4 and "is progressing, not aborted; only an aborted rollout can be retried" in \
        refused.output
    assert (await _cli(router, "set-weight", "chat", "50", key=operator)).exit_code == 0
    assert (await _cli(router, "abort", "chat", key=operator)).exit_code == 0

    bus = router.ctx.bus
    await router.rollouts.flush()
    sub = await bus.nc.subscribe(bus.subjects.rollout("chat"))
    audit = await bus.nc.subscribe(bus.subjects.audit("router"))
    retried = await _cli(router, "retry", "chat", "--json", key=operator)
    assert retried.exit_code == 0, retried.output
    route = router.rollouts.route("chat")
    # Same spec, same canary release, from its first step: the canary's stored decision started it at once.
    assert (route.phase, route.weight, route.step, route.canary.release, route.stable.release) == (
        "progressing", 10.0, 1, "same", "r1")
    assert route.strategy is not None and route.strategy.weights() == [10, 50, 100]
    restarted = await _next_state(sub)
    assert restarted.actor == rec.label and f"retry of same by {rec.label}" in restarted.reason
    entry = _audit.decode((await audit.next_msg(timeout=10)).data)
    await _unsubscribe(sub, audit)
    assert (entry.action, entry.actor, entry.target) == ("retry", rec.label, "chat")


async def _patchable(router: Any, http: aiohttp.ClientSession, signer: Signer) -> tuple[Route, str, Any, Any]:
    """A live canary at its first step (with an analysis), an operator's key and its record, and a subscription
    to the rollout's announcements from now on."""
    await _start(http, router, "same", {"steps": [10, 50, 100], "interval_s": 3600, "analysis": ERRORS})
    await _pass(router, signer, "same")
    before = router.rollouts.route("chat")
    assert before.canary is not None and before.canary.endpoint == "canary"
    operator, rec = KeyStore(router.ctx.settings.home).create("default", "ops", "operator", "on call")
    bus = router.ctx.bus
    await router.rollouts.flush()  # the decision's change announced before we listen
    return before, operator, rec, await bus.nc.subscribe(bus.subjects.rollout("chat"))


async def test_patch_weight_keeps_canary_release_upstream_and_rollout_position(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    before, operator, rec, sub = await _patchable(router, http, signer)
    bus = router.ctx.bus
    audit = await bus.nc.subscribe(bus.subjects.audit("router"))
    url = f"{router.url}/lockgate/v1/deployments/chat"
    merge = {"Authorization": f"Bearer {operator}", "Content-Type": "application/merge-patch+json"}

    # The attack was a re-PUT without canary_upstream: it restarted the rollout and repointed the
    # canary to the default upstream. A PATCH of the weight alone changes the weight alone.
    async with http.patch(url, data=json.dumps({"weight": 30}), headers=merge) as resp:
        assert resp.status == 200, await resp.text()
    after = router.rollouts.route("chat")
    assert after.weight == 30.0
    assert (after.canary, after.stable, after.phase, after.step, after.cursor, after.started_at, after.strategy,
            after.admitted, after.decision_id) == (before.canary, before.stable, before.phase, before.step,
                                                   before.cursor, before.started_at, before.strategy,
                                                   before.admitted, before.decision_id)
    state = await _next_state(sub)
    assert (state.actor, state.canary_weight, state.canary_release) == (rec.label, 30.0, "same")
    assert state.reason.startswith(f"patched weight by {rec.label}")
    entry = _audit.decode((await audit.next_msg(timeout=10)).data)
    await _unsubscribe(sub, audit)
    assert (entry.action, entry.actor, entry.target, entry.details["weight"]) == ("patch", rec.label, "chat", "30.0")

    # One field of the strategy: the interval changes, the steps, the analysis and the weight stay.
    async with http.patch(url, data=json.dumps({"strategy": {"interval_s": 7200}}), headers=merge) as resp:
        assert resp.status == 200, await resp.text()
    patched = router.rollouts.route("chat")
    assert patched.strategy is not None and before.strategy is not None
    assert (patched.strategy.interval_s, patched.strategy.steps, patched.strategy.analysis) == (
        7200, before.strategy.steps, before.strategy.analysis)
    assert (patched.weight, patched.step, patched.canary) == (30.0, before.step, before.canary)

    for body, status, why in (({"stable_release": "bad"}, 409, "PUT starts a new rollout"),
                              ({"weight": 101}, 400, "invalid deployment after the patch"),
                              ({}, 400, "non-empty JSON object")):
        async with http.patch(url, data=json.dumps(body), headers=merge) as resp:
            assert resp.status == status and why in (await resp.json())["error"]["message"]
    viewer, _ = KeyStore(router.ctx.settings.home).create("acme", "ops", "viewer")
    async with http.patch(url, data=json.dumps({"weight": 0}), headers={**merge, "Authorization": f"Bearer {viewer}"}
                          ) as resp:
        assert resp.status == 403
    assert router.rollouts.route("chat").weight == 30.0

    # PUT stays the full replace: a new rollout from its first step (the stored PASS of `same` admits it at once).
    await _start(http, router, "same", {"steps": [10, 50, 100], "interval_s": 3600})
    replaced = router.rollouts.route("chat")
    assert (replaced.phase, replaced.weight, replaced.step) == ("progressing", 10.0, 1) \
        and replaced.strategy is not None and replaced.strategy.analysis is None


async def test_every_measurement_is_a_signed_stored_record_and_a_changed_one_is_flagged(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    await _start(http, router, "bad", {"steps": [50, 100], "interval_s": 0.2, "analysis": ERRORS})
    await _pass(router, signer, "bad")
    await _traffic_until(http, router, lambda r: r.phase == "aborted")
    route = router.rollouts.route("chat")
    assert route.phase == "aborted" and route.analysis is not None
    looks = route.analysis.look
    await router.rollouts.flush()
    await analysis_tests.sink_stored(router.sink.handlers, analysis_runs=looks)

    shown = await _cli(router, "analysis", "chat", "--json")
    assert shown.exit_code == 0, shown.output
    runs = msgspec.json.decode(shown.output)
    assert len(runs) == looks and all(r["verified"] for r in runs)
    last = runs[0]  # newest first: the measurement that aborted the canary
    assert (last["release"], last["baseline"], last["template"], last["phase"], last["outcome"], last["failures"]) == (
        "bad", "r1", "canary", "Failed", "aborted", 1)
    error_rate = next(m for m in last["metrics"] if m["name"] == "error_rate")
    assert error_rate["verdict"] == "FAILED" and error_rate["condition"] == "<= stable + 0.01"
    assert error_rate["canary"] > error_rate["threshold"] == pytest.approx(error_rate["stable"] + 0.01)
    latency = next(m for m in last["metrics"] if m["name"] == "latency_p95")
    assert latency["condition"] == "<= 2000 and <= stable x 3" and latency["threshold"] is not None

    table = await _cli(router, "analysis", "chat")
    assert table.exit_code == 0 and "error_rate" in table.output and "verified" in table.output
    got = await _cli(router, "get", "chat")
    assert got.exit_code == 0 and "latest analysis record" in got.output and "Failed" in got.output

    # Someone with a ClickHouse session makes the failing look read as a pass: the record no longer verifies.
    store = router.sink.ctx.store
    store.command(f"ALTER TABLE analysis_runs UPDATE phase = 'Successful' WHERE id = '{last['id']}' "
                  "SETTINGS mutations_sync = 2")
    flagged = await _cli(router, "analysis", "chat")
    assert flagged.exit_code == 4, flagged.output
    assert "UNVERIFIED" in flagged.output and f"1 of {looks} analysis records of chat do not verify" in flagged.output
    assert "does not match its signature" in flagged.output


async def test_an_odd_deployment_name_is_a_one_line_refusal_and_a_slash_is_part_of_the_name(
        router: Any, keys: Bootstrap) -> None:
    # Found by a probe: a name with a space was put in the URL as it came (a 62-line http.client traceback), and
    # one with a slash was taken for two path segments (a plain "404: Not Found").
    for args in (["start", "bad name!", "--stable", "same"], ["start", "bad name!", "--stable", "r1", "--canary", "same"],
                 ["abort", "bad name!"], ["get", "bad name!"]):
        result = await _cli(router, *args, key=keys.admin_key)
        assert result.exit_code != 0 and "invalid deployment 'bad name!'" in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    result = await _cli(router, "abort", "team/chat", key=keys.admin_key)
    assert result.exit_code != 0 and "'team/chat'" in result.output and "404: Not Found" not in result.output, \
        result.output
