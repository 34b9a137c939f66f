"""Pure gate logic: a policy's rules over an eval run's evidence, turned into one decision (no I/O)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lockgate.contracts import EvalCompleted, GateDecided, ReleaseBinding, RuleResult
from lockgate.contracts.gates import Decision
from lockgate.services.gatekeeper import baseline as baselines
from lockgate.services.gatekeeper.gatesfile import Pin, Required
from lockgate.services.gatekeeper.policy import OPS, Limits, Policy, ReviewTrigger, Rule, parse_policy
from lockgate.services.gatekeeper.review import VETOED, review_reasons
from lockgate.services.gatekeeper.rules import Evidence, evaluate_rule

__all__ = ["OPS", "Evidence", "Limits", "Outcome", "Pin", "Policy", "Required", "ReviewTrigger", "Rule", "Used",
           "baseline_withdrawn", "binding_rules", "binds_content", "called_rules", "content_digest", "decide", "decide_eval",
           "decision_id", "evaluate_rule", "judged_artifacts", "legacy_veto_key", "meets", "parse_policy",
           "past_sunset", "reached_by_veto", "release_rules", "required_rules", "served_content", "standing_veto",
           "under_requirement", "under_veto", "veto_key", "with_rules"]

RELEASE_REGISTERED = "release_registered"
RELEASE_ARTIFACTS = "release_artifacts"
RELEASE_BINDING = "release_binding"
RELEASE_MODEL = "release_model"
REQUIRED_POLICY = "required_policy"
REQUIRED_SUITE = "required_suite"


@dataclass(frozen=True)
class Outcome:
    """The decision, each rule's result, a one-line reason, why review is needed, and whether a rule errored."""

    decision: Decision
    rules: tuple[RuleResult, ...]
    reason: str
    review_required: str = ""
    errored: bool = False


def _short(r: RuleResult) -> str:
    return f"{r.rule}: {r.hint.split('; ')[0]}"


def decide(policy: Policy, evidence: Evidence | Mapping[str, float], *, prior_errors: int = 0,
           review: list[str] | None = None) -> Outcome:
    """Apply limits to the rules' verdicts. BLOCK beats NEEDS_REVIEW beats PASS; dry-run rules never count.

    - FAIL (and NO_DATA under no_data: fail) beyond limits.max_failures blocks; a failing hard rule always blocks.
    - INCONCLUSIVE beyond limits.max_inconclusive needs review: a human (or a bigger sample) must decide.
    - ERROR needs review while this release's run of errored decisions is within max_consecutive_errors
      (a broken measurement is not evidence of a regression), and blocks past it.
    - review triggers that fired need review.
    - NO_DATA under no_data: pass is tolerated, and the reason says so: a PASS's reason counts only the rules
      that passed (before, probe p40 F3, it said "all N rules ... passed" of rules that judged nothing).
    """
    results = tuple(evaluate_rule(r, evidence, policy.measurement, policy.power) for r in policy.rules)
    lim: Limits = policy.limits
    live = [(rule, res) for rule, res in zip(policy.rules, results, strict=True) if not rule.dry_run]
    failing = [(rule, res) for rule, res in live if res.verdict == "FAIL"
               or (res.verdict == "NO_DATA" and (rule.no_data or policy.no_data) == "fail")]
    # NO_DATA under no_data: pass judged nothing: it is tolerated, never counted as passed (probe p40 F3).
    unjudged = [res for rule, res in live if res.verdict == "NO_DATA" and (rule.no_data or policy.no_data) == "pass"]
    inconclusive = [res for _, res in live if res.verdict == "INCONCLUSIVE"]
    errors = [res for _, res in live if res.verdict == "ERROR"]
    blocks: list[str] = []
    holds: list[str] = []
    notes: list[str] = []
    hard = [res for rule, res in failing if rule.hard]
    if hard:
        blocks.append(f"hard gate failed: {'; '.join(_short(r) for r in hard)}")
    if len(failing) > lim.max_failures:
        soft = [res for rule, res in failing if not rule.hard]
        detail = "; ".join(_short(r) for r in soft)
        if soft or not hard:
            blocks.append(f"{len(failing)} of {len(results)} rules failed: {detail}")
    elif failing and not hard:
        notes.append(f"{len(failing)} failure(s) tolerated by max_failures {lim.max_failures}: "
                     f"{'; '.join(_short(r) for _, r in failing)}")
    if len(inconclusive) > lim.max_inconclusive:
        holds.append(f"{len(inconclusive)} rule(s) inconclusive (max_inconclusive {lim.max_inconclusive}): "
                     f"{'; '.join(_short(r) for r in inconclusive)}")
    elif inconclusive:
        notes.append(f"{len(inconclusive)} inconclusive rule(s) tolerated by max_inconclusive {lim.max_inconclusive}")
    if errors:
        run = prior_errors + 1
        detail = "; ".join(_short(r) for r in errors)
        if run > lim.max_consecutive_errors:
            blocks.append(f"{run} consecutive errored decisions exceed max_consecutive_errors "
                          f"{lim.max_consecutive_errors}: {detail}")
        else:
            holds.append(f"rule error ({run} of {lim.max_consecutive_errors} consecutive allowed), re-run the eval: "
                         f"{detail}")
    if review:
        holds.append(f"review required: {'; '.join(review)}")
    if unjudged:
        notes.append(f"{len(unjudged)} rule(s) had no data (no_data: pass): {'; '.join(_short(r) for r in unjudged)}")
    dry = [res for rule, res in zip(policy.rules, results, strict=True) if rule.dry_run and res.verdict != "PASS"]
    if dry:
        notes.append(f"dry-run (not enforced): {'; '.join(f'{r.rule} {r.verdict}' for r in dry)}")
    errored = bool(errors)
    review_required = "; ".join(review or [])
    if blocks:
        return Outcome("BLOCK", results, "; ".join(blocks + notes), review_required, errored)
    if holds:
        return Outcome("NEEDS_REVIEW", results, "; ".join(holds + notes), review_required or "; ".join(holds),
                       errored)
    # The head counts only rules that passed; the notes account for every other one (tolerated, dry-run, no data).
    passed = sum(r.verdict == "PASS" for r in results)
    head = f"all {len(results)} rules of policy {policy.name!r} passed" if passed == len(results) else \
        f"{passed} of {len(results)} rules of policy {policy.name!r} passed"
    return Outcome("PASS", results, "; ".join([head, *notes]), "", errored)


