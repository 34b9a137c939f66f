"""Junk on the append-only provenance stream, as the operator NATS credential publishes it without any personal
key, on a stack run as `lockgate up` runs it (NATS auth on): every reader skips a record that does not decode or
verify and says so, the valid records stay readable and extendable, and the gatekeeper still decides.

Before, one `{"junk": true}` on an alias's subject made `alias get/set/list` fail (exit 1) for good (the stream
cannot be purged), and one on an artifact's lifecycle subject made the gatekeeper dead-letter the eval result of
every release using that artifact: none was ever decided."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats
import pytest

from lockgate import artifacts, credentials
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import AliasChanged, EvalCompleted, EvalRequested, GateDecided
from lockgate.evalruns import record_request
from lockgate.identity import Identity
from lockgate.permissions import inbox
from lockgate.provenance import chain
from lockgate.server.runtime import Runtime
from lockgate.signing import Signer
from tests.helpers import person, register_model_release, run_cli
from tests.integration.test_app_credentials import Errors
from tests.integration.test_gate_flow import started_on

pytestmark = pytest.mark.timeout(120)

JUNK = b'{"junk": true}'
POLICY = {"name": "junk-policy", "version": "1",
          "rules": [{"name": "accuracy", "metric": "exact_match", "op": ">=", "threshold": 0.8}]}


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    """The embedded runtime with its own nats-server and a user per identity (the gatekeeper asks the query
    service, which reads what the sink stored)."""
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink", "query", "gatekeeper"])
    await runtime.start()
    yield runtime
    await runtime.stop()



@pytest.fixture
async def operator(stack: Runtime) -> AsyncIterator[tuple[nats.NATS, Errors]]:
    """A plain NATS connection with the operator credential of the stack's home: no personal key at all."""
    auth = credentials.for_identity(stack.settings, "operator")
    errors = Errors()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(stack.settings.nats_url, user=auth.user, password=auth.password, error_cb=on_error,
                            allow_reconnect=False, inbox_prefix=inbox("operator"))
    yield nc, errors
    await nc.close()


async def _append(nc: nats.NATS, subject: str, data: bytes) -> int:
    """Publish on the provenance stream as `nc` (no message id: the stream stores a copy too); its sequence."""
    return (await nc.jetstream().publish(subject, data, timeout=10)).seq


