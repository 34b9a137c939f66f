"""A decision is signed only as every reader decodes it again (probe p68 F1)."""

from __future__ import annotations

import math

import pytest

from lockgate.codec import Codec, encode
from lockgate.contracts import GateDecided, RuleResult
from lockgate.errors import InvalidEvent
from lockgate.services.gatekeeper.recordable import recordable
from lockgate.signing import Signer

pytestmark = pytest.mark.timeout(10)
decided: Codec[GateDecided] = Codec(GateDecided)


def _rule(name: str, threshold: float, **kw: float | None) -> RuleResult:
    return RuleResult(rule=name, metric="m", op=">=", threshold=threshold, observed=kw.pop("observed", 0.5),
                      verdict="PASS", hint="h", **kw)


def test_a_decidable_decision_is_signed_as_made() -> None:
    d = GateDecided(release="r", decision="PASS", rules=[_rule("acc", 0.8, low=0.7, high=0.9)], policy="sha256:p")
    assert recordable(d) is d


@pytest.mark.parametrize("verdict", ["PASS", "NEEDS_REVIEW", "BLOCK"])
def test_a_rule_json_cannot_carry_makes_a_block_that_decodes_naming_it(verdict: str) -> None:
    # Before: the BLOCK whose slice rule had threshold -inf was signed and stored; JSON wrote it null, and every reader
    # refused the value as no decision (`Expected float, got null - at $.rules[1].threshold`).
    ok, bad = _rule("acc", 0.8), _rule("per-slice", -math.inf, observed=math.inf, low=0.1)
    d = GateDecided(release="r", decision=verdict, rules=[ok, bad], policy="sha256:p", reason="1 of 2 rules failed")
    with pytest.raises(InvalidEvent, match=r"\$\.rules\[1\]\.threshold"):
        decided.decode(encode(d))
    out = recordable(d)
    signed = Signer.generate().sign(out)
    assert decided.decode(encode(signed)) == signed
    assert out.decision == "BLOCK" and out.rules[0] == ok
    fixed = out.rules[1]
    assert (fixed.rule, fixed.verdict, fixed.threshold, fixed.observed, fixed.low) == ("per-slice", "ERROR", 0.0, None, 0.1)
    assert "threshold, observed not a finite number" in fixed.hint
    assert out.reason.startswith(f"the gatekeeper's {verdict} could not be recorded as made: it does not decode again "
                                 "(Expected `float`, got `null` - at `$.rules[1].threshold`) (rule per-slice: "
                                 "threshold -inf, observed inf); BLOCK instead: every number of the policy sha256:p "
                                 "must be finite"), out.reason
    assert out.reason.endswith("1 of 2 rules failed")