def evidence_of(done: EvalCompleted, not_compared: str = "") -> Evidence:
    """The evidence an EvalCompleted carries (without its comparisons when `not_compared` says why)."""
    if not_compared:
        return Evidence(metrics=done.metrics, intervals=done.intervals, run_id=done.run_id, not_compared=not_compared)
    return Evidence(metrics=done.metrics, intervals=done.intervals, comparisons=done.comparisons,
                    run_id=done.run_id, ratios=done.ratios)


def decide_eval(policy: Policy | None, policy_error: str, done: EvalCompleted, *, prior_errors: int = 0,
                candidate_artifacts: Mapping[str, str] | None = None,
                baseline_artifacts: Mapping[str, str] | None = None, baseline_refused: str = "") -> Outcome:
    """The gate's outcome for a finished eval; a failed run or an unusable policy blocks (fail closed).

    `baseline_refused` says why the eval's baseline is no yardstick (baseline.refusal): its comparisons are
    set aside, and a policy judged on them blocks (rule baseline_allowed) rather than pass on no evidence."""
    if done.status != "completed":
        # Rules still shown when possible: "error_rate = 1" explains more than the status alone.
        rules = decide(policy, evidence_of(done)).rules if policy is not None else ()
        return Outcome("BLOCK", rules, f"eval run {done.run_id} {done.status}: {done.error or 'no error given'}")
    if policy is None:
        return Outcome("BLOCK", (), policy_error or "no policy to judge the eval by")
    not_compared = f"the baseline was refused (rule {baselines.BASELINE_ALLOWED})" if baseline_refused else ""
    reasons = review_reasons(policy.review.require_when, {} if not_compared else done.comparisons,
                             candidate_artifacts or done.artifacts,
                             None if not_compared else baseline_artifacts) if policy.review else []
    out = decide(policy, evidence_of(done, not_compared), prior_errors=prior_errors, review=reasons)
    if done.warnings:
        out = Outcome(out.decision, out.rules, f"{out.reason}; {summarise_warnings(done.warnings)}",
                      out.review_required, out.errored)
    if baseline_refused:
        if baselines.uses_baseline(policy):
            return with_rules(out, (baselines.refused_rule(baseline_refused),))
        out = Outcome(out.decision, out.rules, f"{out.reason}; not compared: {baseline_refused}",
                      out.review_required, out.errored)
    return out


