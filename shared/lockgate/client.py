"""SDK for applications: emit inference events without blocking, read and follow gate decisions.

Needs only `pip install lockgate` (nats-py, msgspec, cryptography): none of the services'
dependencies. The streams and buckets are created by the running stack (`Bus.ensure_topology`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

import nats
import nats.errors
import nats.js.errors
from nats.js.api import PubAck

from lockgate import natsclient
from lockgate.clock import TIME_HEADER, Offset, offset
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import GateDecided, InferenceEvent
from lockgate.contracts.names import check_name
from lockgate.credentials import NatsAuth, NotAllowed
from lockgate.decisionwatch import DecisionWithdrawn as DecisionWithdrawn  # what decisions() raises
from lockgate.decisionwatch import (
    GatewaySource,
    Newest,
    ReconnectCounter,
    decisions_only,
    follow_decisions,
    verified,
    watch_decisions,
)
from lockgate.decisionwatch import (
    StaleDecision as StaleDecision,  # what decision() raises for a superseded one
)
from lockgate.errors import BusUnavailable, ClientClosed, ConfigError, InvalidEvent, NotFound, SignatureError
from lockgate.outbox import (
    DEFAULT_LIMITS,
    UNTIL_BACK,
    Outbox,
    checked_unscrubbed,
    encode_event,
    event_from_fields,
)
from lockgate.permissions import APP, app_of
from lockgate.redact import shown_url
from lockgate.retry import RetryPolicy
from lockgate.signing import Verifier
from lockgate.subjects import Subjects, token

log = logging.getLogger("lockgate.client")

# The first connection is tried this many times per server (a server restarting that very second is ridden
# out), then start() raises BusUnavailable: nats-py's `max_reconnect_attempts=-1`, meant for the reconnections
# after it, retried a wrong URL, a closed port or an unknown host forever, and start() never returned.
FIRST_CONNECT_TRIES = 2
CONNECT_TIMEOUT_S = 5
# The least pause between nats-py's reconnection attempts that close() leaves (see close()).
RECONNECT_WAIT_MIN_S = 0.25

# An event whose prompt and response hold this many characters or more is scrubbed and encoded on the client's own
# worker thread, not in emit(): scrubbing 600 KB held an asyncio application's loop 175 ms (548 ms for text shaped
# like keys), against README's "emit() never blocks the request path" (probe p80 F3). The bus's threshold for
# scrubbing a dead letter off its loop, for the same cost.
SCRUB_OFF_CALLER = 64 * 1024

# How many times this process has forked (os.register_at_fork): a client started before a fork finds itself in a
# child when the count it started under differs. Its loop's thread did not survive the fork and its connection's
# socket is the parent's, so nothing it holds can publish there (probe p80 F1: a gunicorn --preload worker's events
# were handed to the parent's stopped loop, emit() True, counted nowhere).
_forks = 0
FORKED_HINT = ("its loop's thread and its connection stay with the parent process: create the Client in each worker "
               "after the fork, e.g. in gunicorn's post_fork hook or Celery's worker_process_init")


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)

_decisions: Codec[GateDecided] = Codec(GateDecided)
async def get_decision(kv: Any, release: str) -> GateDecided | None:
    """The latest decision for `release` in the gates KV bucket, or None.

    Raises InvalidName for a name outside the grammar, and SignatureError if the stored value is no decision or
    a decision for another release (a signature alone does not say it answers the question asked), and
    BusUnavailable if the bucket does not answer (nats-py's own TimeoutError reached `decision()`'s caller, probe
    p39 F3)."""
    check_name(release, "release")
    try:
        entry = await kv.get(token(release))
    except nats.js.errors.KeyNotFoundError:  # also covers deleted/purged keys
        return None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as exc:  # OSError: the connection lost
        raise BusUnavailable(f"cannot read the gate decision of release {release!r}: {exc!r}") from None
    return _stored_decision(entry.value, release)


def _stored_decision(value: bytes | None, release: str) -> GateDecided | None:
    if not value:
        return None
    try:
        decision = _decisions.decode(value)
    except InvalidEvent as exc:  # as a decision that does not verify: it admits nothing, whoever reads it
        raise SignatureError(f"the value stored for release {release!r} is no gate decision ({exc.message}): "
                             "refusing it") from None
    if decision.release != release:
        raise SignatureError(f"decision {decision.id} stored for release {release!r} is for "
                             f"{decision.release!r}: refusing it")
    return decision


class _Publishes:
    """The JetStream publishes the SDK's Outbox makes, telling its client of each publish that found no stream
    (NoStreamResponseError: nothing answers on the subject), of each acknowledged one, and of the stack's time an
    acknowledgement gave (the gateway's relay stamps it: lockgate.clock).

    nats-py's `js.publish` made as it makes it (a request, its answer read as a PubAck or an API error), keeping the
    answer's headers, which `js.publish` drops."""

    def __init__(self, nc: Any, no_stream: Callable[[str | None], None],
                 answered: Callable[[float, float, Any], None], clock: Callable[[], float]) -> None:
        self._nc = nc
        self._no_stream = no_stream
        self._answered = answered
        self._clock = clock

    async def publish(self, subject: str, payload: bytes, *, timeout: float, headers: dict[str, str]) -> PubAck:
        sent = self._clock()
        try:
            msg = await self._nc.request(subject, payload, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            self._no_stream(subject)
            raise nats.js.errors.NoStreamResponseError from None
        self._answered(sent, self._clock(), msg.headers)
        answer = json.loads(msg.data)
        if "error" in answer:
            raise nats.js.errors.APIError.from_error(answer["error"])
        self._no_stream(None)
        return PubAck.from_response(answer)


class Client:
    """Buffers events in memory and publishes them in pipelined JetStream batches.

    `emit` never blocks and never raises for a full buffer: it returns False and counts the event
    in `dropped`. It raises InvalidEvent at once for an event the contract forbids, so one bad
    event never reaches (and poisons) a batch. It may be called from any thread: from another than the one
    that started the client, the event is handed to the client's event loop (`call_soon_threadsafe`) and
    True returned; a full buffer then counts it in `dropped` there.

    While the bus is away, publishes are retried until it is back (or `max_attempts` times, if
    given), and the buffer (`max_buffer` events) takes what is emitted meanwhile; `close()` waits
    at most `close_timeout_s` for a bus still away, then counts what is left in `failed` (never stored) or
    `unconfirmed` (sent, never acknowledged: may be stored).
    """

    def __init__(
        self,
        nats_url: str,
        *,
        prefix: str = "lg",
        app: str,
        tenant: str = "default",
        max_buffer: int = 100_000,
        batch_size: int = 500,
        flush_interval_s: float = 0.05,
        max_in_flight: int = 8,
        max_attempts: int | None = None,
        close_timeout_s: float = 10.0,
        verify: bool = True,
        trusted_keys: list[str] | None = None,
        user: str = "",
        password: str = "",
        creds_file: str = "",
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        trust_file: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.nats_url = nats_url
        # This host's clock, as events are stamped with: compared with the stack's time its acknowledgements give.
        self._clock = clock
        self.clock_offset: Offset | None = None  # its last measure (None: not known yet, or no gateway says it)
        self._clock_off = False  # whether the last measure put this host's events outside the stack's window
        # The application's NATS identity (`app` in `{home}/credentials/app.json`, or your own user).
        self._auth = NatsAuth(user=user, password=password, creds_file=creds_file, tls_ca=tls_ca,
                              tls_cert=tls_cert, tls_key=tls_key)
        scoped = app_of(user)
        if scoped not in (None, (tenant, app)):
            raise ConfigError(f"NATS user {user!r} sends the events of tenant {scoped[0]!r}, app {scoped[1]!r} "
                              f"only; this client is tenant {tenant!r}, app {app!r}")
        self.subjects = Subjects(prefix)
        self.app = app
        self.tenant = tenant
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_attempts = max_attempts
        # max_in_flight batches await their acks at once: pipelining is what makes JetStream fast.
        self._outbox = Outbox(
            self.subjects,
            batch_size=batch_size,
            max_age_s=flush_interval_s,
            capacity=max_buffer,
            overflow="drop_newest",
            max_in_flight=max_in_flight,
            retry=UNTIL_BACK if max_attempts is None else RetryPolicy(attempts=max_attempts, initial_s=0.05, max_s=2.0),
            close_timeout_s=close_timeout_s,
            name="lockgate-sdk",
            # An application credential (its own user, or the shared `app`) publishes through the gateway's relay
            # (Subjects.ingest: it may publish on no stream's subject); another user (your own) or none, directly.
            via="relay" if scoped is not None or user == APP else "sent",
            cause=lambda: self._refusal,
        )
        # And reads decisions through the gateway (Subjects.reads: it makes no JetStream API request), following
        # every announcement (the shared user) or the gateway's copies of its own releases' (its own user).
        self._announcements: str | None = None
        if user == APP:
            self._announcements = self.subjects.gate_decided_all
        elif scoped is not None:
            self._announcements = self.subjects.app_decided_of(app, tenant)
        self._started = False
        self._closed = False
        self._nc: Any = None
        self._js: Any = None
        self._first_tries_left = FIRST_CONNECT_TRIES
        # The loop (and its thread) start() ran on: emits from other threads are handed to it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._forks = _forks  # this process's fork count when it started (see _forks)
        # The worker thread that scrubs and encodes large events (SCRUB_OFF_CALLER), made with the first, and the
        # events it holds: flush() and close() wait for them, and `pending` counts them.
        self._scrubber: concurrent.futures.ThreadPoolExecutor | None = None
        self._scrubbing: set[concurrent.futures.Future[None]] = set()
        self._warned_closed = False
        self._warned_fork = False
        # Why the bus refuses this client since it last reconnected (its credential revoked or rotated), or None:
        # logged once, and the reason given for the events counted failed and for BusUnavailable from calls.
        self._refusal: str | None = None
        self._warned_no_stream = False  # until a publish is acknowledged again
        # Whether a publish was ever acknowledged: then the stack and prefix are right, and nothing answering is a
        # restart (of the bus, the gateway re-subscribing after it), not a wrong address.
        self._answered = False
        self._reconnects = ReconnectCounter()  # a decisions() watch reads every key again after each
        # Decisions are acted on only when signed by a trusted gatekeeper key: the trust file
        # (`trust_file`, LOCKGATE_TRUST_FILE, else {LOCKGATE_HOME or ./.lockgate}/trust.json) and
        # pinned PEM files. Never keys learnt from the bus: anyone who can publish could add one.
        self.verify = verify
        home = os.environ.get("LOCKGATE_HOME") or Settings().home
        self._verifier = Verifier(None, Settings(
            home=home, trust_file=trust_file or os.environ.get("LOCKGATE_TRUST_FILE", ""),
            trusted_keys=",".join(trusted_keys or [])))
        self.rejected_decisions = 0
        # Whatever answers a read, an older decision than one read before is refused (probe p20 F11).
        self._newest = Newest()

    @property
    def sent(self) -> int:
        """Events JetStream acknowledged."""
        return self._outbox.sent

    @property
    def dropped(self) -> int:
        """Events refused because the buffer was full or the client closed, and those still buffered
        when a client that never started was closed."""
        return self._outbox.dropped

    @property
    def failed(self) -> int:
        """Events given up on that were not stored: after `max_attempts` publishes if set, else those the bus
        had not taken when `close()` stopped waiting for it. Re-sending them is safe under new ids too."""
        return self._outbox.failed

    @property
    def unconfirmed(self) -> int:
        """Events given up on that were sent and never acknowledged (the bus hung, or `close()` stopped waiting):
        they may be stored. Re-send them, if at all, as they were (the same ids): the bus keeps one copy."""
        return self._outbox.unconfirmed

    @property
    def pending(self) -> int:
        """Events buffered (or being scrubbed) and not yet handed to a publish."""
        return len(self._outbox) + len(self._scrubbing)

    async def start(self) -> None:
        """Connect to NATS and start publishing (events emitted before are sent now).

        Once started, calling it again does nothing; after close() it raises ClientClosed."""
        if self._closed:
            # Its buffer is closed: a second connection made here would carry nothing, and every emit
            # would be refused while the application believed it was sending.
            raise self._closed_error()
        if self._started:
            if self._forks != _forks:
                raise self._forked_error()
            return  # a second connection would replace the first and leave it open for good
        # A cluster is given as comma-separated URLs (as LOCKGATE_NATS_URL): nats-py takes a list.
        servers = [u.strip() for u in self.nats_url.split(",") if u.strip()]
        self._first_tries_left = FIRST_CONNECT_TRIES * max(1, len(servers))
        try:
            self._nc = await natsclient.connect(
                servers, name=f"lockgate-sdk-{self.app}", max_reconnect_attempts=-1, connect_timeout=CONNECT_TIMEOUT_S,
                error_cb=self._on_error, reconnected_cb=self._on_reconnected, **self._auth.options(),
            )
        except NotAllowed:
            raise
        except nats.errors.Error as exc:
            if "authorization violation" in str(exc).lower() or isinstance(exc, nats.errors.AuthorizationError):
                raise self._bad_credentials() from None
            raise BusUnavailable(f"cannot reach NATS at {shown_url(self.nats_url)}: {exc}") from None
        except OSError as exc:
            raise BusUnavailable(f"cannot reach NATS at {shown_url(self.nats_url)}: {exc}") from None
        self._js = self._nc.jetstream()
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        self._forks = _forks
        self._outbox.start(_Publishes(self._nc, self._no_stream, self._answered_at, self._clock),
                           connected=self._connected)
        self._started = True

    def _connected(self) -> bool:
        """The connection is up: a publish made now goes out (one made while it reconnects waits in its buffer)."""
        return self._nc is not None and self._nc.is_connected

    def _bad_credentials(self) -> NotAllowed:
        return NotAllowed(f"NATS at {shown_url(self.nats_url)} refused this application's credentials "
                          "(pass user and password, or creds_file)")

    def _closed_error(self) -> ClientClosed:
        return ClientClosed("this lockgate client is closed: a Client is started once; make a new one")

    def _forked_error(self) -> ClientClosed:
        return ClientClosed(f"this lockgate client was started before this process forked ({FORKED_HINT})")

    async def _on_error(self, exc: Exception) -> None:
        # Raised while connecting, it ends nats-py's connect loop, which retries bad credentials forever,
        # and a server it cannot reach too (its reconnections, after a first connection, stay unlimited).
        if self._nc is None:
            if "authorization violation" in str(exc).lower():
                raise self._bad_credentials()
            self._first_tries_left -= 1
            if self._first_tries_left <= 0:
                why = str(exc) or f"no answer within {CONNECT_TIMEOUT_S} s ({type(exc).__name__})"
                raise BusUnavailable(f"cannot reach NATS at {shown_url(self.nats_url)}: {why}")
            log.info("lockgate-sdk: NATS at %s not reached (%s); trying again", shown_url(self.nats_url), exc)
            return
        if "authorization violation" in str(exc).lower():
            # Its credential was revoked or rotated: nats-py retries (and is refused) every 2 s, for good.
            if self._refusal is None:
                self._refusal = (f"NATS at {shown_url(self.nats_url)} refused this application's credentials when "
                                 f"it reconnected ({exc}): were they revoked or rotated?")
                log.error("lockgate-sdk: %s Events are kept in the buffer until it accepts them again.",
                          self._refusal)
            return
        if "permissions violation" in str(exc).lower():
            # A publish its NATS user may not make (another app's subject): its batches wait unacknowledged.
            log.error("lockgate-sdk: NATS refused: %s (is this client's tenant and app its credential's?)", exc)
            return
        log.debug("lockgate-sdk: NATS error %s", exc)

    def _no_stream(self, subject: str | None) -> None:
        # Retried as for a leader election (the README's "until it is back"), but said once: a NATS without
        # lockgate's streams (another stack's port, a plain nats-server) left flush() waiting with nothing logged.
        if subject is None:
            self._warned_no_stream, self._answered = False, True
            return
        if self._warned_no_stream:
            return
        self._warned_no_stream = True
        if self._answered:
            # Seen as the bus restarted: this client reconnected before the gateway had subscribed again (probe p4
            # was told "is it a lockgate stack?" of a stack that had answered it a second before).
            who = "the gateway relaying them" if self._outbox.via == "relay" else "the stream capturing them"
            log.warning("lockgate-sdk: nothing answers publishes on %s at NATS %s any more, though it did before: "
                        "the bus is restarting or unreachable, or %s is not back yet. Events stay buffered and are "
                        "retried until it answers (flush() waits for it; max_attempts=N gives up after N tries)",
                        subject, shown_url(self.nats_url), who)
            return
        what = ("no lockgate gateway relays it: is the gateway service running with this prefix?"
                if self._outbox.via == "relay" else "no stream captures it")
        log.warning("lockgate-sdk: nothing answers publishes on %s at NATS %s (%s): is it a lockgate stack with prefix "
                    "%r? Events stay buffered and are retried until one answers (flush() waits for it; "
                    "max_attempts=N gives up after N tries)", subject, shown_url(self.nats_url), what,
                    self.subjects.prefix)

    def _answered_at(self, sent: float, received: float, headers: dict[str, str] | None) -> None:
        # Each acknowledgement through the gateway's relay says the stack's time: a host clock off by more than the
        # window the stack accepts (its events dead-lettered as "more than 1 hour after now", all counted `sent`:
        # probe p80 F4) is said once it is seen, and again once it is back.
        measured = offset(sent, received, (headers or {}).get(TIME_HEADER))
        if measured is None:
            return
        self.clock_offset = measured
        ahead, behind = measured.seconds > 0, measured.seconds < 0
        off = ((ahead and measured.beyond(DEFAULT_LIMITS.future_s))
               or (behind and measured.beyond(DEFAULT_LIMITS.past_s)))
        if off and not self._clock_off:
            log.warning("lockgate-sdk: this host's clock is %+.0f s off the lockgate stack's (%s): the events it stamps "
                        "are outside the window the stack accepts and are dead-lettered, though counted `sent`; "
                        "synchronise its clock (NTP), or give each event its `time`", measured.seconds,
                        shown_url(self.nats_url))
        elif self._clock_off and not off:
            log.warning("lockgate-sdk: this host's clock is within the lockgate stack's window again (%+.0f s off)",
                        measured.seconds)
        self._clock_off = off

    @property
    def clock_skewed(self) -> bool:
        """True while the last measure of this host's clock (`clock_offset`) puts the events it stamps outside the
        window the stack accepts: they are dead-lettered, though counted `sent`."""
        return self._clock_off

    async def _on_reconnected(self) -> None:
        if self._refusal is not None:
            log.warning("lockgate-sdk: NATS at %s accepts this application's credentials again",
                        shown_url(self.nats_url))
        self._refusal = None
        await self._reconnects.bump()

    async def close(self) -> None:
        """Publish everything buffered, wait for the acks, then disconnect.

        Never raises for a bus that went away: what could not be published is counted in `failed`, or in
        `unconfirmed` if it was sent and its acknowledgement never came.
        Closing again does nothing. In a process forked after it started, it only marks it closed: its buffer and
        connection are the parent's, which publishes and closes them."""
        if self._forks != _forks and self._loop is not None:
            self._closed = True  # the socket is shared with the parent: a word on it here would corrupt its stream
            return
        deadline = time.monotonic() + self._outbox.close_timeout_s
        if not self._closed:
            await self._scrubbed()  # the large events emitted before close() are published with the rest
            await self._handed_over()  # what other threads emitted before close() is published with the rest
            # Closed without ever starting, its buffered events are counted dropped, and later emits refused.
            await self._outbox.close()
        self._started = False
        self._closed = True
        if self._scrubber is not None:
            self._scrubber.shutdown(wait=False)
        await self._reconnects.close()  # its decisions() watches end (ClientClosed), not wait for good
        if self._nc is not None and not self._nc.is_closed:
            # nats-py's close() waits up to `reconnect_time_wait` (2 s) for a reconnection in progress, which ends
            # only by succeeding (never, for a refused credential): within close_timeout_s, what is left of it. Never
            # under RECONNECT_WAIT_MIN_S: it is also the pause between nats-py's attempts, and at 0 its loop spends its
            # time in connects, where Python 3.11's wait_for can swallow the cancel that ends it (a CI run's event loop
            # then spun for good at teardown); with a pause, the cancel lands in the sleep.
            options = self._nc.options
            options["reconnect_time_wait"] = min(options["reconnect_time_wait"],
                                                 max(RECONNECT_WAIT_MIN_S, deadline - time.monotonic()))
            try:
                await self._nc.close()
            except OSError as exc:
                # nats-py writes the publishes it buffered while disconnected to the dead socket, and
                # raised ConnectionResetError out of close(); those batches are counted failed already.
                log.warning("lockgate-sdk: NATS connection to %s lost while closing: %r", shown_url(self.nats_url), exc)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def emit(self, event: InferenceEvent | None = None, **fields: Any) -> bool:
        """Buffer one event (given, or built from fields with this client's app and tenant); an event of
        another tenant or app is refused (InvalidEvent)."""
        if self._forks != _forks and self._loop is not None:
            return self._refused_in_fork()
        if event is None:
            fields.setdefault("app", self.app)
            fields.setdefault("tenant", self.tenant)
            event = event_from_fields(fields)
            # Built and checked in one step, so the bytes need no decoding to be known good; without a
            # given time the event is timed by this clock as it is built, so it is inside the time window.
            check: bool | str = "built"
            clock_time = "time" not in fields
        else:
            check, clock_time = True, False
        if event.tenant != self.tenant or event.app != self.app:
            # Its subject names this client's tenant and app, and consumers refuse another's event on it (a
            # per-application NATS user may publish on its own subject only): refused here, not lost there.
            raise InvalidEvent(f"invalid inference event: tenant {event.tenant!r}, app {event.app!r}; this client "
                               f"sends tenant {self.tenant!r}, app {self.app!r}: make a Client for each - at `$.app`")
        loop = self._loop
        if (loop is not None and not self._closed
                and len(event.prompt or "") + len(event.response or "") >= SCRUB_OFF_CALLER):
            # Checked here, as any event (InvalidEvent is the caller's), from its unscrubbed bytes (one encode, a
            # millisecond for 900 KB); scrubbed and encoded again off the caller, the slow part.
            checked_unscrubbed(event, check=check, clock_time=clock_time)
            return self._scrub_off_caller(loop, event)
        encoded = encode_event(event, check=check, clock_time=clock_time)
        if loop is not None and not self._closed:
            if threading.get_ident() != self._loop_thread:
                # The buffer and its flush task belong to the client's loop: added from here, an item started no
                # flush (RuntimeError 'no running event loop', raised after it was buffered) or woke none.
                try:
                    loop.call_soon_threadsafe(self._add, encoded)
                    return True
                except RuntimeError:  # that loop is closed: nothing would ever publish it
                    return self._loop_gone()
            if asyncio._get_running_loop() is not loop:  # its own thread, after its loop ended (or in another)
                return self._loop_gone()
        return self._add(encoded)

    def _scrub_off_caller(self, loop: asyncio.AbstractEventLoop, event: InferenceEvent) -> bool:
        if loop.is_closed() or (threading.get_ident() == self._loop_thread
                                and asyncio._get_running_loop() is not loop):
            return self._loop_gone()
        if self._scrubber is None:
            # One thread: the scrub is pure Python holding the GIL, so more would only take the loop's share of it;
            # the loop still runs between the thread's switch intervals instead of waiting for the whole scrub.
            self._scrubber = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lockgate-scrub")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._scrubbing.add(done)
        self._scrubber.submit(self._scrub_and_hand_over, loop, event, done)
        return True

    def _scrub_and_hand_over(self, loop: asyncio.AbstractEventLoop, event: InferenceEvent,
                             done: concurrent.futures.Future[None]) -> None:
        try:
            encoded = encode_event(event)  # checked in emit(): scrubbed and encoded only
            loop.call_soon_threadsafe(self._add, encoded)
        except RuntimeError:  # its loop closed meanwhile: nothing would ever publish it
            self._loop_gone()
        except Exception:  # counted, never lost silently
            log.exception("lockgate-sdk: a large event could not be scrubbed and encoded; counted in `dropped`")
            self._outbox.refuse()
        finally:
            self._scrubbing.discard(done)
            done.set_result(None)

    async def _scrubbed(self) -> None:
        """Return once the large events emitted before the call are handed to this loop."""
        for done in list(self._scrubbing):
            await asyncio.wrap_future(done)

    def _refused_in_fork(self) -> bool:
        # Counted in this process's `dropped` (its counters were the parent's at the fork: they say what this one
        # refused on top).
        self._outbox.refuse()
        if not self._warned_fork:
            self._warned_fork = True
            log.warning("lockgate-sdk: emit() in a process forked after this client started: events are refused and "
                        "counted in `dropped` (%s)", FORKED_HINT)
        return False

    def _loop_gone(self) -> bool:
        self._outbox.refuse()
        self._warn_once("the event loop this client was started on is no longer running: events are refused and "
                        "counted in `dropped` (close() the client before its loop ends)")
        return False

    def _add(self, encoded: Any) -> bool:
        accepted = self._outbox.add(encoded)
        if not accepted and self._outbox.closed:
            self._warn_once("emit() after close(): events are refused from now on and counted in `dropped` "
                            "(a closed client stays closed: make a new Client)")
        return accepted

    def _warn_once(self, message: str) -> None:
        # Once: requests finishing during a shutdown are many, and one line says it (`dropped` counts each).
        if not self._warned_closed:
            self._warned_closed = True
            log.warning("lockgate-sdk: %s", message)

    async def _handed_over(self) -> None:
        """Return once the events other threads handed to this loop before the call are in the buffer."""
        loop = self._loop
        if loop is None or loop is not asyncio.get_running_loop():
            return
        # Handed over with call_soon_threadsafe, they run before a callback queued after them (FIFO).
        marker = loop.create_future()
        loop.call_soon(marker.set_result, None)
        await marker

    async def flush(self) -> None:
        """Return once every event emitted before this call is acknowledged (or counted failed)."""
        if self._closed:
            raise self._closed_error()
        if not self._started:
            raise BusUnavailable("the lockgate client is not started; call start() or use `async with`")
        if self._forks != _forks:
            raise self._forked_error()
        await self._scrubbed()  # the large events emitted before this call are "before" it too
        await self._handed_over()  # the events other threads emitted before this call are "before" it too
        await self._outbox.flush()

    async def decision(self, release: str) -> GateDecided | None:
        """The latest gate decision for a release, or None.

        Read from the gates bucket; with an application's NATS user (the shared `app` or its own), through the
        gateway (its own user: None for a release not its tenant's and app's), the signature checked here alike.
        Raises InvalidName for a bad name, SignatureError if the decision does not verify or is not
        for `release`, StaleDecision (a SignatureError) if it is older than one this client read for the release
        before (by `decision()` or `decisions()`): a superseded decision handed back, never returned."""
        if self._announcements is None:
            decision = await get_decision(await self._gates(), release)
        else:
            check_name(release, "release")
            entries = await self._gateway().read(token(release))
            decision = _stored_decision(entries[0].value if entries else None, release)
        if decision is not None:
            await self._check(decision)
        return decision

    async def decisions(self, release_prefix: str = "") -> AsyncIterator[GateDecided]:
        """Current decisions, then each new one, for releases starting with `release_prefix`.

        A decision whose signature does not verify is skipped, logged and counted in
        `rejected_decisions`, never yielded; so is one older than a decision this client read for its release
        before (StaleDecision). One yielded that stops verifying with no new decision (its key
        revoked or retired, an approval withdrawn, in the trust file; checked each second), or whose release's
        newer decision does not verify, ends the iteration with DecisionWithdrawn (a SignatureError) naming the
        release, the decision and why: stop acting on it, read `decision()` again and watch again."""
        # A consumer-free watch (decisionwatch): the `app` identity may not create consumers (nats-server#8274).
        if self._announcements is None:
            decisions = await watch_decisions(await self._gates(), release_prefix, nc=self._nc,
                                              subjects=self.subjects, reconnects=self._reconnects)
        else:
            # Through the gateway (its own user follows the gateway's copies of the announcements, the shared `app`
            # user the gatekeeper's), reading every key again when a gateway (re)starts.
            decisions = await follow_decisions(self._gateway(release_prefix), release_prefix, nc=self._nc,
                                               announcements=self._announcements, reconnects=self._reconnects,
                                               relists=self.subjects.app_relist)
        checked = (verified(decisions, self._verifier, refused=self._refused, newest=self._newest) if self.verify
                   else decisions_only(decisions))
        try:
            async for decision in checked:
                yield decision
        finally:
            await checked.aclose()
            await decisions.aclose()

    def _refused(self, exc: SignatureError) -> None:
        self.rejected_decisions += 1
        log.warning("ignoring gate decision: %s", exc.message)

    async def _check(self, decision: GateDecided) -> None:
        if not self.verify:
            return
        self._newest.check(decision)
        await self._verifier.verify(decision)
        self._newest.saw(decision)

    def _started_or_raise(self) -> None:
        if self._closed:
            raise self._closed_error()
        if self._forks != _forks and self._js is not None:
            raise self._forked_error()
        if self._js is None:
            raise BusUnavailable("the lockgate client is not started; call start() or use `async with`")
        if self._refusal is not None and not self._nc.is_connected:
            raise BusUnavailable(self._refusal)  # at once: no request can be made, and the gateway is not why

    def _gateway(self, release_prefix: str = "") -> GatewaySource:
        self._started_or_raise()
        return GatewaySource(self._nc, self.subjects, self.tenant, self.app, release_prefix)

    async def _gates(self) -> Any:
        self._started_or_raise()
        try:
            return await self._js.key_value(self.subjects.kv_gates)
        except nats.js.errors.BucketNotFoundError:
            raise NotFound(
                f"gate bucket {self.subjects.kv_gates!r} does not exist: is the lockgate stack running "
                f"with prefix {self.subjects.prefix!r}?"
            ) from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as exc:  # as get_decision says it
            raise BusUnavailable(f"cannot open gate bucket {self.subjects.kv_gates!r}: {exc!r}") from None
