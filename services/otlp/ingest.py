"""What both OTLP transports do with a request: authenticate, map, publish, answer.

Nothing is dropped silently: a span is stored, or refused and counted in the answer's partial
success, or the whole request is answered with a retryable status (the bus did not acknowledge,
or too many requests are in flight, or its tenant holds its share of them) so the exporter sends it again. A
re-sent request publishes the same message ids and event ids, so JetStream and the sink keep one copy.

A partial success reaches the sender's exporter only, and the OpenTelemetry Python exporters ignore it (they log
nothing): so each refusal (a span refused, a model call stored with no inference event) is also counted here
(`lockgate.events.dropped`, reasons `refused` and `no_event`) and logged at WARNING, at most once a minute per API
key with the count since (`RefusalLog`: one line per export would let a sender flood the log). They are not
dead-lettered: the sender's spans are not a stream's messages, and one sender could fill the DLQ the services'
own bad messages need.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from lockgate import metrics
from lockgate.bus import Bus
from lockgate.encoded import Encoded
from lockgate.errors import BusUnavailable, InvalidEvent
from lockgate.limits import EventLimits
from lockgate.outbox import ANSWER_WITHIN_S, encode_event, per_message, publish_events
from lockgate.redact import scrub_secrets
from lockgate.retry import RetryPolicy
from lockgate.server.apikeys import ApiKey, KeyStore, bearer
from lockgate.server.offloop import OffLoop
from lockgate.server.service import Progress
from lockgate.services.otlp import domain, genai, wire
from lockgate.spanbatches import Message, span_batches, span_bytes

log = logging.getLogger("lockgate.otlp")

# The exporter retries a refused request itself (with our retry delay): a short retry here rides
# out a blip without holding its request for the many seconds the SDK's outbox waits.
RETRY = RetryPolicy(attempts=3, initial_s=0.05, max_s=0.5)


# The most of the receiver's in-flight slots, and of its decode threads, one tenant's exports hold at once: the other
# half stays for the other tenants (probe p89 F1), as of the OTLP/HTTP bodies being received (bodies.TENANT_BODIES).
TENANT_SHARE = 0.5

REFUSED_LOG_S = 60.0  # one key's refusals are logged at most once in this long


class RefusalLog:
    """Refusals per API key, logged at WARNING at most once every `every_s` per key with the counts since."""

    def __init__(self, every_s: float = REFUSED_LOG_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self._clock = every_s, clock
        self._unlogged: dict[str, tuple[int, int, int]] = {}  # key label -> exports, spans refused, no event
        self._next: dict[str, float] = {}  # key label -> monotonic time from which it is logged again

    def note(self, label: str, decoded: domain.Decoded) -> None:
        """Count one export's refusals, and log them with the others unlogged if the key's minute is over."""
        exports, spans, no_event = self._unlogged.get(label, (0, 0, 0))
        exports, spans, no_event = exports + 1, spans + decoded.rejected, no_event + decoded.no_event
        now = self._clock()
        if now < self._next.get(label, 0.0):
            self._unlogged[label] = (exports, spans, no_event)
            return
        self._unlogged.pop(label, None)
        self._next[label] = now + self.every_s
        log.warning("OTLP exports refused in part from %s: %d span(s) refused and %d model call(s) stored with no "
                    "inference event, in %d export(s) (the latest: %s). Each was told in the answer's "
                    "partial_success, which the OpenTelemetry Python exporters do not log. Logged at most once "
                    "every %g s per key", label, spans, no_event, exports, _shown(decoded.problems[0]), self.every_s)


# The most of a refusal's reason a log line shows: it quotes what the sender wrote (a span's name), at any length.
SHOWN_CHARS = 300


def _shown(problem: str) -> str:
    """A refusal's reason as logged: secrets scrubbed (as the span's stored name is) and cut to SHOWN_CHARS (one
    2 MB span name was one 2 MB log line, `Bearer sk-...` in it: probe p10)."""
    text = scrub_secrets(problem)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"


class Receiver:
    """The transport-independent receiver: one per service, shared by the gRPC and HTTP servers."""

    def __init__(self, bus: Bus, keys: KeyStore, *, limits: EventLimits | None = None, max_in_flight: int = 64,
                 retry_after_s: float = 1.0, decode_threads: int | None = None, tenant_share: float = TENANT_SHARE,
                 answer_within_s: float = ANSWER_WITHIN_S) -> None:
        self.bus = bus
        self.answer_within_s = answer_within_s  # the whole publish wait of one export
        self.keys = keys
        self.limits = limits or EventLimits()  # the window of span times, as for inference events
        self.retry_after_s = retry_after_s
        # Exports being parsed, mapped, scrubbed and published: threads of their own, and at most max_in_flight; of
        # both, a tenant's share at most (by tenant, not key, as the OTLP/HTTP bodies: a tenant holds many keys).
        self.work = OffLoop("otlp-decode", slots=max_in_flight, threads=decode_threads, share=tenant_share,
                            busy="too many OTLP exports in flight; retry shortly",
                            over_share="tenant {owner} already has {share} OTLP exports in flight, its share of the "
                                       "receiver's {total}; retry shortly")
        self.retry_asked = Progress()  # exports answered "retry later"; tests await it instead of sleeping
        self.refused = Progress()  # exports answered with a partial success (spans refused, model calls unmade)
        self.refusals = RefusalLog()
        # Where clients reach lockgate's routers (OtlpService.start): a model call a span says went there is billed
        # by the router's own event, and its event here is marked so (genai.to_event).
        self.routers = genai.NO_ROUTERS

    def authenticate(self, headers: Mapping[str, str]) -> ApiKey:
        """The API key of `Authorization: Bearer lg-...` or `x-api-key: lg-...` (header names lower-case);
        AuthError when absent, unknown or revoked, Forbidden when its role may not send (apikeys.SENDERS)."""
        return self.keys.authenticate_sender(bearer(headers.get("authorization")) or headers.get("x-api-key"))

    async def export(self, key: ApiKey, request: ExportTraceServiceRequest | Callable[[], ExportTraceServiceRequest]
                     ) -> ExportTraceServiceResponse:
        """Publish a request's spans and inference events (`request` may be a function parsing it, which runs
        off the event loop too); raises InvalidEvent (it does not parse), Forbidden (another tenant's span, or
        a model call of a deployment outside the key's scope), or BusUnavailable (retryable: too many exports
        in flight, the key's tenant holds its share of them, or nothing or only part was acknowledged, and a retry
        completes it)."""
        try:
            # The slot first: parsing, mapping and scrubbing a 16 MiB export costs about a second of CPU,
            # so the exports being worked on, and the memory they hold, are bounded by the slots.
            async with self.work.slot(key.tenant):
                # Off the event loop, which the router and every other service share in embedded mode:
                # on it, a 15 MB export stalled them all for a second (three at once, for almost four).
                decoded, received, batches, events = await self.work.run(
                    functools.partial(self._prepare, key, request), key.tenant)
                metrics.events_in("otlp", received)
                await self._publish(batches, events)
        except BusUnavailable:
            await self.retry_asked.bump()
            raise
        metrics.events_out("otlp", received - decoded.rejected + len(events))
        if decoded.rejected:
            metrics.events_dropped("otlp", decoded.rejected, reason="refused")
        if decoded.no_event:
            metrics.events_dropped("otlp", decoded.no_event, reason="no_event")
        if decoded.problems:
            self.refusals.note(key.label, decoded)
            await self.refused.bump()
        return wire.response(decoded.rejected, decoded.problems)

    def _prepare(self, key: ApiKey, request: ExportTraceServiceRequest | Callable[[], ExportTraceServiceRequest]
                 ) -> tuple[domain.Decoded, int, list[tuple[str, bytes]], list[Encoded]]:
        """Parse (when given a parser), map, scrub and encode one export: pure CPU, run in the receiver's pool."""
        if callable(request):
            request = request()
        now = datetime.now(UTC)
        window = (now - timedelta(seconds=self.limits.past_s), now + timedelta(seconds=self.limits.future_s))
        decoded = domain.decode(request, tenant=key.tenant, app=key.app, window=window, deployments=key.deployments,
                                routers=self.routers)
        received = len(decoded.spans) + decoded.rejected
        # Cut to the NATS server's max_payload, as lockgate's own span exporter cuts (a fixed size was refused whole by
        # a server configured below it).
        limit = span_bytes(self.bus.max_payload)
        batches, too_large = span_batches(decoded.spans, source="otlp", tenant=key.tenant, app=key.app,
                                          max_bytes=limit)
        for span in too_large:
            decoded.rejected += 1
            decoded.problem(f"span {span.span_id} refused: larger than {limit} bytes encoded")
        events: list[Encoded] = []
        for event in decoded.events:
            try:
                # Checked as every producer's are; one the bus can never take is refused here (too large),
                # else the export would be answered "retry" for ever.
                encoded = encode_event(event, check=True, limits=self.limits)  # the window its span was checked in
            except InvalidEvent as exc:
                decoded.no_event += 1
                decoded.problem(f"span {event.span_id}: its inference event was refused: {exc.message}")
                continue
            events.append(encoded)
        return decoded, received, batches, events

    def close(self) -> None:
        """Stop the decoding threads (an export decoding still finishes); a later export starts them again."""
        self.work.close()

    async def _publish(self, batches: list[Message], events: list[Encoded]) -> None:
        # At once while the connection is down: nats-py would hold the publishes in its reconnect buffer and each
        # would wait out its acknowledgement, and the exporter's deadline passed first (probe p4).
        if self.bus.state != "connected":
            raise BusUnavailable(f"the bus is {self.bus.state} (NATS does not answer): nothing of this export was "
                                 "published; retry it")
        subject = self.bus.subjects.spans

        async def spans(msg_id: str, data: bytes) -> None:
            await RETRY.call(lambda: self.bus.publish(subject, data, msg_id=msg_id), retry_on=BusUnavailable,
                             what=f"publish of OTLP spans to {subject}")

        publishes = [spans(msg.id, msg.data) for msg in batches]
        if events:
            publishes.append(publish_events(self.bus.js, self.bus.subjects, events, retry=RETRY,
                                            batch_size=per_message(self.limits)))
        try:
            # All attempts of all publishes within ANSWER_WITHIN_S: the standard exporters give an export 10 s, and
            # one given up on is dropped, never sent again. The publishes cut short may still be stored.
            async with asyncio.timeout(self.answer_within_s):
                results = await asyncio.gather(*publishes, return_exceptions=True)
        except TimeoutError:
            raise BusUnavailable(f"the bus did not acknowledge this export within {self.answer_within_s:g} s; what "
                                 "was sent may be stored all the same, and a retry of it is deduplicated (the same "
                                 "message ids): retry it") from None
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            # Retryable whatever was acknowledged: the retry re-publishes under the same message ids,
            # which JetStream and the sink drop as duplicates.
            if not all(isinstance(r, BusUnavailable) for r in failed):
                raise next(r for r in failed if not isinstance(r, BusUnavailable))
            raise BusUnavailable(f"the bus did not acknowledge {len(failed)} of {len(results)} publishes "
                                 f"of this export ({failed[0]}); retry it")