def release_rules(release: str, registered: Mapping[str, str] | None,
                  judged: Mapping[str, str] | None) -> tuple[RuleResult, ...]:
    """FAIL rules when an allowing decision for `release` would not be about its registered content; () otherwise.

    `registered` is the artifact map the release name is bound to (None: not registered). A name binds
    once, for ever, so an allowing decision for a name nobody registered yet would cover whatever is
    registered under it later (the router admits by name). `judged` is the artifact map the eval or the
    decision says it judged (None: it names none, e.g. the evaluator could not look the release up yet;
    then the registered bundle is what the decision covers); any difference means the verdict is about
    other content than the name holds.
    """
    if registered is None:
        return (RuleResult(rule=RELEASE_REGISTERED, metric="release", op="registered", threshold=1.0, observed=0.0,
                           verdict="FAIL", hint=f"release {release!r} is not registered: register it with "
                                                "`lockgate release create` (or apply) before gating it"),)
    if judged is None:
        return ()
    diffs = []
    for key in sorted({*registered, *judged}):
        if key not in judged:
            diffs.append(f"{key} not judged")
        elif key not in registered:
            diffs.append(f"{key}={judged[key]} is not in the release")
        elif judged[key] != registered[key]:
            diffs.append(f"{key} judged {judged[key]}, registered {registered[key]}")
    if not diffs:
        return ()
    return (RuleResult(rule=RELEASE_ARTIFACTS, metric="artifacts", op="match registered", threshold=0.0,
                       observed=float(len(diffs)), verdict="FAIL",
                       hint=f"the eval judged other artifacts than release {release!r} is registered with "
                            f"({', '.join(diffs)}): run the eval for the registered release"),)


def standing_veto(current: GateDecided | None, judged: Mapping[str, str], unreadable: str = "",
                  withdrawn: Mapping[str, str] | None = None) -> RuleResult | None:
    """The veto a new eval of the release content `judged` stays under (None: it is judged afresh).

    A person's reject (a BLOCK by a reviewer) binds the content it rejected, and any operator may request
    evals: a new eval of the same content must not sign a PASS over it. The veto is carried as the `vetoed`
    rule on each later decision about that content until an approval passes one (review.apply_review marks
    it lifted). A decision about other content (another content_digest: what the release serves, whatever its
    artifacts' labels and its eval's artifacts) binds nothing here. `unreadable` says why the release's current
    decision cannot be read: it may have been a veto, so the same holds.

    `withdrawn`: approvals of `current` that no longer count (name -> why: a revoked key, a person gone). A PASS
    that lifted a veto by such an approval lifted nothing: the veto stands again (else re-running the eval, which
    the refusal of that PASS advises, signed a clean PASS over the person's reject).
    """
    if unreadable:
        return _veto(f"the current decision cannot be read ({unreadable}); it may be a person's reject")
    if current is None or content_digest(current.artifacts) != content_digest(judged):
        return None
    if current.decision == "PASS":
        lifted = next((r for r in current.rules if r.rule == VETOED and r.verdict == "PASS"), None)
        gone = {a: why for a, why in (withdrawn or {}).items() if a in current.approvals}
        if lifted is None or not gone:
            return None
        return _veto(f"the veto on release {current.release!r} was lifted by approvals that no longer count "
                     f"({'; '.join(gone.values())})")
    carried = next((r for r in current.rules if r.rule == VETOED and r.verdict == "FAIL"), None)
    if carried is not None:
        return carried
    if current.decision == "BLOCK" and current.reviewed_by:
        return _veto(f"release {current.release!r} was rejected by {current.reviewed_by} (decision {current.id}: "
                     f"{current.reason})")
    return None


# The kinds a release lists for its eval, not for its serving: what it was judged on (dataset, suite) and by
# (policy). The gates file pins the policy and suite an app's evals use whatever the release lists, and neither the
# router nor an application reads them. Every other kind (prompt, model_config, tool, environment, and any kind added
# later) is content: the router serves the model config, the eval renders the prompt, applications fetch their
# release's prompt and tools.
EVAL_KINDS = frozenset({"dataset", "eval_suite", "policy"})


