"""Who may publish and subscribe on which NATS subjects: one identity per service, per CLI role and
for SDK applications, derived from `subjects.py` so the table cannot drift from the names.

Publishing is what the trust model guards: only the gatekeeper publishes gate decisions (and
writes the gates and keys buckets), only the evaluator publishes eval completions, only an
approver (or admin) publishes reviews, and an application publishes inference events and
nothing else, through the gateway's relay (a per-application user, `app_user`, its own tenant's and app's only),
and reads decisions through the gateway too: no application user makes a JetStream API request; only the router publishes the events of requests it served (`served`), the one
live evidence canary analysis takes. Reading is granted per stream (JetStream cannot narrow a consumer's filter by
permission), but a service creates, deletes, fetches from and acks only its own durable consumers
(DURABLES), so one service cannot rebind, delete or drain another's; only the sink deletes a
message from a stream (a dead-lettered, unreadable original). Buckets are read by message get, not
through a consumer (see `_ephemeral` for why): an application and the CLI's roles create none. No identity, admin
included, deletes, purges or reconfigures the streams that record who did what (`kept`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lockgate.errors import ConfigError
from lockgate.subjects import Subjects, token, untoken

SERVICES = ("sink", "query", "gateway", "otlp", "lineage", "evaluator", "gatekeeper", "router", "drift", "cost")
ROLES = ("viewer", "operator", "approver", "admin")
APP = "app"
IDENTITIES = (*SERVICES, *ROLES, APP)
APPS = "apps"  # per-application users, `apps.<tenant>.<app>` (`app_user`), made by `lockgate app-credential`


def app_user(tenant: str, app: str) -> str:
    """The NATS user of one tenant's application: it publishes that tenant's and app's events, nothing else.
    Its reply inbox (`_INBOX.apps.<tenant>.<app>`) lies outside the shared `app` user's (`_INBOX.app`)."""
    return f"{APPS}.{token(tenant)}.{token(app)}"


def app_of(user: str) -> tuple[str, str] | None:
    """(tenant, app) of a per-application user; None for any other identity."""
    parts = user.split(".")
    if len(parts) != 3 or parts[0] != APPS:
        return None
    try:
        return untoken(parts[1]), untoken(parts[2])
    except ConfigError:  # not a token `app_user` makes
        return None


@dataclass
class Grant:
    """Subjects one identity may publish to and subscribe on; `responses` lets it answer requests. `deny`: subjects
    it may not publish to whatever `publish` allows (nats-server lets a deny win over an allow)."""

    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    responses: bool = False
    deny: list[str] = field(default_factory=list)

    def add(self, other: Grant) -> Grant:
        """Merge another grant into this one (order kept, duplicates dropped)."""
        self.publish = list(dict.fromkeys(self.publish + other.publish))
        self.subscribe = list(dict.fromkeys(self.subscribe + other.subscribe))
        self.responses = self.responses or other.responses
        self.deny = list(dict.fromkeys(self.deny + other.deny))
        return self


INBOX = "_INBOX"  # nats-py's default inbox prefix, and the root of every identity's own (`inbox`)


def inbox(identity: str) -> str:
    """The reply-inbox prefix of an identity: replies to one identity cannot be read by another."""
    return f"{INBOX}.{identity}"


def is_inbox(reply: str | None) -> bool:
    """Whether a reply subject is a requester's inbox (an identity's own, or nats-py's default without credentials):
    the only subjects the query service answers on, never a KV key's or a stream's someone aimed it at."""
    return reply is not None and reply.startswith(f"{INBOX}.")


def app_reader(reply: str | None, tenant: str, app: str) -> str | None:
    """Which application user a reply subject is an inbox of, for a request on a subject of `tenant`'s `app`: the
    shared `app` user's (APP), that tenant's and app's own user's (`app_user`), or neither (None: someone aiming
    the answer elsewhere, a KV key's subject say). The gateway's relay and reads answer only these."""
    if not reply:
        return None
    return next((user for user in (APP, app_user(tenant, app)) if reply.startswith(f"{inbox(user)}.")), None)


