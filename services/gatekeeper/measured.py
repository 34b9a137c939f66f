"""A baseline withdrawn reaches back: when a release stops being an allowed baseline (a person's reject of it, a veto of
its content reaching it, a drift BLOCK, an artifact's sunset, a later eval that does not PASS), every current PASS or
NEEDS_REVIEW measured against it under a policy that gates on the comparison is remade as a signed BLOCK (rule
baseline_allowed, domain.baseline_withdrawn), as an eval of it against that baseline is judged now (adapter:
remake.judged_again signs and stores, and the router rolls it back as for any BLOCK). Before, probe p85 F1, the gate
refused the rejected release as a yardstick for new evals, but a PASS measured against it before kept admitting."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from lockgate import artifacts
from lockgate.contracts import GateDecided
from lockgate.errors import ConfigError, NotFound, SignatureError
from lockgate.server.service import ServiceContext
from lockgate.services.gatekeeper import baseline as baselines
from lockgate.services.gatekeeper import domain
from lockgate.services.gatekeeper.domain import Outcome
from lockgate.services.gatekeeper.ownkey import OwnKey
from lockgate.services.gatekeeper.records import BASELINE, Records
from lockgate.services.gatekeeper.remake import judged_again
from lockgate.signing import Verifier

__all__ = ["Measured", "baseline_decision"]
# The decisions that admit or may come to (an approval of a NEEDS_REVIEW): what a withdrawn baseline remakes.
_STANDING = ("PASS", "NEEDS_REVIEW")


async def baseline_decision(records: Records, verifier: Verifier, baseline: str) -> tuple[GateDecided | None, str]:
    """The current decision of release `baseline` (None: it has none) and "", or None and why it cannot be trusted
    (its key holds no decision of it, or no trusted key signed it). Verified as history: a baseline PASSed before a
    key rotation is still one (a leaked key's PASS is not)."""
    stored = await records.read(baseline)
    if stored.unreadable:
        return None, f"baseline {baseline!r}'s current decision cannot be trusted: {stored.unreadable}"
    if stored.decision is not None:
        try:
            await verifier.verify(stored.decision, history=True)
        except SignatureError as exc:
            return None, f"baseline {baseline!r}'s current decision cannot be trusted: {exc.message}"
    return stored.decision, ""


class Measured:
    """Remakes the decisions measured against a release that is no allowed baseline (Records.measured calls `after`;
    the gatekeeper's start calls `sweep`)."""

    def __init__(self, ctx: ServiceContext, own: OwnKey, records: Records,
                 publish_key: Callable[[], Awaitable[None]]) -> None:
        self.ctx = ctx
        self.own = own
        self.records = records
        self.publish_key = publish_key

    async def after(self, settled: GateDecided) -> None:
        """After `settled` was stored for its release: if it is no PASS, remake what was measured against that release;
        if it admits or may and was measured against a baseline, remake it should that one be allowed no more.

        Each side writes before it reads (the baseline's decision, then the decisions measured against it; a decision,
        then its baseline's), so an eval that read its baseline allowed while a reject of it was being stored is seen
        by one of them whatever the order. Idempotent (a BLOCK is not remade again), so a redelivery finishes a pass
        cut short; what it remakes goes through Records.finish too, so a decision measured against that one follows."""
        if settled.decision != "PASS":
            for current in await self.records.current_decisions():
                if current.baseline == settled.release and current.decision in _STANDING:
                    await self._remake(current.release, settled.release)
        if settled.baseline and settled.decision in _STANDING:
            await self._remake(settled.release, settled.baseline)

    async def sweep(self) -> int:
        """Remake every current decision measured against a release that is no allowed baseline now: a reach-back cut
        short (a gatekeeper stopped mid-pass) or a baseline withdrawn before a gatekeeper that reaches back ran. How
        many were remade; a second start remakes none."""
        remade = 0
        for current in await self.records.current_decisions():
            if current.baseline and current.decision in _STANDING:
                remade += await self._remake(current.release, current.baseline)
        return remade

    async def _remake(self, release: str, baseline: str) -> bool:
        """Remake `release`'s current decision as a BLOCK if it was measured against `baseline` and that is no allowed
        baseline now (domain.baseline_withdrawn); whether it was remade."""

        async def judge(current: GateDecided) -> Outcome | None:
            if current.baseline != baseline or current.decision not in _STANDING:
                return None  # changed since it was listed
            decision, untrusted = await baseline_decision(self.records, self.own.verifier, baseline)
            why = untrusted or baselines.disallowed(baseline, decision)
            if not why:
                return None
            return domain.baseline_withdrawn(current, why, await self._policy(current.policy))

        return await judged_again(self.own, self.records, self.publish_key, release, judge, action=BASELINE)

    async def _policy(self, policy: str) -> domain.Policy | None:
        """The parsed policy `policy` (hash), None when it cannot be read (then it may gate on the comparison)."""
        if not policy:
            return None
        try:
            return domain.parse_policy(await artifacts.load_structured(self.ctx.bus, policy))
        except (ConfigError, NotFound, ValueError):
            return None
