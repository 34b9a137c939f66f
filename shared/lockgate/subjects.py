"""Every subject, stream, durable consumer and KV bucket name, derived from one prefix."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from lockgate.errors import ConfigError

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPED = re.compile(r"(?:=[0-9A-F]{2})+")
_TOKEN = re.compile(r"(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+|=")


def token(value: str) -> str:
    """One subject token or KV key for a value, one-to-one: `shop.v3` -> `shop=2Ev3`, `shop_v3` -> `shop_v3`.

    Every UTF-8 byte outside [A-Za-z0-9_-] becomes `=XX` (upper-case hex), `=` included, and the
    empty string becomes `=`, so distinct values never share a token (`untoken` reverses it) and the
    result is valid both in a subject (no dots, spaces or wildcards) and as a KV key.
    """
    if not value:
        return "="
    data = value.encode()
    return "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in data)


def untoken(tok: str) -> str:
    """The value `token` mapped to `tok`; ConfigError if `tok` is not one of its outputs."""
    if tok == "=":
        return ""
    if not _TOKEN.fullmatch(tok):
        raise ConfigError(f"{tok!r} is not a lockgate subject token")
    try:
        value = _ESCAPED.sub(lambda m: bytes.fromhex(m.group(0).replace("=", "")).decode("latin-1"), tok)
        value = value.encode("latin-1").decode()
    except (UnicodeDecodeError, UnicodeEncodeError, ValueError):
        raise ConfigError(f"{tok!r} is not a lockgate subject token") from None
    if token(value) != tok:  # e.g. `=41` for a safe character: not canonical, so not ours
        raise ConfigError(f"{tok!r} is not a lockgate subject token")
    return value


GiB = 1 << 30
# The dead-letter originals bucket (`Subjects.object_dead_letters`): full, it refuses the next original, whose
# letter then goes without it, saying so (`Bus.dead_letter`). Reserved up front like a stream's size (`StreamSpec`).
DLQ_ORIGINALS_MAX_BYTES = GiB // 2


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream: its name, the subjects it captures and its limits.

    `retention` says what a message stays for: `limits` keeps it until `max_age_s` or `max_bytes` pushes it
    out (streams read back by sequence: histories, drift reports); `interest` keeps it only
    until every durable consumer on the stream has acknowledged it, so `max_bytes` bounds the backlog nobody
    consumed yet, not all traffic within `max_age_s`. An interest stream's `readers` (durable consumer names,
    filtering on the stream's subject) are declared with it by admin (a service declares its own only:
    `Bus._ensure_readers`), so an event published before its services first start is kept for them rather than
    dropped for want of interest.

    At `max_age_s` the oldest messages expire whatever their consumers did. At `max_bytes` the
    `discard` policy decides: `new` refuses the publish (the producer sees the bus as unavailable,
    keeps its events buffered and retries, so nothing is lost silently), `old` drops the oldest
    messages (telemetry, where the newest spans matter most, and events, which one identity could otherwise fill
    for everyone: see there). nats-server reserves `max_bytes` of its JetStream storage for each stream when the
    stream is created."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float = 7 * 24 * 3600
    max_bytes: int = GiB
    discard: Literal["old", "new"] = "new"
    duplicate_window_s: float = 120.0
    append_only: bool = False  # no message may be deleted and the stream never purged (provenance)
    retention: Literal["limits", "interest"] = "limits"
    readers: tuple[str, ...] = ()  # interest: the durable consumers that read every message


@dataclass(frozen=True)
class Subjects:
    """Names under one prefix (`lg` by default; tests use a unique prefix each)."""

    prefix: str = "lg"
    streams: dict[str, StreamSpec] = field(init=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise ConfigError(f"subject prefix {self.prefix!r} must be letters, digits, '_' or '-'")
        p, s = self.prefix, self.prefix.upper().replace("-", "_")
        object.__setattr__(
            self,
            "streams",
            {
                # Interest: an event is gone once the sink, evaluator, drift monitor and cost service have each
                # acknowledged it (the sink's table is the record), so 2 GiB bound only the backlog they have not
                # consumed yet: hours of it at ordinary rates; past it producers buffer and retry (discard new),
                # the stream never drops an unconsumed event. Sizes stay small because nats-server reserves them
                # up front: a developer's `lockgate up` must start on a laptop with a few GB free. The evaluator
                # reads served answers (`evaluator_served`) apart from applications' events (`evaluator_online`);
                # each narrows its consumer to its subjects when it starts.
                "inference": StreamSpec(f"{s}_INFERENCE", (f"{p}.inference.>",), max_bytes=2 * GiB,
                                        retention="interest", readers=tuple(
                                            f"{p}_{r}" for r in ("sink_inference", "evaluator_online",
                                                                 "evaluator_served", "drift_inference",
                                                                 "cost_inference"))),
                # Discard old: several identities publish here (the operator registrations and eval requests, an
                # approver reviews), and the stream keeps what they sent for 90 days whoever consumed it. Refusing
                # at its size let one of them fill it with valid documents (probe p12: about 510 artifact
                # registrations with 1 MB labels) and so refuse every eval request, result and decision until they
                # aged out. Full, it now drops its oldest messages, consumed long ago at ordinary rates: each
                # consumer reads it live and the tables are the record; the readers of its history (artifact
                # names, drift and score replay) find less, never another answer.
                "events": StreamSpec(
                    f"{s}_EVENTS",
                    (
                        f"{p}.artifact.>",
                        f"{p}.lineage.>",
                        f"{p}.eval.>",
                        f"{p}.gate.>",
                        f"{p}.rollout.>",
                        f"{p}.drift.>",
                        f"{p}.budget.>",
                    ),
                    max_age_s=90 * 24 * 3600, max_bytes=GiB // 2, discard="old",
                ),
                # Cost records apart from the events above: the cost service publishes them for whatever tenant's
                # application sent the inference, so any one application could push every tenant's registrations,
                # decisions and rollouts out of a shared stream with them (probe p42 F1: 81 messages of 5,000
                # models did). Full, it drops its oldest records alone; nothing in lockgate reads their history
                # (the `cost_ledger` table is the record). Declared after `events`, so a start on a home made
                # before narrows that stream's subjects first (two streams may not share one).
                "cost": StreamSpec(f"{s}_COST", (f"{p}.cost.>",), max_age_s=30 * 24 * 3600, max_bytes=GiB // 4,
                                   discard="old"),
                # Rows that have no event of their own, published for the sink (the store owner) alone;
                # kept only as long as the inference stream, because the table is their durable copy. Limits
                # retention: the evaluator reads a run's eval cases back from it (`Bus.stored_after`). Each fact
                # subject is named (the cost ledger's goes to `ledger`: two streams may not share a subject).
                "facts": StreamSpec(f"{s}_FACTS", (self.eval_cases, self.release_bound, self.gate_audit,
                                                   self.lineage_edges, self.audit_records, self.analysis_runs),
                                    max_bytes=GiB),
                # Cost ledger facts apart: the cost service publishes one for every inference message of any
                # tenant's application, so under the facts stream's limits retention ordinary traffic (about 7
                # events/s for its 7 days) or one application's flood filled it, and then every tenant's ledger
                # facts, eval cases and gate audit rows were refused (probe p43 F1). Interest, as inference: a fact
                # is gone once the sink stored it, so 1 GiB bounds only the sink's backlog, and past it the cost
                # service retries (discard new) rather than lose spend. Declared after `facts`, so a start on a
                # home made before narrows that stream's subjects first (as `cost` after `events`).
                "ledger": StreamSpec(f"{s}_LEDGER", (self.cost_ledger,), max_bytes=GiB, retention="interest",
                                     readers=(self.durable("sink", "cost_ledger"),)),
                "telemetry": StreamSpec(f"{s}_TELEMETRY", (f"{p}.telemetry.>",), max_age_s=24 * 3600,
                                        max_bytes=GiB // 2, discard="old"),
                # Interest too: a dead letter is gone once the sink stored it (`dead_letters` reads the table).
                "dlq": StreamSpec(f"{s}_DLQ", (f"{p}.dlq.>",), max_age_s=30 * 24 * 3600, max_bytes=GiB // 2,
                                  retention="interest", readers=(f"{p}_sink_dlq",)),
                # Entries waiting for the audit chainer (the gatekeeper); kept long enough to outlast an outage,
                # and only until chained (or dead-lettered): interest, so a producer's flood of junk (each identity
                # may publish on its own subject) is gone once the chainer has read it. Under limits retention it
                # stayed for 30 days, the full stream refused every later entry, and with them (before decisions
                # were announced whatever their audit row did) every gate decision's announcement.
                "audit": StreamSpec(f"{s}_AUDIT", (f"{p}.audit.>",), max_age_s=30 * 24 * 3600,
                                    max_bytes=GiB // 8, retention="interest", readers=(f"{p}_gatekeeper_audit",)),
                # Signed alias changes and artifact lifecycles: kept for ever, never deleted or purged,
                # since "what did production point to a year ago" must stay answerable.
                "provenance": StreamSpec(f"{s}_PROVENANCE", (f"{p}.provenance.>",), max_age_s=0,
                                         max_bytes=GiB // 16, append_only=True),
            },
        )

    # subjects
    def inference(self, app: str, tenant: str = "default") -> str:
        """Inference events an application sends (SDK, gRPC, OTLP, or JSON on the subject), under its
        tenant and app: `<prefix>.inference.<tenant>.<app>`. The subject names who sent them, and a
        per-application NATS user may publish on its own only, so consumers refuse an event of another
        tenant or app on it (`sender`)."""
        return f"{self.prefix}.inference.{token(tenant)}.{token(app)}"

    def served(self, app: str, tenant: str = "default") -> str:
        """Inference events of requests the router served: only the router may publish here, so these
        alone are a canary's live evidence (an application could send any event on `inference`)."""
        return f"{self.inference(app, tenant)}.router"

    def ingest(self, app: str, tenant: str = "default") -> str:
        """Where an application's NATS user (its own, or the shared `app`) sends its events
        (`<prefix>.ingest.<tenant>.<app>`): no stream captures it, so nothing answers a publish here but the
        gateway's relay, which puts the events on `inference` and acknowledges to an application user's inbox
        only. (A publish on a stream's subject is acknowledged by JetStream on whatever reply subject the
        publisher names, unchecked: a KV key of any bucket, say.)"""
        return f"{self.prefix}.ingest.{token(tenant)}.{token(app)}"

    @property
    def ingest_all(self) -> str:
        return f"{self.prefix}.ingest.*.*"

    @property
    def ingest_group(self) -> str:
        """Queue group of the gateway replicas' relays: each message is relayed once."""
        return f"{self.prefix}_ingest"

    def ingest_sender(self, subject: str) -> tuple[str, str] | None:
        """(tenant, app) of an `ingest` subject; None for any other."""
        head = f"{self.prefix}.ingest."
        parts = subject[len(head):].split(".") if subject.startswith(head) else []
        if len(parts) != 2:
            return None
        try:
            return untoken(parts[0]), untoken(parts[1])
        except ConfigError:
            return None

    def reads(self, app: str, tenant: str = "default") -> str:
        """Where an application's NATS user (its own, or the shared `app`) asks the gateway for decisions
        (`<prefix>.reads.<tenant>.<app>.decision.<key>` one release's, `.decisions.<token(prefix)>` every current one
        whose release starts with the prefix): it makes no JetStream API request, whose answer JetStream sends on
        whatever reply subject the requester names (a KV key's, stored as its value). The gateway answers a reply
        subject in an application user's inbox only (services/gateway/reads.py)."""
        return f"{self.prefix}.reads.{token(tenant)}.{token(app)}"

    def read_decision(self, app: str, tenant: str, release: str) -> str:
        return f"{self.reads(app, tenant)}.decision.{token(release)}"

    def read_decisions(self, app: str, tenant: str, release_prefix: str) -> str:
        return f"{self.reads(app, tenant)}.decisions.{token(release_prefix)}"

    @property
    def reads_all(self) -> str:
        return f"{self.prefix}.reads.*.*.*.*"

    @property
    def reads_group(self) -> str:
        """Queue group of the gateway replicas answering reads (and passing announcements on): each once."""
        return f"{self.prefix}_reads"

    def read_request(self, subject: str) -> tuple[str, str, str, str] | None:
        """(tenant, app, `decision` or `decisions`, the release or release prefix) of a `reads` subject; None for
        any other."""
        head = f"{self.prefix}.reads."
        parts = subject[len(head):].split(".") if subject.startswith(head) else []
        if len(parts) != 4 or parts[2] not in ("decision", "decisions"):
            return None
        try:
            return untoken(parts[0]), untoken(parts[1]), parts[2], untoken(parts[3])
        except ConfigError:
            return None

    def app_decided(self, app: str, tenant: str, release: str) -> str:
        """The gateway passes each `gate.decided` announcement on here, to the release's tenant's and app's users
        (as its binding records them), empty: a per-application user may subscribe to its own only, while
        `gate.decided` carries every tenant's decisions whole. The last token is the release's KV key."""
        return f"{self.prefix}.decided.{token(tenant)}.{token(app)}.{token(release)}"

    def app_decided_of(self, app: str, tenant: str) -> str:
        return f"{self.prefix}.decided.{token(tenant)}.{token(app)}.*"

    @property
    def app_decided_all(self) -> str:
        return f"{self.prefix}.decided.*.*.*"

    @property
    def app_relist(self) -> str:
        """A gateway that (re)starts passing announcements on says so here, empty: what was announced while none did
        was passed on to nobody, so each application user's watch reads every key again (decisionwatch.py)."""
        return f"{self.prefix}.decided.relist"

    @property
    def inference_all(self) -> str:
        """Both kinds: every consumer that stores, prices or watches events takes all of them."""
        return f"{self.prefix}.inference.>"

    @property
    def inference_sent(self) -> str:
        """Every tenant's and app's `inference` subject, and not `served`: what the services that ingest for
        applications (gRPC, OTLP) publish; applications' own NATS users publish on `ingest` (see there)."""
        return f"{self.prefix}.inference.*.*"

    @property
    def served_all(self) -> str:
        return f"{self.prefix}.inference.*.*.router"

    def _inference_tokens(self, subject: str) -> list[str] | None:
        head = f"{self.prefix}.inference."
        return subject[len(head):].split(".") if subject.startswith(head) else None

    def is_served(self, subject: str) -> bool:
        """Whether a message on `subject` carries events of requests a router served (see `served`): exactly
        `<prefix>.inference.<tenant>.<app>.router`, the shape `served_all` subscribes to. An app named
        `router` publishes on `<prefix>.inference.<tenant>.router`, which applications may: never served."""
        tokens = self._inference_tokens(subject)
        return tokens is not None and len(tokens) == 3 and tokens[2] == "router" and all(tokens[:2])

    def sender(self, subject: str) -> tuple[str, str] | None:
        """(tenant, app) an inference subject (sent or served) belongs to; None when `subject` is no such
        subject. The only events a message on it may carry are that tenant's and app's."""
        tokens = self._inference_tokens(subject)
        if tokens is None or not (len(tokens) == 2 or (len(tokens) == 3 and tokens[2] == "router")):
            return None
        try:
            return untoken(tokens[0]), untoken(tokens[1])
        except ConfigError:
            return None

    @property
    def artifact_registered(self) -> str:
        return f"{self.prefix}.artifact.registered"

    @property
    def apply_recorded(self) -> str:
        """What each `lockgate apply` changed, with the folder's Git provenance (ApplyRecorded)."""
        return f"{self.prefix}.artifact.applied"

    @property
    def release_registered(self) -> str:
        return f"{self.prefix}.lineage.release"

    @property
    def lineage_run(self) -> str:
        return f"{self.prefix}.lineage.run"

    @property
    def eval_requested(self) -> str:
        return f"{self.prefix}.eval.requested"

    @property
    def eval_completed(self) -> str:
        return f"{self.prefix}.eval.completed"

    @property
    def eval_reran(self) -> str:
        """Results of `lockgate eval rerun` (EvalReran): apart from eval.completed, so no gate acts on them."""
        return f"{self.prefix}.eval.reran"

    def eval_scores(self, deployment: str) -> str:
        """Online scores of sampled live inference events (InferenceScored), by deployment."""
        return f"{self.prefix}.eval.scores.{token(deployment)}"

    @property
    def eval_scores_all(self) -> str:
        return f"{self.prefix}.eval.scores.>"

    def gate_decided(self, release: str) -> str:
        return f"{self.prefix}.gate.decided.{token(release)}"

    @property
    def gate_decided_all(self) -> str:
        return f"{self.prefix}.gate.decided.>"

    def gate_review(self, release: str) -> str:
        return f"{self.prefix}.gate.review.{token(release)}"

    @property
    def gate_review_all(self) -> str:
        return f"{self.prefix}.gate.review.>"

    def eval_progress(self, run_id: str) -> str:
        """Core-NATS progress ticks of a running eval (not persisted)."""
        return f"{self.prefix}.progress.eval.{token(run_id)}"

    def rollout(self, deployment: str) -> str:
        return f"{self.prefix}.rollout.{token(deployment)}"

    @property
    def rollout_all(self) -> str:
        return f"{self.prefix}.rollout.>"

    def drift(self, deployment: str) -> str:
        return f"{self.prefix}.drift.{token(deployment)}"

    @property
    def drift_all(self) -> str:
        return f"{self.prefix}.drift.>"

    def cost(self, tenant: str) -> str:
        return f"{self.prefix}.cost.{token(tenant)}"

    @property
    def cost_all(self) -> str:
        return f"{self.prefix}.cost.>"

    def budget(self, tenant: str) -> str:
        """Budget events (BudgetEvent): what the router's budgets refused, per tenant."""
        return f"{self.prefix}.budget.{token(tenant)}"

    @property
    def budget_all(self) -> str:
        return f"{self.prefix}.budget.>"

    def dlq(self, origin: str) -> str:
        return f"{self.prefix}.dlq.{token(origin)}"

    @property
    def dlq_all(self) -> str:
        return f"{self.prefix}.dlq.>"

    # facts: one subject per table they are projected into
    @property
    def eval_cases(self) -> str:
        """Batches of finished eval cases (EvalCasesRecorded)."""
        return f"{self.prefix}.fact.eval_cases"

    @property
    def release_bound(self) -> str:
        """Releases the lineage recorder bound: each ReleaseRegistered again, once its content matched the
        name's binding, so a registration forged on the bus for a bound name never reaches `releases`."""
        return f"{self.prefix}.fact.releases"

    @property
    def gate_audit(self) -> str:
        """Rows of the gate audit log (GateAudited)."""
        return f"{self.prefix}.fact.gate_audit"

    @property
    def lineage_edges(self) -> str:
        """Edges the lineage recorder derived from an event (LineageEdges)."""
        return f"{self.prefix}.fact.lineage_edges"

    @property
    def cost_ledger(self) -> str:
        """Per-event costs of one inference message (CostLedger)."""
        return f"{self.prefix}.fact.cost_ledger"

    @property
    def audit_records(self) -> str:
        """Rows of the hash-chained audit log (AuditRecord), published by the chainer for the sink."""
        return f"{self.prefix}.fact.audit"

    @property
    def analysis_runs(self) -> str:
        """Signed records of rollout analysis measurements (AnalysisRun), published by the router for the sink."""
        return f"{self.prefix}.fact.analysis_runs"

    def audit(self, identity: str) -> str:
        """Where `identity` asks for an audit entry (AuditEntry); permissions let each identity publish only its own."""
        return f"{self.prefix}.audit.{token(identity)}"

    @property
    def audit_all(self) -> str:
        return f"{self.prefix}.audit.>"

    def gitops_apply(self, identity: str) -> str:
        """Where `identity` asks the lineage recorder to record an apply (ApplyRequest, request/reply);
        permissions let only the operator publish there (and the admin, who may publish anything)."""
        return f"{self.prefix}.gitops.apply.{token(identity)}"

    @property
    def gitops_apply_all(self) -> str:
        return f"{self.prefix}.gitops.apply.*"

    @property
    def gitops_group(self) -> str:
        """Queue group of the lineage recorders answering applies: each request is recorded by one of them."""
        return f"{self.prefix}_gitops"

    def alias(self, app: str, alias: str) -> str:
        """Where an alias's signed history is appended (one subject per app and alias)."""
        return f"{self.prefix}.provenance.alias.{token(app)}.{token(alias)}"

    @property
    def alias_all(self) -> str:
        return f"{self.prefix}.provenance.alias.>"

    @property
    def alias_any(self) -> str:
        """Any one alias's history subject (an app token and an alias token): where `alias set` appends."""
        return f"{self.prefix}.provenance.alias.*.*"

    def lifecycle(self, digest: str) -> str:
        """Where an artifact version's signed lifecycle (deprecation, sunset, successor) is appended."""
        return f"{self.prefix}.provenance.lifecycle.{token(digest)}"

    @property
    def lifecycle_any(self) -> str:
        """Any one artifact version's lifecycle subject: where `artifact deprecate` appends."""
        return f"{self.prefix}.provenance.lifecycle.*"

    @property
    def spans(self) -> str:
        return f"{self.prefix}.telemetry.spans"

    @property
    def query(self) -> str:
        """Request/reply subject on which the query service answers named queries."""
        return f"{self.prefix}.query"

    @property
    def query_cli(self) -> str:
        """Request/reply subject of the CLI's roles' named queries: the query service answers them in a lane of
        their own, so a viewer's requests never wait in front of a service's (only the roles may publish here)."""
        return f"{self.prefix}.query.cli"

    @property
    def nats_reload(self) -> str:
        """Request/reply: the embedded runtime re-reads its home's NATS users (an application credential
        created or revoked) and reloads its nats-server. Carries nothing: the files are the authority."""
        return f"{self.prefix}.nats.reload"

    @property
    def query_group(self) -> str:
        """Queue group of the query service's replicas: each request is answered by one of them."""
        return f"{self.prefix}_query"

    # durable consumers: one per (service, purpose)
    def durable(self, service: str, purpose: str) -> str:
        return f"{self.prefix}_{service}_{purpose}"

    # KV buckets and object store
    @property
    def kv_gates(self) -> str:
        return f"{self.prefix}_gates"

    @property
    def kv_routes(self) -> str:
        return f"{self.prefix}_routes"

    @property
    def kv_keys(self) -> str:
        """Public keys of decision signers (key id -> raw Ed25519 public key)."""
        return f"{self.prefix}_keys"

    @property
    def kv_drift(self) -> str:
        """Drift monitor windows per deployment, so a restart does not refill the reference."""
        return f"{self.prefix}_drift"

    @property
    def kv_eval_runs(self) -> str:
        """Eval requests the evaluator accepted (run id -> EvalRequested): what the gatekeeper may decide on."""
        return f"{self.prefix}_eval_runs"

    @property
    def kv_eval_cache(self) -> str:
        """Evaluator response cache (request hash -> upstream response)."""
        return f"{self.prefix}_eval_cache"

    @property
    def kv_releases(self) -> str:
        """Release name -> its immutable bundle (create-only: a name is bound to one content forever)."""
        return f"{self.prefix}_releases"

    @property
    def kv_vetoes(self) -> str:
        """A tenant's content (what a release serves, gatekeeper domain.veto_key) -> the latest decision that vetoes it
        or lifts its veto: a person's reject or a drift BLOCK binds the content under any release name of the tenant."""
        return f"{self.prefix}_vetoes"

    @property
    def kv_gitops(self) -> str:
        """The state `lockgate apply` last applied: one entry per folder resource (`kind.name`), with
        its content hash and the Git provenance of the apply that set it; what `plan` diffs against."""
        return f"{self.prefix}_gitops"

    @property
    def kv_audit(self) -> str:
        """The audit chain's head (key `head`: the last AuditRecord), written only with compare-and-set."""
        return f"{self.prefix}_audit"

    @property
    def kept_streams(self) -> tuple[str, ...]:
        """The streams that record who did what, which no identity deletes, purges or reconfigures (permissions.kept,
        Bus.ensure_topology): the provenance stream, the releases bucket's and the audit chain head's."""
        return (self.streams["provenance"].name, f"KV_{self.kv_releases}", f"KV_{self.kv_audit}")

    @property
    def kv_budgets(self) -> str:
        """Budget counters (`budget[.split].period` -> amount leased to router replicas), written with compare-and-set."""
        return f"{self.prefix}_budgets"

    @property
    def kv_response_cache(self) -> str:
        """The router's shared response cache (request hash -> cached answer), for deployments that ask for it."""
        return f"{self.prefix}_response_cache"

    @property
    def kv_response_owners(self) -> str:
        """Which tenant owns each Responses API state the router saw created or first named (sha256 of a response or
        conversation id -> the tenant), so no other tenant continues it through a shared upstream account."""
        return f"{self.prefix}_response_owners"

    @property
    def kv_router_secret(self) -> str:
        """The router's secret (key `secret`, written once): it keys sticky buckets and user hashes; only the router
        (and admin) reads it."""
        return f"{self.prefix}_router_secret"

    @property
    def object_store(self) -> str:
        return f"{self.prefix}_artifacts"

    @property
    def object_dead_letters(self) -> str:
        """The whole originals of dead letters whose payload was cut (`DeadLetter.original`), scrubbed: an object
        store kept as long as the dead-letter stream keeps letters, at most `DLQ_ORIGINALS_MAX_BYTES`."""
        return f"{self.prefix}_dlq_originals"
