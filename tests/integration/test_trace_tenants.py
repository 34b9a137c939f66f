"""One tenant's spans in another tenant's traces, on the embedded runtime as `lockgate up` runs it: tenant acme,
knowing a trace id of tenant default (it travels in `traceparent`), sends over OTLP a span into that trace
signed `service.name=lockgate-router`, in error, naming default's release; and a trace of its own naming that
release. Read with the CLI: the trace shows each span's tenant and origin and says it holds two tenants' spans,
`--tenant` keeps one's, `traces --release` reads as the release's registered tenant, and `cost --by release`
keeps acme's calls apart from default's. Before, acme's span showed as lockgate's router inside default's trace,
its trace was listed among the release's, and its calls were added to the release's cost."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from lockgate.config import Settings
from lockgate.server.apikeys import KeyStore
from lockgate.server.runtime import Runtime
from tests.helpers import eventually, register_model_release, run_cli, run_cli_json

pytestmark = pytest.mark.timeout(120)

RELEASE = "shop-v2-rc2"
FORGED_SPAN = "abcdef0123456789"
ACMES_OWN_TRACE = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    """The embedded runtime with its own nats-server (a user per service) and every span exported."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0", trace_sample_ratio=1.0),
                      services=["sink", "query", "lineage", "cost", "otlp"])
    await runtime.start()
    yield runtime
    await runtime.stop()


def _defaults_trace(url: str, key: str) -> str:
    """Tenant default's application traces a request with a model call of its release; returns the trace id."""
    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=url, headers={"x-api-key": key})))
    tracer = provider.get_tracer("shop")
    with tracer.start_as_current_span("checkout") as root, tracer.start_as_current_span("chat sim-good") as call:
        call.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                             "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 10,
                             "gen_ai.usage.output_tokens": 5, "lockgate.release": RELEASE,
                             "lockgate.deployment": "shop-web"})
    provider.shutdown()
    return format(root.get_span_context().trace_id, "032x")


def _forged(trace_id: str, span_id: str) -> dict[str, Any]:
    """A failed model call naming default's release and deployment, as OTLP/JSON."""
    now = time.time_ns()
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini", "gen_ai.provider.name": "openai",
             "gen_ai.usage.input_tokens": "7", "gen_ai.usage.output_tokens": "900", "lockgate.release": RELEASE,
             "lockgate.deployment": "shop-web"}
    return {"traceId": trace_id, "spanId": span_id, "name": "chat sim-good", "kind": 3,
            "startTimeUnixNano": str(now - 50_000_000), "endTimeUnixNano": str(now),
            "status": {"code": 2, "message": "upstream failed"},
            "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attrs.items()]}


async def test_another_tenants_span_in_a_trace_is_shown_as_theirs_and_kept_out_of_the_trace_owners_views(
        stack: Runtime) -> None:
    s = stack.settings
    keys = KeyStore(s.home)
    default_key, _ = keys.create("default", "shop", "app")
    acme_key, _ = keys.create("acme", "shop", "app")
    await register_model_release(stack.ctx.bus, RELEASE, tenant="default")
    sink = stack.services["sink"].handlers
    await eventually(lambda: stack.ctx.store.scalar("SELECT count() FROM releases") == 1,
                     [sink.progress("releases")], what="the release's binding stored")

    url = stack.services["otlp"].endpoints["otlp-http"] + "/v1/traces"
    victim = await asyncio.to_thread(_defaults_trace, url, default_key)
    body = {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "lockgate-router"}}]},
        "scopeSpans": [{"spans": [_forged(victim, FORGED_SPAN), _forged(ACMES_OWN_TRACE, "abcdef0123456788")]}]}]}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers={"x-api-key": acme_key}) as resp:
        assert resp.status == 200, await resp.text()

    def stored() -> bool:
        # Both tenants' spans and events, and the sink's span of each tenant's message of events.
        spans = stack.ctx.store.scalar("SELECT count() FROM otel_traces "
                                       "WHERE ServiceName IN ('shop', 'lockgate-router')")
        sinks = stack.ctx.store.scalar("SELECT count() FROM otel_traces WHERE ServiceName = 'lockgate-sink'")
        return spans == 4 and sinks >= 2 and stack.ctx.store.scalar("SELECT count() FROM cost_ledger") == 3

    await eventually(stored, [sink.spans, sink.progress("cost_ledger")], what="spans, sink spans and ledger")

    # The trace whole: every span says whose it is; acme's "lockgate-router" span is acme's, sent over OTLP.
    spans = await run_cli_json(stack, "traces", victim)
    by_id = {r["span_id"]: r for r in spans}
    assert (by_id[FORGED_SPAN]["tenant"], by_id[FORGED_SPAN]["origin"]) == ("acme", "otlp")
    assert {(r["service"], r["tenant"], r["origin"]) for r in spans} == {
        ("shop", "default", "otlp"), ("lockgate-router", "acme", "otlp"),
        ("lockgate-sink", "default", "lockgate"), ("lockgate-sink", "acme", "lockgate")}
    table = await run_cli(stack, "traces", victim)
    assert table.exit_code == 0, table.output
    assert "tenant" in table.stdout and "acme" in table.stdout
    assert "holds spans of 2 tenants (acme, default)" in table.stderr

    # Scoped to default: none of acme's (its span, nor the sink's span of its events), and no note.
    mine = await run_cli(stack, "traces", victim, "--tenant", "default", "--json")
    assert {r["tenant"] for r in json.loads(mine.stdout)} == {"default"} and "note" not in mine.stderr
    assert len(json.loads(mine.stdout)) == 3  # checkout, the model call and the sink's span of its event

    # The release's traces, as the tenant it is registered under sees them: acme's own trace is not one, and
    # acme's failed span does not count in default's.
    listed = await run_cli_json(stack, "traces", "--release", RELEASE)
    assert [(r["trace_id"], r["tenants"], r["errors"], r["spans"]) for r in listed] == [(victim, "default", 0, 3)]
    theirs = await run_cli_json(stack, "traces", "--release", RELEASE, "--tenant", "acme")
    assert {(r["trace_id"], r["tenants"], r["errors"]) for r in theirs} == {(victim, "acme", 1),
                                                                           (ACMES_OWN_TRACE, "acme", 1)}
    # `--service router` is lockgate's router: a span naming itself so over OTLP is not.
    assert await run_cli_json(stack, "traces", "--service", "router") == []
    recent = {r["trace_id"]: r["tenants"] for r in await run_cli_json(stack, "traces")}
    assert (recent[victim], recent[ACMES_OWN_TRACE]) == ("acme,default", "acme")
    acmes = await run_cli_json(stack, "traces", "--tenant", "acme")
    assert {(r["trace_id"], r["tenants"], r["spans"]) for r in acmes} == {(victim, "acme", 2),
                                                                          (ACMES_OWN_TRACE, "acme", 1)}

    # Cost by release is by tenant and release: acme's calls naming default's release are acme's.
    cost = await run_cli_json(stack, "cost", "--by", "release")
    assert {(r["tenant"], r["release"]): r["calls"] for r in cost} == {("default", RELEASE): 1, ("acme", RELEASE): 2}
    shown = await run_cli(stack, "cost", "--by", "release")
    assert shown.exit_code == 0 and "tenant" in shown.stdout and "acme" in shown.stdout


