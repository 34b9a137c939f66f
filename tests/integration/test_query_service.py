"""The query service on a real nats-server and chDB: the one reader of ClickHouse for the CLI and
the other services."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts.inference import REQUEST_DIGEST
from lockgate.errors import ConfigError, NotFound, QueryRefused, QueryUnavailable, ReplyTooLarge, Retryable
from lockgate.queryclient import NoQueryService, ask, ask_pages, decode_reply
from lockgate.server.service import ServiceContext
from lockgate.services.evaluator import persist
from lockgate.store import Store
from tests.helpers import sink_stored

pytestmark = pytest.mark.timeout(90)

CASE_COLUMNS = ("run_id", "case_id", "repeat", "release", "input", "expected", "output", "scores", "latency_ms",
                "input_tokens", "output_tokens", "error", "time", "details")

# Every kind of value a result row carries: times, dates, maps, arrays, tuples, decimals, UUIDs,
# NaN and text outside ASCII.
TYPED_SQL = ("SELECT toDateTime64('2024-05-06 07:08:09.123456', 6, 'UTC') AS t, toDate('2024-05-06') AS d, "
             "map('k', 1.5) AS m, [1, 2] AS arr, (1, 'é') AS tup, toDecimal64(1.5, 4) AS dec, nan AS n, "
             "toUUID('00000000-0000-0000-0000-000000000001') AS u, 'naïve ✓' AS s, 0.1 + 0.2 AS f")


def _cli(settings: Settings, *args: str) -> str:
    from lockgate.cli.main import cli

    env = {"LOCKGATE_NATS_URL": settings.nats_url, "LOCKGATE_PREFIX": settings.prefix,
           "LOCKGATE_DATABASE": settings.database, "LOCKGATE_CLICKHOUSE_URL": settings.clickhouse_url}
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _decision_row(release: str, when: datetime) -> list[Any]:
    rules = json.dumps([{"rule": "quality", "verdict": "FAIL", "observed": 0.5}])
    return ["d-" + release, when, release, "decided", "gatekeeper", "BLOCK", "run-1", "policy", "", rules,
            "quality below 0.8 — see the rule", "sig", "key-1", "acme"]


async def test_same_query_prints_identical_json_from_the_stack_and_directly(
    run_services: Callable[..., Any], store: Store, settings: Settings
) -> None:
    query = (await run_services("query"))["query"]
    columns = ("id", "time", "release", "action", "actor", "decision", "eval_run", "policy", "baseline", "rules",
               "reason", "signature", "key_id", "tenant")
    store.insert_rows("gate_decisions", columns, [_decision_row("shop-v2", datetime(2024, 5, 6, 7, 8, 9, 123456))],
                      token=None)
    for args in (("sql", TYPED_SQL), ("decisions",), ("cost", "--by", "app,day")):
        before = query.handlers.answered.count
        # The CLI runs its own event loop, as it does from a shell; this loop keeps serving it.
        through_stack = await asyncio.to_thread(_cli, settings, *args, "--json")
        assert query.handlers.answered.count == before + 1  # the stack answered, not a fallback
        direct = await asyncio.to_thread(_cli, settings, "--clickhouse", settings.clickhouse_url, *args, "--json")
        assert through_stack == direct, args
    row = json.loads(await asyncio.to_thread(_cli, settings, "sql", TYPED_SQL, "--json"))[0]
    assert row["t"] == "2024-05-06T07:08:09.123456Z" and row["d"] == "2024-05-06"
    assert row["m"] == {"k": 1.5} and row["tup"] == [1, "é"] and row["n"] is None and row["s"] == "naïve ✓"
    decisions = json.loads(await asyncio.to_thread(_cli, settings, "decisions", "--json"))
    assert decisions[0]["rules"][0]["rule"] == "quality" and decisions[0]["reason"].endswith("see the rule")


async def test_every_time_a_command_answers_in_json_says_it_is_utc_from_the_stack_and_directly(
    run_services: Callable[..., Any], bus: Bus, store: Store, settings: Settings
) -> None:
    """`--json` wrote ClickHouse's UTC times with no offset ("2024-05-06T07:08:09.123456"), which a script in
    another time zone reads as its own local time; a time a query echoes (`history --at`) too."""
    from lockgate.contracts import RolloutState

    svcs = await run_services("sink", "query")
    decided = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    columns = ("id", "time", "release", "action", "actor", "decision", "eval_run", "policy", "baseline", "rules",
               "reason", "signature", "key_id", "tenant")
    store.insert_rows("gate_decisions", columns, [_decision_row("shop-v2", decided)], token=None)
    changed = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    await bus.publish(bus.subjects.rollout("checkout"),
                      RolloutState(time=changed, deployment="checkout", stable_release="rel-1", phase="idle"))
    await sink_stored(svcs["sink"].handlers, rollout_events=1)

    def times(value: Any) -> list[str]:  # every string in the document that is an ISO 8601 time
        if isinstance(value, dict):
            return [t for v in value.values() for t in times(v)]
        if isinstance(value, list):
            return [t for v in value for t in times(v)]
        return [value] if isinstance(value, str) and len(value) > 16 and value[10:11] == "T" else []

    for direct in ((), ("--clickhouse", settings.clickhouse_url)):
        sql = json.loads(await asyncio.to_thread(_cli, settings, *direct, "sql", TYPED_SQL, "--json"))
        decisions = json.loads(await asyncio.to_thread(_cli, settings, *direct, "decisions", "--json"))
        # --at with no offset is UTC, and the reply echoes it as UTC.
        history = json.loads(await asyncio.to_thread(_cli, settings, *direct, "history", "checkout", "--at",
                                                     "2026-12-01T09:30:00", "--json"))
        assert datetime.fromisoformat(sql[0]["t"]) == datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC), direct
        assert datetime.fromisoformat(decisions[0]["time"]) == decided, direct
        assert datetime.fromisoformat(history["at"]) == changed + timedelta(minutes=30), direct
        assert datetime.fromisoformat(history["serving"]["since"]) == changed, direct
        found = times([sql, decisions, history])
        assert len(found) >= 5 and all(t.endswith(("Z", "+00:00")) for t in found), (direct, found)
    # A table says its times are UTC as well.
    assert "2024-05-06T07:08:09.123456Z" in await asyncio.to_thread(_cli, settings, "sql", TYPED_SQL)


async def test_drift_json_names_each_features_own_test_for_what_it_is(
    run_services: Callable[..., Any], bus: Bus, settings: Settings
) -> None:
    """`lockgate drift --json` gave a categorical feature's chi-squared statistic under `ks_stat` (probe)."""
    from lockgate.contracts import DriftReport, FeatureDrift

    svcs = await run_services("sink", "query")
    now = datetime(2026, 12, 6, 19, 0, tzinfo=UTC)
    features = [
        FeatureDrift(feature="latency_ms", psi=0.3, ks_stat=0.5, ks_pvalue=0.01, reference_mean=1.0, current_mean=2.0,
                     drifted=True, test="ks", statistic=0.5, p_value=0.01, threshold=0.05, test_drifted=True),
        FeatureDrift(feature="finish_reason:length", psi=2.1, ks_stat=93.0, ks_pvalue=1e-9, reference_mean=0.0,
                     current_mean=0.9, drifted=True, test="z", statistic=9.6, p_value=1e-9, threshold=0.05,
                     test_drifted=True),
        FeatureDrift(feature="response_text", psi=0.0, ks_stat=0.2, ks_pvalue=0.04, reference_mean=0.9,
                     current_mean=0.8, drifted=False, test="embedding_mean_distance", statistic=0.2, p_value=0.04,
                     threshold=0.05, test_drifted=True),
    ]
    # A report from before the test selection: only the kind's own test.
    old = [FeatureDrift(feature="status:error", psi=0.4, ks_stat=12.0, ks_pvalue=0.002, reference_mean=0.0,
                        current_mean=0.2, drifted=True)]
    for deployment, feats in (("web", features), ("old", old)):
        await bus.publish(bus.subjects.drift(deployment), DriftReport(
            deployment=deployment, window_start=now, window_end=now, reference_n=50, current_n=50, drifted=True,
            features=feats))
    await sink_stored(svcs["sink"].handlers, drift_reports=2)  # reports (messages), not rows

    for direct in ((), ("--clickhouse", settings.clickhouse_url)):
        shown = json.loads(await asyncio.to_thread(_cli, settings, *direct, "drift", "--deployment", "web", "--json"))
        by = {f["feature"]: f for f in shown[0]["features"]}
        assert (by["latency_ms"]["ks_stat"], by["latency_ms"]["ks_pvalue"]) == (0.5, 0.01), direct
        cat = by["finish_reason:length"]
        assert (cat["chi2_stat"], cat["chi2_pvalue"]) == (93.0, 1e-9) and "ks_stat" not in cat, direct
        assert (cat["test"], cat["statistic"]) == ("z", 9.6)  # the chosen test, as before
        text = by["response_text"]
        assert "ks_stat" not in text and "chi2_stat" not in text and text["statistic"] == 0.2, direct
        assert shown[0]["window_start"].endswith("Z")
    table = await asyncio.to_thread(_cli, settings, "drift", "--deployment", "old")
    assert "chi_squared p=0.002" in table and "ks p=" not in table


