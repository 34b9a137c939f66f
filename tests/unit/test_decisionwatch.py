"""The consumer-free decision watch against a stand-in bucket and connection: current values, then what is
announced, newest per release by KV revision, and every key read again after a reconnection; and `verified`,
which takes back what it yielded once the trust roots no longer admit it."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import nats.js.errors
import pytest

from lockgate.codec import encode
from lockgate.config import Settings
from lockgate.contracts import DecisionsPage, DecisionsRead, GateDecided, StoredDecision
from lockgate.decisionwatch import (
    DecisionWithdrawn,
    GatewaySource,
    Newest,
    ReconnectCounter,
    StaleDecision,
    Unreadable,
    follow_decisions,
    verified,
    watch_decisions,
)
from lockgate.errors import BusUnavailable, ClientClosed, SignatureError
from lockgate.signing import Signer, Verifier, revoke_key, trust_file_path, trust_key
from lockgate.subjects import Subjects, token

pytestmark = pytest.mark.timeout(10)

S = Subjects("lg")


class Bucket:
    """The gates bucket: each key's latest value and revision (a shared stream sequence)."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[int, bytes]] = {}
        self.seq = 0

    def put(self, key: str, value: bytes) -> None:
        self.seq += 1
        self.values[key] = (self.seq, value)

    async def get(self, key: str) -> Any:
        if key not in self.values:
            raise nats.js.errors.KeyNotFoundError
        revision, value = self.values[key]
        return SimpleNamespace(key=key, value=value, revision=revision)

    async def stream_info(self, stream: str, subjects_filter: str) -> Any:
        assert (stream, subjects_filter) == (f"KV_{S.kv_gates}", f"$KV.{S.kv_gates}.>")
        return SimpleNamespace(state=SimpleNamespace(subjects={f"$KV.{S.kv_gates}.{k}": 1 for k in self.values}))


class Connection:
    """A core connection: one subscription, whose callback the test calls as the server would."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.on_message: Any = None
        self.unsubscribed = False
        self.is_closed = False

    async def subscribe(self, subject: str, cb: Any) -> Any:
        assert subject == S.gate_decided_all
        self.on_message = cb

        async def unsubscribe() -> None:
            self.unsubscribed = True
        return SimpleNamespace(unsubscribe=unsubscribe)

    async def flush(self) -> None:
        return None

    def jetstream(self) -> Bucket:
        return self.bucket

    async def announce(self, release: str) -> None:
        await self.on_message(SimpleNamespace(subject=S.gate_decided(release), data=b"ignored"))


def store(bucket: Bucket, release: str, decision: str = "PASS", key: str | None = None) -> GateDecided:
    d = GateDecided(release=release, decision=decision, rules=[])
    bucket.put(key or token(release), encode(d))
    return d


async def next_of(it: Any) -> GateDecided:
    return await asyncio.wait_for(anext(it), 5)


async def test_current_then_announced_newest_per_release_and_a_relist_after_reconnecting() -> None:
    bucket, reconnects = Bucket(), ReconnectCounter()
    conn = Connection(bucket)
    first = store(bucket, "shop-1")
    copied = store(bucket, "shop-2", key=token("shop-x"))  # copied under another release's key: never yielded
    bucket.put(token("shop-bad"), b"{not json")  # undecodable: the watch goes on
    watch = await watch_decisions(bucket, "shop-", nc=conn, subjects=S, reconnects=reconnects)
    assert await next_of(watch) == first
    # Each passed on as no decision of its key's release, for `verified` to take back what it yielded of it (probe
    # p68 F1); never as a decision.
    assert [await next_of(watch), await next_of(watch)] == [
        Unreadable("shop-x", f"it is decision {copied.id} of 'shop-2'"),
        Unreadable("shop-bad", "it does not decode (JSON is malformed: object keys must be strings (byte 1))")]

    second = store(bucket, "shop-2", "BLOCK")
    await conn.announce("search-1")  # another prefix, and nothing stored under it
    await conn.announce("shop-2")
    await conn.announce("shop-2")  # announced twice (a redelivery): yielded once
    assert await next_of(watch) == second

    newer = store(bucket, "shop-1", "BLOCK")
    await conn.announce("shop-1")
    await conn.announce("shop-1")  # a late, stale announcement: KV holds nothing newer
    third = store(bucket, "shop-3")
    await conn.announce("shop-3")
    assert [await next_of(watch), await next_of(watch)] == [newer, third]

    # Written while the connection was down, so never announced to it: read when it comes back.
    lost = store(bucket, "shop-4")
    await reconnects.bump()
    assert await next_of(watch) == lost

    await watch.aclose()
    assert conn.unsubscribed


class Flaky:
    """A source (the gateway) that answers from the bucket, or fails as one with no responder while `down`."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket, self.down = bucket, False
        self.failed = asyncio.Event()

    async def read(self, key: str | None) -> list[Any]:
        if self.down:
            self.failed.set()
            raise BusUnavailable("cannot read gate decisions through the lockgate gateway: NoRespondersError()")
        return [await self.bucket.get(k) for k in ([key] if key else list(self.bucket.values))]


