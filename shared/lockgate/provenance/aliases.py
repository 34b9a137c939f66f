"""Aliases (production, staging ...) per app, pointing to releases, with an append-only signed history."""

from __future__ import annotations

from datetime import datetime

from lockgate import artifacts, auditlog
from lockgate.bus import Bus
from lockgate.config import Settings
from lockgate.contracts.names import check_name, is_name
from lockgate.contracts.provenance import AliasChanged
from lockgate.errors import ConfigError
from lockgate.identity import Identity
from lockgate.provenance import chain, ledger, lifecycle
from lockgate.provenance.trust import verifier
from lockgate.subjects import untoken


async def history(bus: Bus, settings: Settings, app: str, alias: str) -> chain.History[AliasChanged]:
    """Every verified change of the alias, oldest first, who signed each, and the messages on its subject that
    are not part of it (skipped); ChainBroken if a signed change does not follow the one before it."""
    check_name(app, "app")  # a name no alias can have is a mistake to name, not an alias never set
    check_name(alias, "alias")
    return await ledger.read(bus, bus.subjects.alias(app, alias), AliasChanged, f"{app}/{alias}", verifier(settings))


async def set_alias(bus: Bus, settings: Settings, identity: Identity, app: str, alias: str, release: str, *,
                    reason: str = "", origin: str = "cli", audit_as: str = "operator", now: datetime | None = None,
                    ) -> tuple[AliasChanged | None, list[lifecycle.Finding], list[chain.Skipped]]:
    """Point APP's ALIAS at RELEASE: a signed record chained after the last verified one, audited. None if it
    already points there. Refused if the release is of another app or uses a sunset artifact; the findings of
    deprecated (not yet sunset) artifacts come back as warnings, with the messages skipped reading the
    alias's history and the release's artifacts' lifecycles."""
    check_name(app, "app")
    check_name(alias, "alias")
    bundle = await artifacts.release_of(bus, release)
    if bundle.get("app") != app:
        raise ConfigError(f"release {release!r} is of app {bundle.get('app')!r}, not {app!r}")
    findings, skipped = await lifecycle.for_release(bus, settings, bundle.get("artifacts", {}), now)
    if (refused := lifecycle.refusal(findings, release)) is not None:
        raise refused
    found = await history(bus, settings, app, alias)  # never extend a history that does not check out
    skipped = [*found.skipped, *skipped]
    prev = found.records[-1] if found.records else None
    if prev is not None and prev.release == release:
        return None, findings, skipped
    record = chain.seal(identity, AliasChanged(app=app, alias=alias, release=release,
                                               previous=prev.release if prev else "", reason=reason,
                                               origin=origin, tenant=bundle.get("tenant", "default"), seq=0), prev)
    verifier(settings, allow_revoked=False)(record)  # refused before it is written if the signer may not
    # After the subject's last message, skipped or not: anything appended since the read refuses this one.
    await ledger.append(bus, bus.subjects.alias(app, alias), record, found.last_seq)
    await auditlog.record(bus, audit_as, kind="alias", actor=identity.name, target=f"{app}/{alias}", action="set",
                          reason=reason, entry_id=record.id, tenant=record.tenant,
                          details={"release": release, "previous": record.previous, "seq": record.seq,
                                   "key_id": record.key_id, "origin": origin})
    return record, findings, skipped


async def pointed_at(bus: Bus, settings: Settings, app: str, alias: str, when: datetime | None = None,
                     ) -> tuple[AliasChanged | None, list[AliasChanged], list[str], list[chain.Skipped]]:
    """The verified change in force at `when` (None: now), the changes up to then, their signers, and the
    messages skipped reading the history."""
    found = await history(bus, settings, app, alias)
    current = chain.at(found.records, when)
    upto = [r for r in found.records if current is not None and r.seq <= current.seq]
    return current, upto, found.signers[:len(upto)], found.skipped


def _names(subject: str, prefix: str) -> tuple[str, str] | None:
    """The app and alias whose history `subject` is, or None for a subject no alias has (only junk lands
    there: a message published there, or a JetStream acknowledgement aimed there)."""
    app_tok, _, alias_tok = subject.removeprefix(prefix).partition(".")
    try:
        app, alias = untoken(app_tok), untoken(alias_tok)
    except ConfigError:
        return None
    return (app, alias) if is_name(app) and is_name(alias) else None


async def list_aliases(bus: Bus, settings: Settings, app: str | None = None,
                       ) -> tuple[list[AliasChanged], list[chain.Skipped]]:
    """The current (verified) record of every alias, or of one app's, and the messages skipped reading them
    (with, listing every app's, those on subjects no alias has)."""
    if app is not None:
        check_name(app, "app")
    prefix = f"{bus.subjects.prefix}.provenance.alias."
    out, skipped = [], []
    for subject in await ledger.subjects(bus, bus.subjects.alias_all):
        names = _names(subject, prefix)
        if names is None:
            if app is None:
                skipped += [chain.Skipped(subject, seq, "foreign", "on a subject that is no alias's history")
                            for seq, _ in await ledger.messages(bus, subject)]
            continue
        if app is not None and names[0] != app:
            continue
        found = await history(bus, settings, *names)
        skipped += found.skipped
        if found.records:
            out.append(found.records[-1])
    return sorted(out, key=lambda r: (r.app, r.alias)), skipped
