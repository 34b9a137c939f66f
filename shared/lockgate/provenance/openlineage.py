"""Eval runs, gate decisions, releases and rollouts as OpenLineage RunEvents (pure: rows in, dicts out).

An eval run is a job run that read the suite, its dataset, and the release's prompt and model config
(each a dataset named by kind and name, versioned by content hash) and wrote an eval result; a gate
decision read that eval result (with its metrics as data quality facets) and the policy, and wrote
the decision. lockgate's own facets (`lockgate_eval`, `lockgate_decision`) name their JSON Schema.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from lockgate import __version__
from lockgate.artifacts import release_bundle
from lockgate.identity import bundle_content
from lockgate.ids import canonical_json, content_hash

SPEC = "https://openlineage.io/spec/2-0-2/OpenLineage.json"
SCHEMA_URL = f"{SPEC}#/$defs/RunEvent"
PRODUCER = f"https://github.com/lockgate/lockgate/tree/v{__version__}"
FACETS = "https://openlineage.io/spec/facets"
LOCKGATE_FACETS = "https://lockgate.dev/spec/facets/1-0-0"
JOB_TYPE = f"{FACETS}/2-0-4/JobTypeJobFacet.json#/$defs/JobTypeJobFacet"
VERSION = f"{FACETS}/1-0-1/DatasetVersionDatasetFacet.json#/$defs/DatasetVersionDatasetFacet"
SCHEMA = f"{FACETS}/1-2-0/SchemaDatasetFacet.json#/$defs/SchemaDatasetFacet"
QUALITY = f"{FACETS}/1-0-3/DataQualityMetricsInputDatasetFacet.json#/$defs/DataQualityMetricsInputDatasetFacet"
OUTPUT_STATS = f"{FACETS}/1-0-2/OutputStatisticsOutputDatasetFacet.json#/$defs/OutputStatisticsOutputDatasetFacet"
ERROR = f"{FACETS}/1-0-1/ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet"
PARENT = f"{FACETS}/1-2-0/ParentRunFacet.json#/$defs/ParentRunFacet"

# Whose registrations name the inputs of an eval run or decision of a release nobody registered (an ad hoc run).
DEFAULT_TENANT = "default"

# lockgate's own facets, described by JSON Schemas (printed by `lockgate lineage export --facet-schemas`).
FACET_SCHEMAS: dict[str, dict[str, Any]] = {
    "lockgate_eval": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{LOCKGATE_FACETS}/EvalRunFacet.json",
        "type": "object", "required": ["_producer", "_schemaURL", "runId", "release", "status"],
        "properties": {"_producer": {"type": "string"}, "_schemaURL": {"type": "string"},
                       "runId": {"type": "string"}, "release": {"type": "string"}, "status": {"type": "string"},
                       "nCases": {"type": "integer"}, "nErrors": {"type": "integer"},
                       "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
                       "environment": {"type": "object", "additionalProperties": {"type": "string"}}}},
    "lockgate_decision": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{LOCKGATE_FACETS}/GateDecisionRunFacet.json",
        "type": "object", "required": ["_producer", "_schemaURL", "decisionId", "release", "decision"],
        "properties": {"_producer": {"type": "string"}, "_schemaURL": {"type": "string"},
                       "decisionId": {"type": "string"}, "release": {"type": "string"},
                       "decision": {"enum": ["PASS", "BLOCK", "NEEDS_REVIEW"]}, "action": {"type": "string"},
                       "actor": {"type": "string"}, "reason": {"type": "string"}, "keyId": {"type": "string"}}},
    "lockgate_rollout": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{LOCKGATE_FACETS}/RolloutRunFacet.json",
        "type": "object", "required": ["_producer", "_schemaURL", "deployment", "phase", "weights"],
        "properties": {"_producer": {"type": "string"}, "_schemaURL": {"type": "string"},
                       "deployment": {"type": "string"}, "phase": {"type": "string"}, "reason": {"type": "string"},
                       "weights": {"type": "object", "additionalProperties": {"type": "number"}}}},
}
# A rollout attempt's phases as OpenLineage run states (an attempt is one run, from its start to its promotion or
# abort); waiting at 0% for a decision is part of the run too.
_ROLLOUT_STATE = {"idle": "RUNNING", "progressing": "RUNNING", "promoted": "COMPLETE", "aborted": "ABORT"}


def _facet(schema_url: str, **fields: Any) -> dict[str, Any]:
    return {"_producer": PRODUCER, "_schemaURL": schema_url, **fields}


def _own(name: str, **fields: Any) -> dict[str, Any]:
    return _facet(FACET_SCHEMAS[name]["$id"], **fields)


def run_uuid(run_id: str) -> str:
    """OpenLineage runIds are UUIDs: a UUID stays itself, any other id maps to a stable UUID of it."""
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"lockgate:run:{run_id}"))


def _instant(value: Any) -> datetime | None:
    """A row's time as an aware UTC datetime, or None when it is no time. Rows read from ClickHouse carry
    datetimes, rows the query service sends over NATS carry ISO strings: both are UTC when they name no offset."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    return None


