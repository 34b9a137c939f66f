"""What an OpenLineage export needs: eval runs and gate decisions with the releases and artifacts they used."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lockgate.provenance.openlineage import DEFAULT_TENANT, NamesAt
from lockgate.services.query.registry import Limit
from lockgate.store import Store


def lineage_export(store: Store, release: str | None = None, since: datetime | None = None,
                   until: datetime | None = None, limit: Limit = 100) -> dict[str, Any]:
    """{evals, decisions, run_inputs: run -> input hashes, releases: name -> {app, tenant, artifacts},
    registrations: hash -> tenant -> its first registration, registered: release rows, rollouts: rollout changes}:
    everything the export turns into RunEvents, newest first."""
    cond = " AND release = {r:String}" if release else ""
    cond += " AND time >= {since:DateTime64(6, 'UTC')}" if since else ""
    cond += " AND time <= {until:DateTime64(6, 'UTC')}" if until else ""
    params = {"r": release or "", "since": since, "until": until, "n": max(1, min(int(limit), 10_000))}
    evals = store.rows(
        "SELECT * FROM eval_runs "
        f"WHERE 1 {cond} ORDER BY time DESC LIMIT 1 BY run_id LIMIT {{n:UInt32}}", params)
    decisions = store.rows(
        "SELECT id, time, release, action, actor, decision, eval_run, policy, baseline, reason, key_id "
        f"FROM gate_decisions WHERE 1 {cond} ORDER BY time DESC LIMIT 1 BY id, action LIMIT {{n:UInt32}}", params)
    runs = sorted({e["run_id"] for e in evals} | {d["eval_run"] for d in decisions if d["eval_run"]})
    run_inputs = {r["run_id"]: list(r["inputs"]) for r in store.rows(
        "SELECT run_id, inputs FROM lineage_runs WHERE run_id IN {runs:Array(String)} LIMIT 1 BY run_id",
        {"runs": runs})}
    names = sorted({e["release"] for e in evals} | {d["release"] for d in decisions})
    releases = {r["release"]: {"app": r["app"], "tenant": r["tenant"], "artifacts": dict(r["artifacts"])}
                for r in store.rows("SELECT release, app, tenant, artifacts FROM releases "
                                    "WHERE release IN {names:Array(String)} LIMIT 1 BY release", {"names": names})}
    hashes = sorted({h for rel in releases.values() for h in rel["artifacts"].values()}
                    | {h for rel in store.rows(
                        f"SELECT artifacts FROM releases WHERE 1 {cond} LIMIT {{n:UInt32}}", params)
                       for h in dict(rel["artifacts"]).values()}
                    | {h for ins in run_inputs.values() for h in ins} | {e["suite"] for e in evals}
                    | {e["policy"] for e in evals if e["policy"]} | {d["policy"] for d in decisions if d["policy"]})
    registered = store.rows(
        "SELECT release, app, tenant, artifacts, parent, time, event_id FROM releases "
        f"WHERE 1 {cond} ORDER BY time DESC LIMIT 1 BY release LIMIT {{n:UInt32}}", params)
    roll_cond = cond.replace("release = {r:String}", "(stable_release = {r:String} OR canary_release = {r:String})")
    rollouts = store.rows(
        "SELECT id, time, deployment, stable_release, canary_release, canary_weight, phase, step, reason, "
        "started_at, began "
        f"FROM rollout_events WHERE 1 {roll_cond} ORDER BY time DESC LIMIT 1 BY id LIMIT {{n:UInt32}}", params)
    return {"evals": evals, "decisions": decisions, "run_inputs": run_inputs, "releases": releases,
            "registrations": first_registrations(store, hashes), "registered": registered, "rollouts": rollouts}


def first_registrations(store: Store, hashes: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """hash -> tenant -> {kind, name, time} of the tenant's first registration of that content (ties broken by
    kind and name), whatever came after it: what `openlineage.NamesAt` names a past event's inputs by."""
    if not hashes:
        return {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in store.rows(
            "SELECT hash, tenant, argMin(tuple(kind, name), tuple(registered_at, kind, name)) AS first, "
            "min(registered_at) AS first_time FROM artifacts WHERE hash IN {h:Array(String)} "
            "GROUP BY hash, tenant ORDER BY hash, tenant", {"h": sorted(set(hashes))}):
        kind, name = r["first"]
        out.setdefault(r["hash"], {})[r["tenant"]] = {"kind": kind, "name": name, "time": r["first_time"]}
    return out


def artifact_names(store: Store, hashes: list[str], release: str = "", tenant: str = DEFAULT_TENANT,
                   at: datetime | None = None) -> dict[str, dict[str, str]]:
    """hash -> {kind, name} as an event at `at` saw them (the lineage recorder names live OpenLineage datasets so,
    as the export does): each one's first registration by the tenant `release` is registered under (else
    `tenant`), if made at or before `at`."""
    if not hashes:
        return {}
    if release:
        tenant = store.scalar("SELECT any(tenant) FROM releases WHERE release = {r:String}", {"r": release}) or tenant
    return dict(NamesAt(first_registrations(store, sorted(set(hashes))[:1000]), tenant, at))
