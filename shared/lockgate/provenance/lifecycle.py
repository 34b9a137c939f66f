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
from lockgate.subjects import token


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
        when = utc_iso(r.sunset) if r.sunset else "no sunset date"
        state = f"was sunset on {when}" if self.sunset_passed else f"is deprecated (sunset {when})"
        fix = f"; use its successor {r.successor}" if r.successor else ""
        why = f" ({r.reason})" if r.reason else ""
        return f"{self.key} {self.hash[:19]} {state}{why}{fix}"


def utc(when: datetime) -> datetime:
    """`when` as an aware UTC time (a naive one is taken as UTC, as the CLI reads `--sunset`)."""
    return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)


def utc_iso(when: datetime) -> str:
    """`when` as ISO 8601 in UTC with a `Z`: the time, not the date alone (a sunset later the same day read as past)."""
    return utc(when).isoformat().replace("+00:00", "Z")


def assess(release_artifacts: Mapping[str, str], records: Mapping[str, ArtifactLifecycle],
           now: datetime) -> list[Finding]:
    """Pure: a finding for each artifact of the release that has a lifecycle record in force."""
    out = []
    for key, digest in sorted(release_artifacts.items()):
        record = records.get(digest)
        if record is not None:
            out.append(Finding(key, digest, bool(record.sunset and utc(record.sunset) <= now), record))
    return out


def refusal(findings: list[Finding], release: str) -> SunsetArtifact | None:
    """The error that stops promoting `release`, if any artifact of it is past sunset."""
    past = [f.message() for f in findings if f.sunset_passed]
    if not past:
        return None
    return SunsetArtifact(f"release {release} uses sunset artifacts: {'; '.join(past)}")


async def history(bus: Bus, settings: Settings, digest: str) -> chain.History[ArtifactLifecycle]:
    """The verified lifecycle records of an artifact version, with the messages on its subject that are not
    part of it (skipped); ChainBroken if a signed record does not follow the one before it."""
    return await ledger.read(bus, bus.subjects.lifecycle(digest), ArtifactLifecycle, digest, verifier(settings))


async def for_release(bus: Bus, settings: Settings, release_artifacts: Mapping[str, str],
                      now: datetime | None = None) -> tuple[list[Finding], list[chain.Skipped]]:
    """The lifecycle findings of a release's artifacts (`kind/name` -> hash) now, from the record in force for
    each (its last verified one), and the messages skipped reading them."""
    records, skipped = {}, []
    for digest in sorted(set(release_artifacts.values())):
        found = await history(bus, settings, digest)
        skipped += found.skipped
        if found.records:
            records[digest] = found.records[-1]
    return assess(release_artifacts, records, now or datetime.now(UTC)), skipped


async def deprecate(bus: Bus, settings: Settings, identity: Identity, digest: str, *, successor: str = "",
                    sunset: datetime | None = None, reason: str = "", audit_as: str = "operator",
                    ) -> tuple[ArtifactLifecycle, list[chain.Skipped]]:
    """Append a signed deprecation of an artifact version (with successor and sunset), audited; with the
    messages skipped reading its lifecycle."""
    await artifacts.require(bus, digest)  # NotFound unless the version exists
    if successor:
        if successor == digest:
            raise ConfigError("an artifact cannot be its own successor")
        await artifacts.require(bus, successor)
    found = await history(bus, settings, digest)  # never extend a history that does not check out
    prev = found.records[-1] if found.records else None
    record = chain.seal(identity, ArtifactLifecycle(hash=digest, successor=successor, sunset=sunset,
                                                    reason=reason, seq=0), prev)
    verifier(settings, allow_revoked=False)(record)  # refused before it is written if the signer may not
    # After the subject's last message, skipped or not: anything appended since the read refuses this one.
    await ledger.append(bus, bus.subjects.lifecycle(digest), record, found.last_seq)
    await auditlog.record(bus, audit_as, kind="lifecycle", actor=identity.name, target=digest, action="deprecate",
                          reason=reason, entry_id=record.id,
                          details={"successor": successor, "sunset": sunset.isoformat() if sunset else "",
                                   "seq": record.seq, "key_id": record.key_id})
    return record, found.skipped


def rule_results(findings: list[Finding]) -> list[RuleResult]:
    """Pure: the gate rules of a release's lifecycle findings: FAIL past sunset (naming the successor),
    PASS with a warning while only deprecated."""
    return [RuleResult(rule=f"lifecycle {f.key}", metric="sunset", op="not past", threshold=0.0,
                       observed=1.0 if f.sunset_passed else 0.0, verdict="FAIL" if f.sunset_passed else "PASS",
                       hint=f.message()) for f in findings]


def skipped_rule(skipped: list[chain.Skipped], release_artifacts: Mapping[str, str]) -> list[RuleResult]:
    """Pure: a PASS rule naming the lifecycle messages skipped (none: no rule). They are no part of any
    artifact's lifecycle, so they decide nothing; the decision says they were there."""
    if not skipped:
        return []
    subjects = {s.subject for s in skipped}
    keys = sorted(k for k, digest in release_artifacts.items() if any(s.endswith(f".{token(digest)}") for s in subjects))
    return [RuleResult(rule="lifecycle records skipped", metric="skipped", op="ignored", threshold=0.0,
                       observed=float(len(skipped)), verdict="PASS",
                       hint=f"{chain.summary(skipped, 'lifecycle record')} ({', '.join(keys)}; not taken into account)")]


async def gate_rules(bus: Bus, settings: Settings, release_artifacts: Mapping[str, str],
                     now: datetime | None = None) -> list[RuleResult]:
    """What the gatekeeper adds to a decision; a lifecycle history that does not verify fails closed. Messages
    on a lifecycle subject that are no part of it are skipped, logged once and named in a PASS rule."""
    try:
        findings, skipped = await for_release(bus, settings, release_artifacts, now)
    except chain.ChainBroken as exc:
        return [RuleResult(rule="lifecycle", metric="signature", op="verified", threshold=1.0, observed=0.0,
                           verdict="FAIL", hint=exc.message)]
    ledger.reported(skipped)
    return [*rule_results(findings), *skipped_rule(skipped, release_artifacts)]
