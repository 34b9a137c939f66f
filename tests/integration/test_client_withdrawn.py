"""The SDK's `decisions()` takes back a decision it yielded that stops admitting anything with no new decision
written: its key revoked or retired, or the approval it rests on withdrawn, in the trust file. Before, the watch
said nothing and a subscriber kept acting on the PASS, while `decision()` refused it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from lockgate.bus import Bus
from lockgate.client import Client, DecisionWithdrawn
from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import GateDecided, RuleResult
from lockgate.errors import ClientClosed, SignatureError
from lockgate.signing import Signer, retire_key, revoke_key, revoke_person, trust_file_path, trust_key
from lockgate.subjects import token
from tests.helpers import gate_decided, person

pytestmark = pytest.mark.timeout(60)

SIGNER = Signer.generate()


def _client(settings: Settings) -> Client:
    return Client(settings.nats_url, prefix=settings.prefix, app="shop", trust_file=str(trust_file_path(settings)))


def withdrawal(how: str, settings: Settings) -> tuple[GateDecided, Callable[[], Any], str]:
    """A PASS trusted now, what takes it back (`how`), and the reason's words."""
    path = trust_file_path(settings)
    trust_key(path, SIGNER.public)
    if how == "approval":
        ann = person(settings, "ann", "approver")
        d = SIGNER.sign(GateDecided(release="shop-v1", decision="PASS", rules=[], approvals=["ann"],
                                    approval_keys=[ann.signer.key_id]))
        return d, lambda: revoke_person(path, "ann"), f"ann's key {ann.signer.key_id} is revoked"
    key = Signer.generate()
    trust_key(path, key.public)
    d = key.sign(GateDecided(release="shop-v1", decision="PASS", rules=[]))
    if how == "revoke":
        return d, lambda: revoke_key(path, key.key_id), f"revoked key id {key.key_id!r}"
    return d, lambda: retire_key(path, key.key_id, until_seq=0), "a retired key admits nothing"


@pytest.mark.parametrize("how", ["revoke", "retire", "approval"])
async def test_a_yielded_pass_that_stops_verifying_ends_the_watch_naming_it(
        bus: Bus, settings: Settings, how: str) -> None:
    passed, withdraw, why = withdrawal(how, settings)
    await gate_decided(bus, passed, passed.id)
    async with _client(settings) as c:
        stream = c.decisions("shop-")
        assert await asyncio.wait_for(anext(stream), 10) == passed
        withdraw()  # no new decision: only the trust file changed
        with pytest.raises(DecisionWithdrawn) as err:
            await asyncio.wait_for(anext(stream), 10)
        assert isinstance(err.value, SignatureError)
        assert err.value.withdrawn == [("shop-v1", passed.id, err.value.withdrawn[0][2])]
        message = err.value.message
        assert "release 'shop-v1'" in message and passed.id in message and why in message, message
        # What decision() says alike.
        with pytest.raises(SignatureError, match=why):
            await c.decision("shop-v1")
        # Watched again, it is not yielded: refused as any decision that does not verify.
        again = c.decisions("shop-")
        later = SIGNER.sign(GateDecided(release="shop-v2", decision="PASS", rules=[]))
        await gate_decided(bus, later, later.id)
        assert await asyncio.wait_for(anext(again), 10) == later
        assert c.rejected_decisions == 1
        await again.aclose()


