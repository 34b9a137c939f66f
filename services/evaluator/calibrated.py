"""A suite's `calibration:` applied to a run (pure): per-case confidence, then ECE and Brier over the run."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lockgate.services.evaluator import calibration, domain
from lockgate.services.evaluator.stats import InsufficientData

CONFIDENCE = "confidence"  # key of the per-case confidence in CaseResult.scores (and eval_cases.scores)
_FENCE = re.compile(r"^\s*```[\w-]*\s*\n(.*?)\n?\s*```\s*$", re.DOTALL)


def request_params(suite: domain.Suite) -> dict[str, Any] | None:
    """Extra chat-completion parameters the suite needs: `logprobs: true` for logprob confidences."""
    if suite.calibration is not None and suite.calibration.confidence == "logprobs":
        return {"logprobs": True}
    return None


def confidence(spec: domain.CalibrationSpec, output: str, logprobs: Sequence[float] | None) -> float | None:
    """The answer's confidence in [0, 1], or None when the output or endpoint gave none."""
    if spec.confidence == "logprobs":
        if not logprobs:
            return None
        try:
            return calibration.confidence_from_logprobs(logprobs)
        except InsufficientData:
            return None
    text = output or ""
    match = _FENCE.match(text)  # chat models often wrap JSON in a ```json fence
    try:
        doc = json.loads(match.group(1) if match else text)
    except ValueError:
        return None
    value = doc.get(spec.json_field) if isinstance(doc, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        return None
    return float(value)


def with_confidence(suite: domain.Suite, scores: dict[str, float], output: str,
                    logprobs: Sequence[float] | None) -> dict[str, float]:
    """`scores` plus CONFIDENCE when the suite calibrates and this output has one."""
    if suite.calibration is None:
        return scores
    value = confidence(suite.calibration, output, logprobs)
    return scores if value is None else {**scores, CONFIDENCE: value}


@dataclass(frozen=True)
class Pairs:
    """The rows that have a confidence, their confidences and correctness on the spec's scorer."""

    rows: list[domain.CaseResult] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    missing: int = 0
    missing_errored: int = 0


def pairs(suite: domain.Suite, results: Sequence[domain.CaseResult]) -> Pairs:
    """Confidence/correctness pairs; a row is correct when it reaches the scorer's pass mark."""
    spec = suite.calibration
    if spec is None:
        return Pairs()
    confidences: list[float] = []
    correct: list[bool] = []
    rows: list[domain.CaseResult] = []
    missing = errored = 0
    for r in results:
        value = r.scores.get(CONFIDENCE)
        ok = domain.passes(suite, r)[spec.scorer]
        if r.error or value is None or not math.isfinite(value) or ok is None:
            missing += 1
            errored += bool(r.error)
            continue
        confidences.append(float(value))
        correct.append(ok)
        rows.append(r)
    return Pairs(rows, confidences, correct, missing, errored)


def metrics(suite: domain.Suite, results: Sequence[domain.CaseResult]) -> tuple[dict[str, float], list[str]]:
    """`ece` and `brier` over the rows with a confidence, and a warning for every row without one."""
    spec = suite.calibration
    if spec is None or not results:
        return {}, []
    p = pairs(suite, results)
    warnings = []
    if p.missing:
        errored = f" ({p.missing_errored} errored)" if p.missing_errored else ""
        if not p.confidences:
            hint = ("did the endpoint return logprobs?" if spec.confidence == "logprobs"
                    else f"is the output JSON with {spec.json_field!r} a number in [0, 1]?")
            warnings.append(f"calibration: {p.missing} cases had no confidence{errored}: none had one, "
                            f"so ece and brier are omitted ({hint})")
            return {}, warnings
        warnings.append(f"calibration: {p.missing} cases had no confidence{errored}; "
                        f"ece and brier are over the other {len(p.confidences)}")
    return {"ece": calibration.expected_calibration_error(p.confidences, p.correct, spec.bins),
            "brier": calibration.brier_score(p.confidences, p.correct)}, warnings
