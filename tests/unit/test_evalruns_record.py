"""What the evaluator records of a run at its first delivery (probe p12, F7): the request and the release's
bundle as bound then, from which every delivery takes what it evaluates, and the digest its stored cases carry."""

from __future__ import annotations

from lockgate.codec import Codec, encode
from lockgate.contracts import EvalRequested
from lockgate.evalruns import EvalRun, binding_digest, binding_of

BOUND = {"release": "r", "app": "shop", "tenant": "default", "parent": "",
         "artifacts": {"model_config/m": "sha256:m", "prompt/p": "sha256:p"}}
REQ = EvalRequested(run_id="run-1", release="r", suite="sha256:s", endpoint="default")
records: Codec[EvalRun | EvalRequested] = Codec(EvalRun | EvalRequested)


def test_a_record_keeps_the_bundle_the_run_started_on_and_a_bare_request_still_reads() -> None:
    started = EvalRun(request=REQ, bundle=BOUND)
    assert records.decode(encode(started)) == started and started.binding == binding_of(BOUND)
    unbound = EvalRun(request=REQ)  # the name was bound to nothing: the gate blocks it whatever is registered later
    assert records.decode(encode(unbound)).binding == binding_of(None) and not unbound.binding.registered
    assert records.decode(encode(REQ)) == REQ  # written by an evaluator before records carried the bundle


def test_the_digest_cases_carry_tells_bindings_apart_but_not_authors() -> None:
    bound = binding_digest(binding_of(BOUND))
    assert bound == binding_digest(binding_of({**BOUND, "author": {"name": "ann"}}))
    assert bound != binding_digest(binding_of(None))
    assert bound != binding_digest(binding_of({**BOUND, "artifacts": {"model_config/m": "sha256:m"}}))
    assert binding_digest(binding_of(None)).startswith("sha256:")
