"""Trace context across the bus: `traceparent` written into a message's headers and read back (W3C Trace
Context), so a consumer's span continues its producer's trace."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("lockgate.telemetry")
_propagator = TraceContextTextMapPropagator()
_getter = DefaultGetter()


def inject(headers: dict[str, str]) -> None:
    """Add `traceparent` for the current span, if any."""
    try:
        _propagator.inject(headers)
    except Exception:  # telemetry never fails a request
        log.debug("traceparent inject failed", exc_info=True)


def extract(headers: dict[str, str]) -> Any:
    """An OTel context from `traceparent` headers (empty context if absent or malformed)."""
    try:
        return _propagator.extract(headers, getter=_getter)
    except Exception:
        return None
