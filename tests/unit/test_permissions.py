"""The permission table: who may publish each fact, and the deployed config kept in step with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockgate.permissions import DURABLES, IDENTITIES, ROLES, SERVICES, app_of, app_user, grant, query_subject
from lockgate.server.natsserver import deploy_auth_config
from lockgate.subjects import Subjects

S = Subjects("lg")
ROOT = Path(__file__).resolve().parents[2]


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` the rest."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def may_publish(identity: str, subject: str) -> bool:
    g = grant(S, identity)  # a deny wins over an allow, as nats-server has it
    return any(matches(p, subject) for p in g.publish) and not any(matches(p, subject) for p in g.deny)


FACTS = {
    S.gate_decided("shop-v2"): {"gatekeeper", "admin"},
    S.eval_completed: {"evaluator", "admin"},
    S.gate_review("shop-v2"): {"approver", "admin"},
    "$KV.lg_gates.shop-v2": {"gatekeeper", "admin"},
    "$KV.lg_keys.k1": {"gatekeeper", "admin"},
    # vetoes by content (probe p3): a person's reject of an artifact set binds it under any release name
    "$KV.lg_vetoes." + "a" * 64: {"gatekeeper", "admin"},
    "$JS.API.STREAM.CREATE.KV_lg_vetoes": {"sink", "admin"},
    S.eval_requested: {"operator", "admin"},
    "$JS.API.STREAM.DELETE.LG_EVENTS": {"admin"},
    "$JS.API.STREAM.PURGE.LG_EVENTS": {"admin"},
    # the records of who did what, not even admin's (probe p29 F8: admin deleted the provenance stream, and every
    # alias's history and artifact's lifecycle with it), nor their configuration (probe p32: admin's max_age of a
    # second emptied the two buckets)
    "$JS.API.STREAM.DELETE.LG_PROVENANCE": set(),
    "$JS.API.STREAM.PURGE.LG_PROVENANCE": set(),
    "$JS.API.STREAM.UPDATE.LG_PROVENANCE": set(),
    "$JS.API.STREAM.DELETE.KV_lg_releases": set(),
    "$JS.API.STREAM.PURGE.KV_lg_releases": set(),
    "$JS.API.STREAM.DELETE.KV_lg_audit": set(),
    "$JS.API.STREAM.PURGE.KV_lg_audit": set(),
    "$JS.API.STREAM.UPDATE.KV_lg_audit": set(),
    "$JS.API.STREAM.CREATE.LG_PROVENANCE": {"sink", "admin"},
    # the sink creates lockgate's streams and buckets where missing; changing one's configuration is admin's alone
    # (probe p1: the sink added a source to the gates bucket and wrote decisions through it)
    "$JS.API.STREAM.CREATE.KV_lg_gates": {"sink", "admin"},
    "$JS.API.STREAM.UPDATE.KV_lg_gates": {"admin"},
    "$JS.API.STREAM.UPDATE.KV_lg_routes": {"admin"},
    "$JS.API.STREAM.UPDATE.KV_lg_releases": set(),  # a kept one: no identity's (above)
    "$JS.API.STREAM.UPDATE.LG_EVENTS": {"admin"},
    "$JS.API.STREAM.UPDATE.OBJ_lg_artifacts": {"admin"},
    # a dead-lettered original is deleted by the sink alone; a durable is created, fetched and acked by its owner
    "$JS.API.STREAM.MSG.DELETE.LG_EVENTS": {"sink", "admin"},
    "$JS.API.STREAM.MSG.DELETE.LG_INFERENCE": {"sink", "admin"},
    "$JS.API.CONSUMER.CREATE.LG_EVENTS.lg_sink_artifacts.lg.artifact.registered": {"sink", "admin"},
    "$JS.API.CONSUMER.DURABLE.CREATE.LG_EVENTS.lg_sink_artifacts": {"sink", "admin"},
    "$JS.API.CONSUMER.MSG.NEXT.LG_EVENTS.lg_sink_artifacts": {"sink", "admin"},
    "$JS.ACK.LG_EVENTS.lg_sink_artifacts.1.2.2.1700000000.0": {"sink", "admin"},
    "$JS.API.CONSUMER.DELETE.LG_EVENTS.lg_sink_artifacts": {"admin"},
    "$JS.API.CONSUMER.CREATE.LG_EVENTS": {"admin"},
    "$JS.API.CONSUMER.CREATE.LG_EVENTS.lg_router_gates.lg.gate.decided.>": {"router", "admin"},
    # the audit log: each identity asks for entries as itself; only the chainer writes rows and the head
    S.audit("gatekeeper"): {"gatekeeper", "admin"},
    S.audit("router"): {"router", "admin"},
    S.audit("operator"): {"operator", "admin"},
    S.audit("viewer"): {"admin"},
    S.audit_records: {"gatekeeper", "admin"},
    # the embedded runtime reloads its NATS users for `app-credential`, admin's alone (probe p54 F2: the operator's)
    S.nats_reload: {"admin"},
    "$KV.lg_audit.head": {"gatekeeper", "admin"},
    # the whole originals of cut dead letters: every service that dead-letters keeps them, in their bucket only
    "$O.lg_dlq_originals.C.nuid": {*SERVICES, "admin"},
    "$O.lg_dlq_originals.M.bmFtZQ==": {*SERVICES, "admin"},
    # artifacts: the operator registers them, and the evaluator each run's environment (probe p29 F9)
    "$O.lg_artifacts.C.nuid": {"operator", "evaluator", "admin"},
    # nor any identity's purge of them (probe p33 F4: the operator's, without a filter, emptied the store); the
    # dead-letter originals' writers keep theirs (nats-py's put replaces an altered original)
    "$JS.API.STREAM.PURGE.OBJ_lg_artifacts": set(),
    "$JS.API.STREAM.PURGE.OBJ_lg_dlq_originals": set(),
    S.artifact_registered: {"operator", "evaluator", "admin"},
}


@pytest.mark.parametrize("subject", sorted(FACTS))
def test_only_the_owner_may_publish(subject: str) -> None:
    assert {i for i in IDENTITIES if may_publish(i, subject)} == FACTS[subject]


def test_an_application_publishes_inference_only() -> None:
    # Through the gateway's relay: `ingest`, any tenant's and app's for the shared user; and its decision reads.
    assert grant(S, "app").publish == [S.ingest_all, S.reads_all]


def test_the_gateway_subscribes_to_reads_in_its_queue_group_only() -> None:
    # Probe p20 F11: a second process with its credential, subscribed outside the group, answered every read first.
    reads = [p for p in grant(S, "gateway").subscribe if p.split(" ")[0] == S.reads_all]
    assert reads == [f"{S.reads_all} {S.reads_group}"]
    # Nor is it sent every application's events outside the relays' group (to acknowledge and drop them).
    relayed = [p for p in grant(S, "gateway").subscribe if p.split(" ")[0] == S.ingest_all]
    assert relayed == [f"{S.ingest_all} {S.ingest_group}"]


@pytest.mark.parametrize("identity", ["app", app_user("acme", "shop")])
def test_no_application_user_makes_a_jetstream_api_request(identity: str) -> None:
    # JetStream answers an API request (STREAM.INFO, MSG.GET, DIRECT.GET, ...) on whatever reply subject the
    # requester names, unchecked: a KV key's, where the answer is stored as the key's value. Before, the shared
    # `app` user read decisions and keys with such requests; both read through the gateway now.
    g = grant(S, identity)
    assert [p for p in g.publish if p.startswith("$")] == []
    for request in ("$JS.API.INFO", f"$JS.API.STREAM.INFO.KV_{S.kv_gates}", f"$JS.API.STREAM.MSG.GET.KV_{S.kv_keys}",
                    f"$JS.API.DIRECT.GET.KV_{S.kv_gates}.$KV.{S.kv_gates}.k", "$JS.API.STREAM.NAMES"):
        assert not may_publish(identity, request), request


@pytest.mark.parametrize("identity", ["app", app_user("acme", "shop")])
def test_no_application_user_publishes_on_a_streams_subject(identity: str) -> None:
    # JetStream acknowledges a publish on a stream's subject on whatever reply subject the publisher names,
    # unchecked: a KV key's, where the acknowledgement is stored as the key's value.
    subjects = [sub.replace("*", "t").replace(">", "t.x") for spec in S.streams.values() for sub in spec.subjects]
    subjects += [f"$KV.{b}.k" for b in (S.kv_gates, S.kv_routes, S.kv_budgets, S.kv_audit, S.kv_keys)]
    subjects += [f"$O.{S.object_store}.C.x", S.inference("shop", "acme"), S.served("shop", "acme")]
    assert [sub for sub in subjects if may_publish(identity, sub)] == []


def test_an_application_user_publishes_its_own_tenants_and_apps_events_only() -> None:
    user = app_user("acme co", "shop.v2")
    assert app_of(user) == ("acme co", "shop.v2") and app_of("app") is None and app_of("apps.a=41.b") is None
    g = grant(S, user)
    # Not even its own inference subject: a stream's, whose acknowledgement JetStream publishes on any reply
    # subject the publisher names. The gateway relays `ingest` there, answering the sender's own inbox only.
    # Nor any JetStream API request, which it never makes and whose answer JetStream sends on any reply subject.
    assert g.publish == [S.ingest("shop.v2", "acme co"), f"{S.reads('shop.v2', 'acme co')}.>"]
    # Its decisions are read through the gateway, and followed on the gateway's copies of its own releases'
    # announcements: `gate.decided` carries every tenant's decisions whole. And on the gateway's notice, empty, to
    # read them all again (one (re)started: what was announced while none passed it on went to nobody).
    assert g.subscribe == [f"_INBOX.{user}.>", S.app_decided_of("shop.v2", "acme co"), S.app_relist]
    assert not g.responses
    assert not any(matches(p, S.gate_decided("r")) for p in g.subscribe)
    assert not any(matches(p, S.app_decided("shop.v2", "acme", "r")) for p in g.subscribe)
    assert not any(matches(p, S.read_decision("shop.v2", "acme", "r")) for p in g.publish)
    assert any(matches(p, S.read_decisions("shop.v2", "acme co", "")) for p in g.publish)
    # Its replies are its own: outside the shared `app` user's inbox.
    assert not any(matches(p, f"_INBOX.{user}.x") for p in grant(S, "app").subscribe)
    for subject in (S.inference("shop.v2", "acme co"), S.ingest("shop.v2", "acme"), S.served("shop.v2", "acme co"),
                    S.gate_decided("r")):
        assert not any(matches(p, subject) for p in g.publish)


@pytest.mark.parametrize("identity", [i for i in IDENTITIES if i not in ("router", "admin")])
def test_only_the_router_publishes_the_events_of_served_requests(identity: str) -> None:
    # Canary analysis takes these alone as live evidence: an application (or a service ingesting for one)
    # publishing there could steer a rollout with events of requests nobody served.
    assert not any(matches(p, S.served("shop")) for p in grant(S, identity).publish)
    assert any(matches(p, S.served("shop")) for p in grant(S, "router").publish)
    assert not any(matches(p, S.inference("shop")) for p in grant(S, "router").publish)


def _durables() -> list[tuple[str, str, str]]:
    # (stream, durable, owner) for every durable consumer a service runs: the readers of interest streams among them
    return [(S.streams[key].name, S.durable(service, p), service)
            for service, streams in DURABLES.items() for key, purposes in streams.items() for p in purposes]


@pytest.mark.parametrize(("stream", "durable", "owner"), _durables())
def test_only_a_durables_own_service_may_create_it(stream: str, durable: str, owner: str) -> None:
    # A create of an existing consumer is an update nats-server applies whatever it changes (probe p65 F2: the sink,
    # which declared every interest stream's readers, narrowed the drift monitor's filter to a subject nobody
    # publishes, and the stream dropped every event drift never saw). In every form: plain, with a filter, legacy.
    for subject in (f"$JS.API.CONSUMER.CREATE.{stream}.{durable}", f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.x.y",
                    f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}"):
        assert {i for i in IDENTITIES if may_publish(i, subject)} == {owner, "admin"}, subject


@pytest.mark.parametrize("identity", ["app", "viewer", "approver", "operator"])
def test_applications_and_the_cli_create_no_consumer(identity: str) -> None:
    # nats-server#8274: a consumer's delivery subject is not checked against its creator's rights, so these
    # identities read buckets by message get and follow decisions on the announcement subject instead.
    g = grant(S, identity)
    made = [p for p in g.publish if p.startswith(("$JS.API.CONSUMER.CREATE", "$JS.API.CONSUMER.DURABLE.CREATE",
                                                  "$JS.API.CONSUMER.MSG.NEXT", "$JS.ACK"))]
    assert made == []


@pytest.mark.parametrize("identity", IDENTITIES)
def test_the_viewer_roles_read_dead_letter_originals_by_message_get(identity: str) -> None:
    get = "$JS.API.STREAM.MSG.GET.OBJ_lg_dlq_originals"
    assert may_publish(identity, get) == (identity != "app"), identity


def test_the_otlp_receiver_publishes_spans_and_inference_only() -> None:
    facts = [p for p in grant(S, "otlp").publish if not p.startswith("$")]
    assert sorted(facts) == sorted([S.dlq_all, S.spans, S.inference_sent])


def test_the_query_service_answers_on_inboxes_only() -> None:
    # Before: `allow_responses`, so nats-server let it publish on any reply subject a requester named (a KV key's).
    g = grant(S, "query")
    assert not g.responses
    assert may_publish("query", "_INBOX.viewer.abc.1") and may_publish("query", "_INBOX.abc.1")
    for subject in ("$KV.lg_routes.shop-web", "$KV.lg_gates.shop-v2", S.served("shop"), S.gate_decided("r")):
        assert not may_publish("query", subject), subject


def test_the_query_service_subscribes_to_requests_in_its_queue_group_only() -> None:
    # Probe p65 F1: a second process with its credential, subscribed outside the group, was sent every request and
    # answered the evaluator's first.
    asked = [p for p in grant(S, "query").subscribe if p.split(" ")[0] in (S.query, S.query_cli)]
    assert asked == [f"{S.query} {S.query_group}", f"{S.query_cli} {S.query_group}"]


def test_only_the_services_ask_on_the_services_query_subject() -> None:
    # Probe p10: the viewer's requests waited in one queue with the gatekeeper's; the roles have a lane of their own,
    # and may not ask in the services' (the lane is the subject, which nats-server checks; a reply inbox is not).
    assert may_publish("query", S.query) is False
    for identity in ("viewer", "operator", "approver"):
        assert may_publish(identity, S.query_cli) and not may_publish(identity, S.query), identity
    for identity in SERVICES:
        assert not may_publish(identity, S.query_cli), identity
    assert [query_subject(S, r) for r in ROLES] == [S.query_cli] * len(ROLES)
    assert query_subject(S, "gatekeeper") == query_subject(S, "") == S.query


def test_replies_stay_private_to_each_identity() -> None:
    for identity in IDENTITIES:
        if identity != "admin":
            assert grant(S, identity).subscribe[0] == f"_INBOX.{identity}.>"
            assert not any(matches(p, "_INBOX.router.x") for p in grant(S, identity).subscribe) or identity == "router"


def test_the_deployed_nats_config_is_generated_from_the_table() -> None:
    committed = (ROOT / "deploy" / "nats" / "auth.conf").read_text()
    assert committed == deploy_auth_config(S), "regenerate: lockgate nats-config > deploy/nats/auth.conf"