def _named(url: str, key: str, service: str) -> str:
    """A trace of one span naming the release, from an application whose `service.name` is `service`; its id."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=url, headers={"x-api-key": key})))
    with provider.get_tracer("shop").start_as_current_span("chat sim-good") as span:
        span.set_attribute("lockgate.release", RELEASE)
    provider.shutdown()
    return format(span.get_span_context().trace_id, "032x")


def _services_cells(table: str) -> dict[str, str]:
    """{trace id: its `services` cell} of a trace listing's table, the lines a long cell wraps onto joined and its
    whitespace dropped (where the table wraps a cell is the terminal's width, not the listing's)."""
    cells: dict[str, str] = {}
    trace_id = ""
    for line in table.splitlines():
        if line.startswith("│"):
            row = [c.strip() for c in line.strip().strip("│").split("│")]
            trace_id = row[0] or trace_id  # a cell's continuation lines leave the trace id blank
            cells[trace_id] = cells.get(trace_id, "") + "".join(row[5].split())
    return cells


async def test_each_service_of_a_trace_listing_is_marked_whatever_its_name_holds(stack: Runtime) -> None:
    # Probe p10 F4: the listing's services were one string joined with ',' and the marker was appended to the
    # whole name, so acme's span named `lockgate-router,lockgate-sink,shop` listed as lockgate's router and sink
    # beside its own `shop (otlp)`.
    acme_key, _ = KeyStore(stack.settings.home).create("acme", "shop", "app")
    url = stack.services["otlp"].endpoints["otlp-http"] + "/v1/traces"
    commas, quotes = "lockgate-router,lockgate-sink,shop", 'lockgate-router", "shop'
    ids = {await asyncio.to_thread(_named, url, acme_key, name): name for name in (commas, quotes)}
    await eventually(lambda: stack.ctx.store.scalar("SELECT count() FROM otel_traces") == 2,
                     [stack.services["sink"].handlers.spans], what="acme's two spans stored")

    # Each name is one entry with its marker, in the recent listing and the release's alike.
    for listing in (["traces"], ["traces", "--release", RELEASE]):
        rows = await run_cli_json(stack, *listing)
        assert {r["trace_id"]: r["services"] for r in rows} == {i: [f"{n} (otlp)"] for i, n in ids.items()}
        table = await run_cli(stack, *listing)
        assert table.exit_code == 0, table.output
        # The table quotes each entry: the whole name and its marker in one quoted string, `"` escaped.
        assert _services_cells(table.stdout) == {i: "".join(json.dumps(f"{n} (otlp)").split())
                                                 for i, n in ids.items()}, table.stdout