async def test_a_watch_goes_on_through_failed_reads_and_ends_only_with_its_connection() -> None:
    bucket, reconnects = Bucket(), ReconnectCounter()
    conn, source = Connection(bucket), Flaky(bucket)
    first = store(bucket, "shop-1")
    watch = await follow_decisions(source, nc=conn, announcements=S.gate_decided_all, reconnects=reconnects)
    assert await next_of(watch) == first

    source.down = True  # the stack restarted, and the gateway is not back yet
    waiting = asyncio.ensure_future(anext(watch))
    second = store(bucket, "shop-1", "BLOCK")
    await reconnects.bump()
    await asyncio.wait_for(source.failed.wait(), 5)  # the read after the reconnection failed
    assert not waiting.done()
    source.down = False
    await reconnects.bump()  # the gateway back (its relist): every key read again
    assert await asyncio.wait_for(waiting, 5) == second

    source.down, conn.is_closed = True, True  # the client closed: nothing will answer again
    await conn.announce("shop-1")
    with pytest.raises(BusUnavailable, match="NoRespondersError"):
        await next_of(watch)


async def test_a_bucket_made_anew_is_read_as_current_though_its_revisions_start_again() -> None:
    # Found by a probe (p10): only a revision higher than the last read was yielded, so after the gates bucket came
    # back new (a lost store, declared again by a restarted stack) a running watch kept the old PASS as current
    # while decision() read the new BLOCK, until the key's revision passed the old one.
    bucket, reconnects = Bucket(), ReconnectCounter()
    conn = Connection(bucket)
    for _ in range(5):
        store(bucket, "shop-1")
    watch = await watch_decisions(bucket, "shop-", nc=conn, subjects=S, reconnects=reconnects)
    assert (await next_of(watch)).decision == "PASS"
    bucket.values.clear()
    bucket.seq = 0  # the bucket made anew
    blocked = store(bucket, "shop-1", "BLOCK")
    await conn.announce("shop-1")
    assert await next_of(watch) == blocked
    await watch.aclose()


async def test_a_watch_ends_once_its_client_is_closed() -> None:
    bucket, reconnects = Bucket(), ReconnectCounter()
    conn = Connection(bucket)
    store(bucket, "shop-1")
    watch = await watch_decisions(bucket, "shop-", nc=conn, subjects=S, reconnects=reconnects)
    await next_of(watch)
    waiting = asyncio.ensure_future(anext(watch))
    await reconnects.close()
    with pytest.raises(ClientClosed):
        await asyncio.wait_for(waiting, 5)


async def test_a_watch_whose_first_read_fails_says_so_at_once() -> None:
    source = Flaky(Bucket())
    source.down = True
    watch = await follow_decisions(source, nc=Connection(source.bucket), announcements=S.gate_decided_all)
    with pytest.raises(BusUnavailable, match="lockgate gateway"):
        await next_of(watch)


class Gateway:
    """The gateway's reads as a connection's requests: `pages` answers in turn, each request's body kept."""

    def __init__(self, *pages: bytes) -> None:
        self.pages = list(pages)
        self.asked: list[tuple[str, bytes]] = []

    async def request(self, subject: str, body: bytes, timeout: float) -> Any:
        self.asked.append((subject, body))
        return SimpleNamespace(data=self.pages.pop(0))


def _entry(key: str, revision: int) -> StoredDecision:
    return StoredDecision(key=key, revision=revision, value=b"signed")


async def test_the_gateway_source_reads_every_page_of_the_current_decisions() -> None:
    a, b, c = _entry("a", 1), _entry("b", 2), _entry("c", 3)
    nc = Gateway(encode(DecisionsRead(entries=[a, b], next_after="b")), encode(DecisionsRead(entries=[c])),
                 encode(DecisionsRead(entries=[b])))
    source = GatewaySource(nc, S, "acme", "shop")
    assert await source.read(None) == [a, b, c]
    assert await source.read("b") == [b]
    listing = S.read_decisions("shop", "acme", "")
    assert nc.asked == [(listing, encode(DecisionsPage(after=""))), (listing, encode(DecisionsPage(after="b"))),
                        (S.read_decision("shop", "acme", "b"), b"")]  # one key: a body-less request, as before


async def test_a_gateway_from_before_pages_answers_in_one_and_one_that_does_not_move_on_is_refused() -> None:
    a = _entry("a", 1)
    before_pages = b'{"entries":[{"key":"a","revision":1,"value":"c2lnbmVk"}],"error":"","message":""}'
    assert await GatewaySource(Gateway(before_pages), S, "acme", "shop").read(None) == [a]
    stuck = encode(DecisionsRead(entries=[a], next_after="a"))
    with pytest.raises(BusUnavailable, match="not past 'a'"):
        await GatewaySource(Gateway(stuck, stuck), S, "acme", "shop").read(None)


