"""The gatekeeper's own signing key, used only while the trust roots trust it.

Everyone else checks decisions and audit rows against the trust roots (the trust file and pinned PEMs). A
gatekeeper holding a key they revoke (leaked), retire (rotated out) or never listed would sign decisions the
router refuses and audit rows `audit verify` refuses: an approval used up, a reject that never blocks, an eval
that never decides, a chain broken for good. So it decides and chains nothing, says why (its log, and its
readiness), and leaves each message to a replica whose key is trusted (redelivered; dead-lettered with this
reason once its retries are spent, when none is, except an audit entry, which waits for one: chain.CHAIN_WAITS).
"""

from __future__ import annotations

import logging

from lockgate.contracts import GateDecided
from lockgate.errors import Retryable
from lockgate.server.service import Progress, ServiceContext
from lockgate.services.gatekeeper.recordable import recordable
from lockgate.signing import Signer, Verifier

log = logging.getLogger("lockgate.gatekeeper")


class KeyNotTrusted(Retryable):
    """This gatekeeper's signing key is revoked, retired or not in the trust roots: it signs nothing, and the
    message is redelivered for a replica with a trusted key."""


class OwnKey:
    """The gatekeeper's signer, handed out only while the trust roots as they are now trust its key."""

    def __init__(self, ctx: ServiceContext, signer: Signer, verifier: Verifier | None = None) -> None:
        self.signer = signer
        self.verifier = verifier or Verifier(ctx.bus, ctx.settings)
        self._said = ""  # the problem last logged, so a lasting one is logged once, not per message
        self.refused = Progress()  # messages left to another replica because the key was not trusted

    def problem(self) -> str:
        """Why this gatekeeper may not sign now ("" when it may); logged when it changes."""
        why = self.verifier.why_untrusted(self.signer.key_id)
        problem = f"this gatekeeper's signing key is not trusted: {why}; it decides nothing until it has a " \
                  "trusted key (LOCKGATE_SIGNING_KEY)" if why else ""
        if problem != self._said:
            if problem:
                log.error("%s", problem)
            else:
                log.warning("this gatekeeper's signing key %s is trusted again", self.signer.key_id)
            self._said = problem
        return problem

    async def require(self) -> Signer:
        """The signer, or KeyNotTrusted (nacked: a replica with a trusted key takes the message)."""
        problem = self.problem()
        if problem:
            await self.refused.bump()
            raise KeyNotTrusted(problem)
        return self.signer

    async def sign(self, decision: GateDecided) -> GateDecided:
        """`decision` signed as every reader will decode it (recordable: a BLOCK saying why when it would not
        decode again); KeyNotTrusted as `require`. Every decision the gatekeeper makes is signed here."""
        return (await self.require()).sign(recordable(decision))
