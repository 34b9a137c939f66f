"""Traces from `otel_traces`: recent, by id (including spans that link to it), by release; each span with
the tenant it was sent under, and any of these scoped to one tenant."""

from __future__ import annotations

import re
from typing import Any

from lockgate.errors import ConfigError, NotFound
from lockgate.services.query.registry import Limit
from lockgate.store import Store

_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")

# A span received over OTLP. The receiver stamps each with its API key's tenant as the resource attribute
# `lockgate.tenant` (a sender naming another tenant is refused), and lockgate's own services set no such
# resource attribute: so this says the span's service name and attributes are what a tenant's sender wrote
# (`service.name=lockgate-router` among them), not what a lockgate service recorded.
_REPORTED = "mapContains(ResourceAttributes, 'lockgate.tenant')"
# The tenant a span belongs to: its sender's for a span received over OTLP; for lockgate's own, the tenant it
# names where it knows one (the sink's span of a message of one tenant's events), else '' (none).
_TENANT = f"if({_REPORTED}, ResourceAttributes['lockgate.tenant'], SpanAttributes['lockgate.tenant'])"
# One tenant's view: its spans and lockgate's own that name no tenant (the router's, the gatekeeper's).
_IN_SCOPE = f"{_TENANT} IN ({{tenant:String}}, '')"
# A span's service as a summary lists it: a sender's own claim is marked `(otlp)`, so an application's span naming
# itself `lockgate-router` is not read as lockgate's router in a trace listing (the trace itself has `origin`).
# A summary's services are an array, one entry per name: joined into one string with ',' (before, probe p10), a name
# holding commas (`lockgate-router,lockgate-sink,shop`) read as several entries, the marker on the last only.
_SERVICE = f"if({_REPORTED}, concat(ServiceName, ' (otlp)'), ServiceName)"

_SUMMARY = f"""
SELECT TraceId AS trace_id,
       min(Timestamp) AS start,
       round((max(toUnixTimestamp64Nano(Timestamp) + Duration) - min(toUnixTimestamp64Nano(Timestamp))) / 1e6, 3)
           AS duration_ms,
       count() AS spans,
       arrayStringConcat(arraySort(arrayFilter(t -> t != '', groupUniqArray({_TENANT}))), ',') AS tenants,
       arraySort(groupUniqArray({_SERVICE})) AS services,
       argMin(SpanName, Timestamp) AS root,
       countIf(StatusCode = 'Error') AS errors
FROM otel_traces
WHERE {{where}}
GROUP BY TraceId{{having}}
ORDER BY start DESC
LIMIT {{{{limit:UInt32}}}}
"""


def _summaries(store: Store, where: str, params: dict[str, Any], tenant: str | None,
               having: str = "") -> list[dict[str, Any]]:
    if tenant is not None:
        where, params = f"{where} AND {_IN_SCOPE}", params | {"tenant": tenant}
    return store.rows(_SUMMARY.format(where=where, having=having), params)


def _through(where: str, params: dict[str, Any], service: str | None,
             window: str = "1") -> tuple[str, dict[str, Any]]:
    """`where` kept to the traces that passed through lockgate's own `service` within `window` (a condition on
    Timestamp, the listing's), if a service is given."""
    if not service:
        return where, params
    # Always a lockgate service (`router` is `lockgate-router`): a span a tenant sent naming itself so is not one.
    # The listing's window bounds the subquery too: unbounded, it scanned every span ever stored on each request.
    where += (f" AND TraceId IN (SELECT TraceId FROM otel_traces WHERE {window} AND ServiceName = {{service:String}} "
              f"AND NOT {_REPORTED})")
    return where, params | {"service": service if service.startswith("lockgate-") else f"lockgate-{service}"}


_RECENT = "Timestamp > now64(9) - INTERVAL 7 DAY"  # DateTime64 bound: see _TRACE
# A trace starting after now is left out of the listing: an OTLP sender may time its spans up to
# `event_time_future_s` ahead, and 20 traces an hour ahead filled the newest-first page for that hour.
_STARTED = "min(Timestamp) <= now64(9)"


