"""Aliases (production, staging ...) per app, pointing to releases, with an append-only signed history."""

from __future__ import annotations

from datetime import datetime

from lockgate import artifacts, auditlog
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts.names import check_name
from lockgate.contracts.provenance import AliasChanged
from lockgate.errors import ConfigError
from lockgate.identity import Identity
from lockgate.provenance import chain, ledger, lifecycle
from lockgate.provenance.trust import verifier
from lockgate.subjects import untoken


async def history(bus: Bus, settings: Settings, app: str, alias: str) -> tuple[list[AliasChanged], list[str]]:
    """Every change of the alias, oldest first, and who signed each; ChainBroken if any does not check out."""
    check_name(app, "app")  # a name no alias can have is a mistake to name, not an alias never set
    check_name(alias, "alias")
    records = await ledger.history(bus, bus.subjects.alias(app, alias), AliasChanged)
    for r in records:
        if (r.app, r.alias) != (app, alias):
            raise chain.ChainBroken(f"{chain.describe(r)} was appended to the history of {app}/{alias}")
    return records, chain.check(records, verifier(settings))


async def set_alias(bus: Bus, settings: Settings, identity: Identity, app: str, alias: str, release: str, *,
                    reason: str = "", origin: str = "cli", audit_as: str = "operator",
                    now: datetime | None = None) -> tuple[AliasChanged | None, list[lifecycle.Finding]]:
    """Point APP's ALIAS at RELEASE: a signed record chained after the last, audited. None if it already
    points there. Refused if the release is of another app or uses a sunset artifact; the findings of
    deprecated (not yet sunset) artifacts come back as warnings."""
    check_name(app, "app")
    check_name(alias, "alias")
    bundle = await artifacts.release_of(bus, release)
    if bundle.get("app") != app:
        raise ConfigError(f"release {release!r} is of app {bundle.get('app')!r}, not {app!r}")
    findings = await lifecycle.for_release(bus, settings, bundle.get("artifacts", {}), now)
    if (refused := lifecycle.refusal(findings, release)) is not None:
        raise refused
    subject = bus.subjects.alias(app, alias)
    found = await ledger.last(bus, subject, AliasChanged)
    await history(bus, settings, app, alias)  # never extend a history that does not check out
    after, prev = found if found else (0, None)
    if prev is not None and prev.release == release:
        return None, findings
    record = chain.seal(identity, AliasChanged(app=app, alias=alias, release=release,
                                               previous=prev.release if prev else "", reason=reason,
                                               origin=origin, tenant=bundle.get("tenant", "default"), seq=0), prev)
    verifier(settings, allow_revoked=False)(record)  # refused before it is written if the signer may not
    await ledger.append(bus, subject, record, after)
    await auditlog.record(bus, audit_as, kind="alias", actor=identity.name, target=f"{app}/{alias}", action="set",
                          reason=reason, entry_id=record.id, tenant=record.tenant,
                          details={"release": release, "previous": record.previous, "seq": record.seq,
                                   "key_id": record.key_id, "origin": origin})
    return record, findings


async def pointed_at(bus: Bus, settings: Settings, app: str, alias: str,
                     when: datetime | None = None) -> tuple[AliasChanged | None, list[AliasChanged], list[str]]:
    """The verified change in force at `when` (None: now), the changes up to then, and their signers."""
    records, signers = await history(bus, settings, app, alias)
    current = chain.at(records, when)
    upto = [r for r in records if current is not None and r.seq <= current.seq]
    return current, upto, signers[:len(upto)]


async def list_aliases(bus: Bus, settings: Settings, app: str | None = None) -> list[AliasChanged]:
    """The current (verified) record of every alias, or of one app's."""
    if app is not None:
        check_name(app, "app")
    prefix = f"{bus.subjects.prefix}.provenance.alias."
    out = []
    for subject in await ledger.subjects(bus, bus.subjects.alias_all):
        app_tok, _, alias_tok = subject.removeprefix(prefix).partition(".")
        name = untoken(app_tok)
        if app is not None and name != app:
            continue
        records, _ = await history(bus, settings, name, untoken(alias_tok))
        if records:
            out.append(records[-1])
    return sorted(out, key=lambda r: (r.app, r.alias))
