"""What the lineage recorder records of a release: the binding's id, time and content, never an announcement's
claims (probe p12, F3), and which releases an event names (F6)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lockgate.artifacts import announcement_id, release_bundle
from lockgate.contracts import EvalCompleted, GateDecided, RolloutState
from lockgate.errors import InvalidEvent
from lockgate.identity import bundle_content
from lockgate.ids import content_hash
from lockgate.services.lineage.domain import (
    MAX_CLAIM_SKEW,
    bound_release,
    claim_problem,
    edges_fact,
    releases_named,
)

pytestmark = pytest.mark.timeout(30)

ARTS = {"prompt/answer": "sha256:" + "ab" * 32}
BOUND_AT = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)


def test_every_announcement_of_one_binding_is_one_fact_at_the_binding_time() -> None:
    bundle = release_bundle("shop-v2", "shop", ARTS, parent="shop-v1")
    honest = bound_release(bundle, BOUND_AT, description="the real one")
    # An author's signature is not content: a signed binding is the same release.
    signed = bound_release({**bundle, "author": {"name": "olly", "key_id": "k", "signature": "s"}}, BOUND_AT)
    assert honest.id == signed.id == announcement_id("shop-v2", content_hash(bundle_content(bundle)))
    assert (honest.time, honest.release, honest.app, honest.parent, honest.artifacts) == (
        BOUND_AT, "shop-v2", "shop", "shop-v1", ARTS)
    # Its edges are the binding's too: one edge set, at the binding's time.
    fact = edges_fact(honest)
    assert fact is not None and fact == edges_fact(signed) and fact.time == BOUND_AT
    other = bound_release(release_bundle("shop-v2", "shop", {"prompt/answer": "sha256:" + "cd" * 32}), BOUND_AT)
    assert other.id != honest.id


def test_a_bundle_put_in_the_bucket_by_hand_is_no_release() -> None:
    for junk in ({"release": "x"}, {"release": "x", "app": "shop", "artifacts": ["a"]},
                 {"release": "not a name!", "app": "shop", "artifacts": {}}):
        with pytest.raises(InvalidEvent):
            bound_release(junk, BOUND_AT)


def test_a_claimed_time_far_from_the_clock_is_refused() -> None:
    assert claim_problem(BOUND_AT - timedelta(minutes=5), BOUND_AT) is None
    assert claim_problem(BOUND_AT + MAX_CLAIM_SKEW, BOUND_AT) is None
    assert claim_problem(BOUND_AT.replace(tzinfo=None), BOUND_AT) is None  # sent without a zone: UTC
    for claimed in (datetime(2020, 1, 1, tzinfo=UTC), BOUND_AT + MAX_CLAIM_SKEW + timedelta(seconds=1)):
        why = claim_problem(claimed, BOUND_AT)
        assert why is not None and "from the recorder's clock" in why


def test_the_releases_an_event_names() -> None:
    assert releases_named(GateDecided(release="r2", decision="PASS", eval_run="e", rules=[])) == ["r2"]
    assert releases_named(EvalCompleted(run_id="e", release="r2", suite="s")) == ["r2"]
    assert releases_named(RolloutState(deployment="web", stable_release="r1", canary_release="r2")) == ["r1", "r2"]