def _recent(service: str | None, tenant: str | None, limit: int) -> tuple[str, dict[str, Any], list[str]]:
    where, params = _through(_RECENT, {"limit": limit}, service, _RECENT)
    having = [f"countIf({_TENANT} = {{tenant:String}}) > 0"] if tenant is not None else []
    return where, params, having


def recent_traces(store: Store, limit: Limit = 20, service: str | None = None,
                  tenant: str | None = None) -> list[dict[str, Any]]:
    """The newest traces that have started, with their span count, tenants, services and duration; with `tenant`,
    the traces holding a span of that tenant, each summed over that tenant's spans and lockgate's own."""
    where, params, having = _recent(service, tenant, limit)
    return _summaries(store, where, params, tenant, "\nHAVING " + " AND ".join([*having, _STARTED]))


def traces_ahead(store: Store, service: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
    """[{traces, first}]: how many traces `recent_traces` leaves out because they start after now (their senders
    timed them ahead), and the earliest start among them."""
    where, params, having = _recent(service, tenant, 0)
    if tenant is not None:
        where, params = f"{where} AND {_IN_SCOPE}", params | {"tenant": tenant}
    condition = " AND ".join([*having, f"NOT ({_STARTED})"])
    return store.rows(f"SELECT count() AS traces, min(start) AS first FROM (SELECT min(Timestamp) AS start "
                      f"FROM otel_traces WHERE {where} GROUP BY TraceId HAVING {condition})", params)


def release_tenant(store: Store, release: str) -> str | None:
    """The tenant a release is registered under (its binding's, write-once), or None if nobody registered it."""
    rows = store.rows("SELECT tenant FROM releases WHERE release = {release:String} ORDER BY time LIMIT 1",
                      {"release": release})
    return str(rows[0]["tenant"]) if rows else None


def traces_for_release(store: Store, release: str, limit: Limit = 20, service: str | None = None,
                       tenant: str | None = None) -> list[dict[str, Any]]:
    """Traces whose spans are tagged with a release (router requests, evals, gate decisions), read as the
    release's tenant sees them: `tenant`, else the one the release is registered under (any tenant's spans
    name any release they like; only a release nobody registered is read across tenants); with `service`, only
    those that passed through that lockgate service, as `recent_traces`."""
    tenant = tenant if tenant is not None else release_tenant(store, release)
    tagged = "SpanAttributes['lockgate.release'] = {release:String}"
    if tenant is not None:
        tagged += f" AND {_IN_SCOPE}"
    where, params = _through(f"TraceId IN (SELECT TraceId FROM otel_traces WHERE {tagged})",
                             {"release": release, "limit": limit}, service)
    return _summaries(store, where, params, tenant)


_SPANS = f"""
SELECT Timestamp AS time, TraceId AS trace_id, SpanId AS span_id, ParentSpanId AS parent_span_id,
       {_TENANT} AS tenant, if({_REPORTED}, 'otlp', 'lockgate') AS origin,
       ServiceName AS service, SpanName AS name, SpanKind AS kind, round(Duration / 1e6, 3) AS duration_ms,
       StatusCode AS status, SpanAttributes AS attributes, TraceId != {{id:String}} AS linked
FROM otel_traces
"""
_OF_TRACE = "(TraceId = {id:String} OR has(Links.TraceId, {id:String}))"

# The seconds a trace spans (its own spans and those linking to it) from the lookup table, as
# scalars ClickHouse evaluates first, so partition and primary-key pruning see constants. The bounds are
# DateTime64 like Timestamp: against a DateTime (whole seconds) ClickHouse's min-max index, the partition
# key's, reads `Timestamp < hi` as `Timestamp <= hi - 1` (ClickHouse issue #113993) and skipped every part
# whose earliest span lay inside the window's last second, past its start: typically the part holding the
# sink's batch span that links to a request, so the trace came back without it (or empty, all parts skipped).
_TRACE = f"""
WITH (SELECT toUInt32(toUnixTimestamp(min(Start))) FROM otel_traces_trace_id_ts WHERE TraceId = {{id:String}}) AS lo,
     (SELECT toUInt32(toUnixTimestamp(max(End)) + 1) FROM otel_traces_trace_id_ts WHERE TraceId = {{id:String}}) AS hi
{_SPANS}WHERE Timestamp >= toDateTime64(lo, 9) AND Timestamp < toDateTime64(hi, 9) AND {_OF_TRACE}"""
# The same spans without the window: the answer when the window reads nothing although spans were
# stored (their lookup rows not written, e.g. gone with a truncated lookup table), so a stored trace
# is never reported missing. A trace nobody stored pays this one scan before its NotFound.
_TRACE_UNWINDOWED = f"{_SPANS}WHERE {_OF_TRACE}"


def trace(store: Store, trace_id: str, tenant: str | None = None, offset: Limit = 0,
          limit: Limit = 2**32 - 1) -> list[dict[str, Any]]:
    """Every span of one trace, plus spans that link to it (a sink batch carrying this request), each with its
    `tenant` and `origin` (`otlp`: a tenant's sender wrote it); with `tenant`, only that tenant's spans and
    lockgate's own that name none. A page of them with `offset` and `limit` (in time order): any tenant may send
    spans into a trace whose id it learns, as many as make the whole more than one reply carries.

    otel_traces is ordered by service, name and time, not by trace: the lookup table says which
    seconds hold the trace, so only those are read, however many days of spans are stored; only
    when that read finds nothing is the trace looked for without the window."""
    trace_id = trace_id.strip().lower()
    if not _TRACE_ID.match(trace_id):
        raise ConfigError(f"trace id {trace_id!r} must be 32 hex characters")
    params: dict[str, Any] = {"id": trace_id, "offset": offset, "limit": limit}
    scope = ""
    if tenant is not None:
        scope, params["tenant"] = f" AND {_IN_SCOPE}", tenant
    # Ordered in full (a span's trace and id break ties of time), so pages neither repeat nor skip a span.
    page = "\nORDER BY Timestamp, TraceId, SpanId LIMIT {limit:UInt32} OFFSET {offset:UInt32}"
    rows = (store.rows(f"{_TRACE}{scope}{page}", params)
            or store.rows(f"{_TRACE_UNWINDOWED}{scope}{page}", params))
    if not rows and offset == 0:
        of = f" of tenant {tenant!r}" if tenant is not None else ""
        raise NotFound(f"no spans{of} for trace {trace_id} ({_without_spans(store, trace_id, tenant)})")
    return rows


def _without_spans(store: Store, trace_id: str, tenant: str | None) -> str:
    """What a trace with no spans may still have: inference events an application sent with its id and no span (the
    SDK's, gRPC's), which no span will ever come for (probe p23 F7: "spans arrive within a second" sent an operator
    waiting for spans that never come)."""
    scope = " AND tenant = {tenant:String}" if tenant is not None else ""
    events = store.scalar(f"SELECT count() FROM inference_events WHERE trace_id = {{id:String}}{scope}",
                          {"id": trace_id, "tenant": tenant or ""})
    if not events:
        return "spans arrive within a second of the request"
    return (f"but {events} inference event{'s' * (events != 1)} carry it, sent without spans: "
            f"lockgate sql \"SELECT * FROM inference_events WHERE trace_id = '{trace_id}'\"")


def dead_letters(store: Store, origin: str | None = None, limit: Limit = 50) -> list[dict[str, Any]]:
    """Newest dead letters with their reason; `original` names the object holding a cut payload whole."""
    where = "origin = {origin:String}" if origin else "1"
    return store.rows(
        f"SELECT time, origin, subject, reason, error, deliveries, substring(payload, 1, 200) AS payload, original "
        f"FROM dead_letters WHERE {where} ORDER BY time DESC LIMIT {{limit:UInt32}}",
        {"origin": origin or "", "limit": limit},
    )


def dead_letter_counts(store: Store) -> list[dict[str, Any]]:
    """{origin, dead_letters}: how many dead letters each origin sent, stored (the DLQ stream keeps a letter only
    until the sink has stored it)."""
    return store.rows("SELECT origin, count() AS dead_letters FROM dead_letters GROUP BY origin ORDER BY origin")
