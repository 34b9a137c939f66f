"""Artifact lifecycles: deprecate a version with a successor and a sunset date; what a release's
artifacts' lifecycles say about it now (a warning while deprecated, a refusal after sunset)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from lockgate import artifacts, auditlog
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts.gates import RuleResult
from lockgate.contracts.provenance import ArtifactLifecycle
from lockgate.errors import ConfigError, LockgateError
from lockgate.identity import Identity
from lockgate.provenance import chain, ledger
from lockgate.provenance.trust import verifier


class SunsetArtifact(LockgateError):
    """A release uses an artifact version past its sunset date: it may not be promoted."""

    exit_code = 4


@dataclass(frozen=True)
class Finding:
    """What one artifact's lifecycle says about a release that uses it."""

    key: str  # the release's `kind/name`
    hash: str
    sunset_passed: bool
    record: ArtifactLifecycle

    def message(self) -> str:
        """One line naming the artifact, its sunset and its successor (the remediation)."""
        r = self.record
        when = r.sunset.date().isoformat() if r.sunset else "no sunset date"
        state = f"was sunset on {when}" if self.sunset_passed else f"is deprecated (sunset {when})"
        fix = f"; use its successor {r.successor}" if r.successor else ""
        why = f" ({r.reason})" if r.reason else ""
        return f"{self.key} {self.hash[:19]} {state}{why}{fix}"


def assess(release_artifacts: Mapping[str, str], records: Mapping[str, ArtifactLifecycle],
           now: datetime) -> list[Finding]:
    """Pure: a finding for each artifact of the release that has a lifecycle record in force."""
    out = []
    for key, digest in sorted(release_artifacts.items()):
        record = records.get(digest)
        if record is not None:
            out.append(Finding(key, digest, bool(record.sunset and record.sunset <= now), record))
    return out


def refusal(findings: list[Finding], release: str) -> SunsetArtifact | None:
    """The error that stops promoting `release`, if any artifact of it is past sunset."""
    past = [f.message() for f in findings if f.sunset_passed]
    if not past:
        return None
    return SunsetArtifact(f"release {release} uses sunset artifacts: {'; '.join(past)}")


async def current(bus: Bus, settings: Settings, digest: str) -> ArtifactLifecycle | None:
    """The verified lifecycle record in force for an artifact version, or None (never deprecated)."""
    records = await ledger.history(bus, bus.subjects.lifecycle(digest), ArtifactLifecycle)
    if any(r.hash != digest for r in records):
        raise chain.ChainBroken(f"the lifecycle history of {digest} holds a record for another artifact")
    chain.check(records, verifier(settings))
    return records[-1] if records else None


async def for_release(bus: Bus, settings: Settings, release_artifacts: Mapping[str, str],
                      now: datetime | None = None) -> list[Finding]:
    """The lifecycle findings of a release's artifacts (`kind/name` -> hash) now."""
    records = {}
    for digest in set(release_artifacts.values()):
        record = await current(bus, settings, digest)
        if record is not None:
            records[digest] = record
    return assess(release_artifacts, records, now or datetime.now(UTC))


async def deprecate(bus: Bus, settings: Settings, identity: Identity, digest: str, *, successor: str = "",
                    sunset: datetime | None = None, reason: str = "", audit_as: str = "operator") -> ArtifactLifecycle:
    """Append a signed deprecation of an artifact version (with successor and sunset), audited."""
    await artifacts.require(bus, digest)  # NotFound unless the version exists
    if successor:
        if successor == digest:
            raise ConfigError("an artifact cannot be its own successor")
        await artifacts.require(bus, successor)
    subject = bus.subjects.lifecycle(digest)
    found = await ledger.last(bus, subject, ArtifactLifecycle)
    await current(bus, settings, digest)  # never extend a history that does not check out
    after, prev = found if found else (0, None)
    record = chain.seal(identity, ArtifactLifecycle(hash=digest, successor=successor, sunset=sunset,
                                                    reason=reason, seq=0), prev)
    verifier(settings, allow_revoked=False)(record)  # refused before it is written if the signer may not
    await ledger.append(bus, subject, record, after)
    await auditlog.record(bus, audit_as, kind="lifecycle", actor=identity.name, target=digest, action="deprecate",
                          reason=reason, entry_id=record.id,
                          details={"successor": successor, "sunset": sunset.isoformat() if sunset else "",
                                   "seq": record.seq, "key_id": record.key_id})
    return record


def rule_results(findings: list[Finding]) -> list[RuleResult]:
    """Pure: the gate rules of a release's lifecycle findings: FAIL past sunset (naming the successor),
    PASS with a warning while only deprecated."""
    return [RuleResult(rule=f"lifecycle {f.key}", metric="sunset", op="not past", threshold=0.0,
                       observed=1.0 if f.sunset_passed else 0.0, verdict="FAIL" if f.sunset_passed else "PASS",
                       hint=f.message()) for f in findings]


async def gate_rules(bus: Bus, settings: Settings, release_artifacts: Mapping[str, str],
                     now: datetime | None = None) -> list[RuleResult]:
    """What the gatekeeper adds to a decision; a lifecycle history that does not verify fails closed."""
    try:
        return rule_results(await for_release(bus, settings, release_artifacts, now))
    except chain.ChainBroken as exc:
        return [RuleResult(rule="lifecycle", metric="signature", op="verified", threshold=1.0, observed=0.0,
                           verdict="FAIL", hint=exc.message)]