def served_content(decision_artifacts: Mapping[str, str]) -> list[str]:
    """What a release serves, as the sorted, distinct `kind=hash` lines of its non-eval artifacts (EVAL_KINDS): the
    name an artifact is bound under is a label for people, and two names of one hash serve the same bytes."""
    return sorted({f"{k.partition('/')[0]}={v}" for k, v in judged_artifacts(decision_artifacts).items()
                   if k.partition("/")[0] not in EVAL_KINDS})


def content_digest(decision_artifacts: Mapping[str, str]) -> str:
    """The one name of the content a decision judged, whatever release name it was registered under and however its
    artifacts are labelled: sha256 (hex) of its served_content lines; "" when it serves nothing known (a veto of
    nothing known binds nothing)."""
    served = served_content(decision_artifacts)
    return hashlib.sha256("\n".join(served).encode()).hexdigest() if served else ""


def veto_key(tenant: str, decision_artifacts: Mapping[str, str]) -> str:
    """The KV `lg_vetoes` key of the content a decision judged, in its tenant: sha256 (hex) of the tenant and the
    content_digest ("" when that is ""). A veto binds its tenant's names of the content only: tenants are isolated,
    so one tenant's reject neither holds nor names another tenant's release."""
    digest = content_digest(decision_artifacts)
    return hashlib.sha256(f"tenant={tenant}\n{digest}".encode()).hexdigest() if digest else ""


def legacy_veto_key(decision_artifacts: Mapping[str, str]) -> str:
    """The key vetoes were recorded under before veto_key (every tenant's alike): sha256 (hex) of the judged artifacts'
    sorted `kind/name=hash` lines; still read, so a veto recorded before an upgrade is not lost by it."""
    judged = judged_artifacts(decision_artifacts)
    if not judged:
        return ""
    return hashlib.sha256("\n".join(f"{k}={v}" for k, v in sorted(judged.items())).encode()).hexdigest()


def binds_content(decision: GateDecided, kept: GateDecided | None, unreadable: bool = False) -> bool:
    """Whether `decision`, just stored for its release, replaces `kept` as what its content is vetoed by.

    A veto (a person's reject, a drift BLOCK, a decision carrying either) binds the content it judged under any
    name of its tenant (veto_key): registering the same artifact versions under a new release name, or under new
    artifact names, must not escape it. An approval's PASS that lifted that very veto lifts it for the content too
    (the same rule as for the name); a PASS that lifted another veto, or nothing kept, leaves `kept` as it is.
    `unreadable`: what is kept cannot be read (held as a veto, see standing_veto), and an approval that lifted that
    hold replaces it, as it replaces such a decision of a name.
    """
    judged = judged_artifacts(decision.artifacts)
    if standing_veto(decision, judged) is not None:
        return True
    lifted = [r.hint for r in decision.rules if r.rule == VETOED and r.verdict == "PASS"]
    if decision.decision != "PASS" or not lifted:
        return False
    if unreadable:
        return True
    if kept is None:
        return False
    veto = standing_veto(kept, judged_artifacts(kept.artifacts))
    return veto is not None and any(hint.endswith(veto.hint) for hint in lifted)


def reached_by_veto(current: GateDecided, tenant: str, digest: str) -> bool:
    """Whether a veto of `tenant`'s content `digest` remakes a name's decision `current` under it: one about that
    content that carries no veto yet. A PASS always does: read with approvals that no longer count, one stands under
    the veto it lifted, but a PASS of vetoed content must end NEEDS_REVIEW."""
    if current.tenant != tenant or content_digest(current.artifacts) != digest:
        return False
    return current.decision == "PASS" or standing_veto(current, judged_artifacts(current.artifacts)) is None


def drift_veto(release: str, report_id: str, reason: str) -> RuleResult:
    """The veto a drift BLOCK puts on the content it judged: live evidence from production is not overruled by an
    offline eval of the same content (as a person's reject is not); an approver's approval lifts it."""
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    return _veto(f"release {release!r} was BLOCKed on live evidence (drift report {report_id}: {reason})",
                 "Production traffic showed this content drift; an offline eval cannot overrule that.")


def _veto(why: str, explanation: str = "A person rejected this content; an eval cannot overrule a person.") -> RuleResult:
    return RuleResult(rule=VETOED, metric="review", op="approved after the reject", threshold=1.0, observed=0.0,
                      verdict="FAIL",
                      hint=f"{why}; a new eval of the same content does not lift a reject: an approver's "
                           "`lockgate gate approve` of this decision does (or gate the change as a new release)",
                      explanation=explanation)


