"""Settings for one process, from defaults, `LOCKGATE_*` environment variables and CLI flags."""

from __future__ import annotations

import os
from typing import Annotated, Any

import msgspec

from lockgate.errors import ConfigError
from lockgate.redact import RedactMode


class Settings(msgspec.Struct, kw_only=True):
    """Everything a service needs to know; the same code runs embedded or distributed."""

    nats_url: str = "nats://127.0.0.1:4222"
    # NATS identity: explicit user/password or a .creds file; empty = {home}/credentials/<identity>.json
    nats_user: str = ""
    nats_password: str = ""
    nats_creds: str = ""
    # TLS for NATS (client side, and the embedded server's listener when cert and key are set)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    # copies of each JetStream stream and KV bucket lockgate declares: 1 on one server, 3 on a cluster
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    clickhouse_url: str = "chdb://./.lockgate/clickhouse"
    database: str = "lockgate"
    # operator SQL runs as this ClickHouse user (server mode: the read-only `lockgate_reader` of
    # deploy/clickhouse/users.d); empty = clickhouse_url, in a session opened with readonly=1
    clickhouse_readonly_url: str = ""
    prefix: str = "lg"
    home: str = "./.lockgate"
    host: str = "127.0.0.1"
    router_port: int = 8080
    # /livez and /readyz of a `lockgate serve` process (lockgate.server.health); 0: not served
    health_port: int = 0
    grpc_port: int = 50051
    # the OTLP receiver: OTLP/gRPC and OTLP/HTTP (protobuf and JSON), the ports SDKs and Collectors default to
    otlp_grpc_port: int = 4317
    otlp_http_port: int = 4318
    sim_port: int = 9000
    # What one client may hold of the HTTP servers (the router and its admin API, OTLP/HTTP, /livez and /readyz;
    # lockgate.server.httpguard and .body). A connection whose next request head is not whole this many seconds after
    # it opened or after its previous answer is closed (the idle keep-alive deadline too: above a load balancer's 60 s)
    http_head_s: Annotated[float, msgspec.Meta(gt=0)] = 75.0
    # a request body must be whole within http_body_max_s, and after its first http_body_grace_s arrive at
    # http_body_min_rate bytes a second on average; else 408
    http_body_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    http_body_min_rate: Annotated[float, msgspec.Meta(gt=0)] = 16 * 1024.0
    http_body_max_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    # bytes of request bodies the process reads at once (every server's); past them a request is answered 503, retry
    http_body_bytes: Annotated[int, msgspec.Meta(ge=1)] = 256 * 1024 * 1024
    # client connections the process keeps open at once (every HTTP server's); one past it is closed at once.
    # 0: half the process's descriptor limit (ulimit -n), the rest left to upstreams, the bus and files
    http_max_connections: Annotated[int, msgspec.Meta(ge=0)] = 0
    # router
    stable_upstream: str = "http://127.0.0.1:9000/v1"
    canary_upstream: str = "http://127.0.0.1:9000/v1"
    deployment: str = "default"
    # Ungoverned passthrough (LOCKGATE_PASSTHROUGH=true): a request whose deployment has no rolled-out release
    # goes to the `default` endpoint with the client's own model and parameters, outside release governance.
    # Off by default: such a request is a 404 model_not_found, so no API key reaches an upstream outside release
    # governance by naming a deployment or model (roll a release out with PUT /lockgate/v1/deployments/{d}).
    passthrough: bool = False
    # The router's events wait for the bus in a spool on local disk as well as in memory, so a router killed -9
    # loses none (lockgate.spool): router_spool_dir, or else the first of {home}/spool/router-<router_port>,
    # ...-2, ...-3 that no live router holds (replicas never share one; a restarted one takes over a dead one's).
    # It refuses events beyond router_spool_max_bytes (they then wait in memory only, counted).
    router_spool: bool = True
    router_spool_dir: str = ""
    router_spool_max_bytes: int = 512 * 1024 * 1024
    # A router replica cut off from the bus longer than this (seconds) hears no gate decision (a BLOCK) and no
    # other replica's route change, so it serves stable only (no canary weight, header route or shadow) until
    # it is back and has reloaded its routes (/healthz `serving: stable_only`). Decisions reach connected
    # replicas within milliseconds, so the bound only has to ride out a nats-server restart or a cluster leader
    # election (a few seconds; the client tries again every 2 s) without dropping canaries on every blip: 10 s
    # is the longest a BLOCKed canary keeps traffic on a replica that cannot hear it. 0: at once.
    router_cut_off_s: float = 10.0
    # Serving stable only for longer than this (seconds) a cut-off replica refuses its governed deployments' requests
    # (503 `cut_off_from_bus`) until it is back: the stable it knows may have been BLOCKed or rejected meanwhile, and
    # it cannot hear that. For operators who put enforcement before availability; their load balancer sends the
    # request to another replica (its /readyz fails while the bus is away). 0: never (it keeps serving stable).
    router_cut_off_refuse_s: float = 0.0
    # A client that hangs up before its answer after the router has waited this long (seconds) on the upstream, for
    # the answer's first byte or a stream's next line, was let down by the release: its event is `upstream_unanswered`,
    # an error of its variant in canary analysis. A hang-up sooner, or while the upstream was answering, is the
    # client's own (`client_disconnected`, left out of the evidence). Clients commonly give up after 10-30 s, below the
    # endpoints' first_byte_s (60 s) and between_chunks_s (30 s), which would otherwise never fire; an endpoint timeout
    # below it ends such a call first, as that timeout's own failure.
    router_unanswered_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    # A client's own hang-up (`client_disconnected`) counts in its arm's `hang_up_rate` only when the upstream had kept
    # it waiting at least this long (seconds) when it left: for a non-streamed answer the whole call, for a stream the
    # silence since its latest event with data; never once every choice of a stream has its finish reason (the client
    # has the whole answer). A hang-up sooner left while the answer flowed, the client's choice: it is left out of
    # every metric. Counted, an app key hanging up on each stream whose first chunk named the canary's model, or a
    # client stopping at the finish reason before a canary's usage chunk, aborted a healthy canary (probe p71).
    router_hang_up_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # The router's upstream calls in flight, per endpoint: at most router_endpoint_slots on one endpoint at once, and of
    # those at most the fraction router_tenant_slot_share for one tenant's requests (at least one), so neither a slow
    # endpoint nor one busy tenant takes the connections of the others. A call that finds no slot waits for one for its
    # endpoint's connect_s at most, then the request is answered 503 `router_busy` (Retry-After), which is the router's
    # capacity and no evidence of the release. 1000 per endpoint is what the one pool for all of them held before; half
    # of it for one tenant leaves the other half to the rest (a router of one tenant may set the share to 1). Before,
    # one pool of 1000 served every tenant and endpoint, with no bound on the wait (probe p37 F1).
    router_endpoint_slots: Annotated[int, msgspec.Meta(ge=1)] = 1000
    router_tenant_slot_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    # How long (seconds) the router remembers which tenant owns a Responses state (a response id it relayed, a
    # response or conversation id a request named first): OpenAI keeps a stored response 30 days. Its owner naming
    # the id renews it; left unnamed past it, the next tenant naming the id owns it (services/router/owners.py).
    router_response_owner_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 30 * 24 * 3600.0
    app: str = "default"
    rollout_steps: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0)
    rollout_step_interval_s: float = 5.0
    # Where clients reach the routers, as the OTLP receiver compares a GenAI client span's endpoint (`server.address`
    # and `server.port`, `url.full`, `gen_ai.openai.api_base`): comma-separated `host`, `host:port` or URLs
    # (`router.internal:8080,https://llm.example.com/v1`; a host alone: any of its ports). A span of a call made
    # through a router is then kept for drift and traces and left out of the cost ledger: the router's event bills
    # it. A router in the receiver's own process (`lockgate up`) is known without it, at its bound address.
    router_addresses: str = ""
    # upstream allow-list (YAML `endpoints: {id: {url, credential}}`); empty: `default` and `canary` from
    # the two upstream settings above. Credentials are looked up by name in the environment, then here:
    endpoints_file: str = ""
    secrets_file: str = ""  # YAML mapping NAME: secret (keep it 0600)
    # the API keys the router, the gRPC gateway and the OTLP receiver check, and `lockgate keys` changes (hashed:
    # lockgate.server.apikeys); empty: {home}/apikeys.json. Pods with a home of their own mount it (deploy/k8s)
    api_keys_file: str = ""
    # gateway policy (YAML: budgets, rate_limits, cache; services/router/admission.py); empty = none
    gateway_file: str = ""
    # TLS for the gateway's gRPC API and the OTLP receiver (both ports) when both are set (PEM files);
    # plaintext otherwise
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    # sink
    redact: RedactMode = "scrub"
    # drift
    drift_reference_size: int = 500
    drift_window_size: int = 500
    drift_psi_threshold: float = 0.2
    # window sets the drift monitor keeps per tenant (each up to a few MB with text vectors): past it, the application
    # holding the most of its own windows (events no router served) loses its least recently seen, never one within
    # its fair share of the cap; served ones are never evicted
    drift_max_windows: Annotated[int, msgspec.Meta(ge=1)] = 64
    # online evaluation: share of live inference events the evaluator scores off the request path (0: off),
    # with these reference-free deterministic scorers (services/evaluator/online.py)
    online_eval_sample: float = 0.0
    online_eval_scorers: tuple[str, ...] = ("pii_free", "refusal", "length")
    # store: days kept per table, `table=days,...` over the defaults of lockgate.store.retention (0 = for ever)
    retention_days: str = ""
    # cost
    price_book: str = ""
    # gatekeeper: Ed25519 key that signs decisions (generated under home/keys when empty)
    signing_key: str = ""
    # consumers of decisions trust the keys of the trust file ({home}/trust.json when empty: key ids ->
    # PEM public keys, and revoked ids) plus these PEM files (comma-separated); never keys from the bus
    trust_file: str = ""
    trusted_keys: str = ""
    # gatekeeper: YAML naming the policy (and suite) that must gate each app's releases
    # (services/gatekeeper/gatesfile.py); empty: an eval is judged by the policy it names
    gates_file: str = ""
    # evaluator
    eval_cache: bool = True
    # evals one evaluator runs at once, and at most eval_tenant_runs of them one tenant's (0: eval_workers - 1), so one
    # tenant's slow runs always leave a slot to another tenant's; a request beyond them waits for a slot
    eval_workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    eval_tenant_runs: Annotated[int, msgspec.Meta(ge=0)] = 0
    # a run still calling after this many seconds ends failed, its cases not run yet each saying why; a run whose
    # suite's rate_limit_rps alone needs longer fails before its first call
    eval_max_run_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    # lineage: POST OpenLineage RunEvents live (START when an eval run or rollout starts, COMPLETE/FAIL when
    # it ends; decisions and releases) to this endpoint, e.g. Marquez's http://host:5000/api/v1/lineage
    openlineage_url: str = ""
    openlineage_namespace: str = ""  # empty: lockgate://{prefix}
    # consumers
    ack_wait_s: float = 30.0
    # inference messages: events per message, and how far an event's time may be from now (lockgate.limits)
    max_events_per_message: int = 5000
    event_time_past_s: float = 30 * 86400.0
    event_time_future_s: float = 3600.0
    # telemetry: the share of new traces exported (a caller's sampled traceparent is always followed);
    # spans that end in error or last trace_slow_ms or more are exported whatever the ratio, and so
    # is the sink's span for a message of events (it links to each request in it).
    trace_sample_ratio: float = 0.1
    trace_slow_ms: float = 5000.0
    # OTLP/HTTP base URL of a Collector (e.g. http://otel-collector:4318); metrics are exported
    # there when set, and are always served as Prometheus text at /metrics
    otlp_endpoint: str = ""

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed (None values are ignored)."""
        return msgspec.structs.replace(self, **{k: v for k, v in changes.items() if v is not None})


def from_env(environ: dict[str, str] | None = None) -> Settings:
    """Defaults overridden by LOCKGATE_<FIELD> variables (e.g. LOCKGATE_NATS_URL)."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for name in Settings.__struct_fields__:
        value = env.get(f"LOCKGATE_{name.upper()}")
        if value is not None:
            raw[name] = value
    try:
        base = msgspec.to_builtins(Settings())
        base.update(raw)
        return msgspec.convert(base, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad LOCKGATE_* setting: {exc}") from None