def query_subject(s: Subjects, identity: str) -> str:
    """Where `identity` asks named queries: a CLI role on the roles' subject (its own lane in the query service,
    which only the roles may publish to), a service or an unauthenticated client on the services' one."""
    return s.query_cli if identity in ROLES else s.query


def _base(identity: str) -> Grant:
    # Every connection reads its own replies (requests, JetStream API, pull fetches, KV watches).
    # STREAM.NAMES (names only) is how nats-py finds the stream behind an object-store subject.
    return Grant(publish=["$JS.API.INFO", "$JS.API.STREAM.NAMES"], subscribe=[f"{inbox(identity)}.>"])


# The durable consumers each service runs (registered in its app.py), by stream: `Subjects.durable(
# service, purpose)` for each purpose. A durable missing here cannot start under auth, and
# tests/integration/test_nats_auth.py checks every registered consumer against this table.
DURABLES: dict[str, dict[str, tuple[str, ...]]] = {
    "sink": {"inference": ("inference",), "telemetry": ("spans",), "dlq": ("dlq",),
             # one per fact table it projects (services/sink/domain.py FACTS)
             "events": ("artifacts", "lineage_runs", "eval_runs", "rollout_events", "drift_reports",
                        "inference_scores"),
             "facts": ("releases", "lineage_edges", "eval_cases", "gate_decisions", "audit_log", "analysis_runs"),
             "ledger": ("cost_ledger",)},
    "lineage": {"events": ("release", "run", "eval", "gate", "rollout", "eval_start")},  # eval_start: live OpenLineage
    # online: sampled live traffic scored, applications' events; served: the answers routers served, apart
    "evaluator": {"events": ("requests",), "inference": ("online", "served")},
    # audit: the chainer; lifecycles: an artifact's sunset BLOCKs what binds it when it passes
    "gatekeeper": {"events": ("evals", "reviews", "drift"), "audit": ("audit",), "provenance": ("lifecycles",)},
    "router": {"events": ("gates", "drift")},
    "drift": {"inference": ("inference",), "events": ("rollout", "scores")},  # scores: online eval of live traffic
    "cost": {"inference": ("inference",)},
}


def own_durables(s: Subjects, identity: str) -> frozenset[str]:
    """The durable consumers `identity` may create (none for a role or an application): the only ones a service's
    declaration of the topology makes (Bus._ensure_readers); admin's makes every stream's readers."""
    return frozenset(s.durable(identity, p) for purposes in DURABLES.get(identity, {}).values() for p in purposes)


