"""Drift reports."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from lockgate.contracts.envelope import Event

Comparison = Literal["now_vs_reference", "canary_vs_stable"]

# Features the drift monitor measures of the request, not of the answer: what clients send. A client moves them
# as it likes (a burst of long prompts), and on both arms of a rollout at once, so their drift says nothing of a
# release: they are reported, and a gate policy may judge them by naming them, but they never abort a canary
# or roll a release back on their own.
REQUEST_FEATURES = frozenset({"input_tokens", "prompt_text"})


def request_side(feature: str) -> bool:
    """True for a feature measured of the request (`REQUEST_FEATURES`), categorical ones by their name."""
    return feature.partition(":")[0] in REQUEST_FEATURES


class FeatureDrift(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Drift of one feature between the reference and current windows.

    `test` is the test chosen by sample size and type (as Evidently does): "ks", "chi_squared" or "z" up
    to 1,000 reference rows (drift when `p_value` < `threshold`), "wasserstein" (normed by the reference's
    std) or "jensen_shannon" above (drift when `statistic`, the distance, >= `threshold`), or
    "embedding_mean_distance" for texts (a permutation p-value). `test_drifted` is that test's verdict;
    `drifted` is what the monitor alarms on: the test's verdict and a PSI at least the monitor's threshold
    (significant and material), never set for texts (a canary's new model rewords answers by design; a
    gate policy can opt in). `ks_stat`/`ks_pvalue` keep their v1 name and meaning from before the test selection:
    the kind's own test, KS for a number, chi-squared for a category, the mean distance for a text; the query
    service's `drift_reports` (`lockgate drift --json`) gives them by that test's name (`chi2_stat`, ...).
    Fields appended since v1 are left out of the encoding at their defaults (omit_defaults), so a v1 report
    encodes byte for byte as before.
    """

    feature: str
    psi: float
    ks_stat: float
    ks_pvalue: float
    reference_mean: float
    current_mean: float
    drifted: bool
    test: str = ""
    statistic: float = 0.0
    p_value: float | None = None  # None for a distance
    threshold: float = 0.0
    test_drifted: bool = False
    reference_size: int = 0  # this feature's sample sizes (rows that measured it)
    current_size: int = 0


class DriftReport(Event, frozen=True, kw_only=True, tag="lockgate.drift.report"):
    """Per-deployment drift over the current window.

    `comparison`: "now_vs_reference" compares the deployment's latest window with its reference (the first
    events after the last promotion); "canary_vs_stable" compares a rollout's canary window (`release`) with
    the stable variant's window of the same deployment (`reference_release`). `embedder` names the text
    embedder of the text features ("" when no text was compared). `served`: both windows hold only answers
    a router served (events on `Subjects.served`); only such a report moves traffic or gates a release,
    since an application may report any event of its own deployment (always true of canary_vs_stable).
    `window_start`/`window_end` span the current (a canary's) window; `reference_window_start`/`_end` span
    stable's window of a canary_vs_stable report (the two cover the same time), the reference of a now_vs_reference
    one (None from a monitor before it named it; a restored reference saved before then starts at 0).
    """

    deployment: str
    app: str = ""
    window_start: datetime
    window_end: datetime
    reference_n: int
    current_n: int
    features: list[FeatureDrift]
    drifted: bool
    comparison: Comparison = "now_vs_reference"
    release: str = ""
    reference_release: str = ""
    embedder: str = ""
    served: bool = False
    reference_window_start: datetime | None = None
    reference_window_end: datetime | None = None

    def observed_since(self, t: float) -> bool:
        """Both windows hold only what was observed at or after `t` (unix seconds): after a promotion at `t`, only
        such a report is of the promoted release alone (one naming no reference span may hold its predecessor's)."""
        ref = self.reference_window_start
        return self.window_start.timestamp() >= t and ref is not None and ref.timestamp() >= t
