"""The CLI as a user runs it: `lockgate up` in one process, queries and the demo from others."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Process, printed_endpoints

pytestmark = pytest.mark.timeout(300)

LOCKGATE = [sys.executable, "-m", "lockgate.cli.__main__"]


def run(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*LOCKGATE, *args], capture_output=True, text=True, env=env, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"lockgate {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`lockgate dev up` with every server on port 0; yields the environment that points the CLI at the
    endpoints it printed."""
    home = tmp_path_factory.mktemp("home")
    # Steps of 1 s and windows of 100: the demo's canary waits at 50% for the drift monitor's first comparison with
    # stable (every 100 canary answers), a few hundred requests, however fast the machine serves them.
    env = {**os.environ, "LOCKGATE_ROLLOUT_STEP_INTERVAL_S": "1", "LOCKGATE_DRIFT_REFERENCE_SIZE": "100",
           "LOCKGATE_DRIFT_WINDOW_SIZE": "100", "COLUMNS": "200"}
    # "Ctrl-C stops ..." follows the list of endpoints, so all of them have been printed by then.
    up = Process([*LOCKGATE, "dev", "up", "--home", str(home), "--nats-port", "0", "--router-port", "0",
                  "--grpc-port", "0", "--otlp-grpc-port", "0", "--otlp-http-port", "0", "--sim-port", "0"],
                 env, "Ctrl-C stops the stack")
    assert up.started(120), up.output
    endpoints = printed_endpoints(up.output)
    assert f"{home}/credentials/router-admin.key" in up.output  # where the first admin key is, never the key
    # What to send, as a shell runs it (test_the_key_files_are_sent_as_the_banner_says follows it).
    assert f"Authorization: Bearer $(cat {home}/credentials/router-app.key)" in up.output, up.output
    # The demo app's policy and suite are fixed by the stack's gates file, not by whoever requests an eval.
    assert f"{home}/demo-gates.yaml" in up.output and "shop-release-policy=sha256:" in (home / "demo-gates.yaml").read_text()
    assert all(not endpoints[n].removesuffix("/v1").endswith(":0") for n in ("nats", "router", "grpc", "simulator")), \
        up.output  # the ports the servers bound, not the 0 they were asked for
    env["LOCKGATE_NATS_URL"] = endpoints["nats"]
    env["E2E_ROUTER"] = endpoints["router"]
    env["E2E_SIM"] = endpoints["simulator"]
    env["E2E_OTLP_GRPC"] = endpoints["otlp-grpc"]
    env["E2E_HOME"] = str(home)
    env["LOCKGATE_HOME"] = str(home)  # the CLI finds the NATS credentials, API keys and trust file `dev up` made there
    # The tests' operator signs what they register as `op`: the tests below add people (vic, ann, boss) to this home,
    # and with several there and none chosen, what `release create` and `artifact register` bind is refused.
    run("identity", "create", "op", env=env)
    run("gate", "trust", "--person", "op", "--role", "operator", str(home / "identities" / "op.pub"), env=env)
    env["LOCKGATE_IDENTITY"] = "op"
    yield env
    # Ctrl-C as a terminal sends it, to the whole foreground group. Before, nats-server (in the stack's group) got it
    # too and exited before the services had flushed: restarted, the drift state not saved, a traceback.
    os.killpg(up.proc.pid, signal.SIGINT)
    assert up.proc.wait(60) == 0, up.output
    assert "stopped cleanly" in up.output and "Traceback" not in up.output, up.output
    assert "restarting it" not in up.output, up.output
    assert not [line for line in up.lines if "stopping" in line and "failed" in line], up.output