async def test_drift_table_ties_each_row_to_the_releases_and_window_it_compares(
    run_services: Callable[..., Any], bus: Bus, settings: Settings
) -> None:
    """Probe p61 F5: the table had neither the releases a canary-vs-stable row compares nor its window's times (only
    `--json` did), so with two canaries on one deployment a DRIFT row could not be tied to its canary."""
    from lockgate.contracts import DriftReport, FeatureDrift

    svcs = await run_services("sink", "query")
    t0 = datetime(2026, 12, 6, 19, 0, tzinfo=UTC)

    def feature(drifted: bool) -> FeatureDrift:
        return FeatureDrift(feature="output_tokens", psi=0.9 if drifted else 0.01, ks_stat=0.5, ks_pvalue=0.01,
                            reference_mean=10.0, current_mean=40.0 if drifted else 10.0, drifted=drifted)

    reports = [  # two canaries of one deployment, one drifting, and the deployment against its reference
        DriftReport(deployment="multi", window_start=t0, window_end=t0 + timedelta(minutes=5), reference_n=50,
                    current_n=50, features=[feature(True)], drifted=True, comparison="canary_vs_stable",
                    release="shop-v2", reference_release="shop-v1", served=True, time=t0 + timedelta(minutes=5)),
        DriftReport(deployment="multi", window_start=t0 + timedelta(minutes=1), window_end=t0 + timedelta(minutes=6),
                    reference_n=50, current_n=50, features=[feature(False)], drifted=False,
                    comparison="canary_vs_stable", release="shop-v3", reference_release="shop-v1", served=True,
                    time=t0 + timedelta(minutes=6)),
        DriftReport(deployment="multi", window_start=t0 + timedelta(minutes=2), window_end=t0 + timedelta(minutes=7),
                    reference_n=50, current_n=50, features=[feature(False)], drifted=False, served=True,
                    time=t0 + timedelta(minutes=7)),
    ]
    for report in reports:
        await bus.publish(bus.subjects.drift("multi"), report)
    await sink_stored(svcs["sink"].handlers, drift_reports=3)

    table = await asyncio.to_thread(_cli, settings, "drift", "--deployment", "multi")
    # One record per row (too wide for a pipe's 160 columns), newest first; each names its releases and window.
    records = [dict(line.strip().split(None, 1) for line in record.strip().splitlines()[1:])
               for record in table.split("-[")[1:]]
    assert [(r["releases"], r["window"], r["n"], r["drifted"]) for r in records] == [
        ("-", "2026-12-06T19:02:00Z, 2026-12-06T19:07:00Z", "50 vs 50", "-"),
        ("shop-v3 vs shop-v1", "2026-12-06T19:01:00Z, 2026-12-06T19:06:00Z", "50 vs 50", "-"),
        ("shop-v2 vs shop-v1", "2026-12-06T19:00:00Z, 2026-12-06T19:05:00Z", "50 vs 50", "DRIFT"),
    ], table
    # Read from ClickHouse directly, alike.
    assert await asyncio.to_thread(_cli, settings, "--clickhouse", settings.clickhouse_url, "drift", "--deployment",
                                   "multi") == table


