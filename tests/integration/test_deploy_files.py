"""compose.yaml and deploy/k8s checked against the CLI, offline: every command, flag, service and
LOCKGATE_* variable they use exists; the router is told where its upstream is, and in compose the evaluator
reads the same endpoints; the gatekeepers share one mounted signing key; streams are replicated on the
three-node cluster. A broken copy fails."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from lockgate.cli.main import cli
from lockgate.config import Settings
from lockgate.permissions import IDENTITIES
from lockgate.server.natsaccounts import ROUTE_PASSWORD, ROUTES_VARIABLE, SYSTEM_USER
from lockgate.server.natsserver import env_password
from lockgate.server.registry import available

ROOT = Path(__file__).resolve().parents[2]
# Variables the CLI group reads besides the settings (click envvars) and the NATS servers' passwords.
_CLI_ENV = {"LOCKGATE_ROLE", "LOCKGATE_IDENTITY"}
_PASSWORDS = {f"LOCKGATE_NATS_PASSWORD_{i.upper()}" for i in IDENTITIES}
# deploy/nats/cluster.conf's other secrets: the system account's user and the routes'
_CLUSTER_PASSWORDS = {env_password(SYSTEM_USER), ROUTE_PASSWORD, ROUTES_VARIABLE}


def _known_variable(name: str) -> bool:
    field = name.removeprefix("LOCKGATE_").lower()
    return field in Settings.__struct_fields__ or name in _CLI_ENV or name in _PASSWORDS


def _check_command(args: list[str]) -> list[str]:
    """Problems with one `lockgate ARGS` invocation: parsed by the CLI itself, nothing run."""
    try:
        # The files give no global options: the first word is the command.
        ctx = click.Context(cli, info_name="lockgate")
        name, command, rest = cli.resolve_command(ctx, list(args))
        assert name is not None and command is not None
        sub = command.make_context(name, rest, parent=ctx)
    except click.exceptions.Exit:
        return []
    except click.UsageError as exc:
        return [f"lockgate {' '.join(args)}: {exc.format_message()}"]
    if name == "serve":
        unknown = set(sub.params["services"]) - set(available())
        return [f"lockgate serve: unknown service {s!r}" for s in sorted(unknown)]
    return []


def _mounted(mounts: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume a file path lies on, if any."""
    for mount_path, volume in mounts.items():
        if path.startswith(mount_path.rstrip("/") + "/"):
            return volume
    return None


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def k8s_problems(text: str) -> list[str]:
    """What is wrong with a k8s manifest of lockgate (empty: nothing)."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    config = next(d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "lockgate")
    problems = [f"ConfigMap: unknown variable {k}" for k in config if not _known_variable(k)]
    if config.get("LOCKGATE_REPLICAS") != "3":
        problems.append("ConfigMap: LOCKGATE_REPLICAS must be 3 on a three-node NATS cluster")
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in _containers(doc):
            where = f"Deployment {doc['metadata']['name']}"
            problems += [f"{where}: {p}" for p in _check_command(c["args"])]
            env = {e["name"]: e for e in c.get("env", [])}
            problems += [f"{where}: unknown variable {k}" for k in env if not _known_variable(k)]
            service = c["args"][1]
            user = env.get("LOCKGATE_NATS_USER", {}).get("value")
            secret_key = env.get("LOCKGATE_NATS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("key")
            if user != service or secret_key != service:
                problems.append(f"{where}: connects as {user!r} with the password of {secret_key!r}, not {service!r}")
            mounts = {m["mountPath"]: volumes.get(m["name"]) for m in c.get("volumeMounts", [])}

            if service == "gatekeeper":
                key = env.get("LOCKGATE_SIGNING_KEY", {}).get("value", "")
                volume = _mounted(mounts, key) if key else None
                if volume is None or "secret" not in volume:
                    problems.append(f"{where}: the signing key must be LOCKGATE_SIGNING_KEY on a mounted Secret")
            if service in _KEY_CHECKERS:
                problems += [f"{where}: {p}" for p in _key_store_problems(config, env, c, volumes)]
            if service == "router":
                endpoints = env.get("LOCKGATE_ENDPOINTS_FILE", {}).get("value", "")
                upstream = env.get("LOCKGATE_STABLE_UPSTREAM", {}).get("value", "")
                if not (endpoints and _mounted(mounts, endpoints)) and not (upstream and "127.0.0.1" not in upstream):
                    problems.append(f"{where}: no upstream configured (LOCKGATE_ENDPOINTS_FILE on a mounted "
                                    "ConfigMap); the default is the simulator on 127.0.0.1")
    return problems + _k8s_operations(docs)


# The services that check API keys (lockgate.server.apikeys.KeyStore): a pod of its own home reads them from the file
# LOCKGATE_API_KEYS_FILE names, which must be on a Secret volume mounted whole (the kubelet updates no subPath mount).
# Before (probe p86 F1), no pod had one: each said ready and refused every key.
_KEY_CHECKERS = ("router", "gateway", "otlp")


def _key_store_problems(config: dict[str, str], env: dict[str, Any], container: dict[str, Any],
                        volumes: dict[str, Any]) -> list[str]:
    path = env.get("LOCKGATE_API_KEYS_FILE", {}).get("value") or config.get("LOCKGATE_API_KEYS_FILE", "")
    for m in container.get("volumeMounts", []):
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
            secret = (volumes.get(m["name"]) or {}).get("secret", {})
            if secret and "subPath" not in m and Path(path).name in (
                    [i["path"] for i in secret.get("items", [])] or ["apikeys.json"]):
                return []
    return ["the key store must be LOCKGATE_API_KEYS_FILE on a Secret volume mounted whole (key apikeys.json)"]


# Variables whose values are credentials: a Secret's, never a literal or a ConfigMap's.
_SECRET_VARIABLES = ("LOCKGATE_NATS_PASSWORD", "LOCKGATE_CLICKHOUSE_URL", "LOCKGATE_CLICKHOUSE_READONLY_URL")


def _k8s_operations(docs: list[dict[str, Any]]) -> list[str]:
    """What a cluster operator needs beyond the CLI: resources on every container, a disruption budget
    per scaled service, credentials from Secrets, and readiness on every pod a Service sends traffic to."""
    problems = []
    config = next(d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "lockgate")
    problems += [f"ConfigMap: {k} is a credential (a Secret's)" for k in config if k in _SECRET_VARIABLES]
    problems += [f"ConfigMap: {k} carries a password" for k, v in config.items() if re.search(r"://[^/@]+:[^/@]+@", v)]
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    served = [d["spec"]["selector"] for d in docs if d["kind"] == "Service"]
    for doc in (d for d in docs if d["kind"] == "Deployment"):
        where = f"Deployment {doc['metadata']['name']}"
        labels = doc["spec"]["template"]["metadata"]["labels"]
        replicas = doc["spec"].get("replicas", 1)
        budgets = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        if replicas >= 2 and not any(0 < p["spec"].get("minAvailable", 0) < replicas for p in budgets):
            problems.append(f"{where}: {replicas} replicas and no PodDisruptionBudget keeping one of them")
        behind_service = any(sel.items() <= labels.items() for sel in served)
        for c in _containers(doc):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(res.get(kind, {}))
                problems += [f"{where}: no {kind}.{m}" for m in sorted(missing)]
            env = {e["name"]: e for e in c.get("env", [])}
            service = c["args"][1]
            for name in _SECRET_VARIABLES:
                if name in env and "secretKeyRef" not in env[name].get("valueFrom", {}):
                    problems.append(f"{where}: {name} must come from a Secret")
            if service in ("sink", "query") and "LOCKGATE_CLICKHOUSE_URL" not in env:
                problems.append(f"{where}: opens the store without LOCKGATE_CLICKHOUSE_URL from a Secret")
            if behind_service and "readinessProbe" not in c:
                problems.append(f"{where}: a Service sends it traffic and it has no readinessProbe")
            probe = c.get("readinessProbe", {}).get("httpGet", {})
            if service == "router" and probe.get("path") != "/healthz":
                problems.append(f"{where}: readiness must be /healthz (it reports the bus)")
            args = c["args"]
            health = args[args.index("--health-port") + 1] if "--health-port" in args else None
            if service != "router" and (probe.get("path"), str(probe.get("port"))) != ("/readyz", health):
                problems.append(f"{where}: readiness must be /readyz on its --health-port (ready: on the bus)")
    return problems


# The settings that make the upstream allow-list (lockgate/endpoints.py): the evaluator's online judge and eval
# runs call the endpoints the router routes to, so the evaluator must read the same ones.
_ENDPOINT_VARIABLES = ("LOCKGATE_ENDPOINTS_FILE", "LOCKGATE_SECRETS_FILE", "LOCKGATE_STABLE_UPSTREAM",
                       "LOCKGATE_CANARY_UPSTREAM")


def compose_problems(text: str) -> list[str]:
    """What is wrong with lockgate's compose file (empty: nothing)."""
    doc = yaml.safe_load(text)
    problems: list[str] = []
    nodes = [n for n, s in doc["services"].items() if s.get("image", "").startswith("nats")]
    for name, svc in doc["services"].items():
        env = svc.get("environment", {}) or {}
        if name in nodes:
            missing = (_PASSWORDS | _CLUSTER_PASSWORDS) - set(env)
            problems += [f"{name}: no {v}" for v in sorted(missing)]
            # every node solicits every node, authenticated (the password is interpolated by compose)
            route_urls = re.findall(r"nats-route://route:\$\{LOCKGATE_NATS_ROUTE_PASSWORD:\?\}@([\w-]+):6222",
                                    env.get(ROUTES_VARIABLE, ""))
            if sorted(route_urls) != sorted(nodes):
                problems.append(f"{name}: {ROUTES_VARIABLE} must list every node with the route password")
            command = svc.get("command", [])
            if command[:2] != ["-c", "/etc/nats/cluster.conf"] or "--name" not in command:
                problems.append(f"{name}: must run deploy/nats/cluster.conf (accounts, authenticated routes) "
                                "with its --name")
            continue
        if svc.get("image") != "lockgate:latest":
            continue
        where = f"service {name}"
        problems += [f"{where}: {p}" for p in _check_command(svc["command"])]
        problems += [f"{where}: unknown variable {k}" for k in env if k.startswith("LOCKGATE_") and not _known_variable(k)]
        if svc["command"][0] != "serve":
            continue
        service = svc["command"][1]
        if env.get("LOCKGATE_NATS_USER") != service:
            problems.append(f"{where}: connects as {env.get('LOCKGATE_NATS_USER')!r}, not {service!r}")
        urls = env.get("LOCKGATE_NATS_URL", "").split(",")
        if sorted(u.split("//")[1].split(":")[0] for u in urls if u) != sorted(nodes):
            problems.append(f"{where}: LOCKGATE_NATS_URL must list every NATS node ({', '.join(nodes)})")
        if env.get("LOCKGATE_REPLICAS") != "3":
            problems.append(f"{where}: LOCKGATE_REPLICAS must be 3 on the three-node cluster")
        if service == "router" and not re.match(r"https?://(?!127\.0\.0\.1)", env.get("LOCKGATE_STABLE_UPSTREAM", "")) \
                and "LOCKGATE_ENDPOINTS_FILE" not in env:
            problems.append(f"{where}: no upstream configured")
    router, evaluator = (doc["services"][n].get("environment", {}) or {} for n in ("router", "evaluator"))
    problems += [f"service evaluator: {v} is not the router's (its judge would call other endpoints)"
                 for v in _ENDPOINT_VARIABLES if evaluator.get(v) != router.get(v)]
    return problems