def _time(value: Any) -> str:
    """An RFC 3339 eventTime in UTC (`...Z`), as the spec's `date-time` requires."""
    t = _instant(value)
    if t is None:
        return str(value)  # not a time at all: shown as it is, so the consumer names what it refused
    return t.isoformat().replace("+00:00", "Z")


class NamesAt(Mapping[str, Mapping[str, str]]):
    """hash -> {kind, name} as one event saw it: each artifact's first registration by the event's tenant, if it
    was made at or before the event's time. `registrations` is hash -> tenant -> {kind, name, time} of that
    first registration (the query service's `first_registrations`). A registration made later, or by another
    tenant, never renames what a past event used: before (probe p29 F1), any registration of the same bytes (the
    one ClickHouse happened to return) named it, so exports disagreed and anyone could relabel a past input."""

    def __init__(self, registrations: Mapping[str, Mapping[str, Mapping[str, Any]]], tenant: str,
                 time: Any = None) -> None:
        self._registrations = registrations
        self._tenant = tenant
        self._time = _instant(time) if time is not None else None

    def __getitem__(self, digest: str) -> Mapping[str, str]:
        first = self._registrations.get(digest, {}).get(self._tenant)
        if first is None:
            raise KeyError(digest)
        made = _instant(first.get("time"))
        if self._time is not None and (made is None or made > self._time):
            raise KeyError(digest)
        return {"kind": str(first.get("kind", "")), "name": str(first.get("name", ""))}

    def __iter__(self) -> Iterator[str]:
        return (digest for digest in self._registrations if digest in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _artifact_dataset(namespace: str, digest: str, artifacts: Mapping[str, Mapping[str, str]],
                      key: str = "") -> dict[str, Any]:
    """An artifact version as a dataset: named by the `kind/name` key it was bound by when there is one (what the
    release used), else by its registration as the event saw it (`NamesAt`), else `artifact/<hash>`."""
    if "/" in key:
        kind, _, name = key.partition("/")
    else:
        known = artifacts.get(digest) or {}
        kind, name = known.get("kind") or "artifact", known.get("name") or digest
    return {"namespace": namespace, "name": f"{kind}/{name}",
            "facets": {"version": _facet(VERSION, datasetVersion=digest)}}


def _eval_result(namespace: str, row: Mapping[str, Any], as_input: bool) -> dict[str, Any]:
    metrics = dict(row.get("metrics") or {})
    ds: dict[str, Any] = {"namespace": namespace, "name": f"eval_result/{row['run_id']}", "facets": {
        "schema": _facet(SCHEMA, fields=[{"name": m, "type": "double"} for m in sorted(metrics)])}}
    n = int(row.get("n_cases") or 0)
    if as_input:
        ds["inputFacets"] = {"dataQualityMetrics": _facet(QUALITY, rowCount=n, columnMetrics={
            m: {"count": n, "sum": v * n} for m, v in sorted(metrics.items())})}
    else:
        ds["outputFacets"] = {"outputStatistics": _facet(OUTPUT_STATS, rowCount=n)}
    return ds


def eval_event(row: Mapping[str, Any], inputs: list[str], release: Mapping[str, Any] | None,
               artifacts: Mapping[str, Mapping[str, str]], namespace: str) -> dict[str, Any]:
    """The COMPLETE (or FAIL) RunEvent of one eval run: suite, dataset, prompt and model config in."""
    # An input the release bound is named by the key it bound it by, whatever else the same bytes were registered
    # as; the suite and dataset the run read are named by their registration (`artifacts`) unless the release
    # bound them.
    bound: dict[str, list[str]] = {}
    for key, digest in sorted((release or {}).get("artifacts", {}).items()):
        bound.setdefault(digest, []).append(key)
    used = [d for d, keys in bound.items()
            if any(k.partition("/")[0] in ("prompt", "model_config", "dataset", "tool") for k in keys)]
    seen: dict[str, dict[str, Any]] = {}
    for digest in dict.fromkeys(d for d in [row["suite"], *inputs, *used] if d):
        for key in bound.get(digest) or [""]:
            ds = _artifact_dataset(namespace, digest, artifacts, key)
            seen.setdefault(ds["name"], ds)
    failed = row.get("status") not in ("completed", "")
    run_facets: dict[str, Any] = {"lockgate_eval": _own(
        "lockgate_eval", runId=row["run_id"], release=row["release"], status=row.get("status", ""),
        nCases=int(row.get("n_cases") or 0), nErrors=int(row.get("n_errors") or 0),
        metrics={k: float(v) for k, v in (row.get("metrics") or {}).items()},
        environment={k: str(v) for k, v in (row.get("environment") or {}).items()})}
    if failed and row.get("error"):
        run_facets["errorMessage"] = _facet(ERROR, message=str(row["error"]), programmingLanguage="python")
    suite_name = artifacts.get(row["suite"], {}).get("name") or row["suite"]
    return {
        "eventType": "FAIL" if failed else "COMPLETE", "eventTime": _time(row["time"]), "producer": PRODUCER,
        "schemaURL": SCHEMA_URL,
        "run": {"runId": run_uuid(row["run_id"]), "facets": run_facets},
        "job": {"namespace": namespace, "name": f"eval/{suite_name}", "facets": {
            "jobType": _facet(JOB_TYPE, processingType="BATCH", integration="LOCKGATE", jobType="EVAL")}},
        "inputs": list(seen.values()),
        "outputs": [_eval_result(namespace, row, as_input=False)],
    }


def eval_start_event(row: Mapping[str, Any], inputs: list[str], release: Mapping[str, Any] | None,
                     artifacts: Mapping[str, Mapping[str, str]], namespace: str) -> dict[str, Any]:
    """The START RunEvent of an eval run (same runId and job as its COMPLETE/FAIL): what it will read,
    nothing written yet. `row` needs run_id, release, suite and time."""
    done = eval_event({**row, "status": "completed"}, inputs, release, artifacts, namespace)
    facets = {"lockgate_eval": _own("lockgate_eval", runId=row["run_id"], release=row["release"], status="started",
                                    environment={k: str(v) for k, v in (row.get("environment") or {}).items()})}
    return {**done, "eventType": "START", "run": {**done["run"], "facets": facets}, "outputs": []}


def decision_event(row: Mapping[str, Any], eval_row: Mapping[str, Any] | None,
                   artifacts: Mapping[str, Mapping[str, str]], namespace: str) -> dict[str, Any]:
    """The COMPLETE RunEvent of one gate decision: the eval result (with its metrics) and the policy in,
    the decision out; its parent is the eval run."""
    inputs = []
    if eval_row is not None:
        inputs.append(_eval_result(namespace, eval_row, as_input=True))
    if row.get("policy"):
        inputs.append(_artifact_dataset(namespace, row["policy"], artifacts))
    facets: dict[str, Any] = {"lockgate_decision": _own(
        "lockgate_decision", decisionId=row["id"], release=row["release"], decision=row["decision"],
        action=row.get("action", ""), actor=row.get("actor", ""), reason=row.get("reason", ""),
        keyId=row.get("key_id", ""))}
    if row.get("eval_run"):
        facets["parent"] = _facet(PARENT, run={"runId": run_uuid(row["eval_run"])},
                                  job={"namespace": namespace, "name": "eval"})
    return {
        "eventType": "COMPLETE", "eventTime": _time(row["time"]), "producer": PRODUCER, "schemaURL": SCHEMA_URL,
        "run": {"runId": run_uuid(f"{row['id']}:{row.get('action', '')}"), "facets": facets},
        "job": {"namespace": namespace, "name": f"gate/{row['release']}", "facets": {
            "jobType": _facet(JOB_TYPE, processingType="BATCH", integration="LOCKGATE", jobType="GATE")}},
        "inputs": inputs,
        "outputs": [{"namespace": namespace, "name": f"gate_decision/{row['release']}", "facets": {}}],
    }


def release_event(row: Mapping[str, Any], artifacts: Mapping[str, Mapping[str, str]],
                  namespace: str) -> dict[str, Any]:
    """The COMPLETE RunEvent of a release's registration: its artifact versions in, the release out."""
    arts = dict(row.get("artifacts") or {})
    bundle = content_hash(canonical_json(bundle_content(release_bundle(row["release"], row["app"], arts, parent=row.get("parent", ""),
                                                        tenant=row.get("tenant", "default")))))
    inputs = [_artifact_dataset(namespace, h, artifacts, k) for k, h in sorted(arts.items())]
    if row.get("parent"):
        inputs.append({"namespace": namespace, "name": f"release/{row['parent']}", "facets": {}})
    return {
        "eventType": "COMPLETE", "eventTime": _time(row["time"]), "producer": PRODUCER, "schemaURL": SCHEMA_URL,
        "run": {"runId": run_uuid(row.get("event_id") or f"release:{row['release']}"), "facets": {}},
        "job": {"namespace": namespace, "name": f"release/{row['app']}", "facets": {
            "jobType": _facet(JOB_TYPE, processingType="BATCH", integration="LOCKGATE", jobType="RELEASE")}},
        "inputs": inputs,
        "outputs": [{"namespace": namespace, "name": f"release/{row['release']}",
                     "facets": {"version": _facet(VERSION, datasetVersion=bundle)}}],
    }


def rollout_event(row: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    """A RunEvent of one rollout change: the releases taking traffic in, the deployment out. The changes of one
    rollout attempt (the router's `started_at` of it) share one runId: START at the change that began it, RUNNING
    for the next ones, then COMPLETE on promotion or ABORT. A change that is part of no attempt (a first release,
    a rollback after promotion: the router names none) is a run of its own, COMPLETE at once, so no run gets an
    event after its end. Before (probe p23 F9), the run was per deployment and release: separate canaries of a
    release were one run, and a promoted (COMPLETE) run later got the rollback's ABORT."""
    split = weights(row)
    attempt = float(row.get("started_at") or 0.0)
    if attempt:
        run_key = f"rollout:{row['deployment']}:{attempt!r}"
        state = "START" if row.get("began") else _ROLLOUT_STATE.get(row.get("phase", ""), "RUNNING")
    else:
        run_key = f"rollout-change:{row['deployment']}:{row['id']}"
        state = "COMPLETE"
    return {
        "eventType": state, "eventTime": _time(row["time"]),
        "producer": PRODUCER, "schemaURL": SCHEMA_URL,
        "run": {"runId": run_uuid(run_key), "facets": {"lockgate_rollout": _own(
            "lockgate_rollout", deployment=row["deployment"], phase=row.get("phase", ""),
            reason=row.get("reason", ""), weights=split)}},
        "job": {"namespace": namespace, "name": f"rollout/{row['deployment']}", "facets": {
            "jobType": _facet(JOB_TYPE, processingType="STREAMING", integration="LOCKGATE", jobType="ROLLOUT")}},
        "inputs": [{"namespace": namespace, "name": f"release/{r}", "facets": {}} for r in sorted(split)],
        "outputs": [{"namespace": namespace, "name": f"deployment/{row['deployment']}", "facets": {}}],
    }


def weights(row: Mapping[str, Any]) -> dict[str, float]:
    """Percent of traffic per release in one rollout state (a canary at 0% takes none)."""
    canary, w = row.get("canary_release") or "", float(row.get("canary_weight") or 0.0)
    if not canary or w <= 0:
        return {row["stable_release"]: 100.0}
    if w >= 100:
        return {canary: 100.0}
    return {row["stable_release"]: 100.0 - w, canary: w}


def events(export: Mapping[str, Any], namespace: str) -> list[dict[str, Any]]:
    """Every RunEvent of a `lineage_export` query answer, oldest first. An artifact is named as the event saw it:
    by the registration its release's tenant made first, at or before the event (`NamesAt`)."""
    regs = export.get("registrations", {})
    releases = export.get("releases", {})

    def names(release: str, time: Any) -> NamesAt:
        return NamesAt(regs, (releases.get(release) or {}).get("tenant") or DEFAULT_TENANT, time)

    evals = {e["run_id"]: e for e in export.get("evals", [])}
    out = [eval_event(e, export.get("run_inputs", {}).get(e["run_id"], []), releases.get(e["release"]),
                      names(e["release"], e["time"]), namespace) for e in evals.values()]
    out += [decision_event(d, evals.get(d.get("eval_run", "")), names(d["release"], d["time"]), namespace)
            for d in export.get("decisions", [])]
    out += [release_event(r, NamesAt(regs, r.get("tenant") or DEFAULT_TENANT, r["time"]), namespace)
            for r in export.get("registered", [])]
    out += [rollout_event(r, namespace) for r in export.get("rollouts", [])]
    return sorted(out, key=lambda ev: ev["eventTime"])