def under_veto(out: Outcome, veto: RuleResult | None) -> Outcome:
    """The outcome under a standing veto: at most NEEDS_REVIEW (an approver decides), the veto carried on."""
    if veto is None:
        return out
    if out.decision == "BLOCK":
        return Outcome("BLOCK", (*out.rules, veto), f"{out.reason}; {veto.hint}", out.review_required, out.errored)
    review = "; ".join(x for x in (veto.hint, out.review_required) if x)
    reason = f"{veto.hint}; {out.reason}" if out.reason else veto.hint
    return Outcome("NEEDS_REVIEW", (*out.rules, veto), reason, review, out.errored)


def binding_rules(release: str, run_id: str, started: ReleaseBinding | None,
                  current: ReleaseBinding) -> tuple[RuleResult, ...]:
    """FAIL rules when `release` is not bound now (`current`) as it was when eval run `run_id` started
    (`started`, what the run evaluated); () when it is, or when it is not registered now (release_rules
    blocks that).

    The evaluator chooses what to call when a run starts: for a name bound to nothing, what the request
    names. A registration landing during the run would otherwise have the decision name, and the router
    admit, content that was never called. `started` None: an evaluator that did not say (fail closed).
    """
    if not current.registered:
        return ()
    if started is None:
        return (RuleResult(rule=RELEASE_BINDING, metric="binding", op="recorded", threshold=1.0, observed=0.0,
                           verdict="FAIL", hint=f"eval run {run_id} does not say which binding of release "
                                                f"{release!r} it evaluated (an evaluator older than the gatekeeper): "
                                                "run the eval again"),)
    if not started.registered:
        return (RuleResult(rule=RELEASE_REGISTERED, metric="release", op="registered at start", threshold=1.0,
                           observed=0.0, verdict="FAIL",
                           hint=f"release {release!r} was not registered when eval run {run_id} started and was "
                                f"registered during it (bundle {current.bundle}): the run called what its request "
                                "named, not the release; run the eval again now that it is registered"),)
    if started.bundle == current.bundle:
        return ()
    diffs = [f"{key} {started.artifacts.get(key, 'absent')} then, {current.artifacts.get(key, 'absent')} now"
             for key in sorted({*started.artifacts, *current.artifacts})
             if started.artifacts.get(key) != current.artifacts.get(key)]
    return (RuleResult(rule=RELEASE_BINDING, metric="binding", op="unchanged", threshold=0.0,
                       observed=float(max(1, len(diffs))), verdict="FAIL",
                       hint=f"release {release!r} is bound to other content than when eval run {run_id} started "
                            f"(bundle {started.bundle} then, {current.bundle} now"
                            + (f": {', '.join(diffs)}" if diffs else "") + "): run the eval for the release as "
                            "it is bound now"),)


def called_rules(release: str, model: str, endpoint: str, config: str,
                 environment: Mapping[str, str]) -> tuple[RuleResult, ...]:
    """FAIL rules when the run whose `environment` is given called another model or endpoint than `release`'s
    model config (`config`) ships (`model` at `endpoint`); () when it called those, or called nothing (a
    recorded task, or an evaluator that does not say)."""
    if environment.get("task") != "call":
        return ()
    called = {"model": environment.get("model", ""), "endpoint": environment.get("endpoint", "")}
    diffs = [f"{what} {called[what]!r}, the release ships {ships!r}"
             for what, ships in (("model", model), ("endpoint", endpoint)) if called[what] != ships]
    if not diffs:
        return ()
    return (RuleResult(rule=RELEASE_MODEL, metric="model", op="is shipped", threshold=1.0, observed=0.0,
                       verdict="FAIL", hint=f"the eval called {'; '.join(diffs)} ({config}): the gate judges what "
                                            f"release {release!r} ships; run the eval without --model and --endpoint"),)


def judged_artifacts(decision_artifacts: Mapping[str, str]) -> dict[str, str]:
    """The release artifacts (`kind/name` -> hash) a decision names, without the suite and policy it adds
    under the bare keys `eval_suite` and `policy`."""
    return {k: v for k, v in decision_artifacts.items() if "/" in k}


