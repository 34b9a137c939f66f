"""`lockgate demo`: the whole loop on simulated models, told as a short story.

Register a baseline and two candidates, evaluate all three, gate them (one is blocked, one
passes), roll the good one out through the router under simulated traffic, and leave drift
reports, costs and traces behind to query. Each act shows one thing: the gate stops the wrong
candidate before any traffic (act 3); the good one, which answers the rest as stable does, is
promoted step by step while the drift monitor compares its answers with stable's, past 50% only once it has
(act 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import yaml
from rich.console import Console

from lockgate import artifacts
from lockgate.bus import Bus
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import DriftReport, EvalRequested, GateDecided, RolloutState
from lockgate.errors import LockgateError
from lockgate.ids import content_hash, uuid7
from lockgate_dev.sim import ModelSpec, SimConfig

DEPLOYMENT = "shop-web"
APP = "shop"
BASELINE, BAD, GOOD = "shop-v1", "shop-v2-rc1", "shop-v2-rc2"
MODELS = {BASELINE: "sim-stable", BAD: "sim-bad", GOOD: "sim-good"}
POLICY, SUITE = "shop-release-policy", "shop-qa"
# The good canary's steps: at 50% it waits for the demo's approval, which follows the drift monitor's first comparison
# of its answers with stable's (no sooner: the monitor compares every `drift_window_size` canary answers, and steps
# of a fixed time promoted it uncompared whenever the machine served fewer requests in them).
GOOD_STEPS: list[Any] = [10, 25, 50, {"pause": {}}, 100]
COMPARED_STEP = 4  # the pause's step (1-based), which the approval names


def _data(name: str) -> bytes:
    return resources.files("lockgate_dev.demo_data").joinpath(name).read_bytes()


def _cases(name: str = "qa.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in _data(name).decode().splitlines() if line.strip()]


def demo_sim_config() -> SimConfig:
    """Simulated models: a correct stable one, a correct candidate that answers the rest as stable does, and a
    wrong candidate."""
    template = yaml.safe_load(_data("suite.yaml"))["prompt"]["template"]
    right = {template.format(**c["vars"]): str(c["expected"]) for c in _cases()}
    wrong = {q: ("I am not sure" if i % 2 else a) for i, (q, a) in enumerate(right.items())}
    # The right answers of the repository's example GitOps folder too (a copy of
    # tests/fixtures/gitops/datasets/qa.jsonl), so that its release passes its own gate on this stack as README's
    # GitOps section shows; added after the demo's own, which keep their answers and their order.
    example = {template.format(**c["vars"]): str(c["expected"]) for c in _cases("gitops_qa.jsonl")}
    right |= {q: a for q, a in example.items() if q not in right}
    # The demo's traffic asks what no case answers: the default reply. The good candidate's is stable's words
    # and timing, so the drift monitor finds its answers like stable's and it is promoted. (It used to be a
    # longer, "chattier" reply: harmful drift in output_tokens, which aborted the canary the demo said it promoted
    # whenever the monitor compared the two before the last step.)
    reply = ModelSpec(default="Thanks for asking, here is a short answer.", latency_ms=20, jitter_ms=5, ttft_ms=5)
    return SimConfig(
        seed=7,
        models={
            "sim-stable": msgspec.structs.replace(reply, answers=right),
            "sim-good": msgspec.structs.replace(reply, answers=right),
            "sim-bad": ModelSpec(answers=wrong, default="Sorry, something went wrong on my side.",
                                 latency_ms=60, jitter_ms=20, error_rate=0.02),
        },
    )


def _suite_doc(dataset: str) -> dict[str, Any]:
    """The demo suite, its dataset named by hash."""
    return {**yaml.safe_load(_data("suite.yaml")), "dataset": dataset}


def demo_gates() -> dict[str, Any]:
    """The dev stack's gates file: the demo app's releases must be gated by exactly the demo's policy and
    suite, so an eval under a policy of the operator's choosing cannot pass them (the hashes are those
    `_register` gets)."""
    dataset = content_hash(artifacts.canonical_bytes(_data("qa.jsonl"), "application/jsonl"))
    suite = content_hash(artifacts.canonical_bytes(_suite_doc(dataset), "application/json"))
    policy = content_hash(artifacts.canonical_bytes(_data("policy.yaml"), "application/yaml"))
    return {"apps": {APP: {"policy": f"{POLICY}={policy}", "suite": f"{SUITE}={suite}"}}}


def write_demo_gates(home: str) -> str:
    """Write `demo_gates()` as `{home}/demo-gates.yaml` (rewritten at each start: it follows the demo's data)."""
    path = Path(home) / "demo-gates.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by `lockgate dev up` (LOCKGATE_GATES_FILE names your own instead): the policy\n"
                    "# and suite that must gate each app's releases, whatever policy an eval names.\n"
                    + yaml.safe_dump(demo_gates(), sort_keys=False))
    return str(path)


