"""The router service: aiohttp gateway + admin API, route table and event batcher."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any

import aiohttp
from aiohttp import web

from lockgate import metrics
from lockgate.config import Settings
from lockgate.limits import EventLimits
from lockgate.outbox import UNTIL_BACK, Outbox, per_message
from lockgate.server.apikeys import Forbidden, KeyStore
from lockgate.server.httpguard import HttpLimits, app_runner
from lockgate.server.service import Progress, Service, ServiceContext, fewer_collections
from lockgate.server.tls import listen_http
from lockgate.services.router import clock
from lockgate.services.router.admin import KEY, PREFIX, Admin, require_router_wide, unrouted
from lockgate.services.router.admission import Admission
from lockgate.services.router.endpoints import Endpoints
from lockgate.services.router.handlers import (
    Seen,
    await_served,
    drift_callback,
    evidence_callback,
    read_back,
    replay_drift,
    scores_callback,
)
from lockgate.services.router.looplag import LoopLag
from lockgate.services.router.owners import Owners
from lockgate.services.router.proxy import Proxy
from lockgate.services.router.rollouts import Rollouts
from lockgate.services.router.wire import error_response
from lockgate.spool import Spool, claim

log = logging.getLogger("lockgate.router")


class RouterService(Service):
    """OpenAI-compatible traffic router with progressive canary rollout."""

    name = "router"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.upstreams = Endpoints(ctx.settings)  # the operator's allow-list; a bad file fails the start
        self.rollouts = Rollouts(ctx, self.upstreams)
        # The request path only adds; when the bus cannot keep up the oldest events go first
        # (counted), so the freshest traffic is what drift and cost see. Publishes are retried until
        # the bus is back: an outage costs only what overflows the buffer. The spool keeps them through a
        # kill -9 too: the next router on it publishes them first.
        # At most as many events a message as the stack's consumers take (else a full batch is refused whole).
        self.batcher = Outbox(ctx.bus.subjects, batch_size=per_message(EventLimits.from_settings(ctx.settings)),
                              overflow="drop_oldest", max_in_flight=4, retry=UNTIL_BACK,
                              via="served", name="router-events", spool=open_spool(ctx.settings),
                              on_sent=metrics.events_out_counter("router"), on_drop=metrics.drop_counter("router"))
        self.keys = KeyStore.of(ctx.settings)  # clients and operators authenticate with these
        self.proxy = Proxy(ctx.settings, self.rollouts, self.batcher, ctx.telemetry.server_spans(self.name),
                           self.keys, self.upstreams)
        self.rollouts.upstream = self.proxy.upstream  # its breakers hold a failing canary's steps (Rollouts.tripped)
        self.admin = Admin(self.rollouts, self.keys)
        self.proxy.admission = self.admission = Admission(ctx.settings, ctx.bus, replica=ctx.bus.name)
        self.proxy.owners = Owners(ctx.settings, ctx.bus)
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._evidence: Any = None
        self._scores: Any = None
        self._drifts: Any = None
        self.clock: clock.Offset | None = None  # this replica's clock against the NATS server's (None: unknown)
        self.clock_checked = Progress()  # clock probes answered

    @property
    def endpoints(self) -> dict[str, str]:
        """The gateway's base URL."""
        return {"router": self.url} if self.url else {}

    def app(self) -> web.Application:
        """The aiohttp application (gateway + admin)."""
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.proxy.chat)
        app.router.add_post("/v1/completions", self.proxy.completions)
        app.router.add_post("/v1/embeddings", self.proxy.embeddings)
        app.router.add_post("/v1/responses", self.proxy.responses)
        app.router.add_get("/v1/models", self.proxy.models)
        app.router.add_get("/v1/models/{model:.+}", self.proxy.model)
        # Last: any other /v1/ path or method gets OpenAI's error shape, not aiohttp's plain text.
        app.router.add_route("*", "/v1/{tail:.*}", self.proxy.unknown)
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/metrics", self._metrics)  # on the gateway's port: no second listener
        app.add_subapp(PREFIX, self.admin.app())
        # Last: any other path or method is answered in the same JSON error shape, not aiohttp's plain text.
        app.router.add_route("*", "/{tail:.*}", unrouted)
        return app

    async def start(self) -> None:
        """Restore routes and follow other replicas' changes, open the upstream pool, then serve."""
        fewer_collections()  # each request allocates dozens of containers: see fewer_collections
        # How long the loop is held by any work (a large body's decode, a GC pause, another embedded service's), so
        # a wait on an upstream leaves it out: that time is not the upstream's silence (Proxy's hang-ups, probe p18).
        self.proxy.upstream.lag = LoopLag(asyncio.get_running_loop())
        self.keys.say_problem(log)
        await self.rollouts.restore()
        self.spawn(self.rollouts.run_watch(), "route-watch")
        # Live evidence for canary analysis: the events of requests served by this replica and the others,
        # on the subject only routers may publish to (an application's events could say anything).
        served = Seen()  # shared with the replay below: a batch both live and stored counts once
        reconnects = self.ctx.bus.reconnects  # what the subscriptions miss from here on is read back
        self._evidence = await self.ctx.bus.nc.subscribe(self.ctx.bus.subjects.served_all,
                                                         cb=evidence_callback(self.rollouts, served))
        # Online evaluation: before the read-back below, so that no score falls between the two (one in both
        # counts once: Evidence keeps each scorer's score of an answer once).
        self._scores = await self.ctx.bus.nc.subscribe(self.ctx.bus.subjects.eval_scores_all,
                                                       cb=scores_callback(self.rollouts))
        self._drifts = await self.ctx.bus.nc.subscribe(self.ctx.bus.subjects.drift_all,
                                                       cb=drift_callback(self.rollouts))  # drift metrics
        # A replica that starts mid-rollout reads back the reports already published (live ones keep arriving
        # above meanwhile; the newest per deployment and comparison wins), so its drift metric need not wait.
        await replay_drift(self.rollouts)
        # And the served events since each rollout under analysis started, with their online scores: evidence lives
        # in memory, and a restart after a blue-green promotion would otherwise lose the old release's baseline
        # (events and scores) for good. Read in the background (the query service may be away for long: requests
        # are served meanwhile), tried until it completes; until then the deployments it covers are marked, and
        # their looks wait (never a pass). The same again each time the connection is lost: what the subscriptions
        # above miss until it is back (events, scores, drift reports) is read back as well.
        await_served(self.rollouts)
        self.spawn(read_back(self.rollouts, served, reconnects), "evidence-replay")
        self.spawn(self._replay_after_reconnects(reconnects), "drift-replay")
        # Timeouts are per endpoint (endpoints.py, applied in upstream.py), so the pool has none of its own.
        self.proxy.upstream.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=60, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,  # bodies pass through as the upstream sent them
        )
        self.batcher.start(self.ctx.bus.js)
        self.spawn(self.rollouts.run_timer(), "rollout-timer")
        self.spawn(self.rollouts.run_cut_off(), "bus-cut-off")
        self.spawn(self.rollouts.run_unanswered(), "bus-unanswered")
        # Every restored route's releases against their current decisions before the first request: one BLOCKed
        # while no replica ran is rolled back now, not served meanwhile (before, probe p50 F2, a replica started
        # after such a BLOCK served the BLOCKed canary to 7 of its first 20 requests).
        self.spawn(self.rollouts.run_trust_watch(await self.rollouts.trust_look()), "trust-watch")
        self.spawn(self.admission.run(), "budget-leases")
        self.spawn(self._watch_clock(), "clock-skew")
        # handler_cancellation: a client that closes its connection cancels its request's handler, and
        # with it the upstream call (proxy.forward records client_disconnected).
        # Bounded as every HTTP server of lockgate (httpguard): request heads, bodies and connections.
        self._runner = app_runner(self.app(), HttpLimits.from_settings(self.ctx.settings), shutdown_timeout=2.0,
                                  handler_cancellation=True)
        await self._runner.setup()
        s = self.ctx.settings
        await listen_http(self._runner, s.host, s.router_port, what="router", flag="--router-port",
                          backlog=1024)  # bursts of new clients
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def _replay_after_reconnects(self, seen: int) -> None:
        # Live reports published while the connection was down never reach the subscription above: each
        # time it comes back, they are read back from the stream as at start.
        while True:
            seen = await self.ctx.bus.reconnected(after=seen)
            await replay_drift(self.rollouts)

    async def _watch_clock(self) -> None:
        # Rollout times are written with one replica's clock and read with another's (clock.py): a replica whose
        # clock is off says so, in its health and its log, each time it is measured.
        stream = self.ctx.bus.subjects.streams["events"].name  # one the router may read: the answer has `ts`
        while True:
            try:
                sent = clock.now()
                reply = await self.ctx.bus.nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2.0)
                measured = clock.offset(sent, clock.now(), json.loads(reply.data).get("ts"))
            except Exception:  # the bus away (the cut-off watch handles that) or an odd answer: unknown for now
                measured = None
            if measured is not None and measured.skewed:
                log.warning("this replica's clock is %+.1f s off the NATS server's (more than %g s): rollout times "
                            "it writes and compares are wrong by as much; synchronise its clock (NTP)",
                            measured.seconds, clock.MAX_SKEW_S)
            self.clock = measured
            await self.clock_checked.bump()
            await asyncio.sleep(clock.PROBE_EVERY_S)

    async def stop(self) -> None:
        """Stop serving (in-flight requests finish), flush events and route changes, close the pool."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.batcher.close()
        await self.admission.close()  # unused budget allowances back to the shared counters
        for sub in (self._evidence, self._scores, self._drifts):
            if sub is not None:
                with contextlib.suppress(Exception):  # the connection may already be closing
                    await sub.unsubscribe()
        try:
            await self.rollouts.flush()
        except Exception:
            self.log.warning("route changes left unpersisted at stop", exc_info=True)
        await self.rollouts.close()
        await self.proxy.shadow.close()
        await self.proxy.upstream.close()
        self.proxy.upstream.lag.close()
        await super().stop()

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        # The request counters are by variant: read before and after one request they tell which arm of a canary
        # a user id loads, which is the admin API's to say (docs/rollouts.md "Sticky bucketing"). So the metrics take the
        # admin API's own read check, a key of role viewer, approver, operator or admin: 401 without a key, 403
        # for an app key, in the same JSON shape.
        return await self.admin.middleware(request, self._router_wide)

    async def _router_wide(self, request: web.Request) -> web.StreamResponse:
        # The counters are the whole router's, of every tenant's and deployment's requests, while the admin API
        # shows a key only its own tenant's routes and its scope's: so they take a key whose reach is as wide (before,
        # probe p25, another tenant's viewer key scoped to one deployment of its own read them all, and so saw that a
        # tenant ran a canary and how its arms answered).
        key = request[KEY]
        try:
            require_router_wide(key, self.keys.keys())
        except Forbidden as exc:
            return error_response(403, exc.message, "permission_denied", code="metrics_not_in_scope")
        # The provider is the process's: in an embedded stack the sink, evaluator, drift, cost, gatekeeper and
        # lineage count every tenant's events on it, tenants the router's keys do not tell (an application NATS
        # user's, a registered release's). So a key of one tenant reads the router's own request counters alone, an
        # admin key (every tenant's) all of them. (Before, probe p27 F1, a one-tenant router's viewer read another
        # tenant's event rate in `lockgate_events_received_total{service="sink"}`.)
        return await metrics.serve_prometheus(request, None if key.tenants is None else metrics.routers_own)

    def problems(self) -> list[str]:
        """Not ready while the key store holds no key: every request would be refused (401)."""
        return self.keys.problems()

    async def _health(self, request: web.Request) -> web.Response:
        # Requests are still served while the bus is away (events wait in the bounded outbox), so a
        # lost bus is "degraded", not a failed health check that would restart a working router; and the answer
        # comes within Bus.health's deadline, a hung nats-server reading "unresponsive".
        # A full inference stream refuses the events of every request served (they wait in the outbox or spool); a
        # full DLQ or dead-letter originals bucket keeps bad input's letters waiting or without their originals.
        bus, full = await self.ctx.bus.health()
        # Cut off longer than router_cut_off_s (and until its routes are reloaded), it serves stable only.
        cut_off = self.rollouts.cut_off
        # A clock off the server's (clock.py) makes the rollout times this replica writes and compares wrong.
        skewed = self.clock is not None and self.clock.skewed
        lag = self.proxy.upstream.lag
        healthy = bus == "connected" and not cut_off and not full and not skewed
        # Not ready (503: the readiness probe keeps traffic away) only when no request can be served; a lost bus is
        # degraded but ready, as requests are still served.
        problems = self.problems()
        ready = self.rollouts.ready.is_set() and not problems
        return web.json_response({"status": "ok" if healthy else "degraded",
                                  "bus": bus, "streams_full": full,
                                  # The process's, not the router's own connection's: in `lockgate up` the sink
                                  # letters on its own, and this read 0 while its letters waited (probe p16).
                                  "dead_letters_waiting": sum(bus.letters_waiting
                                                              for bus in self.ctx.buses or [self.ctx.bus]),
                                  "clock_offset_s": round(self.clock.seconds, 3) if self.clock else None,
                                  "clock_skewed": skewed,
                                  "ready": ready, "problems": problems,
                                  "serving": "none" if self.rollouts.refusing else
                                             "stable_only" if cut_off else "all",
                                  "events_dropped": self.batcher.dropped,
                                  "events_failed": self.batcher.failed,
                                  # Given up on after they were sent: they may be stored (outbox.Outbox.unconfirmed).
                                  "events_unconfirmed": self.batcher.unconfirmed,
                                  "events_spooled": spool.pending if (spool := self.batcher.spool) else 0,
                                  "events_not_spooled": spool.refused if spool else 0,
                                  # The process's own spans lost on their way to the bus (lockgate.spans.dropped).
                                  "spans_dropped": self.ctx.telemetry.spans_dropped,
                                  # How long the event loop was held (every embedded service's work counts), in all
                                  # and at worst at once, since the start: a request waits at least that long.
                                  "loop_held_s": round(lag.held_s(), 3),
                                  "loop_longest_hold_s": round(lag.worst_s, 3)},
                                 status=200 if ready else 503)


def open_spool(settings: Settings) -> Spool | None:
    """The router's spool (see Settings.router_spool_dir); SpoolBusy if its directory is a live router's."""
    if not settings.router_spool:
        return None
    if settings.router_spool_dir:
        return Spool(settings.router_spool_dir, max_bytes=settings.router_spool_max_bytes)
    base = os.path.join(settings.home, "spool", f"router-{settings.router_port}")
    return claim(base, max_bytes=settings.router_spool_max_bytes)