def test_demo_then_query_everything(stack: dict[str, str], tmp_path: Path) -> None:
    # No --router or --sim: the stack runs on ports `dev up` picked, and the demo finds them from the home's stack.json
    # (LOCKGATE_HOME), as every other command does. Before (probe p11), it called 127.0.0.1:8080 and died half-way.
    demo = run("demo", "--traffic", "300", env=stack)
    assert f"through the router ({stack['E2E_ROUTER']})" in demo.stdout, demo.stdout
    # What the demo reached, not what its headlines say (before, the headline's "promoted" passed this test while
    # the good canary was aborted for drift, as a new user's first run showed): the route the router serves,
    # and the rollout it went through.
    route = json.loads(run("rollout", "get", "shop-web", "--json", env=stack).stdout)
    if route["phase"] == "aborted":
        # On a loaded machine the canary's latency at 100% (every request on it) can drift from stable's measured
        # before: an abort for latency_ms is that machine's doing; any other reason (output_tokens) fails the demo.
        assert "DRIFT in latency_ms" in route["reason"] and "output_tokens" not in route["reason"], route["reason"]
    else:
        assert (route["phase"], route["stable"]["release"]) == ("promoted", "shop-v2-rc2"), route["reason"]
        assert "shop-web now serves shop-v2-rc2" in demo.stdout  # and the demo says so, from the route it saw last
    rc1_aborted = ("SELECT count() AS n FROM rollout_events WHERE deployment = 'shop-web' AND canary_release = "
                   "'shop-v2-rc1' AND phase = 'aborted' AND canary_weight = 0")
    assert _sql_count(stack, rc1_aborted, 1) == 1  # the blocked candidate got no traffic
    steps = ("SELECT count() AS n FROM rollout_events WHERE deployment = 'shop-web' AND canary_release = "
             "'shop-v2-rc2' AND phase = 'progressing' AND canary_weight > 0")
    assert _sql_count(stack, steps, 4) >= 4  # 10, 25, 50, 100%
    # ...while the drift monitor compared its answers with stable's (the demo saw its report before it approved the
    # pause at 50%: fixed-time steps promoted it uncompared when a loaded machine served too few requests in them), and
    # found them alike.
    assert re.search(r"compared shop-v2-rc2's answers with shop-v1's [1-9]\d* times", demo.stdout), demo.stdout
    compared = ("SELECT count() AS n FROM drift_reports WHERE deployment = 'shop-web' AND comparison = "
                "'canary_vs_stable' AND release = 'shop-v2-rc2' AND feature = 'output_tokens'")
    assert _sql_count(stack, compared, 1) >= 1
    assert _sql_count(stack, compared + " AND drifted", 0) == 0

    decisions = json.loads(run("decisions", "--json", env=stack).stdout)
    assert {d["release"]: d["decision"] for d in decisions}["shop-v2-rc1"] == "BLOCK"
    table = run("decisions", env=stack).stdout
    assert "answers-correct" in table  # the failing rule is named in the terminal table

    lineage = json.loads(run("lineage", "shop-v2-rc2", "--json", env=stack).stdout)
    assert any(e["dst"].startswith("sha256:") for e in lineage["upstream"] + lineage["downstream"])

    cost = json.loads(run("cost", "--by", "app,deployment", "--json", env=stack).stdout)
    assert cost and cost[0]["cost_usd"] > 0

    recent = json.loads(run("traces", "--json", env=stack).stdout)
    assert recent
    spans = json.loads(run("traces", recent[0]["trace_id"], "--json", env=stack).stdout)
    assert spans

    count = json.loads(run("sql", "SELECT count() AS n FROM inference_events", "--json", env=stack).stdout)
    assert count[0]["n"] >= 300

    health = json.loads(run("status", "--json", env=stack).stdout)
    assert {s["role"] for s in health["streams"]} == {"inference", "events", "cost", "facts", "ledger", "telemetry",
                                                     "dlq", "audit", "provenance", "dlq_originals"}
    assert any(c["consumer"] == "lg_sink_inference" for c in health["consumers"])

    # The commands the demo ends with reach this stack pasted as shown, from another directory and with nothing in
    # the environment: its home is not ./.lockgate, so they name it. Before, they never did: `lockgate traces ID`
    # asked the stack of ./.lockgate ("no spans for trace"), or found no credentials.
    printed = [line.strip().removeprefix("$ ") for line in demo.stdout.splitlines() if line.strip().startswith("$ ")]
    assert len(printed) == 8 and all(c.startswith(f"lockgate --home {stack['E2E_HOME']} ") for c in printed), demo.stdout
    assert "source " in demo.stdout and "/bin/lockgate" in demo.stdout  # and where `lockgate` is without the venv
    pasted = {k: v for k, v in stack.items() if k not in ("LOCKGATE_HOME", "LOCKGATE_NATS_URL")}
    for command in printed:
        if command.split()[3] in ("decisions", "traces"):
            out = subprocess.run([*LOCKGATE, *shlex.split(command)[1:]], capture_output=True, text=True, env=pasted,
                                 cwd=tmp_path, timeout=60)
            assert out.returncode == 0 and out.stdout.strip(), f"{command}: {out.stderr}"