async def test_errors_come_back_as_the_lockgate_error_they_were(run_services: Callable[..., Any], bus: Bus,
                                                                store: Store) -> None:
    await run_services("query")
    with pytest.raises(ConfigError, match="unknown query 'nope'"):
        await ask(bus, "nope")
    with pytest.raises(ConfigError, match="32 hex characters"):
        await ask(bus, "trace", {"trace_id": "not-a-trace"})
    with pytest.raises(NotFound, match="no spans for trace .* arrive within a second"):
        await ask(bus, "trace", {"trace_id": "0" * 32})
    # An application's events sent without spans (the SDK's): said, with where to read them, not "wait for spans"
    # that never come (probe p23 F7).
    store.insert_rows("inference_events", ("id", "time", "tenant", "app", "trace_id"),
                      [["sdk-1", datetime(2024, 1, 1), "acme", "shop", "1" * 32]], token=None)
    with pytest.raises(NotFound, match="but 1 inference event carry it, sent without spans: lockgate sql"):
        await ask(bus, "trace", {"trace_id": "1" * 32})
    with pytest.raises(NotFound, match="of tenant 'evil' .* arrive within a second"):  # another tenant's: not said
        await ask(bus, "trace", {"trace_id": "1" * 32, "tenant": "evil"})
    with pytest.raises(ConfigError, match="no argument 'colour'"):
        await ask(bus, "decisions", {"colour": "red"})
    with pytest.raises(ConfigError, match="needs 'run_id'"):
        await ask(bus, "eval_cases", {})
    with pytest.raises(ConfigError, match="argument 'limit'"):
        await ask(bus, "decisions", {"limit": "many"})
    with pytest.raises(ConfigError, match="cannot group cost by 'colour'"):
        await ask(bus, "cost_rollup", {"by": ["colour"]})
    # a typed argument arrives as JSON text and is converted at the edge
    since = datetime.now(UTC) - timedelta(days=1)
    assert await ask(bus, "cost_rollup", {"by": ["app"], "since": since}) == []
    # Arguments nested deeper than Python's recursion limit (a probe's 200,000 `[`): answered with the reason,
    # never left to time out unanswered.
    deep = b'{"query": "decisions", "args": {"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}"
    with pytest.raises(ConfigError, match="nested too deeply"):
        decode_reply((await bus.nc.request(bus.subjects.query, deep, timeout=10)).data, "decisions")