async def _register(bus: Bus) -> dict[str, dict[str, str]]:
    dataset = await artifacts.register(bus, "dataset", "shop-qa", _data("qa.jsonl"), media_type="application/jsonl")
    suite_doc = _suite_doc(dataset.hash)
    suite = await artifacts.register(bus, "eval_suite", SUITE, suite_doc)
    policy = await artifacts.register(bus, "policy", POLICY, _data("policy.yaml"), media_type="application/yaml")
    prompt = await artifacts.register(bus, "prompt", "shop-answer", suite_doc["prompt"])
    out = {}
    for release, model in MODELS.items():
        config = await artifacts.register(bus, "model_config", f"shop-{model}", {"model": model, "endpoint": "default",
                                                                                     "temperature": 0})
        arts = {"dataset/shop-qa": dataset.hash, f"eval_suite/{SUITE}": suite.hash,
                f"policy/{POLICY}": policy.hash, "prompt/shop-answer": prompt.hash,
                f"model_config/shop-{model}": config.hash}
        await artifacts.register_release(bus, release, APP, arts, parent="" if release == BASELINE else BASELINE)
        out[release] = arts
    return {"releases": out, "suite": {"hash": suite.hash}, "policy": {"hash": policy.hash}}


async def _evaluate(bus: Bus, release: str, suite: str, policy: str, sim_url: str, baseline: str) -> GateDecided:
    codec: Codec[GateDecided] = Codec(GateDecided)
    sub = await bus.nc.subscribe(bus.subjects.gate_decided(release))
    try:
        await bus.publish(bus.subjects.eval_requested, EvalRequested(
            run_id=uuid7(), release=release, suite=suite, policy=policy, endpoint=sim_url,
            model=MODELS[release], baseline=baseline, concurrency=8))
        msg = await sub.next_msg(timeout=120)
        return codec.decode(msg.data)
    finally:
        await sub.unsubscribe()


async def _put_route(http: aiohttp.ClientSession, router_url: str, body: dict[str, Any],
                     admin_key: str) -> dict[str, Any]:
    async with http.put(f"{router_url}/lockgate/v1/deployments/{DEPLOYMENT}", json=body,
                        headers={"Authorization": f"Bearer {admin_key}"}) as resp:
        data = await resp.json()
        if resp.status >= 400:
            raise LockgateError(f"router refused the rollout: {data}")
        return data


async def _approve_once_compared(http: aiohttp.ClientSession, router_url: str, admin_key: str, started_at: float,
                                 paused: asyncio.Event, compared: asyncio.Event, say: Callable[[str], None]) -> None:
    """End the good canary's pause (of the rollout attempt that started at `started_at`) once the drift monitor
    compared it with stable; runs until then (a harmful drift aborts the canary meanwhile, and the demo stops waiting
    for it)."""
    await paused.wait()
    await compared.wait()
    async with http.post(f"{router_url}/lockgate/v1/deployments/{DEPLOYMENT}/approve",
                         json={"step": COMPARED_STEP, "canary": GOOD, "started_at": started_at,
                               "reason": "the drift monitor compared its answers with stable's"},
                         headers={"Authorization": f"Bearer {admin_key}"}) as resp:
        if resp.status >= 400:  # e.g. the router aborted it for drift meanwhile: its state says so
            say(f"   the router refused the approval: {await resp.text()}")