async def test_junk_and_forged_records_on_an_alias_are_skipped_and_said(stack: Runtime, operator: Any) -> None:
    nc, _ = operator
    s, bus = stack.settings, stack.ctx.bus
    ann = person(s, "ann", "operator")
    for name in ("shop-v1", "shop-v2"):
        art = await artifacts.register(bus, "prompt", f"{name}-prompt", {"template": name})
        await artifacts.register_release(bus, name, "shop", {f"prompt/{name}-prompt": art.hash})
    staging = bus.subjects.alias("shop", "staging")

    # Junk on an alias never set: it still points to nothing (exit 3, not 1), and the skip is said.
    await _append(nc, staging, JUNK)
    unset = await run_cli(stack, "alias", "get", "shop", "staging")
    assert unset.exit_code == 3 and "points to nothing yet" in unset.output, unset.output
    assert "1 record skipped" in unset.output and "not a readable record" in unset.output
    first = await run_cli(stack, "--as", "ann", "alias", "set", "shop", "staging", "shop-v1", "--json")
    assert first.exit_code == 0, first.output
    record = msgspec.convert(json.loads(first.stdout)["record"], AliasChanged)
    assert record.seq == 1 and record.previous == ""

    # After it: junk, ann's record altered to point elsewhere (its signature no longer matches), the same record
    # replayed, a record chained after it but signed by a key nobody trusts, and ann's genuine record of another
    # alias.
    forged = msgspec.structs.replace(record, id="forged", release="shop-v2", previous="shop-v1", seq=2,
                                     prev_digest=chain.digest(record))
    mallory = chain.seal(Identity("ann", Signer.generate()), msgspec.structs.replace(record, release="shop-v2"),
                         record)
    other = chain.seal(ann, AliasChanged(app="shop", alias="production", release="shop-v2", seq=0), None)
    for data in (JUNK, encode(forged), encode(record), encode(mallory), encode(other)):
        await _append(nc, staging, data)
    got = await run_cli(stack, "alias", "get", "shop", "staging")
    assert got.exit_code == 0 and got.stdout.strip() == "shop-v1", got.output
    assert "6 records skipped" in got.output and "not signed by a trusted person" in got.output, got.output
    assert "1 a copy of an earlier record" in got.output and "1 a record of another history" in got.output

    # A trusted person still moves it: the new record follows ann's first, whatever lies between.
    second = await run_cli(stack, "--as", "ann", "alias", "set", "shop", "staging", "shop-v2")
    assert second.exit_code == 0 and "change #2" in second.output, second.output
    history = await run_cli(stack, "history", "shop/staging", "--json")
    assert history.exit_code == 0, history.output
    view = json.loads(history.stdout)
    assert view["release"] == "shop-v2" and [h["seq"] for h in view["history"]] == [2, 1]
    assert len(view["skipped"]) == 6 and {k["kind"] for k in view["skipped"]} == {
        "undecodable", "unverified", "copy", "foreign"}

    # Junk on a subject no alias has (an invalid name's token), and a JetStream acknowledgement aimed at one:
    # the list skips them.
    await _append(nc, f"{s.prefix}.provenance.alias.=.staging", encode(record))
    acks = await bus.js.subscribe(f"{s.prefix}.provenance.alias.zz", ordered_consumer=True)
    await nc.publish(staging, JUNK, reply=f"{s.prefix}.provenance.alias.zz")
    await acks.next_msg(timeout=10)  # the ack is stored in the provenance stream
    await acks.unsubscribe()
    listed = await run_cli(stack, "alias", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [(a["app"], a["alias"], a["release"]) for a in json.loads(listed.stdout)] == [("shop", "staging", "shop-v2")]
    assert "records skipped" in listed.stderr


async def test_the_operator_credential_publishes_only_on_an_alias_or_a_lifecycle_subject(
        stack: Runtime, operator: Any) -> None:
    # Before, it might publish anywhere under `lg.provenance.>`.
    nc, errors = operator
    p = stack.settings.prefix
    for subject in (f"{p}.provenance.junk", f"{p}.provenance.alias.shop", f"{p}.provenance.alias.shop.staging.x",
                    f"{p}.provenance.lifecycle.a.b"):
        await nc.publish(subject, JUNK)
        await errors.refused(subject)
    # Where `alias set` and `artifact deprecate` append, it still may (readers skip what it alone publishes).
    assert await _append(nc, stack.ctx.bus.subjects.alias("shop", "staging"), JUNK) > 0
    assert await _append(nc, stack.ctx.bus.subjects.lifecycle("sha256:" + "0" * 64), JUNK) > 0


async def test_junk_on_a_lifecycle_neither_dead_letters_the_gate_nor_hides_a_deprecation(
        stack: Runtime, operator: Any) -> None:
    nc, _ = operator
    s, bus = stack.settings, stack.ctx.bus
    person(s, "ann", "operator")
    arts = await register_model_release(bus, "shop-lc")
    [(key, digest)] = arts.items()
    subject = bus.subjects.lifecycle(digest)

    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    deprecated = await run_cli(stack, "--as", "ann", "artifact", "deprecate", digest, "--sunset", past)
    assert deprecated.exit_code == 0, deprecated.output
    await _append(nc, subject, JUNK)

    policy = (await artifacts.register(bus, "policy", POLICY["name"], POLICY)).hash
    done = EvalCompleted(run_id="run-junk", release="shop-lc", suite="sha256:suite", policy=policy, n_cases=50,
                         metrics={"exact_match": 0.9}, binding=await started_on(bus, "shop-lc"))
    await record_request(bus, EvalRequested(run_id=done.run_id, release=done.release, suite=done.suite,
                                            policy=policy, endpoint="http://127.0.0.1:9/v1"))
    decided = await bus.nc.subscribe(bus.subjects.gate_decided("shop-lc"))
    dead = await bus.nc.subscribe(bus.subjects.dlq_all)
    await bus.publish(bus.subjects.eval_completed, done)
    # Whichever comes first: a decision, or the eval result dead-lettered (as before the fix).
    waits = {asyncio.ensure_future(decided.next_msg(timeout=60)): "decided",
             asyncio.ensure_future(dead.next_msg(timeout=60)): "dead-lettered"}
    finished, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    [first] = finished
    msg = first.result()
    assert waits[first] == "decided", msg.data[:400]
    await decided.unsubscribe()
    await dead.unsubscribe()
    decision = msgspec.json.decode(msg.data, type=GateDecided)
    # The genuine deprecation past its sunset still blocks; the skipped records are named, not acted on.
    assert decision.decision == "BLOCK" and decision.reason.startswith(key), decision.reason
    rules = {r.rule: r for r in decision.rules if r.rule.startswith("lifecycle")}
    assert rules[f"lifecycle {key}"].verdict == "FAIL"
    skipped = rules["lifecycle records skipped"]
    assert skipped.verdict == "PASS" and skipped.observed == 1.0 and "not a readable record" in skipped.hint
    explained = await run_cli(stack, "gate", "explain", "shop-lc")
    assert "1 lifecycle record skipped" in explained.output, explained.output

    # A trusted person still extends the lifecycle past the junk (a later sunset), and the CLI says what it skipped.
    await _append(nc, subject, JUNK)
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    again = await run_cli(stack, "--as", "ann", "artifact", "deprecate", digest, "--sunset", later, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["seq"] == 2, again.output
    assert "2 records skipped" in again.stderr