@dataclass(frozen=True)
class Used:
    """The artifact version an eval used (`hash`, "" for none) and the names it was registered under as
    that kind (what a name-only requirement is checked against)."""

    hash: str
    names: frozenset[str] = frozenset()
    # Whether the events stream still holds a registration of the version under any kind: one it holds none of may
    # be a policy whose registration aged out; one registered as another kind only (a dataset) is no policy.
    known: bool = False

    def __str__(self) -> str:
        if not self.hash:
            return "none"
        if not self.names:
            return f"{self.hash} (registered under no name)"
        first, *others = sorted(self.names)
        return f"{first}={self.hash}" + (f" (also registered as {', '.join(others)})" if others else "")


def meets(pin: Pin, used: Used) -> bool:
    """True if `used` is what `pin` requires: exactly its content, or (a name-only pin) any version of its name."""
    return used.hash == pin.hash if pin.hash else pin.name in used.names


def required_rules(release: str, app: str, required: Required | None, policy: Used,
                   suite: Used | None = None, *, standing: str = "") -> tuple[RuleResult, ...]:
    """FAIL rules when the eval of `release` (of `app`) used another policy or suite than the gates file
    requires for the app; () when it requires nothing or the eval meets it.

    The requirement is the gatekeeper's configuration, not the eval's: otherwise whoever requests the
    eval could choose a policy that passes anything.

    `standing`: the id of the release's current PASS, judged against the file as it is when the gatekeeper
    starts (under_requirement). A name-only pin is then not held against a version the events stream no longer
    holds a registration of, under any kind (older than the stream keeps): what it was registered as is unknown,
    and a PASS the file allowed when it was decided must not BLOCK at a restart for that. A name alone trusts
    operators anyway (any of them may register a version under it). One registered as another kind only (a
    dataset's bytes named as the policy) is no policy of any name: held against the pin (probe p21 F1)."""
    if required is None:
        return ()
    out = []
    for rule, what, pin, used in ((REQUIRED_POLICY, "policy", required.policy, policy),
                                  (REQUIRED_SUITE, "suite", required.suite, suite or Used(""))):
        if pin is None or meets(pin, used) or (standing and not pin.hash and used.hash and not used.names
                                                      and not used.known):
            continue
        by = f"its PASS (decision {standing}) was decided under" if standing else "this eval used"
        out.append(RuleResult(
            rule=rule, metric=what, op="is required", threshold=1.0, observed=0.0, verdict="FAIL",
            hint=f"release {release!r} of app {app!r} must be gated by {what} {pin} (gates file "
                 f"{required.source}): {by} {what} {used}; {_remedy(what, pin)}"))
    return tuple(out)


def under_requirement(current: GateDecided, failed: Sequence[RuleResult]) -> Outcome | None:
    """What the release's current decision becomes when it was decided under another policy or suite than the
    gates file requires now (`failed`: required_rules with `standing`): a PASS (an eval's, or an approval's) is a
    BLOCK carrying those rules, their remediation leading the reason. None when it stays: it meets the file, or it
    admits nothing (a BLOCK; a NEEDS_REVIEW, whose approval is refused under the file).

    The file is like branch protection's required checks: it binds what admits now, not only what is decided
    after it. Before, a PASS decided under a lax policy while the file did not cover the app (or under a pin
    changed since) kept admitting, as a first release at 100% (probe p20 F6)."""
    if current.decision != "PASS" or not failed:
        return None
    return with_rules(Outcome(current.decision, tuple(current.rules), current.reason, current.review_required),
                      failed)


def past_sunset(current: GateDecided, lifecycle: Sequence[RuleResult]) -> Outcome | None:
    """What the release's current decision becomes once an artifact it binds is past its sunset (`lifecycle`: the
    lifecycle rules of its artifacts now, provenance.lifecycle.gate_rules): a PASS or a NEEDS_REVIEW is a BLOCK
    carrying them, their remediation (the successor) leading the reason; the lifecycle rules it was decided with
    (a deprecation's warning) give way to these. None when it stays: nothing it binds is past sunset, or it admits
    nothing and no approval can make it admit (a BLOCK).

    An eval judged after the sunset is a BLOCK already; this is the same rule for one judged before it (README,
    "Deprecation and sunset")."""
    if current.decision not in ("PASS", "NEEDS_REVIEW") or not any(r.verdict == "FAIL" for r in lifecycle):
        return None
    kept = tuple(r for r in current.rules if not r.rule.startswith("lifecycle"))
    return with_rules(Outcome(current.decision, kept, current.reason, current.review_required), lifecycle)