def test_cli_errors_are_one_line_with_an_exit_code(stack: dict[str, str]) -> None:
    bad = run("traces", "not-a-trace-id", env=stack, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

    missing = run("lineage", "no-such-release", env=stack, check=False)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr

    write = run("sql", "DROP TABLE inference_events", env=stack, check=False)
    assert write.returncode != 0 and "Traceback" not in write.stderr


def test_queries_without_a_running_stack_read_clickhouse_instead_of_hanging(tmp_path: Path) -> None:
    # Nothing listens at the NATS URL: the CLI says nothing about NATS and reads the home's store itself.
    home, cwd = tmp_path / "home", tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "LOCKGATE_NATS_URL": "nats://127.0.0.1:1"}
    env.pop("LOCKGATE_CLICKHOUSE_URL", None)
    made = "from lockgate.store import open_store; open_store(f'chdb://{__import__(\"sys\").argv[1]}').close()"
    subprocess.run([sys.executable, "-c", made, str(home / "clickhouse")], check=True, env=env, timeout=120)
    proc = subprocess.run([*LOCKGATE, "--home", str(home), "decisions", "--json"], capture_output=True, text=True,
                          env=env, timeout=60, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []

    # A home with no database: said in one line with an exit code, never an empty database made and read.
    nowhere = tmp_path / "nowhere"
    proc = subprocess.run([*LOCKGATE, "--home", str(nowhere), "sql", "SELECT count() FROM inference_events"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=cwd)
    assert proc.returncode == 1 and proc.stdout == "", (proc.stdout, proc.stderr)  # no stack: as every command
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert f"there is no database at {nowhere / 'clickhouse'}" in proc.stderr
    assert not nowhere.exists() and list(cwd.iterdir()) == []


def test_a_nats_urls_password_is_never_printed(tmp_path: Path) -> None:
    # Before: CI sets LOCKGATE_NATS_URL (or --nats) from a secret, and a stack that did not answer was named with its
    # password in the error a CI log keeps: `no lockgate stack answers at nats://ci:<password>@...`.
    env = {**os.environ, "LOCKGATE_HOME": str(tmp_path), "LOCKGATE_NATS_URL": "nats://ci:CIPWCANARY6@127.0.0.1:1"}
    env.pop("LOCKGATE_CLICKHOUSE_URL", None)
    printed = {}
    for args in (["status"], ["traces"], ["--nats", "tls://q6user:CLIPW/CANARY2@127.0.0.1:1", "traces"],
                 ["app-credential", "create", "--tenant", "acme", "--app", "shop"]):
        proc = subprocess.run([*LOCKGATE, *args], capture_output=True, text=True, env=env, timeout=120)
        printed[args[-1]] = proc.stdout + proc.stderr
    assert "nats://ci:[REDACTED]@127.0.0.1:1" in printed["status"]
    assert "tls://q6user:[REDACTED]@127.0.0.1:1" in printed["traces"]
    assert printed["shop"].count("nats://ci:[REDACTED]@127.0.0.1:1") == 2  # the audit note and the reload's
    assert not [out for out in printed.values() if "CANARY" in out], printed


def test_a_query_that_misses_a_running_stacks_nats_fails_rather_than_reading_an_empty_database(
        stack: dict[str, str], tmp_path: Path) -> None:
    # The stack runs from its home on a NATS port the CLI was not given (`up --nats-port 0`), queried from
    # another directory with --home: the CLI opened a new empty ./.lockgate/clickhouse there and printed 0.
    env = {**stack, "LOCKGATE_NATS_URL": "nats://127.0.0.1:1"}
    del env["LOCKGATE_HOME"]
    proc = subprocess.run([*LOCKGATE, "--home", stack["E2E_HOME"], "sql", "SELECT count() AS n FROM inference_events"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "--nats URL" in proc.stderr and f"{stack['E2E_HOME']}/clickhouse" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created where it ran
    # Given the stack's NATS URL, the same query answers from the stack.
    proc = subprocess.run([*LOCKGATE, "--home", stack["E2E_HOME"], "--nats", stack["LOCKGATE_NATS_URL"], "sql",
                           "SELECT count() AS n FROM inference_events", "--json"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["n"] >= 0, proc.stderr


def test_the_cli_finds_the_stack_running_from_its_home_on_ports_it_was_not_given(
        stack: dict[str, str], tmp_path: Path) -> None:
    # `dev up --nats-port 0 --router-port 0`: with only --home, the CLI reaches that stack (HOME/stack.json),
    # for NATS queries and for the router's admin API alike; before, it asked port 4222 and 8080 and failed.
    env = {k: v for k, v in stack.items() if k not in ("LOCKGATE_NATS_URL", "LOCKGATE_HOME", "LOCKGATE_ROUTER_URL")}
    home = Path(stack["E2E_HOME"])
    assert "nats://127.0.0.1:" in (home / "stack.json").read_text() and "key" not in (home / "stack.json").read_text()
    # Addresses only, as a script reads them (probe p23 F8: the simulator's had a note after it).
    recorded = json.loads((home / "stack.json").read_text())["endpoints"]
    assert recorded["simulator"] == stack["E2E_SIM"] and recorded["gates"] == f"{home}/demo-gates.yaml"
    proc = subprocess.run([*LOCKGATE, "--home", str(home), "status", "--json"], capture_output=True, text=True,
                          env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout), proc.stdout
    proc = subprocess.run([*LOCKGATE, "--home", str(home), "rollout", "get", "no-such-deployment", "--json"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    # The router answered: a deployment nothing was rolled out to is not found (exit 3, one line).
    assert proc.returncode == 3 and proc.stderr.startswith("error: no deployment 'no-such-deployment'"), proc.stderr

    # A file left by a stack that no longer runs (killed with -9) is ignored: the CLI says it found none.
    stale = tmp_path / "stale-home"
    stale.mkdir()
    (stale / "stack.json").write_text((home / "stack.json").read_text().replace(
        f'"pid": {json.loads((home / "stack.json").read_text())["pid"]}', '"pid": 999999999'))
    proc = subprocess.run([*LOCKGATE, "--home", str(stale), "sql", "SELECT 1"], capture_output=True, text=True,
                          env=env, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0 and "nats://127.0.0.1:4222" in proc.stderr, proc.stderr


def test_schema_command_writes_json_schema(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    run("schema", "--out", str(out), env=dict(os.environ))
    assert "InferenceEvent" in json.loads(out.read_text())["$defs"]


def test_gate_explain_verify_and_review_commands(stack: dict[str, str], tmp_path: Path) -> None:
    # the demo (module-scoped stack) already produced decisions; explain the blocked candidate
    run("demo", "--router", stack["E2E_ROUTER"], "--sim", stack["E2E_SIM"], "--traffic", "50", env=stack)
    explained = run("gate", "explain", "shop-v2-rc1", env=stack).stdout
    assert "answers-correct" in explained and "FAIL" in explained

    assert run("gate", "verify", "shop-v2-rc2", env=stack).returncode == 0
    decision = json.loads(run("gate", "explain", "shop-v2-rc2", "--json", env=stack).stdout)
    decision["decision"] = "BLOCK" if decision["decision"] != "BLOCK" else "PASS"  # tamper with it
    (tmp_path / "d.json").write_text(json.dumps(decision))
    (tmp_path / "k.pem").write_text(run("gate", "keys", env=stack).stdout)
    tampered = run("gate", "verify", "--file", str(tmp_path / "d.json"), "--key", str(tmp_path / "k.pem"),
                   env=stack, check=False)
    assert tampered.returncode == 4 and "signature invalid" in tampered.stderr

    refused = run("gate", "approve", "shop-v2-rc1", "--reason", "ship it", env=stack, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr


def test_roles_bound_what_the_cli_may_do(stack: dict[str, str], tmp_path: Path) -> None:
    # `up` says where the credentials are; they are private to the user who started it
    creds = Path(stack["LOCKGATE_HOME"]) / "credentials"
    assert (creds.stat().st_mode & 0o777) == 0o700
    assert all((f.stat().st_mode & 0o777) == 0o600 for f in creds.iterdir())

    # a viewer may query but not review: refused before anything is sent (the permission table), no decision follows
    run("demo", "--router", stack["E2E_ROUTER"], "--sim", stack["E2E_SIM"], "--traffic", "20", env=stack)
    before = json.loads(run("decisions", "--release", "shop-v2-rc1", "--json", env=stack).stdout)
    run("identity", "create", "vic", env=stack)  # a person signs the review; the role still bounds the publish
    refused = run("--role", "viewer", "--as", "vic", "gate", "reject", "shop-v2-rc1", "--reason", "x",
                  "--timeout", "5", env=stack, check=False)
    assert refused.returncode == 5, refused.stderr
    assert "role 'viewer' may not run `lockgate gate reject`: use --role approver or admin" in refused.stderr
    assert "Traceback" not in refused.stderr
    after = json.loads(run("--role", "viewer", "decisions", "--release", "shop-v2-rc1", "--json", env=stack).stdout)
    assert len(after) == len(before)

    # without the home's credentials the stack refuses the CLI, and says where it looked
    stranger = {**stack, "LOCKGATE_HOME": str(tmp_path)}
    out = run("decisions", "--json", env=stranger, check=False)
    assert out.returncode == 5 and "refused role 'viewer'" in out.stderr, out.stderr


def test_a_role_that_may_not_change_rollouts_is_refused_before_the_router_is_asked(stack: dict[str, str]) -> None:
    # Before: `--role viewer rollout set-weight/abort/retry ...` went with the admin key of HOME/credentials and
    # changed the route (as admin), where README says a --role is refused what it may not do before anything is sent.
    run("demo", "--router", stack["E2E_ROUTER"], "--sim", stack["E2E_SIM"], "--traffic", "20", env=stack)  # shop-v1 PASS

    def refused(role: str, *args: str) -> None:
        out = run("--role", role, "rollout", *args, env=stack, check=False)
        assert (out.returncode, out.stderr) == (5, f"error: role {role!r} may not run `lockgate rollout {args[0]}`: "
                                                   "use --role operator or admin\n"), out.stderr

    for role in ("viewer", "approver"):
        refused(role, "start", "roles-web", "--stable", "shop-v1")
    assert run("rollout", "get", "roles-web", env=stack, check=False).returncode == 3  # nothing was started
    run("--role", "operator", "rollout", "start", "roles-web", "--stable", "shop-v1", env=stack)
    before = json.loads(run("rollout", "get", "roles-web", "--json", env=stack).stdout)
    for args in (["pause", "roles-web"], ["resume", "roles-web"], ["approve", "roles-web"], ["abort", "roles-web"],
                 ["promote", "roles-web"], ["retry", "roles-web"], ["undo", "roles-web"],
                 ["set-weight", "roles-web", "20"], ["patch", "roles-web", "--weight", "5"]):
        refused("viewer", *args)
    refused("approver", "abort", "roles-web")
    assert json.loads(run("rollout", "get", "roles-web", "--json", env=stack).stdout) == before
    # Reading a rollout stays every role's.
    for args in (["get", "roles-web"], ["history", "roles-web"], ["analysis", "roles-web"],
                 ["watch", "roles-web", "--timeout", "30"]):
        run("--role", "viewer", "rollout", *args, env=stack)
    run("--role", "approver", "rollout", "get", "roles-web", env=stack)


def _gated_release(stack: dict[str, str], tmp_path: Path, release: str, model: str, tenant: str) -> None:
    """Register `release` (tenant `tenant`, app shop, served by the simulator's `model`) and gate it as the stack's
    gates file pins the app (the demo's policy and suite): a PASS, or AssertionError."""
    demo = Path(__file__).parents[2] / "dev" / "lockgate_dev" / "demo_data"
    for name in ("suite.yaml", "qa.jsonl", "policy.yaml"):
        (tmp_path / name).write_bytes((demo / name).read_bytes())
    config = tmp_path / f"{release}.json"
    config.write_text(json.dumps({"model": model, "endpoint": "default"}))
    [art] = json.loads(run("artifact", "register", "model_config", str(config), "--json", env=stack).stdout)
    run("release", "create", release, "--app", "shop", "--tenant", tenant, "--artifact",
        f"model_config/{release}={art['hash']}", env=stack)
    gated = run("eval", "run", str(tmp_path / "suite.yaml"), "--candidate", release, "--policy",
                str(tmp_path / "policy.yaml"), "--json", env=stack)
    assert json.loads(gated.stdout)["decision"]["decision"] == "PASS", gated.stdout


def test_keys_cli_and_router_authentication(stack: dict[str, str], tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    router = stack["E2E_ROUTER"]

    def call(method: str, path: str, key: str | None, body: bytes | None = None, **headers: str) -> int:
        req = urllib.request.Request(router + path, data=body, method=method,
                                     headers={"Content-Type": "application/json", **headers,
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    chat = json.dumps({"model": "sim-stable", "messages": [{"role": "user", "content": "hi"}]}).encode()
    # Before: an unauthenticated promote returned 200 and any client could call the router.
    assert call("POST", "/lockgate/v1/deployments/shop-web/promote", None) == 401
    assert call("POST", "/v1/chat/completions", None, chat) == 401

    created = run("keys", "create", "--tenant", "acme", "--app", "shop", env=stack).stdout
    key = created.strip().splitlines()[-1]
    assert key.startswith("lg-")
    # Accepted (not 401) and answered: `keys-web` serves its first release, gated (the dev stack governs: a
    # deployment no release was rolled out to answers 404, as the default one still does). The release is the
    # key's tenant's: an app key is served only deployments of its own tenant's releases.
    _gated_release(stack, tmp_path, "keys-r1", "sim-stable", "acme")
    run("rollout", "--router", router, "start", "keys-web", "--stable", "keys-r1", "--json", env=stack)
    assert call("POST", "/v1/chat/completions", key, chat, **{"x-lockgate-deployment": "keys-web"}) == 200
    assert call("POST", "/v1/chat/completions", key, chat) == 404
    assert call("POST", "/lockgate/v1/deployments/shop-web/promote", key) == 403  # an app key is no operator
    listed = json.loads(run("keys", "list", "--json", env=stack).stdout)
    mine = next(k for k in listed if k["tenant"] == "acme")
    assert key not in json.dumps(listed)  # only hashes are kept
    assert "apikeys.json" not in key and (Path(stack["E2E_HOME"]) / "apikeys.json").stat().st_mode & 0o777 == 0o600
    run("keys", "revoke", mine["id"], env=stack)
    assert call("POST", "/v1/chat/completions", key, chat, **{"x-lockgate-deployment": "keys-web"}) == 401


def test_the_key_files_are_sent_as_the_banner_says(stack: dict[str, str]) -> None:
    # Found by a probe: the banner said to send the app key file as `Authorization: Bearer <key>`, but the file held
    # `<id> <key>`, so `Bearer $(cat router-app.key)` (and `LOCKGATE_API_KEY=$(cat router-admin.key)`) got 401.
    import urllib.error
    import urllib.request

    creds = Path(stack["E2E_HOME"]) / "credentials"

    def status(path: str, file: Path) -> int:
        value = subprocess.run(["bash", "-c", f'printf %s "$(cat {file})"'], capture_output=True, text=True,
                               check=True).stdout  # `$(cat FILE)` as the user's shell expands it
        req = urllib.request.Request(stack["E2E_ROUTER"] + path, headers={"Authorization": f"Bearer {value}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status("/v1/models", creds / "router-app.key") == 200
    assert status("/lockgate/v1/deployments", creds / "router-admin.key") == 200


def test_keys_scoped_to_deployments_through_the_cli_and_the_router(stack: dict[str, str]) -> None:
    import urllib.error
    import urllib.request

    def chat(key: str, deployment: str) -> tuple[int, dict]:
        body = json.dumps({"model": "sim-stable", "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(stack["E2E_ROUTER"] + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}",
                                              "x-lockgate-deployment": deployment})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    created = run("keys", "create", "--tenant", "acme", "--app", "helpdesk", "--deployment", "support", env=stack)
    assert "may use support" in created.stdout
    key = created.stdout.strip().splitlines()[-1]
    listed = {k["app"]: k for k in json.loads(run("keys", "list", "--json", env=stack).stdout)}
    assert listed["helpdesk"]["deployments"] == ["support"]
    assert all(k["deployments"] == [] for app, k in listed.items() if app != "helpdesk")  # every deployment
    assert "every deployment" in run("keys", "list", env=stack).stdout

    # Another deployment: refused for the key's scope (403), whether or not a release serves it.
    status, body = chat(key, "shop-web")
    assert status == 403 and body["error"]["code"] == "model_not_found", body
    assert f"apikey:{listed['helpdesk']['id']}" in body["error"]["message"] and key not in body["error"]["message"]
    assert chat(key, "support")[0] == 404  # its own: accepted, and unknown as no release was rolled out to it

    run("keys", "scope", listed["helpdesk"]["id"], "--deployment", "shop-web", env=stack)
    assert chat(key, "shop-web")[0] not in (401, 403)  # from the router's next request
    assert chat(key, "support")[0] == 403
    refused = run("keys", "create", "--tenant", "acme", "--app", "ops", "--role", "admin", "--deployment",
                  "support", env=stack, check=False)
    assert refused.returncode == 2 and "takes no deployment scope" in refused.stderr, refused.stderr


def _admin_call(stack: dict[str, str], method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """The router's admin API with the admin key `dev up` made; (status, JSON body)."""
    import urllib.error
    import urllib.request

    from lockgate.server.apikeys import read_credential

    key = read_credential(Path(stack["E2E_HOME"]) / "credentials" / "router-admin.key")
    req = urllib.request.Request(stack["E2E_ROUTER"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _sql_count(stack: dict[str, str], sql: str, expected: int) -> int:
    """`lockgate sql` (a round trip to the running stack each time) until `expected` rows or 60 s."""
    deadline = time.monotonic() + 60
    count = 0
    while count < expected and time.monotonic() < deadline:
        count = json.loads(run("sql", sql, "--json", env=stack).stdout)[0]["n"]
    return count


def test_an_opentelemetry_sdk_exports_its_spans_to_lockgate_up(stack: dict[str, str]) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from lockgate.server.apikeys import KeyStore, read_credential

    key = read_credential(Path(stack["E2E_HOME"]) / "credentials" / "router-app.key")
    app = KeyStore(stack["E2E_HOME"]).authenticate(key).app  # its model calls are the key's app's events
    provider = TracerProvider(resource=Resource.create({"service.name": "e2e-otlp"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(
        endpoint=stack["E2E_OTLP_GRPC"], insecure=True, headers={"authorization": f"Bearer {key}"})))
    tracer = provider.get_tracer("e2e")
    with tracer.start_as_current_span("answer") as root:
        with tracer.start_as_current_span("chat sim-good") as call:
            call.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": "sim-good",
                                 "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 5})
    provider.shutdown()
    trace_id = format(root.get_span_context().trace_id, "032x")
    # lockgate's own spans (the sink storing the event) join the application's trace too
    assert _sql_count(stack, "SELECT count() AS n FROM otel_traces WHERE TraceId = "
                             f"'{trace_id}' AND ServiceName = 'e2e-otlp'", 2) == 2
    assert _sql_count(stack, "SELECT count() AS n FROM inference_events WHERE trace_id = "
                             f"'{trace_id}' AND app = '{app}' AND input_tokens = 10", 1) == 1


def test_reviews_and_break_glass_are_signed_by_people(stack: dict[str, str], tmp_path: Path) -> None:
    # Before: `gate approve --actor` was free text; a break-glass was an admin key and a free-text reason.
    run("demo", "--router", stack["E2E_ROUTER"], "--sim", stack["E2E_SIM"], "--traffic", "20", env=stack)
    created = run("identity", "create", "ann", env=stack).stdout
    pub = Path(stack["E2E_HOME"]) / "identities" / "ann.pub"
    assert f"lockgate gate trust --person ann --role approver {pub}" in created and "BEGIN PUBLIC KEY" in created
    assert "not trusted" in run("--as", "ann", "identity", "show", env=stack).stdout
    assert "trusted ann (approver)" in run("gate", "trust", "--person", "ann", "--role", "approver", str(pub),
                                           env=stack).stdout
    run("identity", "create", "boss", env=stack)
    run("gate", "trust", "--person", "boss", "--role", "admin", str(pub.with_name("boss.pub")), env=stack)

    gone = run("gate", "approve", "shop-v2-rc1", "--reason", "x", "--actor", "mallory", env=stack, check=False)
    assert gone.returncode != 0 and "--actor is gone" in gone.stderr
    unchosen = {k: v for k, v in stack.items() if k != "LOCKGATE_IDENTITY"}
    several = run("gate", "reject", "shop-v2-rc1", "--reason", "x", env=unchosen, check=False)
    assert several.returncode != 0 and "--as NAME" in several.stderr  # several identities here: say which
    # Nor does anything bind unsigned for want of a choice (before: "no author: no personal identity").
    unsigned = run("release", "create", "nobody-r1", "--app", "shop", "--artifact", "prompt/p=sha256:" + "0" * 64,
                   env=unchosen, check=False)
    assert unsigned.returncode == 2 and unsigned.stderr.startswith("error: several personal identities (ann, boss, "), \
        unsigned.stderr
    veto = json.loads(run("--as", "ann", "gate", "reject", "shop-v2-rc1", "--reason", "still wrong", "--json",
                          env=stack).stdout)
    assert (veto["decision"], veto["reviewed_by"]) == ("BLOCK", "ann")
    audit = json.loads(run("decisions", "--release", "shop-v2-rc1", "--json", env=stack).stdout)
    assert ("ann", "override") in {(r["actor"], r["action"]) for r in audit}

    # A release authored by ann (signed), never gated: only a signed break-glass gives it traffic.
    config = tmp_path / "glass.json"
    config.write_text(json.dumps({"model": "sim-stable", "endpoint": "default"}))
    [art] = json.loads(run("artifact", "register", "model_config", str(config), "--json", env=stack).stdout)
    made = run("--as", "ann", "release", "create", "glass-r1", "--app", "shop", "--artifact",
               f"model_config/glass={art['hash']}", env=stack).stdout
    assert "authored by ann" in made
    body = {"stable_release": "shop-v1", "canary_release": "glass-r1", "initial_weight": 20}
    status, err = _admin_call(stack, "PUT", "/lockgate/v1/deployments/glass", body)
    assert status == 409 and "no verified gate decision" in err["error"]["message"]
    status, err = _admin_call(stack, "PUT", "/lockgate/v1/deployments/glass",
                              {**body, "break_glass": {"reason": "incident 7"}})
    assert status == 403 and "not signed by a person" in err["error"]["message"]
    not_admin = json.loads(run("--as", "ann", "break-glass", "glass", "glass-r1", "--action", "canary",
                               "--weight", "20", "--reason", "incident 7", env=stack).stdout)
    status, err = _admin_call(stack, "PUT", "/lockgate/v1/deployments/glass", {**body, **not_admin})
    assert status == 403 and "needs admin" in err["error"]["message"]

    # The weight is the admin's: a statement names it, and a PUT asking more than it says is refused.
    unweighted = run("--as", "boss", "break-glass", "glass", "glass-r1", "--action", "canary", "--reason", "incident 7",
                     env=stack, check=False)
    assert unweighted.returncode == 2 and "--weight PERCENT is required" in unweighted.stderr, unweighted.stderr
    small = json.loads(run("--as", "boss", "break-glass", "glass", "glass-r1", "--action", "canary", "--weight", "5",
                           "--reason", "incident 7", env=stack).stdout)
    status, err = _admin_call(stack, "PUT", "/lockgate/v1/deployments/glass", {**body, **small})
    assert status == 403 and "lets 'glass-r1' take 5% of 'glass', not the 20% asked" in err["error"]["message"], err
    signed = json.loads(run("--as", "boss", "break-glass", "glass", "glass-r1", "--action", "canary",
                            "--weight", "20", "--reason", "incident 7", env=stack).stdout)
    status, route = _admin_call(stack, "PUT", "/lockgate/v1/deployments/glass", {**body, **signed})
    assert status == 200 and route["weight"] == 20.0 and route["override"]["actor"] == "boss"
    shown = json.loads(run("status", "--json", env=stack).stdout)["overrides"]
    assert [(o["deployment"], o["release"], o["by"], o["reason"]) for o in shown] == [
        ("glass", "glass-r1", "boss", "incident 7")]
    assert "BREAK-GLASS" in run("status", env=stack).stdout
    status, route = _admin_call(stack, "DELETE", "/lockgate/v1/deployments/glass/break-glass")
    assert status == 200 and route["override"] is None and route["weight"] == 0.0
    assert json.loads(run("status", "--json", env=stack).stdout)["overrides"] == []


def test_audit_log_of_a_running_stack_verifies(stack: dict[str, str]) -> None:
    # The demo's gate decisions and canary starts, and a key change from the CLI, are chained and signed.
    run("demo", "--router", stack["E2E_ROUTER"], "--sim", stack["E2E_SIM"], "--traffic", "20", env=stack)
    run("keys", "create", "--tenant", "acme", "--app", "audit", "--role", "viewer", env=stack)
    ok = run("audit", "verify", env=stack)
    assert ok.stdout.startswith("ok: audit log intact: "), ok.stdout
    rows = json.loads(run("audit", "log", "--limit", "1000", "--json", env=stack).stdout)
    assert {("gatekeeper", "decision"), ("router", "rollout")} <= {(r["producer"], r["kind"]) for r in rows}
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))


def test_a_release_may_name_only_registered_artifacts(stack: dict[str, str], tmp_path: Path) -> None:
    # Before: `release create` bound the name to any hash (`sha256:deadbeef`, an artifact never registered,
    # a kind that does not exist) and a release name binds once: a typo took the name for ever, with a
    # release no eval or router could load.
    prompt = tmp_path / "answer.txt"
    prompt.write_text("Answer briefly.")
    [art] = json.loads(run("artifact", "register", "prompt", str(prompt), "--json", env=stack).stdout)
    missing = "sha256:" + "0" * 64
    for pair, code, said in ((f"prompt/answer={missing}", 3, f"prompt/answer={missing} is not registered"),
                             ("prompt/answer=sha256:deadbeef", 2, "is not a content hash"),
                             (f"bogus/answer={art['hash']}", 2, "the kind must be one of dataset, prompt"),
                             (f"prompt/../etc={art['hash']}", 2, "invalid artifact name in 'prompt/../etc'")):
        refused = run("release", "create", "typo-r1", "--app", "shop", "--artifact", pair, env=stack, check=False)
        assert refused.returncode == code and said in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    made = run("release", "create", "typo-r1", "--app", "shop", "--artifact", f"prompt/answer={art['hash']}",
               env=stack)
    assert "release typo-r1 recorded with 1 artifacts" in made.stdout  # the refused tries did not take the name

    odd = run("artifact", "register", "prompt", str(prompt), "--name", "../../etc", env=stack, check=False)
    assert odd.returncode == 2 and "invalid artifact name '../../etc'" in odd.stderr, odd.stderr


def test_eval_run_checks_the_suite_first_and_its_exit_code_says_how_the_eval_and_gate_went(
        stack: dict[str, str], tmp_path: Path) -> None:
    # Before: a suite that was not YAML gave a traceback; a suite the evaluator refuses, or an eval whose
    # every call failed, printed an error and exited 0, and so did a gate that blocked: CI went green. A policy
    # the gatekeeper cannot use was found only after the whole eval ran (a BLOCK whose reason was not shown).
    demo = Path(__file__).parents[2] / "dev" / "lockgate_dev" / "demo_data"
    for name in ("suite.yaml", "qa.jsonl", "policy.yaml"):
        (tmp_path / name).write_bytes((demo / name).read_bytes())
    prompt = tmp_path / "p.txt"
    prompt.write_text("Answer with one word.")
    [art] = json.loads(run("artifact", "register", "prompt", str(prompt), "--json", env=stack).stdout)
    run("release", "create", "evalx-r1", "--app", "shop", "--artifact", f"prompt/p={art['hash']}", env=stack)
    suite, sim = str(tmp_path / "suite.yaml"), stack["E2E_SIM"]

    def eval_run(suite: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run("eval", "run", suite, "--candidate", "evalx-r1", "--endpoint", sim, *args, env=stack, check=False)

    (tmp_path / "broken.yaml").write_text("name: s\ndataset: [1, 2\n")
    (tmp_path / "partial.yaml").write_text("name: s\ndataset: qa.jsonl\nscorers: [exact_match]\n")
    (tmp_path / "regex.yaml").write_text("name: p\nrules: [{name: a, metric: score, op: '=~', threshold: 1}]\n")
    for args, said in (([str(tmp_path / "broken.yaml")], "is not valid YAML"),
                       ([str(tmp_path / "partial.yaml")], "missing required field `prompt`"),
                       ([suite, "--policy", str(tmp_path / "regex.yaml")], "Invalid enum value '=~' - at `$.rules[0].op`")):
        refused = eval_run(*args)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

    blocked = eval_run(suite, "--model", "sim-bad", "--policy", str(tmp_path / "policy.yaml"), "--json")
    assert blocked.returncode == 5, blocked.stdout + blocked.stderr
    assert json.loads(blocked.stdout)["decision"]["decision"] == "BLOCK"
    failed = run("eval", "run", suite, "--candidate", "evalx-r1", "--endpoint", "http://127.0.0.1:1/v1", "--json",
                 env=stack, check=False)
    assert failed.returncode == 1 and json.loads(failed.stdout)["status"] == "failed"
    assert eval_run(suite, "--model", "sim-stable", "--json").returncode == 0


def test_a_jsonl_dataset_of_one_case_runs_and_a_broken_one_is_refused_naming_the_line(
        stack: dict[str, str], tmp_path: Path) -> None:
    # Before: a dataset of one case (one JSONL line) read back as a JSON object, so its every eval failed
    # with "Expected `array`, got `object`"; a line that was not JSON, or not UTF-8, was a traceback.
    demo = Path(__file__).parents[2] / "dev" / "lockgate_dev" / "demo_data"
    (tmp_path / "suite.yaml").write_bytes((demo / "suite.yaml").read_bytes())
    first = (demo / "qa.jsonl").read_text().splitlines()[0]
    (tmp_path / "qa.jsonl").write_text(first + "\n")

    def eval_run() -> subprocess.CompletedProcess[str]:
        return run("eval", "run", str(tmp_path / "suite.yaml"), "--candidate", "one-case-r1", "--endpoint",
                   stack["E2E_SIM"], "--model", "sim-good", "--json", env=stack, check=False)

    one = eval_run()
    assert one.returncode == 0, one.stdout + one.stderr
    assert json.loads(one.stdout)["metrics"]["n_cases"] == 1
    for content, said in ((first.encode() + b"\n{not json\n", "line 2: not valid JSON: Expecting property name"),
                          (b'{"input": "caf\xe9", "expected": "x"}\n', "not UTF-8 text (line 1)")):
        (tmp_path / "qa.jsonl").write_bytes(content)
        refused = eval_run()
        assert refused.returncode == 2 and f"{tmp_path / 'qa.jsonl'}: artifact is not valid application/jsonl: " \
            f"{said}" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_a_release_parent_must_be_another_registered_release(stack: dict[str, str], tmp_path: Path) -> None:
    # Before: `release create --parent` took any name (a typo, a release never registered, the release
    # itself, or two releases naming each other) and bound it for ever into the release and its lineage.
    prompt = tmp_path / "p.txt"
    prompt.write_text("Answer in one word.")
    [art] = json.loads(run("artifact", "register", "prompt", str(prompt), "--json", env=stack).stdout)
    pair = f"prompt/p={art['hash']}"
    for name, parent, code, said in (("kin-r2", "kin-r1", 3, "parent release 'kin-r1' of 'kin-r2' is not registered"),
                                     ("kin-r1", "kin-r1", 2, "release 'kin-r1' cannot be its own parent")):
        refused = run("release", "create", name, "--app", "kin", "--artifact", pair, "--parent", parent, env=stack,
                      check=False)
        assert refused.returncode == code and said in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    run("release", "create", "kin-r1", "--app", "kin", "--artifact", pair, env=stack)
    run("release", "create", "kin-r2", "--app", "kin", "--artifact", pair, "--parent", "kin-r1", env=stack)


BOMB = "kind: prompt\nname: bomb\nspec:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  {x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n" for p, x in zip("abcdefgh", "bcdefghi", strict=True))


def test_a_yaml_bomb_is_refused_before_it_is_expanded(stack: dict[str, str], tmp_path: Path) -> None:
    # Before: nine lists of nine aliases of the last, nine deep (400 bytes, 387 million values once expanded)
    # passed `plan` and made `apply` (and `artifact register` of such a file) build them all: a MemoryError
    # traceback under a memory limit, the machine's memory without one.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "bomb.yaml").write_text(BOMB)
    for args in (("plan", str(folder)), ("apply", str(folder)), ("artifact", "register", "prompt", str(folder / "bomb.yaml"))):
        refused = run(*args, env=stack, check=False)
        assert refused.returncode in (1, 2) and "aliases expand it to more than 5,000,000 values" in refused.stderr, \
            (args, refused.stderr)
        assert "Traceback" not in refused.stderr