async def test_a_yielded_decision_replaced_by_one_that_does_not_verify_is_withdrawn(
        bus: Bus, settings: Settings) -> None:
    trust_key(trust_file_path(settings), SIGNER.public)
    passed = SIGNER.sign(GateDecided(release="shop-v1", decision="PASS", rules=[]))
    await gate_decided(bus, passed, passed.id)
    async with _client(settings) as c:
        stream = c.decisions("shop-")
        assert await asyncio.wait_for(anext(stream), 10) == passed
        # The release's current decision is now one decision() refuses: the PASS yielded is no longer it.
        tampered = msgspec.structs.replace(SIGNER.sign(GateDecided(release="shop-v1", decision="BLOCK", rules=[])),
                                           decision="PASS")
        await (await bus.kv(bus.subjects.kv_gates)).put(token("shop-v1"), encode(tampered))
        await bus.nc.publish(bus.subjects.gate_decided("shop-v1"), b"")
        with pytest.raises(DecisionWithdrawn, match=f"decision {passed.id} is withdrawn .*newer decision "
                                                    f"{tampered.id} is refused: signature invalid"):
            await asyncio.wait_for(anext(stream), 10)


def no_decision(release: str, how: str) -> bytes:
    """A value under `release`'s key that is no decision of it: a genuinely signed BLOCK whose rule's threshold JSON
    cannot carry (-inf, written null: probe p68 F1), or another release's decision."""
    if how == "undecodable":
        inf = RuleResult(rule="per-slice", metric="m", op=">=", threshold=float("-inf"), observed=None,
                         verdict="NO_DATA")
        return encode(SIGNER.sign(GateDecided(release=release, decision="BLOCK", rules=[inf])))
    return encode(SIGNER.sign(GateDecided(release="shop-v9", decision="PASS", rules=[])))


@pytest.mark.parametrize(("how", "why"), [("undecodable", re.escape("it does not decode (Expected `float`, got `null` - "
                                                                     "at `$.rules[0].threshold`)")),
                                          ("other release", "it is decision .* of 'shop-v9'")])
async def test_a_yielded_decision_replaced_by_a_value_that_is_no_decision_is_withdrawn(
        bus: Bus, settings: Settings, how: str, why: str) -> None:
    # Before (probe p68 F1): the watch logged "skipping undecodable gate decision" and went on, so its last yield, the
    # PASS, stood, while decision() refused the release's value as no gate decision.
    trust_key(trust_file_path(settings), SIGNER.public)
    passed = SIGNER.sign(GateDecided(release="shop-v1", decision="PASS", rules=[]))
    await gate_decided(bus, passed, passed.id)
    async with _client(settings) as c:
        stream = c.decisions("shop-")
        assert await asyncio.wait_for(anext(stream), 10) == passed
        await (await bus.kv(bus.subjects.kv_gates)).put(token("shop-v1"), no_decision("shop-v1", how))
        await bus.nc.publish(bus.subjects.gate_decided("shop-v1"), b"")
        with pytest.raises(DecisionWithdrawn, match=f"decision {passed.id} is withdrawn \\(its release's newer value "
                                                    f"in the gates bucket is no decision of it: {why}"):
            await asyncio.wait_for(anext(stream), 10)
        with pytest.raises(SignatureError):
            await c.decision("shop-v1")
        # A watch that never yielded the release's decision skips the value and goes on.
        again = c.decisions("shop-")
        later = SIGNER.sign(GateDecided(release="shop-v2", decision="PASS", rules=[]))
        await gate_decided(bus, later, later.id)
        assert await asyncio.wait_for(anext(again), 10) == later
        await again.aclose()


async def test_a_watch_ends_when_its_client_is_closed(bus: Bus, settings: Settings) -> None:
    # Found by a probe (p10): a watch waiting for its next decision kept waiting after close(), for good (its
    # subscriptions and task leaked, and the application never learnt its watch was dead).
    passed = SIGNER.sign(GateDecided(release="shop-v1", decision="PASS", rules=[]))
    trust_key(trust_file_path(settings), SIGNER.public)
    await gate_decided(bus, passed, passed.id)
    c = _client(settings)
    await c.start()
    stream = c.decisions("shop-")
    assert await asyncio.wait_for(anext(stream), 10) == passed
    waiting = asyncio.ensure_future(anext(stream))
    await c.close()
    with pytest.raises(ClientClosed, match="decisions\\(\\) watch ends"):
        await asyncio.wait_for(waiting, 10)
