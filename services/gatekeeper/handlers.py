"""NATS edge of the gatekeeper: EvalCompleted and GateReview in; signed GateDecided out, in KV and audited."""

from __future__ import annotations

import logging

import msgspec
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from lockgate import artifacts
from lockgate.bus import Delivery
from lockgate.contracts import EvalCompleted, GateDecided, GateReview, RuleResult
from lockgate.contracts.gates import review_key
from lockgate.errors import ConfigError, NotFound, SignatureError, UnreadableValue
from lockgate.evalruns import check_result, requested_run
from lockgate.identity import OutOfScope, author_of, verify_review, withdrawn_approvals
from lockgate.provenance import lifecycle
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper import baseline as baselines
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.domain import Outcome
from lockgate.services.gatekeeper.driftgate import known_good, read_route
from lockgate.services.gatekeeper.evaluated import evaluated_rules
from lockgate.services.gatekeeper.gatesfile import Gates
from lockgate.services.gatekeeper.measured import Measured, baseline_decision
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import REQUIRED, Records
from lockgate.services.gatekeeper.registrations import Registrations
from lockgate.services.gatekeeper.remake import judged_again
from lockgate.services.gatekeeper.review import ReviewRules, apply_review, review_action
from lockgate.services.gatekeeper.siblings import Siblings
from lockgate.signing import Signer, Verifier, publish_key

__all__ = ["GateHandlers"]
log = logging.getLogger("lockgate.gatekeeper")


