"""`lockgate drift --json` names a feature's own test for what it is: KS for a number, chi-squared for a category."""

from __future__ import annotations

from typing import Any

import pytest

from lockgate.cli.main import _drift_test
from lockgate.services.query.drift import _named


def _row(feature: str, test: str = "") -> dict[str, Any]:
    return {"feature": feature, "psi": 0.1, "ks_stat": 7.5, "ks_pvalue": 0.002, "test": test}


@pytest.mark.parametrize(("feature", "test", "keys"), [
    ("latency_ms", "ks", {"ks_stat", "ks_pvalue"}),
    ("score.json_valid", "z", {"ks_stat", "ks_pvalue"}),  # a 0/1 score is a number with a categorical test
    ("finish_reason:length", "chi_squared", {"chi2_stat", "chi2_pvalue"}),
    ("status:error", "", {"chi2_stat", "chi2_pvalue"}),  # a report from before the test selection
    ("response_text", "embedding_mean_distance", set()),
])
def test_a_features_own_test_is_named_for_what_it_is(feature: str, test: str, keys: set[str]) -> None:
    named = _named(_row(feature, test))
    assert {k for k in named if k.startswith(("ks_", "chi2_"))} == keys
    assert all(named[k] == (7.5 if k.endswith("stat") else 0.002) for k in keys)


def test_a_report_from_before_the_test_selection_shows_its_kinds_test() -> None:
    assert _drift_test(_named(_row("status:error"))) == "chi_squared p=0.002"
    assert _drift_test(_named(_row("latency_ms"))) == "ks p=0.002"