def baseline_withdrawn(current: GateDecided, why: str, policy: Policy | None) -> Outcome | None:
    """What the release's current decision becomes once the release it was measured against (`current.baseline`) is
    no allowed baseline any more (`why`: baseline.disallowed, "" while it is): a PASS or a NEEDS_REVIEW judged under
    a policy that gates on the comparison (baseline.uses_baseline; `policy` None: it cannot be read now, so it may)
    is a BLOCK carrying rule baseline_allowed, its remediation leading the reason: what an eval of it against that
    baseline is now (decide_eval). None when it stays: the baseline is still allowed, the policy judged nothing on the
    comparison, it admits nothing and no approval can make it admit (a BLOCK), or it was measured against its own
    release (an earlier PASS of it: what that release's decision says now is this decision itself).

    A BLOCK, not the veto reach-back's NEEDS_REVIEW: that one holds content a person rejected for an approver, whose
    approval lifts the veto; here the evidence itself is void (no regression against a release the gate no longer
    allows says nothing), and no approval supplies it: an eval against an allowed baseline does. A NEEDS_REVIEW is
    remade too, so no approval PASSes it on that comparison."""
    if not why or current.baseline in ("", current.release) or current.decision not in ("PASS", "NEEDS_REVIEW"):
        return None
    if policy is not None and not baselines.uses_baseline(policy):
        return None
    return with_rules(Outcome(current.decision, tuple(current.rules), current.reason, current.review_required),
                      (baselines.refused_rule(why),))


def _remedy(what: str, pin: Pin) -> str:
    """How to run an eval that meets `pin`, in the CLI's terms."""
    if what == "policy":
        return ("run it with `--policy FILE`, FILE holding exactly that content" if pin.hash else
                f"run it with `--policy {pin.name}.yaml` (a policy file registers under its file name), "
                f"or any policy registered as {pin.name}")
    return ("run it on the suite with exactly that content" if pin.hash else
            f"run it on suite {pin.name} (a suite file registers under its `name:`)")


def with_rules(out: Outcome, rules: Sequence[RuleResult]) -> Outcome:
    """The outcome with extra release rules (registration, artifact lifecycle): a FAIL (say an artifact past
    its sunset) blocks and leads the reason with its remediation; a PASS (a deprecated artifact) only adds
    its warning."""
    if not rules:
        return out
    failed = [r.hint for r in rules if r.verdict == "FAIL"]
    notes = "; ".join([*failed, *(r.hint for r in rules if r.verdict != "FAIL")])
    reason = f"{notes}; {out.reason}" if failed and out.reason else f"{out.reason}; {notes}" if out.reason else notes
    return Outcome("BLOCK" if failed else out.decision, (*out.rules, *rules), reason, out.review_required,
                   out.errored)


def summarise_warnings(warnings: list[str]) -> str:
    """'metric: text' warnings grouped by text, so one small-sample warning is not repeated per metric."""
    by_text: dict[str, list[str]] = {}
    for w in warnings:
        metric, sep, text = w.partition(": ")
        if not sep:
            metric, text = "", w
        by_text.setdefault(text, []).append(metric)
    parts = [f"{text} ({', '.join(m for m in metrics if m)})" if any(metrics) else text
             for text, metrics in by_text.items()]
    return "evaluator warning" + ("s" if len(parts) > 1 else "") + ": " + "; ".join(parts)


def decision_id(eval_event_id: str, salt: str) -> str:
    """A UUIDv7-shaped id derived from an event (eval or review), so a redelivery yields the same decision id.

    The 48-bit time comes from the eval event's UUIDv7 (keeping ids time-ordered); the rest is a hash over
    the event's id and `salt`, the gatekeeper's secret (`Signer.id_salt`): whoever may publish on the events
    stream (an operator, an approver choosing a review's id) cannot predict the id, so cannot publish first
    under it and have JetStream drop the decision as a duplicate of theirs.
    """
    digest = hashlib.sha256(f"gate:{salt}:{eval_event_id}".encode()).digest()
    try:
        ms = uuid.UUID(eval_event_id).int >> 80
    except ValueError:
        ms = int.from_bytes(digest[:6], "big")
    value = ms << 80 | 0x7 << 76 | (int.from_bytes(digest[6:8], "big") & 0xFFF) << 64
    value |= 0b10 << 62 | int.from_bytes(digest[8:16], "big") & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))
