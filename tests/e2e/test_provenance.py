"""Provenance as a user runs it on `lockgate dev up` with auth on: aliases with a signed history, a real
gate decision attested and verified offline, sunset enforcement, the OpenLineage export, and the
environment an eval run recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e import test_cli
from tests.e2e.test_cli import run
from tests.openlineage_spec import check

pytestmark = pytest.mark.timeout(400)

stack = test_cli.stack  # `lockgate dev up`, started once for this module


def test_aliases_attestations_sunset_and_openlineage_on_a_running_stack(stack: dict[str, str],
                                                                       tmp_path: Path) -> None:
    run("demo", "--router", stack["E2E_ROUTER"], "--sim", stack["E2E_SIM"], "--traffic", "20", env=stack)
    run("identity", "create", "pat", env=stack)
    pub = Path(stack["E2E_HOME"]) / "identities" / "pat.pub"
    run("gate", "trust", "--person", "pat", "--role", "operator", str(pub), env=stack)

    config = tmp_path / "prov.json"
    config.write_text(json.dumps({"model": "sim-stable", "endpoint": "default"}))
    [art] = json.loads(run("--as", "pat", "artifact", "register", "model_config", str(config), "--json",
                           env=stack).stdout)
    assert art["key_id"]  # signed by pat's key
    for name in ("prov-r1", "prov-r2"):
        run("--as", "pat", "release", "create", name, "--app", "shop", "--artifact",
            f"model_config/prov={art['hash']}", env=stack)

    first = json.loads(run("--as", "pat", "alias", "set", "shop", "staging", "prov-r1", "--json", env=stack).stdout)
    run("--as", "pat", "alias", "set", "shop", "staging", "prov-r2", env=stack)
    at_first = json.loads(run("--role", "viewer", "history", "shop/staging", "--at", first["record"]["time"],
                              "--json", env=stack).stdout)
    assert at_first["release"] == "prov-r1"
    now = run("--role", "viewer", "history", "shop/staging", env=stack)
    assert "prov-r2" in now.stderr and "pat" in now.stdout
    listed = json.loads(run("--role", "viewer", "alias", "list", "shop", "--json", env=stack).stdout)
    assert [(a["alias"], a["release"]) for a in listed] == [("staging", "prov-r2")]
    # A viewer may read aliases but not move them.
    refused = run("--role", "viewer", "--as", "pat", "alias", "set", "shop", "staging", "prov-r1", env=stack,
                  check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr

    # The demo's good candidate was decided by the stack's gatekeeper: attest it, verify offline.
    out = tmp_path / "rc2.intoto.json"
    run("--as", "pat", "attest", "decision", "shop-v2-rc2", "--out", str(out), env=stack)
    ok = run("attest", "verify", str(out), env=stack)
    assert "verified: decision PASS for shop-v2-rc2, attested by pat" in ok.stdout
    env = json.loads(out.read_text())
    env["payload"] = env["payload"][:-8] + "AAAAAAA="
    (tmp_path / "bad.json").write_text(json.dumps(env))
    bad = run("attest", "verify", str(tmp_path / "bad.json"), env=stack, check=False)
    assert bad.returncode == 4 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1

    # The eval runs the demo made recorded their environment, and export as OpenLineage RunEvents.
    [row] = json.loads(run("sql", "SELECT environment FROM eval_runs WHERE release = 'shop-v2-rc2' LIMIT 1",
                           "--json", env=stack).stdout)
    assert row["environment"]["python"] and row["environment"]["model"]
    events = [json.loads(line) for line in run("lineage", "export", "--format", "openlineage", "--release",
                                                "shop-v2-rc2", env=stack).stdout.splitlines()]
    assert {e["job"]["name"].split("/")[0] for e in events} == {"eval", "gate", "release", "rollout"}
    for event in events:
        check(event)  # the official OpenLineage model (tests/openlineage_spec.py)

    # An artifact past its sunset: the alias refuses the release, naming the successor.
    config.write_text(json.dumps({"model": "sim-stable", "endpoint": "default", "max_tokens": 64}))
    [successor] = json.loads(run("artifact", "register", "model_config", str(config), "--json", env=stack).stdout)
    run("--as", "pat", "artifact", "deprecate", art["hash"], "--successor", successor["hash"], "--sunset",
        "2026-01-01T00:00:00Z", env=stack)
    sunset = run("--as", "pat", "alias", "set", "shop", "production", "prov-r1", env=stack, check=False)
    assert sunset.returncode == 4 and "uses sunset artifacts" in sunset.stderr and successor["hash"] in sunset.stderr


def test_reading_an_alias_of_a_name_no_alias_can_have_is_refused_as_such(stack: dict[str, str]) -> None:
    # Before: `alias get shop ''`, `alias get '' production` and `alias list ''` answered "points to nothing
    # yet" (exit 3) or "no aliases" (exit 0), as if the alias were merely unset, while `alias set` refuses them.
    for args, said in ((("alias", "get", "shop", ""), "invalid alias ''"),
                       (("alias", "get", "", "production"), "invalid app ''"),
                       (("alias", "get", "shop", "prod uction"), "invalid alias 'prod uction'"),
                       (("alias", "list", ""), "invalid app ''"),
                       (("history", "shop/a b"), "invalid alias 'a b'")):
        refused = run("--role", "viewer", *args, env=stack, check=False)
        assert refused.returncode == 2 and refused.stderr.startswith(f"error: {said}: 1-128 characters"), \
            (args, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1