class GateHandlers:
    """Decides a release from its eval result or a human review; every path ends in an audit row."""

    def __init__(self, ctx: ServiceContext, tracer: trace.Tracer, signer: Signer, gates: Gates | None = None) -> None:
        self.ctx = ctx
        self.tracer = tracer
        self.signer = signer
        self.records = Records(ctx, signer.id_salt)
        # The policy (and suite) each app's releases must be gated by (None: whatever the eval names).
        self.gates = gates
        self.registrations = Registrations(ctx.bus)
        # The configured trust roots: before countersigning a stored decision (a review) or comparing with a
        # baseline's, it must verify; and our own key must be trusted before it signs anything (OwnKey).
        self.verifier = Verifier(ctx.bus, ctx.settings)
        self.own = OwnKey(ctx, signer, self.verifier)
        self.siblings = Siblings(ctx, self.own, self.records, self.publish_key)
        self.records.siblings = self.siblings.veto
        self.measured = Measured(ctx, self.own, self.records, self.publish_key)
        self.records.measured = self.measured.after
        self._key_published = False

    async def upgrade_vetoes(self) -> None:
        """Record the vetoes of before under their content's key (Records.upgrade_vetoes), and put the names of
        their content under them as a veto recorded now is: they bind relabelled names too, and names gated
        before them."""
        for old in await self.records.upgrade_vetoes():
            await self.siblings.veto(old)

    async def hold_to_gates_file(self) -> int:
        """Remake as a BLOCK each current PASS of a release of an app the gates file covers that was decided under
        another policy or suite than the file requires (domain.under_requirement): decided before the file covered
        the app, or under a pin changed since. The router then refuses it as a canary or first release and rolls a
        deployment serving it back. How many were remade; a second start with the same file remakes none."""
        if self.gates is None:
            return 0
        remade = 0
        for listed in await self.records.current_decisions():
            if listed.decision == "PASS" and await self._hold(listed.release):
                remade += 1
        return remade

    async def _hold(self, release: str) -> bool:
        """Remake `release`'s current decision as a BLOCK if the gates file does not allow what it was decided
        under (and it admits); whether it was remade."""

        async def judge(current: GateDecided) -> Outcome | None:
            if current.decision != "PASS":
                return None
            failed = await self._required(release, await self._bundle(release), current.policy,
                                          current.artifacts.get("eval_suite", ""), standing=current.id)
            return domain.under_requirement(current, failed)

        return await judged_again(self.own, self.records, self.publish_key, release, judge, action=REQUIRED)

    async def publish_key(self) -> None:
        """Put our public key in the KV keyring before any decision it signs can be seen."""
        if not self._key_published:
            await publish_key(self.ctx.bus, self.signer)
            self._key_published = True

    async def on_eval_completed(self, done: EvalCompleted, delivery: Delivery) -> None:
        """Judge the eval by its policy, then sign, record and announce the decision (an eval that names no
        policy is a measurement: nothing is decided)."""
        with self.tracer.start_as_current_span(
            "gatekeeper.decide", context=delivery.trace_context, kind=SpanKind.CONSUMER,
            attributes={"lockgate.release": done.release, "lockgate.run_id": done.run_id},
        ) as span:
            # Only a result for a run the evaluator accepted, with the request's release, suite, policy
            # and baseline, is judged; anything else raises UntrustedEvalResult and is dead-lettered.
            # (That only the evaluator can record runs is the NATS permissions' job.)
            check_result(done, await requested_run(self.ctx.bus, done.run_id))
            if not done.policy:
                # A measurement (`eval run` without --policy): there is nothing to judge it by, so it decides
                # nothing, as a rerun decides nothing. Before, it was a signed BLOCK ("names no policy") that
                # replaced a serving release's PASS and had the router roll production back (probe p12).
                log.info("eval run %s of %s names no policy: a measurement, not decided", done.run_id,
                         done.release)
                return
            decision_id = domain.decision_id(done.id, self.signer.id_salt)
            key = f"gate-{done.run_id or decision_id}"
            # What it is judged over: stored only over this (Records), so a person's reject or a drift BLOCK landing
            # meanwhile has it judged again, under their veto.
            stored = await self.records.read(done.release)
            if stored.decision is not None and stored.decision.id == decision_id:
                await self.records.finish(stored.decision, action="decided", actor="gatekeeper", key=key)
                return  # redelivered after its decision was stored
            if stored.decision is not None and done.run_id and stored.decision.eval_run == done.run_id:
                # Redelivered after its decision was stored and then reviewed (or BLOCKed on drift), which keep its
                # run: judged again, it was stored over the review under the same decision id, which the audit log
                # and the announcements had already taken (as duplicates) for the first decision.
                log.info("eval run %s of %s was decided already; its decision is now %s (%s): not judged again",
                         done.run_id, done.release, stored.decision.id, stored.decision.decision)
                return
            # The binding in KV is the authority on what the release holds (the lineage tables may lag it).
            bundle = await self._bundle(done.release)
            registered = _artifacts(bundle)
            # An eval that names no artifacts judged the release as registered (see domain.release_rules).
            release_arts = registered if registered is not None else done.artifacts
            policy, policy_error = await self._policy(done)
            prior, baseline, refused = 0, None, ""
            if policy is not None and done.status == "completed":
                prior = await self.records.consecutive_errors(done.release, done.run_id)
                if done.baseline:
                    refused, baseline = await self._baseline(done, bundle)
            outcome = domain.decide_eval(policy, policy_error, done, prior_errors=prior,
                                         candidate_artifacts=release_arts, baseline_artifacts=baseline,
                                         baseline_refused=refused)
            # Artifacts past their sunset block (naming the successor); deprecated ones warn.
            outcome = domain.with_rules(outcome, await lifecycle.gate_rules(self.ctx.bus, self.ctx.settings,
                                                                            release_arts))
            # The gates file, not the eval's requester, says which policy and suite may gate the app.
            outcome = domain.with_rules(outcome, await self._required(done.release, bundle, done.policy,
                                                                      done.suite))
            outcome = domain.with_rules(outcome, await self._required_baseline(done, bundle))
            # The release's tenant, whoever asked for the eval (`lockgate eval run` names none): its stored row is then
            # its tenant's to read (the ClickHouse row policies go by it), and its content's veto that tenant's.
            tenant = str((bundle or {}).get("tenant") or done.tenant)
            # A person's reject of this content stands over a re-run of its eval: at most NEEDS_REVIEW. It binds the
            # content, not the name: what the release serves, under any release or artifact name of its tenant.
            judged = domain.judged_artifacts(done.artifacts or release_arts)
            veto = domain.standing_veto(stored.decision, judged, stored.unreadable,
                                        withdrawn_approvals(self.ctx.settings, stored.decision))
            if veto is None:
                kept = await self.records.content(tenant, judged)
                veto = domain.standing_veto(kept.decision, judged, kept.unreadable,
                                            withdrawn_approvals(self.ctx.settings, kept.decision))
            outcome = domain.under_veto(outcome, veto)
            # Last, so its remediation leads the reason: fail closed for a name nobody registered (or other content),
            # one bound otherwise than when the run started, or evaluated on another model than it ships.
            outcome = domain.with_rules(outcome, (*await evaluated_rules(self.ctx.bus, done, bundle),
                                                  *domain.release_rules(done.release, registered,
                                                                        done.artifacts or None)))
            span.set_attribute("lockgate.decision", outcome.decision)
            arts = {**(done.artifacts or release_arts),
                    **{k: v for k, v in (("eval_suite", done.suite), ("policy", done.policy)) if v}}
            decision = await self.own.sign(GateDecided(
                id=decision_id, release=done.release, decision=outcome.decision,
                rules=list(outcome.rules), eval_run=done.run_id, policy=done.policy, baseline=done.baseline,
                reason=outcome.reason, artifacts=arts, review_required=outcome.review_required,
                tenant=tenant, source="gatekeeper", trace_id=done.trace_id, seq=stored.next_seq,
            ))
            await self.publish_key()
            await self.records.settle(decision, over=stored.revision, action="decided", actor="gatekeeper", key=key)
            if outcome.decision != "PASS":
                log.info("release %s %s: %s", done.release, outcome.decision, outcome.reason)

    async def on_review(self, review: GateReview, delivery: Delivery) -> None:
        """Turn a pending NEEDS_REVIEW into a signed PASS/BLOCK (or refuse / override, see review.apply_review).

        The reviewer is the trusted person whose key signed the review; an unsigned, unknown, revoked,
        wrong-role or altered review is refused (audit row) and dead-lettered with the reason, and so is one of a
        release of a tenant the trust file does not let its signer review (the stored decision's tenant, never the
        review's: before, probe p25, tenant A's approver approved and rejected tenant B's releases).
        """
        with self.tracer.start_as_current_span(
            "gatekeeper.review", context=delivery.trace_context, kind=SpanKind.CONSUMER,
            attributes={"lockgate.release": review.release, "lockgate.review": review.action},
        ):
            new_id = domain.decision_id(review.id, self.signer.id_salt)
            key = review_key(review.id)  # the reviewer's CLI follows its review by it (a refusal too)
            stored = await self.records.read(review.release)
            if stored.unreadable:  # refused below as a release with no decision: nothing to review
                log.warning("review %s: %s", review.id, stored.unreadable)
            current = stored.decision
            if current is not None and current.id == new_id:  # redelivered after its decision was stored
                await self.records.finish(current, action=review_action(current), actor=current.reviewed_by, key=key)
                return
            try:
                reviewer = verify_review(self.ctx.settings, review,
                                         tenant=current.tenant if current is not None else None)
            except OutOfScope as exc:
                # Genuinely theirs, so named; but it does not count, approve or reject alike.
                await self._refuse(review, current, new_id, key, actor=exc.person,
                                   reason=f"{review.action} by {exc.person} refused: {exc.message}")
                raise
            except SignatureError as exc:
                # Not believed: the claimed actor is recorded only as a claim, in the reason.
                await self._refuse(review, current, new_id, key, actor="unverified",
                                   reason=f"{review.action} claimed by {review.actor or 'nobody'!r} refused: "
                                          f"{exc.message}")
                raise
            refusal = ""
            rules, author = ReviewRules(), None
            if current is not None:
                try:
                    # As history: what a key retired since decided before is still ours (only a leaked key's is not).
                    await self.verifier.verify(current, history=True)
                except SignatureError as exc:
                    # Never countersign content we cannot prove we decided.
                    refusal = f"{review.action} by {reviewer} refused: the stored decision fails: {exc.message}"
            if current is not None and not refusal and review.action == "approve":
                # Only an approval needs these checks; a veto is always allowed. An approval must not PASS a
                # name that is not registered (any more), or holds other content than was judged: the eval
                # path blocks both, this catches a NEEDS_REVIEW decided before it did.
                bundle = await self._bundle(current.release)
                failed = domain.release_rules(current.release, _artifacts(bundle),
                                              domain.judged_artifacts(current.artifacts))
                # Nor one decided under another policy (or suite) than the gates file requires now: it may
                # have been decided before the file required it.
                failed = failed or await self._required(current.release, bundle, current.policy,
                                                        current.artifacts.get("eval_suite", ""))
                if failed:
                    refusal = f"{review.action} by {reviewer} refused: {'; '.join(r.hint for r in failed)}"
                else:
                    try:
                        rules, author = await self._review_rules(current, bundle)
                    except (ConfigError, NotFound, ValueError) as exc:
                        why = exc.message if isinstance(exc, ConfigError | NotFound) \
                            else f"not JSON or YAML ({exc})"
                        refusal = (f"{review.action} by {reviewer} refused: policy {current.policy} is unusable: "
                                   f"{why}")
            # Earlier approvals count only while their signers are still trusted: a revoked (stolen) key's
            # approval must not complete an N-person rule with one honest approver.
            withdrawn = withdrawn_approvals(self.ctx.settings, current) if review.action == "approve" else {}
            outcome = apply_review(current, review, new_id, reviewer=reviewer, rules=rules, author=author,
                                   withdrawn=withdrawn)
            if refusal or outcome.decision is None:
                await self._refuse(review, current, new_id, key, actor=reviewer, reason=refusal or outcome.reason)
                return
            # Ordered after the decision it answers by its seq, never by this replica's clock.
            decision = await self.own.sign(msgspec.structs.replace(outcome.decision, seq=stored.next_seq))
            await self.publish_key()
            # Over the decision it answers: an eval's decision stored meanwhile makes it stale (refused when redelivered).
            await self.records.settle(decision, over=stored.revision, action=outcome.action, actor=reviewer, key=key)

    async def _refuse(self, review: GateReview, current: GateDecided | None, new_id: str, key: str, *,
                      actor: str, reason: str) -> None:
        row = GateDecided(id=new_id, release=review.release, rules=[],
                          decision=current.decision if current else "BLOCK",
                          eval_run=current.eval_run if current else "", tenant=review.tenant)
        await self.records.audit(row, action="refused", actor=actor, key=key, reason=reason)
        log.warning("%s", reason)

    async def _review_rules(self, current: GateDecided, bundle: dict | None) -> tuple[ReviewRules, str | None]:
        """What an approval of `current` takes (its policy's review section) and the author of the release
        `bundle`, when the policy forbids self-approval (None: unknown)."""
        if not current.policy:
            return ReviewRules(), None
        policy = domain.parse_policy(await artifacts.load_structured(self.ctx.bus, current.policy))
        rules = ReviewRules.of(policy.review)
        if not rules.forbid_self_approval or bundle is None:
            return rules, None
        return rules, author_of(self.ctx.settings, bundle)

    async def _required(self, release: str, bundle: dict | None, policy: str, suite: str, *,
                        standing: str = "") -> tuple[RuleResult, ...]:
        """FAIL rules when the policy or suite (hashes) an eval of the registered `bundle` used is not what
        the gates file requires for its app; () without a requirement (or an unregistered release, which
        release_rules blocks). `standing`: the id of the current PASS so judged (domain.required_rules)."""
        app = str((bundle or {}).get("app", ""))
        if self.gates is None or bundle is None or (required := self.gates.for_app(app)) is None:
            return ()
        reg = self.registrations
        used_policy = domain.Used(policy, await reg.names(required.policy.kind, policy), await reg.known(policy))
        used_suite = domain.Used(suite, await reg.names(required.suite.kind, suite), await reg.known(suite)) \
            if required.suite else None
        return domain.required_rules(release, app, required, used_policy, used_suite, standing=standing)

    async def _baseline(self, done: EvalCompleted, bundle: dict | None) -> tuple[str, dict[str, str] | None]:
        """Why the eval's baseline is refused as its yardstick ("" if it is not; baseline.refusal), and its
        artifacts (None when unknown or refused: review triggers then take every artifact as changed)."""
        base = await self._bundle(done.baseline)
        current, untrusted = await baseline_decision(self.records, self.verifier, done.baseline)
        if untrusted:
            return untrusted, None
        compared = done.baseline_run if done.baseline_run or done.comparisons else None
        app = None if bundle is None else str(bundle.get("app", ""))
        why = baselines.refusal(done.baseline, current, _artifacts(base), app=app,
                                baseline_app=str((base or {}).get("app", "")), compared_run=compared)
        if not why and current is not None:
            # Its PASS must have been decided under what the gates file requires of the app now.
            failed = await self._required(done.baseline, base, current.policy,
                                          current.artifacts.get("eval_suite", ""))
            why = "; ".join(f"baseline {done.baseline!r} is not gated as required: {r.hint}" for r in failed)
        return why, None if why else _artifacts(base)

    async def _required_baseline(self, done: EvalCompleted, bundle: dict | None) -> tuple[RuleResult, ...]:
        """FAIL when the gates file pins the app's baseline to a deployment's known-good release and the eval
        compared with another (baseline.required_baseline_rules)."""
        app = str((bundle or {}).get("app", ""))
        required = self.gates.for_app(app) if self.gates is not None and bundle is not None else None
        if required is None or not required.baseline_deployment:
            return ()
        try:
            expected: str | None = known_good(await read_route(self.ctx, required.baseline_deployment))
            unreadable = ""
        except UnreadableValue as exc:
            expected, unreadable = None, exc.message
        return baselines.required_baseline_rules(done.release, app, required, done.baseline, expected, unreadable)

    async def _bundle(self, release: str) -> dict | None:
        """The bundle `release` is bound to, None if it is not registered; BusUnavailable (retried) if the
        bucket cannot be read, which must never count as "not registered"."""
        try:
            return await artifacts.release_of(self.ctx.bus, release)
        except NotFound:
            return None

    async def _policy(self, done: EvalCompleted) -> tuple[domain.Policy | None, str]:
        """The parsed policy the eval names (one naming none is not decided), or None and why not (the gate then
        fails closed)."""
        try:
            return domain.parse_policy(await artifacts.load_structured(self.ctx.bus, done.policy)), ""
        except (ConfigError, NotFound) as exc:
            return None, f"policy {done.policy} is unusable: {exc.message}"
        except ValueError as exc:  # stored bytes that are not JSON at all
            return None, f"policy {done.policy} is unusable: not JSON or YAML ({exc})"


def _artifacts(bundle: dict | None) -> dict[str, str] | None:
    """The artifact map of a release bundle (None: the release is not registered)."""
    return None if bundle is None else dict(bundle.get("artifacts") or {})