def _read_stream(stream: str) -> Grant:
    # Reading messages by sequence (and a stream's state); consumers are granted apart.
    api = "$JS.API"
    return Grant(publish=[f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.MSG.GET.{stream}",
                          f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>"])


def _durables(stream: str, names: tuple[str, ...]) -> Grant:
    # Create (nats-server 2.9+ `CONSUMER.CREATE.{stream}.{name}[.{filter}]`, and the legacy durable
    # subject), look up, fetch from and ack only these named consumers: no ephemeral create
    # (`CONSUMER.CREATE.{stream}`), so another service's durable can be neither rebound nor drained.
    api = "$JS.API"
    return Grant(publish=[sub for d in names for sub in (
        f"{api}.CONSUMER.CREATE.{stream}.{d}", f"{api}.CONSUMER.CREATE.{stream}.{d}.>",
        f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{d}", f"{api}.CONSUMER.INFO.{stream}.{d}",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.{d}", f"$JS.ACK.{stream}.{d}.>")])


def _consume(s: Subjects, service: str) -> Grant:
    """Read every stream the service consumes, through its own durable consumers only."""
    g = Grant()
    for key, purposes in DURABLES[service].items():
        stream = s.streams[key].name
        g.add(_read_stream(stream)).add(_durables(stream, tuple(s.durable(service, p) for p in purposes)))
    return g


def _ephemeral(stream: str) -> Grant:
    # Unnamed ordered consumers (KV watch, object reads) on a bucket's stream, which has no durable to
    # protect; they are deleted when they end or reset. Granted only where a consumer is needed: nats-server
    # does not check a push consumer's delivery subject against its creator's publish rights
    # (nats-io/nats-server#8274), so whoever holds this can have the stream's messages delivered onto any
    # subject a service subscribes to.
    api = "$JS.API"
    return _read_stream(stream).add(Grant(publish=[
        f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.*", f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{api}.CONSUMER.DELETE.{stream}.*", f"$JS.ACK.{stream}.>"]))


def _read_kv(bucket: str) -> Grant:
    # Gets by message get and listing by STREAM.INFO (kvread.py), no consumer: see _ephemeral.
    return _read_stream(f"KV_{bucket}")


def _watch_kv(bucket: str) -> Grant:
    # A KV watch (an ordered consumer), for the service that follows the bucket's every write.
    return _ephemeral(f"KV_{bucket}")


def _write_kv(bucket: str) -> Grant:
    return _read_kv(bucket).add(Grant(publish=[f"$KV.{bucket}.>"]))


def _create_kv(bucket: str) -> Grant:
    # Create-only is enforced by the KV create (expected last sequence 0), which JetStream checks;
    # the permission is the bucket's put subject.
    return _write_kv(bucket)


def _read_objects(bucket: str) -> Grant:
    return _ephemeral(f"OBJ_{bucket}")


def _write_objects(bucket: str) -> Grant:
    # A put looks the object up by message get, then publishes its chunks and metadata (`Bus.put_object`, no purge);
    # reading an object's bytes (an ordered consumer) is _read_objects. This grant can put any bytes under any name:
    # what keeps them from being used is that every read checks them against the hash they are stored under
    # (artifacts.load), not this grant.
    return _read_stream(f"OBJ_{bucket}").add(Grant(publish=[f"$O.{bucket}.>"]))


def _manage_topology(s: Subjects) -> Grant:
    # Create lockgate's own streams and buckets where missing (Bus.ensure_topology), nothing else. Never UPDATE:
    # nats-server takes any configuration in an update, so an identity holding it could add a source copying a
    # subject it may publish into a bucket (the sink wrote a superseded PASS over a BLOCK in the gates bucket and a
    # route serving a BLOCKed release), lift the releases bucket's write-once rule or age decisions out. A create
    # of an existing stream with another configuration is refused (10058): changing one is admin's alone
    # (`lockgate --role admin topology apply`), and a kept one's (`kept`) no identity's.
    names = [spec.name for spec in s.streams.values()]
    names += [f"KV_{b}" for b in (s.kv_gates, s.kv_routes, s.kv_keys, s.kv_drift, s.kv_eval_runs, s.kv_releases,
                                  s.kv_eval_cache, s.kv_audit, s.kv_gitops, s.kv_budgets,
                                  s.kv_response_cache, s.kv_response_owners, s.kv_vetoes, s.kv_router_secret)]
    names += [f"OBJ_{s.object_store}", f"OBJ_{s.object_dead_letters}"]
    # And whether the durable consumers an interest stream keeps its messages for (StreamSpec.readers) exist, to name
    # those missing (Bus._ensure_readers). Only looked up: a create of an existing consumer is an update, which
    # nats-server applies whatever it changes, so whoever may create another service's durable re-points it (probe
    # p65 F2: the sink narrowed the drift monitor's filter to a subject nobody publishes, and the stream dropped every
    # event drift never saw). Each is declared by admin (`topology apply`, `lockgate up`) or by its own service.
    readers = [f"$JS.API.CONSUMER.INFO.{spec.name}.{d}" for spec in s.streams.values() for d in spec.readers]
    return Grant(publish=[f"$JS.API.STREAM.{op}.{n}" for n in names for op in ("CREATE", "INFO")] + readers)


def kept(s: Subjects) -> list[str]:
    """The JetStream API requests no identity may make, admin included: deleting or purging the streams that record
    who did what (`Subjects.kept_streams`), or changing their configuration; and purging the object stores."""
    # The provenance stream holds every alias's signed history and every artifact's lifecycle, kept for ever; the
    # releases bucket, each release name's one binding (write-once); the audit bucket, the chain head `audit verify`
    # checks the stored rows against. Their own settings refuse a message delete or purge (deny_delete, deny_purge),
    # not the stream's deletion: admin, which may publish anything, deleted the provenance stream and every history
    # with it, and the topology then made it anew, empty (probe p29 F8). Nor an update: nats-server refuses only
    # lifting deny_delete and deny_purge, and an update to one message with discard old dropped every provenance
    # record but the last; a bucket's `max_age` of a second emptied it as its deletion would (probe p32), and an
    # update lifted the releases bucket's write-once rule, after which a binding could be overwritten. Their
    # configuration is the server operator's alone, with nats-server's own tools (`Bus.ensure_topology` leaves them).
    api = "$JS.API.STREAM"
    kept = [f"{api}.{op}.{name}" for name in s.kept_streams for op in ("DELETE", "PURGE", "UPDATE")]
    # And the object stores' purges, not their deletion or configuration (admin's `topology apply`): every release,
    # pinned policy and eval case set is read from the artifact store by hash, and one purge without a filter emptied
    # it for every tenant (probe p33 F4). Their writers never purge (`Bus.put_object`); nats-server cannot tell a
    # filtered purge from a whole one.
    return kept + [f"{api}.PURGE.OBJ_{bucket}" for bucket in (s.object_store, s.object_dead_letters)]


def grant(s: Subjects, identity: str) -> Grant:
    """The permissions of one identity under the prefix of `s`."""
    return _grant(s, identity).add(Grant(deny=kept(s)))


def _grant(s: Subjects, identity: str) -> Grant:
    st = {k: v.name for k, v in s.streams.items()}
    # Every service may report its failures and its spans, and see whether the streams events and dead letters go
    # to refuse publishes (full: its health says so, Bus.full_streams). A letter whose payload is cut keeps the
    # whole original in the dead-letter originals bucket (Bus.dead_letter), which each service may therefore
    # write to, with `_write_objects`' caveat: a reader checks the bytes against the sha256 their name ends with.
    service = Grant(publish=[s.dlq_all, s.spans] + [f"$JS.API.STREAM.INFO.{spec.name}"
                                                      for spec in s.streams.values() if spec.retention == "interest"]
                    ).add(_read_kv(s.kv_keys)).add(_write_objects(s.object_dead_letters))
    scoped = app_of(identity)
    if scoped is not None:
        # One tenant's application: its own events only, through the gateway's relay (Subjects.ingest: never
        # a stream's subject, whose acknowledgement JetStream would publish on any reply subject it named).
        # Its decisions (its tenant's and app's releases') are read through the gateway too (`reads`), and followed
        # on the gateway's copies of their announcements (`app_decided`: `gate.decided` carries every tenant's
        # decisions whole) and its notice to read them all again (`app_relist`, empty). Nor any JetStream API
        # request (`_base`'s): JetStream answers those too on any reply subject, a KV key's included.
        tenant, app = scoped
        return Grant(publish=[s.ingest(app, tenant), f"{s.reads(app, tenant)}.>"],
                     subscribe=[f"{inbox(identity)}.>", s.app_decided_of(app, tenant), s.app_relist])
    if identity == APP:
        # The SDK: send inference events of any tenant and app through the gateway's relay (`ingest`, as a
        # per-application user does: never a stream's subject, see there), read every decision through the
        # gateway (`reads`) and follow their announcements (decisionwatch.py), reading them all again when a gateway
        # (re)starts (`app_relist`: the reads that failed while it was away wait for nothing else). No JetStream API
        # request at all (not `_base`'s): JetStream answers one on whatever reply subject it names, unchecked (a KV
        # key's).
        return Grant(publish=[s.ingest_all, s.reads_all],
                     subscribe=[f"{inbox(identity)}.>", s.gate_decided_all, s.app_relist])
    g = _base(identity)
    if identity == "admin":
        return Grant(publish=[">"], subscribe=[">"], responses=True)
    if identity == "sink":
        g.add(service).add(_manage_topology(s)).add(_consume(s, "sink"))
        # The one identity that deletes a message: once a dead letter is stored, the sink removes its
        # unreadable original (which may carry secrets) from the stream it came from.
        g.add(Grant(publish=[f"$JS.API.STREAM.MSG.DELETE.{st[k]}" for k in ("inference", "events", "facts",
                                                                             "ledger", "telemetry", "dlq", "audit")]))
        # It checks the original before deleting it (_delete_original); the audit queue is the one stream it
        # deletes from without consuming it. Before, each letter of an audit entry failed on this read.
        g.add(_read_stream(st["audit"]))
    elif identity == "query":
        # It answers on inboxes only (`is_inbox`), not on any reply subject a requester names (`responses`: a
        # viewer's request with reply `$KV.<routes>.<deployment>` had the answer stored as that route; nats-server
        # lets a response through whatever the allow and deny lists say, so it cannot narrow `_INBOX.>` either).
        # The requests in the replicas' queue group only, as the gateway's reads: a second process holding this
        # credential, subscribed outside it, was sent every request and answered the evaluator's first (probe p65
        # F1); in the group it answers its share, and no gate input is taken from this lane's answer any more.
        g.add(service).add(Grant(subscribe=[f"{s.query} {s.query_group}", f"{s.query_cli} {s.query_group}"],
                                 publish=[f"{INBOX}.>"]))
    elif identity == "gateway":
        g.add(service).add(_read_kv(s.kv_gates)).add(Grant(publish=[s.inference_sent]))
        # The relay of application users' events (each per-application user's, the shared `app`'s): it answers
        # them on their own inboxes only, in the relays' queue group only, as the reads below (a second process
        # holding this credential, subscribed outside it, was sent every event and could acknowledge and drop it).
        g.add(Grant(subscribe=[f"{s.ingest_all} {s.ingest_group}"], publish=[f"{inbox(APPS)}.>", f"{inbox(APP)}.>"]))
        g.add(Grant(subscribe=[s.gate_decided_all]))  # WatchDecisions follows the announcements (decisionwatch.py)
        # Applications' users' decision reads (reads.py), answered on their inboxes as above, the announcements
        # passed on to each release's tenant and app, and the notice to read every key again once it passes them on.
        # The reads in the replicas' queue group only (`subject queue`): a second process holding this credential
        # joins the group and answers its share, never every read ahead of the gateway (probe p20 F11: it raced
        # each answer with a superseded, genuinely signed PASS).
        g.add(Grant(subscribe=[f"{s.reads_all} {s.reads_group}"], publish=[s.app_decided_all, s.app_relist]))
        g.add(_read_kv(s.kv_releases))  # whose a release is: a key reads its own tenant's and app's decisions
    elif identity == "otlp":
        # The OTLP receiver: spans it was sent, and the inference events of GenAI spans; nothing else.
        g.add(service).add(Grant(publish=[s.inference_sent]))
    elif identity == "lineage":
        # It binds each release name once (create-only KV) and publishes the bound releases and the
        # edges as facts.
        g.add(service).add(_consume(s, "lineage")).add(_read_objects(s.object_store))
        g.add(_create_kv(s.kv_releases)).add(Grant(publish=[s.release_bound, s.lineage_edges, s.query]))
        # The applied state's only writer: it records each apply it is asked for, with an audit row, and
        # announces it.
        g.add(_write_kv(s.kv_gitops)).add(Grant(publish=[s.apply_recorded, s.audit("lineage")],
                                                subscribe=[s.gitops_apply_all], responses=True))
    elif identity == "evaluator":
        # It records each requested run (the gatekeeper decides only on those) and its cases as facts.
        g.add(service).add(_consume(s, "evaluator")).add(_read_objects(s.object_store))
        g.add(_read_kv(s.kv_releases))  # a release's model config: it evaluates what the release ships
        g.add(_write_kv(s.kv_eval_cache)).add(_write_kv(s.kv_eval_runs))
        g.add(Grant(publish=[s.eval_completed, s.lineage_run, s.eval_cases, f"{s.prefix}.progress.eval.>", s.query]))
        # A resumed run reads the cases it published back from the facts stream, those the sink has not stored yet
        # included, so it asks none of them again (the query service reads only what is stored).
        g.add(_read_stream(s.streams["facts"].name))
        g.add(Grant(publish=[s.eval_reran]))  # reruns of stored runs, which no gate acts on
        # Each run's environment, registered as an `environment` artifact (object store + `artifact.registered`).
        # nats-server cannot tell kinds apart on the one subject, so this identity could register any kind; it is
        # the one that publishes the eval results the gate decides on, trusted with more than that already.
        g.add(_write_objects(s.object_store)).add(Grant(publish=[s.artifact_registered]))
        g.add(Grant(publish=[s.eval_scores_all]))  # online scores of sampled live traffic
        g.add(_read_kv(s.kv_gitops))  # each deployment's online_eval, as last applied
        # Its judges' shared budgets (compare-and-set), under `_judge.` keys only: never a gateway budget's.
        g.add(_read_kv(s.kv_budgets)).add(Grant(publish=[f"$KV.{s.kv_budgets}._judge.>"]))
    elif identity == "gatekeeper":
        # It reads the evaluator's run records (not writes them) and publishes decisions and their audit rows.
        g.add(service).add(_consume(s, "gatekeeper")).add(_read_objects(s.object_store))
        g.add(_write_kv(s.kv_gates)).add(_write_kv(s.kv_keys)).add(_read_kv(s.kv_eval_runs))
        g.add(_write_kv(s.kv_vetoes))  # vetoes by content, its alone: a new name for rejected content stays vetoed
        g.add(_read_kv(s.kv_releases))  # a release's signed author, so self-approval can be refused
        g.add(_read_kv(s.kv_routes))  # which release a deployment canaries, for its drift policy
        g.add(_read_stream(s.streams["provenance"].name))  # artifact lifecycles: a sunset artifact blocks
        # and every replica hears each lifecycle record appended, to arm its sunset's timer (sunsets.on_heard)
        g.add(Grant(subscribe=[s.lifecycle_any]))
        g.add(Grant(publish=[s.gate_decided_all, s.gate_audit, s.query]))
        # It chains the audit log: reads every identity's entries, keeps the head, publishes the signed rows.
        g.add(_write_kv(s.kv_audit))
        g.add(Grant(publish=[s.audit("gatekeeper"), s.audit_records]))
    elif identity == "router":
        # Rollouts name releases only: it reads their bindings and bundles, never binds one.
        g.add(service).add(_consume(s, "router")).add(_read_kv(s.kv_gates)).add(_write_kv(s.kv_routes))
        g.add(_watch_kv(s.kv_routes))  # every replica applies the others' route writes as they happen
        g.add(_read_kv(s.kv_releases)).add(_read_objects(s.object_store))
        # Its events of served requests on `served` (canary evidence), which no application may publish to.
        g.add(Grant(publish=[s.rollout_all, s.served_all, s.query]))
        g.add(Grant(publish=[s.audit("router")]))  # its manual rollout actions and overrides, as itself
        # Canary analysis reads the served events (core subscription, every replica all of them).
        g.add(Grant(subscribe=[s.served_all]))
        # and reads them back at start, for the rollouts under analysis (its evidence is kept in memory only).
        g.add(_read_stream(s.streams["inference"].name))
        # Budgets: it leases from the shared counters (compare-and-set) and reports what they refused.
        g.add(_write_kv(s.kv_budgets)).add(Grant(publish=[s.budget_all]))
        g.add(_write_kv(s.kv_response_cache))  # answers shared between replicas (opt-in per deployment)
        g.add(_create_kv(s.kv_response_owners))  # which tenant owns each Responses state (responses, conversations)
        # Its secret (sticky buckets, user hashes), its alone: no read role is granted the bucket (probe p10 F9, F13).
        g.add(_create_kv(s.kv_router_secret))
        g.add(Grant(subscribe=[s.eval_scores_all, s.drift_all]))  # and online scores and drift reports
        g.add(Grant(publish=[s.analysis_runs]))  # its signed analysis records, for the sink
    elif identity == "drift":
        g.add(service).add(_consume(s, "drift"))
        g.add(_write_kv(s.kv_drift)).add(Grant(publish=[s.drift_all, s.query]))
    elif identity == "cost":
        g.add(service).add(_consume(s, "cost")).add(Grant(publish=[s.cost_all, s.cost_ledger, s.query]))
    elif identity in ("viewer", "operator", "approver"):
        g.add(_viewer(s))
        if identity == "operator":
            # `release create` binds the name itself (create-only KV) before announcing it. `apply` asks the
            # lineage recorder to record the folder's applied state: it never writes the bucket itself.
            g.add(_write_objects(s.object_store)).add(_create_kv(s.kv_releases))
            g.add(Grant(
                publish=[s.eval_requested, s.artifact_registered, s.release_registered, s.gitops_apply("operator")],
                subscribe=[s.eval_completed, f"{s.prefix}.progress.eval.>", s.gate_decided_all, s.eval_reran]))
            # Trust-file revocations and retirements made from the CLI (a safety action any operator may take), recorded
            # as itself, and their rows as the chainer appends them (the command waits for its own; each row is one
            # `audit log` shows any viewer anyway). Keys and application credentials are admin's
            # (cli.audit.may_record_admin_change), so it no longer asks the runtime to reload its NATS users (p54 F2).
            g.add(Grant(publish=[s.audit("operator")], subscribe=[s.audit_records]))
            # `alias set` and `artifact deprecate` append signed records to the provenance stream, on one
            # alias's or one artifact's subject only. nats-server cannot check a signature: what it lets the
            # credential alone publish there, readers skip (lockgate.provenance.chain).
            g.add(Grant(publish=[s.alias_any, s.lifecycle_any]))
        if identity == "approver":
            # A review's outcome: its new decision, or the gatekeeper's refusal, which only its audit row says
            # (`gate approve` follows both; any viewer reads those rows with `lockgate decisions` anyway).
            g.add(Grant(publish=[s.gate_review_all], subscribe=[s.gate_decided_all, s.gate_audit]))
    else:
        raise KeyError(identity)
    return g


def _viewer(s: Subjects) -> Grant:
    # Named queries, decisions and keys, and the health of streams and consumers (`lockgate status`). The roles ask
    # on a subject of their own, never the services' (`query_subject`): the query service answers each in its own lane.
    g = Grant(publish=[s.query_cli])
    # kv_audit: `audit verify` checks the tail; kv_releases and kv_gitops: `plan` diffs a folder against them.
    for bucket in (s.kv_gates, s.kv_keys, s.kv_routes, s.kv_audit, s.kv_releases, s.kv_gitops, s.kv_budgets):
        g.add(_read_kv(bucket))
    g.add(_read_stream(s.streams["provenance"].name))  # alias histories and artifact lifecycles
    # `dlq --original`: the whole originals of cut dead letters, read by message gets (Bus.original).
    g.add(_read_stream(f"OBJ_{s.object_dead_letters}"))
    for spec in s.streams.values():
        g.add(Grant(publish=[f"$JS.API.STREAM.INFO.{spec.name}", f"$JS.API.CONSUMER.LIST.{spec.name}",
                             f"$JS.API.CONSUMER.NAMES.{spec.name}"]))
    return g
