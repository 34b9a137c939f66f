"""A decision admits the content it judged, not whatever its release name holds (domain.other_content)."""

from __future__ import annotations

import pytest

from lockgate.contracts import GateDecided
from lockgate.services.router.domain import other_content

BOUND = {"model_config/c": "sha256:a", "prompt/p": "sha256:b"}


def _decision(artifacts: dict[str, str]) -> GateDecided:
    return GateDecided(id="d1", release="r1", decision="PASS", rules=[], artifacts=artifacts)


@pytest.mark.parametrize(("judged", "bound", "why"), [
    # exactly the bound content; the suite and policy it names too are not release content
    ({**BOUND, "eval_suite": "sha256:s", "policy": "sha256:p"}, BOUND, ""),
    ({"model_config/c": "sha256:x", "prompt/p": "sha256:b"}, BOUND,
     "decision d1 judged other content than release 'r1' holds (model_config/c judged sha256:x, bound to sha256:a)"),
    ({"model_config/c": "sha256:a"}, BOUND, "(prompt/p judged nothing, bound to sha256:b)"),
    ({**BOUND, "dataset/d": "sha256:d"}, BOUND, "(dataset/d judged sha256:d, bound to nothing)"),
    ({"policy": "sha256:p"}, BOUND, "model_config/c judged nothing, bound to sha256:a; prompt/p judged nothing"),
    (BOUND, None, "release 'r1' is not registered"),
])
def test_a_decision_speaks_only_for_the_content_it_judged(judged: dict[str, str], bound: dict[str, str] | None,
                                                          why: str) -> None:
    got = other_content(_decision(judged), bound)
    assert (got == "") if not why else (why in got), got