async def test_a_limit_or_time_clickhouse_cannot_take_is_refused_at_the_edge_not_called_an_outage(
        run_services: Callable[..., Any], bus: Bus) -> None:
    """A negative limit, or a time before 1970, went on to ClickHouse and came back as its parse error
    under the kind StoreUnavailable (retryable): a caller waited and retried a request that could never
    succeed, and `decisions` answered the same -1 with no rows at all."""
    await run_services("query")
    for query, args in [("dead_letters", {"limit": -1}), ("recent_traces", {"limit": -5}),
                        ("decisions", {"limit": -1}), ("recent_traces", {"limit": 2**70})]:
        with pytest.raises(ConfigError, match="argument 'limit'") as caught:
            await ask(bus, query, args)
        assert not isinstance(caught.value, Retryable)
    for query, args in [("cost_rollup", {"since": "0001-01-01T00:00:00Z"}),
                        ("serving_history", {"deployment": "web", "at": "0001-01-01T00:00:00"})]:
        with pytest.raises(ConfigError, match="outside the times lockgate stores"):
            await ask(bus, query, args)
    assert await ask(bus, "dead_letters", {"limit": 0}) == []
    assert await ask(bus, "cost_rollup", {"since": "1970-01-01T00:00:00Z"}) == []


async def test_a_reply_too_large_for_one_message_is_an_error_not_silence(
    run_services: Callable[..., Any], bus: Bus
) -> None:
    await run_services("query")
    # Operator SQL stops reading at what one message carries (probe p44 F1), and says so; a named query is answered
    # ReplyTooLarge (test_large_runs_arrive_page_by_page_without_gaps_or_repeats).
    with pytest.raises(QueryRefused, match=rf"at most 100,000 rows and {bus.nc.max_payload:,} bytes"):
        await ask(bus, "sql", {"query": "SELECT repeat('x', 1000) AS s FROM numbers(2000)"})
    # the service keeps answering afterwards
    assert await ask(bus, "sql", {"query": "SELECT 1 AS one"}) == [{"one": 1}]


