"""`lockgate traces <id>` of a router request traced unsampled (LOCKGATE_TRACE_SAMPLE_RATIO is 0.1 by default) finds
only the sink's span of its event: it now says why, and where the request's inference event is (stored either way).
Before, it showed that one span and nothing else, and the README's "follow one request" read as if the router's span
would be there."""

from __future__ import annotations

from lockgate.contracts import InferenceEvent
from lockgate.outbox import encode_event, publish_events
from lockgate.server.runtime import Runtime
from tests.helpers import eventually, run_cli
from tests.integration import test_trace_tenants

stack = test_trace_tenants.stack  # the embedded runtime with the sink and the query service

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_a_trace_holding_only_the_sinks_span_says_the_router_span_was_not_sampled(stack: Runtime) -> None:
    bus = stack.ctx.bus
    # The router's event of an unsampled request: its trace id, and a traceparent the sink's span continues.
    event = InferenceEvent(tenant="default", app="shop", deployment="shop-web", model="gpt-4o-mini",
                           trace_id=TRACE, span_id="00f067aa0ba902b7", input_tokens=3)
    await publish_events(bus.js, bus.subjects, [encode_event(event, check=True)])
    sink = stack.services["sink"].handlers
    await eventually(lambda: stack.ctx.store.scalar(
        f"SELECT count() FROM otel_traces WHERE TraceId = '{TRACE}' AND ServiceName = 'lockgate-sink'") >= 1,
        [sink.spans], what="the sink's span of the event")
    shown = await run_cli(stack, "traces", TRACE.upper())
    assert shown.exit_code == 0, shown.output
    assert "sink.persist" in shown.stdout
    assert f"trace {TRACE.upper()} holds only the sink's span" in shown.stderr, shown.stderr
    assert "LOCKGATE_TRACE_SAMPLE_RATIO" in shown.stderr and "sampled `traceparent`" in shown.stderr
    assert f"FROM inference_events WHERE trace_id = '{TRACE}'" in shown.stderr