def test_k8s_manifest_matches_the_cli() -> None:
    assert k8s_problems((ROOT / "deploy/k8s/lockgate.yaml").read_text()) == []


def test_compose_matches_the_cli() -> None:
    assert compose_problems((ROOT / "compose.yaml").read_text()) == []


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("'--router-port', '8080'", "'--router-prt', '8080'", "No such option '--router-prt'"),
    ("args: ['serve', 'drift',", "args: ['serve', 'drfit',", "unknown service 'drfit'"),
    ("- {name: LOCKGATE_ENDPOINTS_FILE, value: /etc/lockgate/endpoints/endpoints.yaml}", "",
     "no upstream configured"),
    ("- {name: LOCKGATE_SIGNING_KEY, value: /etc/lockgate/signing/gatekeeper.pem}", "",
     "the signing key must be LOCKGATE_SIGNING_KEY on a mounted Secret"),
    ("LOCKGATE_REPLICAS: \"3\"", "LOCKGATE_REPLICA: \"3\"", "unknown variable LOCKGATE_REPLICA"),
    ("key: cost}", "key: router}", "with the password of 'router'"),
    ("limits: {cpu: '1', memory: 1Gi}", "limits: {memory: 1Gi}", "no limits.cpu"),
    ("requests: {cpu: 250m, memory: 256Mi}", "requests: {cpu: 250m}", "no requests.memory"),
    ("component: cost}\n---", "component: costs}\n---", "no PodDisruptionBudget"),
    ("LOCKGATE_PREFIX: lg", "LOCKGATE_PREFIX: lg\n  LOCKGATE_CLICKHOUSE_URL: http://lockgate:pw@clickhouse:8123",
     "LOCKGATE_CLICKHOUSE_URL is a credential"),
    ("valueFrom: {secretKeyRef: {name: lockgate-clickhouse, key: reader-url}}", "value: http://clickhouse:8123",
     "LOCKGATE_CLICKHOUSE_READONLY_URL must come from a Secret"),
    ("          readinessProbe: {httpGet: {path: /readyz, port: 8081}, periodSeconds: 5}  # every bus connection up\n",
     "", "readiness must be /readyz"),
    ("args: ['serve', 'cost', '--host', '0.0.0.0', '--health-port', '8081']", "args: ['serve', 'cost']",
     "readiness must be /readyz on its --health-port"),
    ("  LOCKGATE_API_KEYS_FILE: /etc/lockgate/apikeys/apikeys.json\n", "", "the key store must be"),
    ("            - {name: apikeys, mountPath: /etc/lockgate/apikeys, readOnly: true}\n          ports: [{containerPort: 50051",
     "          ports: [{containerPort: 50051", "Deployment lockgate-gateway: the key store must be"),
    ("volumeMounts: [{name: apikeys, mountPath: /etc/lockgate/apikeys, readOnly: true}]",
     "volumeMounts: [{name: apikeys, mountPath: /etc/lockgate/apikeys/apikeys.json, subPath: apikeys.json}]",
     "Deployment lockgate-otlp: the key store must be"),
    ("- {name: apikeys, mountPath: /etc/lockgate/apikeys, readOnly: true}\n          ports: [{containerPort: 8080",
     "- {name: apikeys, mountPath: /etc/lockgate/keys, readOnly: true}\n          ports: [{containerPort: 8080",
     "Deployment lockgate-router: the key store must be"),
])
def test_a_broken_k8s_manifest_fails(old: str, new: str, expected: str) -> None:
    text = (ROOT / "deploy/k8s/lockgate.yaml").read_text()
    assert old in text
    problems = k8s_problems(text.replace(old, new, 1))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('command: ["serve", "router", "--router-port"', 'command: ["serve", "router", "--port"',
     "No such option '--port'"),
    ("LOCKGATE_STABLE_UPSTREAM: http://simulator:9000/v1", "LOCKGATE_STABLE_UPSTREAM: http://127.0.0.1:9000/v1",
     "no upstream configured"),
    ("<<: [*lockgate-env, *upstreams]\n      LOCKGATE_NATS_USER: evaluator",
     "<<: *lockgate-env\n      LOCKGATE_NATS_USER: evaluator", "LOCKGATE_STABLE_UPSTREAM is not the router's"),
    ("nats://nats-2:4222,", "", "must list every NATS node"),
    ('"/etc/nats/cluster.conf", "--name", "nats-2"', '"/etc/nats/nats.conf", "--name", "nats-2"',
     "nats-2: must run deploy/nats/cluster.conf"),
    ("  LOCKGATE_NATS_ROUTE_PASSWORD: ${LOCKGATE_NATS_ROUTE_PASSWORD:?}\n", "", "no LOCKGATE_NATS_ROUTE_PASSWORD"),
    ("nats-route://route:${LOCKGATE_NATS_ROUTE_PASSWORD:?}@nats-3:6222", "nats-route://nats-3:6222",
     "LOCKGATE_NATS_ROUTES must list every node with the route password"),
])
def test_a_broken_compose_file_fails(old: str, new: str, expected: str) -> None:
    text = (ROOT / "compose.yaml").read_text()
    assert old in text
    problems = compose_problems(text.replace(old, new, 1))
    assert any(expected in p for p in problems), problems
