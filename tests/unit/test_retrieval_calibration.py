"""Retrieval metrics and calibration against hand-computed examples."""

from __future__ import annotations

import math

import pytest

from lockgate.services.evaluator.calibration import (
    brier_score,
    choice_confidence,
    confidence_from_logprobs,
    expected_calibration_error,
    reliability_bins,
)
from lockgate.services.evaluator.retrieval import mrr, ndcg_at_k, precision_at_k, recall_at_k
from lockgate.services.evaluator.stats import InsufficientData

RETRIEVED = ["d3", "d1", "d7", "d2", "d9"]
RELEVANT = {"d1", "d2", "d4"}


@pytest.mark.parametrize(
    ("k", "recall", "precision"),
    [
        (1, 0.0, 0.0),
        (2, 1 / 3, 1 / 2),
        (4, 2 / 3, 2 / 4),
        (5, 2 / 3, 2 / 5),
        (10, 2 / 3, 2 / 10),
        (None, 2 / 3, 2 / 5),
    ],
)
def test_recall_and_precision_at_k(k, recall, precision):
    assert recall_at_k(RETRIEVED, RELEVANT, k) == pytest.approx(recall)
    assert precision_at_k(RETRIEVED, RELEVANT, k) == pytest.approx(precision)


def test_mrr():
    assert mrr(RETRIEVED, RELEVANT) == 0.5
    assert mrr(RETRIEVED, RELEVANT, k=1) == 0.0
    assert mrr(["d2"], RELEVANT) == 1.0
    assert mrr([], RELEVANT) == 0.0


def test_ndcg_binary_hand_computed():
    # Relevant at ranks 2 and 4: DCG = 1/log2(3) + 1/log2(5); ideal puts 3 relevant at ranks 1-3.
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(RETRIEVED, RELEVANT) == pytest.approx(dcg / idcg)
    # At k=2 the ideal list has only two slots.
    assert ndcg_at_k(RETRIEVED, RELEVANT, 2) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_ndcg_graded_wikipedia_example():
    # Wikipedia "Discounted cumulative gain": ranked grades 3,2,3,0,1,2 give DCG6 = 6.861; two
    # unretrieved documents (grades 3 and 2) make the ideal 3,3,3,2,2,2 with IDCG6 = 8.740, and
    # nDCG6 = 0.785.
    grades = {"d1": 3, "d2": 2, "d3": 3, "d4": 0, "d5": 1, "d6": 2, "d7": 3, "d8": 2}
    got = ndcg_at_k(["d1", "d2", "d3", "d4", "d5", "d6"], grades, 6)
    dcg = 3 + 2 / math.log2(3) + 3 / 2 + 0 + 1 / math.log2(6) + 2 / math.log2(7)
    idcg = 3 + 3 / math.log2(3) + 3 / 2 + 2 / math.log2(5) + 2 / math.log2(6) + 2 / math.log2(7)
    assert dcg == pytest.approx(6.861, abs=1e-3) and idcg == pytest.approx(8.740, abs=1e-3)
    assert got == pytest.approx(dcg / idcg)
    assert got == pytest.approx(0.785, abs=1e-3)


def test_retrieval_edge_cases():
    assert recall_at_k(["a", "a", "a"], {"a", "b"}) == 0.5  # duplicates earn credit once
    assert precision_at_k(["a", "a"], {"a"}, 2) == 0.5
    assert recall_at_k([], set()) == 1.0 and ndcg_at_k([], set()) == 1.0  # nothing to find
    assert precision_at_k([], {"a"}) == 0.0
    assert ndcg_at_k(["x"], {"a"}) == 0.0
    assert ndcg_at_k(["ü", "名"], ["名"]) == pytest.approx(1 / math.log2(3))
    with pytest.raises(ValueError):
        recall_at_k(["a"], {"a"}, 0)


def test_ece_hand_computed():
    # bins (0.8,0.9]: acc .5 conf .9; (0.5,0.6]: acc 1 conf .6; (0.1,0.2]: acc 0 conf .2
    # ECE = 2/5*.4 + 2/5*.4 + 1/5*.2 = 0.36
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.6, 0.2], [1, 0, 1, 1, 0]) == pytest.approx(0.36)


def test_ece_edges():
    assert expected_calibration_error([1.0] * 4, [True] * 4) == 0.0  # all-pass, fully confident
    assert expected_calibration_error([1.0] * 4, [False] * 4) == 1.0  # all-fail, fully confident
    assert expected_calibration_error([0.0, 0.0], [0, 0]) == 0.0  # confidence 0 lands in bin 1
    assert expected_calibration_error([0.7], [1], n_bins=1) == pytest.approx(0.3)
    bins = reliability_bins([0.7, 0.7], [1, 0])
    assert [(b.lower, b.upper) for b in bins] == [(pytest.approx(0.6), pytest.approx(0.7))]
    # More bins never raise ECE above the per-sample bound of mean |y - p|.
    p, y = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert (
        expected_calibration_error(p, y, 1) <= expected_calibration_error(p, y, 100) <= 0.1 + 0.4 + 0.65 + 0.2
    )


@pytest.mark.parametrize(
    ("p", "y", "want"),
    [
        ([0.9, 0.1], [1, 0], 0.01),
        ([0.5], [1], 0.25),
        ([1.0, 0.0], [0, 1], 1.0),
        ([0.7, 0.2, 0.9], [1, 0, 0], (0.09 + 0.04 + 0.81) / 3),
    ],
)
def test_brier_hand_computed(p, y, want):
    assert brier_score(p, y) == pytest.approx(want)


@pytest.mark.parametrize("bad", [([], []), ([0.5], [1, 0]), ([1.5], [1]), ([0.5], [2])])
def test_calibration_rejects_bad_input(bad):
    with pytest.raises(InsufficientData):
        brier_score(*bad)


def test_confidence_from_logprobs():
    lps = [math.log(0.9), math.log(0.5)]
    assert confidence_from_logprobs(lps) == pytest.approx(math.sqrt(0.45))
    assert confidence_from_logprobs(lps, "product") == pytest.approx(0.45)
    assert confidence_from_logprobs(lps, "min") == pytest.approx(0.5)
    assert confidence_from_logprobs([0.0]) == 1.0
    assert confidence_from_logprobs([-math.inf, 0.0], "min") == 0.0
    with pytest.raises(InsufficientData):
        confidence_from_logprobs([])
    with pytest.raises(InsufficientData):
        confidence_from_logprobs([0.3])


def test_choice_confidence_merges_token_variants():
    top = {" A": math.log(0.3), "A": math.log(0.2), "B": math.log(0.25), "c": math.log(0.25)}
    assert choice_confidence(top, "a") == pytest.approx(0.5)
    assert choice_confidence(top, "D") == 0.0
