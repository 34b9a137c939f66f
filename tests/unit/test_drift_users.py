"""Users as the unit of the canary-versus-stable tests (probe p81 F1/F2) and every choice's finish reason (F3).

The router's split is sticky: a user's requests all go to one arm, and one user's answers are alike (their length,
their topic). A deterministic design: 20 users on each arm, whose typical answer lengths and topics are draws of one
distribution, served by the same model, requests taken in turn. Counted as rows, the arms' windows part far enough
for every row-level test; counted as users, they part as far as random splits of these users do."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
import pytest

from lockgate.contracts import DriftReport, FeatureDrift, InferenceEvent
from lockgate.services.drift import snapshots, stats, text
from lockgate.services.drift.domain import DriftMonitor
from lockgate.services.drift.features import OUTPUT_MESSAGES, finish_reason, rows
from lockgate.services.drift.windows import Pair, Windows

TOPICS = ["billing invoice refund payment card charge", "shipping delivery parcel tracking courier address",
          "password login account reset email security", "product size colour fabric fit return",
          "warranty repair broken device battery screen", "discount coupon promotion sale code price"]
FACTORS = (0.8, 0.9, 1.0, 1.1, 1.2)  # a user's answers around their typical length
USERS = 20  # on each arm
WINDOW = 200


def design(seed: int = 0) -> list[tuple[int, int]]:
    """Each user's typical answer length (lognormal around 60 tokens) and topic: the first USERS are the canary's."""
    rng = random.Random(seed)
    return [(int(math.exp(rng.gauss(math.log(60), 0.8))), rng.randrange(len(TOPICS))) for _ in range(2 * USERS)]


def answer(topic: int, k: int) -> str:
    r = random.Random(k)
    return "Sure. " + " ".join(r.choice(TOPICS[topic].split()) for _ in range(12)) + ". Anything else?"


def reports(users: bool, *, longer: float = 1.0, per_request: bool = False,
            giants: tuple[int, int] | None = None) -> list[DriftReport]:
    """The canary-versus-stable reports of two windows' traffic (`users`: events carry their user; `longer`: the
    canary's answers that many times as long; `per_request`: each request its own user; `giants`: besides each
    request, four of two more users, one on each arm, whose answers are that many tokens long, stable's and the
    canary's, whatever the release)."""
    m = DriftMonitor(WINDOW, WINDOW, 0.2, embedder=text.HASHING)
    t0, d, out = datetime(2026, 1, 1, tzinfo=UTC), design(), []
    for k in range(4 * WINDOW + 200):
        u = k % (2 * USERS)
        length, topic = d[u]
        canary = u < USERS
        time = t0 + timedelta(seconds=k / 100)
        e = InferenceEvent(deployment="chat", app="shop", variant="canary" if canary else "stable",
                           release="r2" if canary else "r1", model="m", input_tokens=10, latency_ms=5.0,
                           output_tokens=max(1, int(length * FACTORS[k // (2 * USERS) % 5] * longer ** canary)),
                           finish_reason="stop", prompt="q", response=answer(topic, k),
                           user_hash=(f"r{k}" if per_request else f"u{u}") if users else "", time=time)
        heavy = [InferenceEvent(deployment="chat", app="shop", variant="canary" if arm else "stable",
                                release="r2" if arm else "r1", model="m", input_tokens=10, latency_ms=5.0,
                                output_tokens=giants[arm], finish_reason="stop", prompt="q",
                                response=answer(0, k), user_hash=f"giant{arm}", time=time)
                 for arm in (0, 1)] if giants else []
        out += [r for r in m.observe_events([e, *heavy]) if r.comparison == "canary_vs_stable"]
    assert len(out) >= 2
    return out


def feature(report: DriftReport, name: str) -> FeatureDrift:
    return next(f for f in report.features if f.feature == name)


def test_an_identical_canary_serving_other_users_does_not_drift() -> None:
    for by_rows, by_users in zip(reports(False), reports(True), strict=True):
        rows_out, users_out = feature(by_rows, "output_tokens"), feature(by_users, "output_tokens")
        # As rows: significant and material, an alarm (what aborted identical canaries, probe p81 F1) ...
        assert rows_out.drifted and rows_out.p_value is not None and rows_out.p_value < 0.001 and rows_out.psi > 0.5
        # ... as users: the same PSI, but these 40 users split at random part the windows as far
        assert users_out.psi == rows_out.psi and not users_out.test_drifted and not users_out.drifted
        assert users_out.p_value is not None and users_out.p_value > 0.2 and not by_users.drifted
        # the text test permutes users: the arms' topics are the users' (probe p81 F2)
        assert feature(by_rows, "response_text").test_drifted
        users_text = feature(by_users, "response_text")
        assert not users_text.test_drifted and users_text.p_value is not None and users_text.p_value > 0.2


def test_a_real_shift_drifts_with_users_as_the_unit() -> None:
    report = reports(True, longer=3.0)[0]
    out = feature(report, "output_tokens")
    assert out.drifted and out.p_value is not None and out.p_value < 0.05 and report.drifted


def test_one_request_per_user_keeps_the_row_level_verdicts() -> None:
    # Each row its own unit: every feature's test, p-value and verdict as without users (the text test's
    # permutations are the same splits).
    for alone, anonymous in zip(reports(True, per_request=True), reports(False), strict=True):
        assert alone.features == anonymous.features


def test_units_are_a_users_rows_on_one_arm_and_a_row_without_a_user_its_own() -> None:
    nan = math.nan
    unit, g_ref, g_cur = stats.units_of(np.array([1.0, 1.0, nan, 2.0]), np.array([2.0, nan, nan, 3.0, 3.0]))
    # user 2 on both arms is a unit on each; each row without a user is one; numbered in order of first row
    assert unit.tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 6] and (g_ref, g_cur) == (3, 4)
    assert stats.clustered(np.array([1.0, 1.0]), np.array([2.0])) and not stats.clustered(np.array([1.0, nan]),
                                                                                            np.array([nan]))


def test_a_user_level_permutation_sees_a_shift_between_many_users() -> None:
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(60.0), 10)
    typical = rng.lognormal(4, 0.5, 60)[users.astype(int)]
    ref, cur = typical[:300], typical[300:] * 2
    assert stats.unit_pvalue(ref, cur, users[:300], users[300:], "ks") < 0.01
    assert stats.unit_pvalue(ref, cur, users[:300], users[300:], "wasserstein") < 0.01
    assert stats.unit_pvalue(ref, typical[300:], users[:300], users[300:], "ks") > 0.05


def giant_windows(seed: int, longer: float, giant_tokens: float | None) -> tuple[np.ndarray, ...]:
    """A stable's and its canary's windows and their rows' users: on each arm 20 users sending 5 answers each around
    their typical length (lognormal around 60 tokens) and 2 sending 200 each, four rows in five. The canary's answers
    are `longer` times as long; with `giant_tokens`, the giants' are all that long on either arm (`max_tokens`)."""
    rng = np.random.default_rng(seed)
    sizes = np.r_[np.full(40, 5), np.full(4, 200)]
    canary = np.r_[np.zeros(20), np.ones(20), 0, 0, 1, 1].astype(bool)
    typical = rng.lognormal(math.log(60), 0.8, len(sizes))
    if giant_tokens is not None:
        typical[40:] = giant_tokens
    user = np.repeat(np.arange(len(sizes), dtype=np.float64), sizes)
    values = np.round(typical[user.astype(int)] * rng.uniform(0.8, 1.2, len(user)))
    on_canary = canary[user.astype(int)]
    values[on_canary & (giant_tokens is None or user < 40)] *= longer
    return values[~on_canary], values[on_canary], user[~on_canary], user[on_canary]


@pytest.mark.parametrize("giant_tokens", [None, 1.0])
def test_a_few_giant_users_neither_decide_nor_hide_the_users_splits(giant_tokens: float | None) -> None:
    # Probe p87 F2: counted by their rows, the splits putting both giants of two on one side parted the windows far
    # more than any canary did; with `max_tokens: 1` giants (1.0) a canary three times as long was never found.
    # Every user weighing one, 100 designs: an identical canary's users' test errs at about its 5%, and the three
    # times as long canary is found, whatever the giants answer.
    same = sum(stats.unit_pvalue(*giant_windows(seed, 1.0, giant_tokens), "ks") < 0.05 for seed in range(100))
    longer = sum(stats.unit_pvalue(*giant_windows(seed, 3.0, giant_tokens), "ks") < 0.05 for seed in range(100))
    assert same <= 10 and longer >= 90, (same, longer)


def test_two_giant_users_cannot_hide_a_canary_answering_three_times_as_long() -> None:
    # Two users, one on each arm, send two rows in three with `max_tokens: 1` (probe p87 F2, through the monitor):
    # where the rows' KS test finds the canary, the users' test no longer overrides it.
    found = 0
    for report in reports(True, longer=3.0, giants=(1, 1)):
        out = feature(report, "output_tokens")
        assert out.psi >= 0.2 and out.drifted == (out.ks_pvalue < 0.05), out
        found += out.drifted
    assert found >= 2


@pytest.mark.parametrize("giants", [(150, 20), (20, 150)])
def test_an_identical_canary_with_a_heavy_user_on_each_arm_does_not_drift(giants: tuple[int, int]) -> None:
    # One user on each arm sends two rows in three, answered at a length of their own by either release: the rows'
    # test always finds the two apart, but 21 users a side split at random part them as far.
    for report in reports(True, giants=giants):
        out = feature(report, "output_tokens")
        assert out.ks_pvalue < 0.001 and not out.drifted and not report.drifted, out


@pytest.mark.parametrize(("choices", "expected"), [
    (["stop", "length"], "length"), (["stop", "content_filter"], "content_filter"), (["length", "stop"], "length"),
    (["stop", "stop"], "stop"), (None, "stop")])
def test_the_finish_reason_is_any_choices_that_did_not_end_normally(choices: list[str] | None, expected: str) -> None:
    attributes = {} if choices is None else {OUTPUT_MESSAGES: msgspec.json.encode(
        [{"role": "assistant", "parts": [], "finish_reason": c} for c in choices]).decode()}
    e = InferenceEvent(deployment="chat", app="shop", finish_reason=(choices or ["stop"])[0], attributes=attributes)
    assert finish_reason(e) == expected
    unreadable = InferenceEvent(deployment="chat", app="shop", finish_reason="stop",
                                attributes={OUTPUT_MESSAGES: "not json"})
    assert finish_reason(unreadable) == "stop"


def test_a_rollouts_windows_keep_their_units_across_a_restart() -> None:
    events = [InferenceEvent(deployment="chat", app="shop", variant="canary", user_hash=f"u{i % 3}")
              for i in range(6)]
    batch = rows(events)
    p = Pair(10)
    p.canary.push(batch.values, batch.times, None, batch.units)
    snap = snapshots.snapshot("chat", Windows(10, 10), p)
    back = snapshots.restore_pair(msgspec.json.decode(msgspec.json.encode(snap), type=snapshots.Snapshot), 10)
    assert back is not None
    np.testing.assert_array_equal(back.canary.ordered_units(), batch.units)
    assert len(np.unique(batch.units)) == 3
    # saved before units were kept: every row its own unit
    assert snap.pair is not None
    old = msgspec.structs.replace(snap.pair, canary=msgspec.structs.replace(snap.pair.canary, units=b""))
    again = snapshots.restore_pair(msgspec.structs.replace(snap, pair=old), 10)
    assert again is not None and np.isnan(again.canary.ordered_units()).all()