async def test_large_runs_arrive_page_by_page_without_gaps_or_repeats(
    run_services: Callable[..., Any], bus: Bus, store: Store
) -> None:
    await run_services("query")
    now = datetime.now(UTC).replace(tzinfo=None)
    # 40 cases x 60 kB do not fit in one 1 MB message; the case stored twice (a redelivered
    # batch) is still read once.
    rows = [["run-big", f"c{i:02d}", r, "v1", "in", "", "x" * 60_000, {"exact_match": 1.0}, 1.5, 3, 4, "", now, ""]
            for i in range(20) for r in range(2)]
    store.insert_rows("eval_cases", CASE_COLUMNS, rows, token=None)
    store.insert_rows("eval_cases", CASE_COLUMNS, rows[7:8], token=None)
    with pytest.raises(ReplyTooLarge):
        await ask(bus, "eval_case_results", {"run_id": "run-big"})
    results = await persist.run_cases(bus, "run-big")
    assert [(r.case_id, r.repeat) for r in results] == [(f"c{i:02d}", r) for i in range(20) for r in range(2)]
    assert results[0].scores == {"exact_match": 1.0} and results[0].output_tokens == 4

    # recorded outputs page by (time, id), newest first, one row per event id; only the events a router
    # served to the tenant asked for (an application's own, or another tenant's, are never recorded outputs)
    base = datetime(2024, 1, 1)
    # Only chat requests with the router's request digest are recorded outputs, failed ones too, cache replays not.
    digest = {REQUEST_DIGEST: "sha256:" + "0" * 64}
    events = [[f"e{i:03d}", base + timedelta(seconds=i // 3), "acme", True, "shop", "v1", f"p{i}", "r" * 30_000,
               digest] for i in range(60)]
    others = [[f"x{i}", base, tenant, served, "shop", "v1", "p1", "forged", digest]
              for i, (tenant, served) in enumerate([("acme", False), ("evil", True), ("evil", False)])]
    others += [["undigested", base, "acme", True, "shop", "v1", "p1", "a", {}],
               ["replayed", base, "acme", True, "shop", "v1", "p1", "a", {**digest, "cache": "hit"}]]
    columns = ("id", "time", "tenant", "served", "app", "release", "prompt", "response", "attributes")
    store.insert_rows("inference_events", columns, events + others, token=None)
    store.insert_rows("inference_events", columns, events[10:12], token=None)
    got = await ask_pages(bus, "recorded_events", {"app": "shop", "release": "v1", "tenant": "acme"}, page=7,
                          after=lambda r: {"before_us": r["time_us"], "before_id": r["id"]})
    assert [e["id"] for e in got] == [f"e{i:03d}" for i in reversed(range(60))]
    assert got[0]["digest"] == digest[REQUEST_DIGEST] and set(got[0]) >= {"status", "error_type", "response"}
    since = await persist.recorded_events(bus, "shop", "v1", "2024-01-01T00:00:19", "acme")
    assert {e["id"] for e in since} == {f"e{i:03d}" for i in range(57, 60)}
    assert [e["id"] for e in await persist.recorded_events(bus, "shop", "v1", "", "evil")] == ["x1"]
    with pytest.raises(ConfigError, match="needs 'tenant'"):  # no tenant, no events: never every tenant's
        await ask(bus, "recorded_events", {"app": "shop", "release": "v1"})


async def test_replicas_in_one_queue_group_share_the_requests(
    run_services: Callable[..., Any], context: ServiceContext, bus: Bus
) -> None:
    from lockgate.services.query.app import create

    first = (await run_services("query"))["query"]
    second = create(context)
    await second.start()
    try:
        for _ in range(40):
            assert await ask(bus, "sql", {"query": "SELECT 1 AS one"}) == [{"one": 1}]
    finally:
        await second.stop()
    counts = (first.handlers.answered.count, second.handlers.answered.count)
    assert sum(counts) == 40 and min(counts) > 0  # each request was answered once, by either replica


async def test_a_long_operator_query_does_not_hold_up_the_services_named_queries(
    run_services: Callable[..., Any], bus: Bus, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Operator SQL may run for 25 s; answered in the same turn as the named queries, one viewer's query
    # made the gatekeeper's and the evaluator's queries wait that long (their timeout is 30 s).
    entered, release = threading.Event(), threading.Event()
    readonly_rows = store.readonly_rows

    def held(sql: str, parameters: dict[str, Any] | None = None, **bounds: Any) -> list[dict[str, Any]]:
        if "held" in sql and bounds:  # the statement itself, not the parser's checks of it
            entered.set()
            release.wait(timeout=60)
        return readonly_rows(sql, parameters, **bounds)

    monkeypatch.setattr(store, "readonly_rows", held)
    await run_services("query")
    operator = asyncio.create_task(ask(bus, "sql", {"query": "SELECT 1 AS held"}))
    try:
        await asyncio.to_thread(entered.wait, 30)
        assert await ask(bus, "decisions", {}, timeout_s=10) == []  # answered while the operator's runs
        assert not operator.done()
    finally:
        release.set()
    assert await operator == [{"held": 1}]


async def test_without_a_query_service_a_read_is_retryable(bus: Bus) -> None:
    with pytest.raises(NoQueryService) as err:
        await ask(bus, "decisions")
    assert isinstance(err.value, QueryUnavailable) and isinstance(err.value, Retryable)


async def test_values_a_sender_chose_are_shown_as_data_never_as_markup_or_terminal_control(
    run_services: Callable[..., Any], settings: Settings
) -> None:
    # Before (probe p10, F1 and F2): a `[/]` in a stored value (a span or service name, a model, a dead letter) ended
    # every operator's table in a rich MarkupError traceback, exit 1; `[conceal]` hid what followed; and ESC
    # sequences reached the terminal raw (erasing and redrawing the cells that say whose a span is).
    await run_services("query")
    shown = await asyncio.to_thread(_cli, settings, "sql", "SELECT 'checkout[/] (otlp)' AS svc, "
                                    "concat('a', char(27), '[2Kb[conceal]c') AS name")
    assert "checkout[/] (otlp)" in shown and "a\\x1b[2Kb[conceal]c" in shown, shown
    assert "\x1b" not in shown
    # An error line is data too: the name asked for is shown as it was given.
    from lockgate.cli.main import cli

    missing = await asyncio.to_thread(CliRunner().invoke, cli, ["lineage", "[/x]"], env={
        "LOCKGATE_NATS_URL": settings.nats_url, "LOCKGATE_PREFIX": settings.prefix,
        "LOCKGATE_DATABASE": settings.database, "LOCKGATE_CLICKHOUSE_URL": settings.clickhouse_url})
    assert missing.exit_code != 0 and "Traceback" not in missing.output, missing.output
    assert len(missing.stderr.splitlines()) == 1 and "[/x]" in missing.stderr, missing.stderr


SCORE_COLUMNS = ("time", "tenant", "event_id", "app", "deployment", "variant", "release", "scorer", "value", "served")


async def test_a_deployments_scores_are_its_tenants_served_answers_and_say_whose(
        run_services: Callable[..., Any], store: Store, settings: Settings) -> None:
    """Probe p25 F3: tenant acme's own events naming tenant default's deployment, release and canary were scored
    (served = false) and `lockgate scores` merged them into the canary's row: their e-mail addresses read as the canary
    leaking PII. A deployment's scores are its tenant's served answers; --tenant and --all show the others, marked."""
    await run_services("query")
    now = datetime.now(UTC) - timedelta(minutes=1)
    store.insert_rows("releases", ("release", "app", "tenant", "time", "event_id"),
                      [["shop-v1", "shop", "default", now, "r1"], ["shop-v2", "shop", "default", now, "r2"],
                       ["acme-v1", "shop", "acme", now, "r3"]], token=None)
    store.insert_rows("rollout_events", ("id", "time", "deployment", "stable_release", "canary_release", "phase"),
                      [["ro-1", now, "shop-web", "shop-v1", "shop-v2", "progressing"]], token=None)

    def scores(tenant: str, event: str, release: str, variant: str, value: float, served: bool,
               deployment: str = "shop-web") -> list[Any]:
        return [now, tenant, event, "shop", deployment, variant, release, "pii_free", value, served]

    store.insert_rows("inference_scores", SCORE_COLUMNS, [
        *(scores("default", f"e-{i}", "shop-v2", "canary", 1.0, True) for i in range(3)),
        # acme's application's own events naming default's canary (and one of its answers' ids)
        *(scores("acme", f"e-{i}", "shop-v2", "canary", 0.0, False) for i in range(5)),
        # acme's key under passthrough: served under the name, as a release nobody rolled out there
        *(scores("acme", f"p-{i}", "", "stable", 0.0, True) for i in range(2)),
        scores("default", "own-1", "shop-v2", "canary", 0.5, False),  # default's application's own event
        # a deployment no route change names: every tenant's served answers, each row saying whose
        scores("default", "c-1", "r", "stable", 1.0, True, "chat"), scores("acme", "c-2", "r", "stable", 0.0, True, "chat"),
    ], token=None)

    async def cli(*args: str) -> str:
        return await asyncio.to_thread(_cli, settings, "scores", *args)

    async def read(*args: str) -> list[tuple[Any, ...]]:
        rows = json.loads(await cli(*args, "--json"))
        return [(r["tenant"], r["served"], r["release"], r["variant"], r["scored"], r["mean"]) for r in rows]

    merged = json.loads(await cli("shop-web", "--json"))  # before: 9 canary answers, mean 0.39; 2 stable, 0.0
    assert [(r["release"], r["variant"], r["scored"], r["mean"]) for r in merged] == [("shop-v2", "canary", 3, 1.0)]
    assert await read("shop-web") == [("default", True, "shop-v2", "canary", 3, 1.0)]
    assert await read("shop-web", "--tenant", "acme") == [("acme", True, "", "stable", 2, 0.0)]
    assert await read("shop-web", "--all") == [("acme", True, "", "stable", 2, 0.0), ("acme", False, "shop-v2", "canary", 5, 0.0),
                                         ("default", True, "shop-v2", "canary", 3, 1.0),
                                         ("default", False, "shop-v2", "canary", 1, 0.5)]
    assert await read("shop-web", "--all", "--tenant", "default") == [("default", True, "shop-v2", "canary", 3, 1.0),
                                                                ("default", False, "shop-v2", "canary", 1, 0.5)]
    assert await read("chat") == [("acme", True, "r", "stable", 1, 0.0), ("default", True, "r", "stable", 1, 1.0)]
    # One answer's scores: another tenant's event may take its id.
    one = json.loads(await cli("shop-web", "--event", "e-0", "--json"))
    assert [(r["tenant"], r["served"], r["value"]) for r in one] == [("default", True, 1.0)]
    table = await cli("shop-web")
    assert "tenant" in table and "served" in table and "its tenant's answers a router served" in table