async def _traffic(http: aiohttp.ClientSession, router_url: str, done: asyncio.Event, minimum: int,
                   traces: list[str]) -> int:
    sent = 0

    async def one(i: int) -> None:
        trace_id = os.urandom(16).hex()
        headers = {"x-lockgate-deployment": DEPLOYMENT, "x-lockgate-user": f"user-{i % 97}",
                   "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"}
        body = {"model": MODELS[BASELINE], "messages": [{"role": "user", "content": f"Do you ship item {i % 13}?"}]}
        async with http.post(f"{router_url}/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.read()
        if len(traces) < 5:
            traces.append(trace_id)

    while not done.is_set() or sent < minimum:
        await asyncio.gather(*(one(sent + k) for k in range(16)), return_exceptions=True)
        sent += 16
    return sent


def _verdicts(decision: GateDecided) -> str:
    return ", ".join(f"{r.rule}={r.verdict}" + (f" ({r.observed:.3g} {r.op} {r.threshold:g})"
                                                 if r.observed is not None else "") for r in decision.rules)


async def run_demo(bus: Bus, *, router_url: str, sim_url: str, console: Console, admin_key: str, app_key: str,
                   home: str, traffic: int = 1200) -> dict[str, Any]:
    """Drive the loop through a running stack and print what happened (admin key for routes, app key for traffic;
    `home` is the stack's, which the commands it ends with name)."""
    say = console.print
    say("\n[bold]1. Register[/bold] dataset, prompt, eval suite, policy and model configs (content-addressed)")
    reg = await _register(bus)
    for release, arts in reg["releases"].items():
        say(f"   release [cyan]{release}[/cyan] = {len(arts)} artifact versions, model {MODELS[release]}")

    say("\n[bold]2. Evaluate and gate[/bold] each release on the shop-qa suite (20 cases)")
    decisions: dict[str, GateDecided] = {}
    for release in (BASELINE, BAD, GOOD):
        d = await _evaluate(bus, release, reg["suite"]["hash"], reg["policy"]["hash"], sim_url,
                            "" if release == BASELINE else BASELINE)
        decisions[release] = d
        colour = "green" if d.decision == "PASS" else "red"
        say(f"   {release:<12} [{colour}]{d.decision}[/{colour}]  {_verdicts(d)}")

    # Each canary's rollout states, printed as they come: its act ends when it is promoted or aborted.
    rollouts: list[RolloutState] = []
    settled = {BAD: asyncio.Event(), GOOD: asyncio.Event()}
    rollout_codec: Codec[RolloutState] = Codec(RolloutState)
    drift_codec: Codec[DriftReport] = Codec(DriftReport)
    compared: list[DriftReport] = []  # the drift monitor's reports of the good canary against stable
    paused, compared_once = asyncio.Event(), asyncio.Event()

    async def on_rollout(msg: Any) -> None:
        state = rollout_codec.decode(msg.data)
        if state.canary_release not in settled:
            return
        rollouts.append(state)
        reason = state.reason.split("; evaluator warning")[0]  # the full text is in `lockgate gate explain`
        say(f"   {state.phase:<12} canary={state.canary_release:<12} weight={state.canary_weight:>5.1f}%  {reason}")
        if state.phase in ("promoted", "aborted"):
            settled[state.canary_release].set()
        elif state.canary_release == GOOD and state.step == COMPARED_STEP:
            paused.set()

    async def on_drift(msg: Any) -> None:
        report = drift_codec.decode(msg.data)
        if report.comparison == "canary_vs_stable" and report.release == GOOD and report.served:
            compared.append(report)
            compared_once.set()

    subs = [await bus.nc.subscribe(bus.subjects.rollout(DEPLOYMENT), cb=on_rollout),
            await bus.nc.subscribe(bus.subjects.drift(DEPLOYMENT), cb=on_drift)]
    traces: list[str] = []
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {app_key}"}) as http:
            say(f"\n[bold]3. Canary {BAD}[/bold] through the router: the gate blocked it, so it gets 0% at once")
            await _put_route(http, router_url, {"stable_release": BASELINE, "canary_release": BAD}, admin_key)
            await _settled(settled[BAD], BAD)
            say(f"\n[bold]4. Canary {GOOD}[/bold] under simulated traffic: the gate passed it, so the router moves it "
                "up step by step, while the drift monitor compares its answers with stable's (harmful drift would "
                "abort it); it goes past 50% once the monitor has compared them")
            route = await _put_route(http, router_url, {"stable_release": BASELINE, "canary_release": GOOD,
                                                        "strategy": {"steps": GOOD_STEPS}}, admin_key)
            approval = asyncio.create_task(_approve_once_compared(http, router_url, admin_key, route["started_at"],
                                                                  paused, compared_once, say))
            try:
                sent = await asyncio.wait_for(_traffic(http, router_url, settled[GOOD], traffic, traces), 300)
            finally:
                approval.cancel()
    finally:
        for sub in subs:
            await sub.unsubscribe()
    final = [s for s in rollouts if s.canary_release == GOOD][-1]
    say(f"   the drift monitor compared {GOOD}'s answers with {BASELINE}'s {len(compared)} times while it had "
        "traffic (every `drift_window_size` canary answers)")
    say(f"   sent {sent} requests through the router ({router_url}); {DEPLOYMENT} now serves "
        f"[cyan]{final.stable_release}[/cyan]")

    say("\n[bold]5. Look deeper[/bold]")
    say(f"   {cli_note()}", markup=False, highlight=False, soft_wrap=True)
    for cmd in look_deeper(home, traces):
        say(f"   $ {cmd}", markup=False, highlight=False, soft_wrap=True)  # as typed: never wrapped or restyled
    return {"decisions": {r: d.decision for r, d in decisions.items()}, "requests": sent, "traces": traces,
            "rollouts": [(s.phase, s.canary_weight) for s in rollouts],
            "final": {"phase": final.phase, "stable": final.stable_release, "canary": final.canary_release},
            "drift_reports": len(compared)}


def look_deeper(home: str, traces: list[str]) -> list[str]:
    """The commands the demo ends with, pasted as shown reaching the stack of `home`: with `--home` unless it is the
    default one (./.lockgate here). Before, they never named it: with `dev up --home DIR` (when the default ports
    are taken) they answered from the stack of ./.lockgate, or found no credentials."""
    path = Path(home).resolve()
    lockgate = "lockgate" if path == Path(Settings().home).resolve() else f"lockgate --home {shlex.quote(str(path))}"
    return [f"{lockgate} {args}" for args in (
        f"gate explain {BAD}", "decisions", f"lineage {GOOD}", f"traces --release {GOOD}",
        f"traces {traces[0]}" if traces else "traces", f"drift --deployment {DEPLOYMENT}",
        "cost --by app,deployment,model", "dlq")]


def cli_note() -> str:
    """How to run `lockgate` with the venv not active: the script beside the interpreter running this, shown from
    here (`.venv/bin/lockgate` in the checkout `make run` ran in)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "activate").exists():  # not a venv: its `lockgate` is on the PATH as installed
        return "run them where `lockgate` is on the PATH:"
    with contextlib.suppress(ValueError):
        bin_dir = bin_dir.relative_to(Path.cwd())
    return (f"run them with the venv active (`source {shlex.quote(str(bin_dir / 'activate'))}`), or as "
            f"{shlex.quote(str(bin_dir / 'lockgate'))} ...:")


async def _settled(done: asyncio.Event, release: str) -> None:
    """Wait until the router promoted or aborted `release` (LockgateError after 60 s: the stack is not deciding)."""
    try:
        await asyncio.wait_for(done.wait(), 60)
    except TimeoutError:
        raise LockgateError(f"the router neither promoted nor aborted canary {release} within 60 s: "
                            f"see `lockgate rollout get {DEPLOYMENT}`") from None