async def test_verified_takes_back_what_it_yielded_once_the_trust_roots_no_longer_admit_it(tmp_path: Any) -> None:
    settings = Settings(home=str(tmp_path))
    path = trust_file_path(settings)
    kept, revoked, unknown = Signer.generate(), Signer.generate(), Signer.generate()
    for signer in (kept, revoked):
        trust_key(path, signer.public)
    queue: asyncio.Queue[GateDecided] = asyncio.Queue()

    async def decisions() -> Any:
        while True:
            yield await queue.get()

    refused: list[SignatureError] = []
    watch = verified(decisions(), Verifier(None, settings), refused=refused.append, every_s=0.01)
    first, second = (s.sign(GateDecided(release=r, decision="PASS", rules=[]))
                     for s, r in ((kept, "a"), (revoked, "b")))
    for d in (unknown.sign(GateDecided(release="c", decision="PASS", rules=[])), first, second):
        queue.put_nowait(d)
    assert [await anext(watch), await anext(watch)] == [first, second]
    assert len(refused) == 1 and "unknown key id" in refused[0].message  # skipped, never yielded
    pending = asyncio.ensure_future(anext(watch))
    trust_key(path, Signer.generate().public)  # a change that takes nothing back: the watch goes on
    assert not (await asyncio.wait({pending}, timeout=0.1))[0]
    revoke_key(path, revoked.key_id)
    with pytest.raises(DecisionWithdrawn) as err:
        await asyncio.wait_for(pending, 5)
    assert err.value.withdrawn == [("b", second.id, err.value.withdrawn[0][2])]
    assert "revoked key id" in err.value.withdrawn[0][2] and "release 'a'" not in err.value.message


def test_newest_refuses_a_decision_signed_before_one_read_for_its_release() -> None:
    old = GateDecided(release="a", decision="PASS", rules=[])
    newer = GateDecided(release="a", decision="BLOCK", rules=[], time=old.time + timedelta(seconds=1))
    tied = GateDecided(release="a", decision="PASS", rules=[], time=newer.time)
    other = GateDecided(release="b", decision="PASS", rules=[], time=old.time - timedelta(days=1))
    newest = Newest()
    for decision in (old, newer, other):
        newest.check(decision)  # nothing read yet for any release
    newest.saw(newer)
    with pytest.raises(StaleDecision, match=f"decision {old.id} .* is older than decision {newer.id}") as err:
        newest.check(old)
    assert (err.value.release, err.value.id, err.value.newer) == ("a", old.id, newer.id)
    for decision in (newer, tied, other):  # the one read, again; one signed at the same time; another release's
        newest.check(decision)
    newest.saw(old)  # recorded only if not older: the floor stays
    with pytest.raises(StaleDecision):
        newest.check(old)


def test_newest_orders_by_the_signed_seq_never_by_the_signing_clock() -> None:
    # Found by a probe: a reject made by a gatekeeper replica whose clock ran a minute behind was signed before the
    # PASS it replaced, and was refused as stale. Its seq is the PASS's + 1: it is the newer.
    passed = GateDecided(release="a", decision="PASS", rules=[], seq=4)
    blocked = GateDecided(release="a", decision="BLOCK", rules=[], seq=5, time=passed.time - timedelta(minutes=1))
    newest = Newest()
    newest.saw(passed)
    newest.check(blocked)
    newest.saw(blocked)
    with pytest.raises(StaleDecision, match=f"decision {passed.id} \\(PASS, seq 4\\) is older than decision "
                                            f"{blocked.id} \\(BLOCK, seq 5\\)"):
        newest.check(passed)  # later by its clock, older by its seq
    # A decision without a seq (signed before decisions carried one) is older than any with one, whatever its time:
    # none made before can pass for newer once one with a seq was read.
    before = GateDecided(release="a", decision="PASS", rules=[], time=passed.time + timedelta(days=365))
    with pytest.raises(StaleDecision, match="no seq, signed"):
        newest.check(before)
    newest.saw(before)  # not recorded over the newer one
    newest.check(blocked)
    # Read first, one without a seq gives way to the first with one, whatever their times.
    fresh = Newest()
    fresh.saw(before)
    fresh.check(passed)


async def test_verified_skips_a_decision_older_than_one_it_yielded_and_goes_on(tmp_path: Any) -> None:
    settings = Settings(home=str(tmp_path))
    signer = Signer.generate()
    trust_key(trust_file_path(settings), signer.public)
    old = signer.sign(GateDecided(release="a", decision="PASS", rules=[]))
    newer = signer.sign(GateDecided(release="a", decision="BLOCK", rules=[], time=old.time + timedelta(seconds=1)))
    later = signer.sign(GateDecided(release="a", decision="PASS", rules=[], time=old.time + timedelta(seconds=2)))

    async def decisions() -> Any:
        for d in (newer, old, later):
            yield d

    refused: list[SignatureError] = []
    watch = verified(decisions(), Verifier(None, settings), refused=refused.append, newest=Newest())
    assert [d async for d in watch] == [newer, later]  # the old one skipped, not the end of the watch
    assert len(refused) == 1 and isinstance(refused[0], StaleDecision)
