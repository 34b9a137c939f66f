"""`lockgate audit verify|log`: check and read the hash-chained audit log; and how CLI changes are recorded in it."""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from collections.abc import Mapping
from typing import Any

import click
import msgspec
import nats
import nats.errors
import nats.js.errors

from lockgate import auditchain, auditlog
from lockgate.bus import Bus
from lockgate.cli import access
from lockgate.cli.access import chosen_role, with_bus
from lockgate.cli.render import emit_json, err_console, table
from lockgate.cli.root import handle_errors, json_option
from lockgate.config import Settings
from lockgate.contracts import AuditEntry, AuditRecord
from lockgate.credentials import NotAllowed
from lockgate.errors import AuditBroken, BusUnavailable, LockgateError
from lockgate.permissions import Grant
from lockgate.queryclient import ask_pages
from lockgate.redact import shown_url
from lockgate.retry import RetryPolicy
from lockgate.signing import Keyring
from lockgate.subjects import Subjects

_head_decoder = msgspec.json.Decoder(AuditRecord)  # the chain head, and the rows the chainer publishes


async def read_head(bus: Bus) -> AuditRecord | None:
    """The chain head (the last row the chainer appended) from KV, or None before the first row."""
    try:
        kv = await bus.kv(bus.subjects.kv_audit)
        entry = await kv.get(auditchain.HEAD_KEY)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.BucketNotFoundError):
        return None
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        raise BusUnavailable(f"cannot read the audit chain head from KV {bus.subjects.kv_audit}: {exc!r}") from None
    try:
        return _head_decoder.decode(entry.value)
    except msgspec.DecodeError as exc:
        raise AuditBroken(f"audit log broken: the chain head in KV {bus.subjects.kv_audit} is unreadable "
                          f"({exc})") from None


# The head is written before its row is published and stored: give the sink a few seconds to catch up
# before a short tail is reported as missing.
_TAIL_WAIT = RetryPolicy(attempts=8, initial_s=0.1, max_s=1.0)


def _last_seq(rows: list[dict[str, Any]]) -> int:
    seqs = [r["seq"] for r in rows if isinstance(r.get("seq"), int)]
    return max(seqs, default=0)


async def read_chain(bus: Bus) -> tuple[list[dict[str, Any]], AuditRecord | None]:
    """The stored rows up to the chain head, in seq order, and the head (read first: rows appended while
    we read are beyond it and are left for the next verify)."""
    head = await read_head(bus)
    rows: list[dict[str, Any]] = []
    for attempt in range(1, _TAIL_WAIT.attempts + 1):
        rows.extend(await ask_pages(bus, "audit_log", {"after_seq": _last_seq(rows)},
                                    after=lambda r: {"after_seq": r["seq"]}))
        if head is None or _last_seq(rows) >= head.seq or attempt == _TAIL_WAIT.attempts:
            break  # complete, or still short: verify names the first missing row
        await asyncio.sleep(_TAIL_WAIT.delay(attempt))  # backoff while the sink catches up
    if head is not None:
        rows = [r for r in rows if not isinstance(r.get("seq"), int) or r["seq"] <= head.seq]
    return rows, head


def check(rows: list[dict[str, Any]], head: AuditRecord | None, keyring: Keyring) -> dict[str, Any]:
    """The verification report as `--json` prints it."""
    report = auditchain.verify(rows, keyring, head)
    return {"ok": report.ok, "rows": report.rows, "last_seq": report.last_seq,
            "head_seq": head.seq if head else 0, "head_hash": head.hash if head else "",
            "keys": sorted(report.keys),
            "broken": None if report.ok else {"seq": report.broken.seq, "reason": report.broken.reason,
                                               "message": str(report.broken)}}


async def _stack_answers(settings: Settings, role: str) -> bool:
    """True if a NATS server answers at the URL."""
    nc = await access.connect_once(settings, role, "the change is not in the audit log")
    if nc is None:
        return False
    await nc.close()
    return True


def may_record(settings: Settings, doing: str, *also: str) -> str:
    """The role a key change is recorded as (admin unless --role), once the permission table says it may append to
    the audit log (and publish to `also`); NotAllowed otherwise, naming the roles that may. Called before the change
    is made: before, a role that may not audit had the change made, then reported failed, and never audited."""
    role = chosen_role("admin")
    s = Subjects(settings.prefix)
    access.require(settings, role, doing, lambda r: Grant(publish=[s.audit(r), *also]))
    return role


def may_record_admin_change(settings: Settings, what: str, doing: str, *also: str) -> str:
    """`may_record` for a change only admin may make (whom the trust file names, who holds which API key or NATS
    credential: each decides who may do the rest): any other role is refused first, in one line saying what the
    change decides (NotAllowed), before anything is changed. Before (probes p3, p54 F2), an operator, who may append
    to the audit log, trusted approvers, minted admin API keys, lifted any key's scope and revoked the admin's."""
    role = chosen_role("admin")
    if role != "admin":
        raise NotAllowed(f"role {role!r} may not {what}: use --role admin")
    return may_record(settings, doing, *also)


class NotChained(LockgateError):
    """An audit entry JetStream took (it is queued) that the chainer did not append to the audit log in time."""


# How long a CLI change waits for its entry's row: the chainer appends one in milliseconds when a gatekeeper with a
# trusted key runs; past this, none is chaining.
CHAINED_WITHIN_S = 10.0


def record_change(settings: Settings, *, target: str, action: str, reason: str = "",
                  details: Mapping[str, object] | None = None, wait: bool = True) -> None:
    """Append a key change made from the CLI to the audit log, as the CLI's identity (admin unless --role), and
    wait (CHAINED_WITHIN_S at most) for the chainer to append its row.

    The change itself is a file in the home, made first (once `may_record` allowed it); with no stack running
    there is no log to append to, which is said on stderr (the next `lockgate up` starts from the files as they
    are). When a running stack does not take the entry, or takes it but does not chain it in time (NotChained: no
    gatekeeper with a trusted key), this raises, and the caller must not leave the change unrecorded in silence: it
    undoes it (a grant) or says it is in force but unrecorded (a revocation). Before, JetStream's acknowledgement
    counted as recorded, and an entry no gatekeeper could sign was dead-lettered later while the command said
    nothing. `wait=False` only queues the entry (what a caller adds after a NotChained, chained right after it)."""
    role = chosen_role("admin")
    if not asyncio.run(_stack_answers(settings, role)):
        err_console.print(f"[yellow]note:[/yellow] no stack answers at {shown_url(settings.nats_url)}: this change is not "
                          "in the audit log", highlight=False, soft_wrap=True)
        return
    # Who is at the keyboard, as told (unverified, unlike the NATS identity the row is recorded under).
    ctx = click.get_current_context(silent=True)
    told = {"os_user": os.environ.get("USER") or getpass.getuser(),
            "as": (ctx.find_root().obj or {}).get("identity") if ctx is not None else None}

    async def work(bus: Bus) -> None:
        # Subscribed before the entry is sent: the chainer publishes each row it appends on `audit_records` (and
        # again for a redelivered entry), so the row of ours is seen however soon it comes.
        rows = await bus.nc.subscribe(bus.subjects.audit_records) if wait else None
        try:
            entry = await auditlog.record(bus, role, kind="key", actor=bus.auth.user or role, target=target,
                                          action=action, reason=reason, details={**told, **(details or {})})
            if rows is not None:
                await _chained(bus, rows, entry, role)
        finally:
            if rows is not None:
                await rows.unsubscribe()

    with_bus(settings, work, role=role)  # as the role it records as: its own audit subject and the rows


def record_undone(settings: Settings, *, target: str, action: str, details: Mapping[str, object] | None = None) -> str:
    """Queue `<action>-undone` for a change undone because its entry was queued but not chained (NotChained): that
    entry is chained once a gatekeeper with a trusted key runs, and this one after it, so the log never shows the
    change without its undoing. Returns "" or what to add to the error when it could not be queued."""
    try:
        record_change(settings, target=target, action=f"{action}-undone", details=details,
                      reason="its audit entry was not chained in time", wait=False)
    except LockgateError as exc:
        return f" (and its undoing could not be queued for the audit log: {exc.message})"
    return ""


async def _chained(bus: Bus, rows: Any, entry: AuditEntry, producer: str) -> None:
    """Return once the row of `entry` is published; NotChained after CHAINED_WITHIN_S."""
    try:
        async with asyncio.timeout(CHAINED_WITHIN_S):
            while True:
                msg = await rows.next_msg(timeout=None)
                try:
                    row = _head_decoder.decode(msg.data)
                except msgspec.DecodeError:
                    continue  # not a row: nothing of ours
                if auditchain.records(row, entry, producer):
                    return
    except TimeoutError:
        refused = bus.refused(bus.subjects.audit_records, "subscribe to")
        if refused is not None:
            raise refused from None
        raise NotChained(
            f"the audit entry ({entry.action} {entry.target}) is queued but was not chained into the audit log within "
            f"{CHAINED_WITHIN_S:.0f}s: no gatekeeper with a trusted signing key is chaining (`lockgate status`; a "
            "gatekeeper whose key is revoked, retired or not in the trust file chains nothing, its /readyz says "
            "why); it is chained once one runs") from None


def register(cli: click.Group) -> None:
    """Attach `audit` to the top-level group."""

    @cli.group()
    def audit() -> None:
        """The tamper-evident audit log: decisions, reviews, overrides, rollout actions and key changes."""

    @audit.command("verify")
    @click.option("--key", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
                  help="Trusted public key PEM (repeatable); default: the trust file and settings.trusted_keys.")
    @json_option
    @click.pass_context
    @handle_errors
    def verify(ctx: click.Context, keys: tuple[str, ...], as_json: bool) -> None:
        """Walk the chain: seq contiguous from 1, every hash recomputed and linked, every signature by a trusted
        key, the last row equal to the chain head. Exit 4 naming the first missing or altered row."""
        settings: Settings = ctx.obj["settings"]
        keyring = Keyring.from_pem_files(keys) if keys else Keyring.from_settings(settings)
        rows, head = with_bus(settings, read_chain)
        report = check(rows, head, keyring)
        if as_json:
            emit_json(report)
        if not report["ok"]:
            if not as_json:
                # click.echo, not rich: scripts rely on exactly one line, which rich would wrap.
                click.echo(f"error: {report['broken']['message']}", err=True)
            sys.exit(AuditBroken.exit_code)
        if not as_json:
            tail = f"seq 1..{report['last_seq']}, head {report['head_hash']}" if report["rows"] else "empty"
            click.echo(f"ok: audit log intact: {report['rows']} rows ({tail}); signed by key(s) "
                       f"{', '.join(report['keys']) or 'none'}")

    @audit.command("log")
    @click.option("--after", "after_seq", default=0, show_default=True, help="Only rows after this seq.")
    @click.option("--limit", default=50, type=click.IntRange(min=1), show_default=True)
    @json_option
    @click.pass_context
    @handle_errors
    def log(ctx: click.Context, after_seq: int, limit: int, as_json: bool) -> None:
        """Rows of the audit log in chain order: who did what to which release, deployment or key."""
        rows = access.query(ctx.obj["settings"], "audit_log", direct=ctx.obj["direct"], after_seq=after_seq,
                            limit=limit)
        if as_json:
            emit_json(rows)
            return
        table([{"seq": r["seq"], "time": str(r["time"])[:19].replace("T", " ") + "Z", "producer": r["producer"],
                "kind": r["kind"], "actor": r["actor"], "target": r["target"], "action": r["action"],
                "reason": r["reason"], "details": _short(r.get("details") or {})} for r in rows],
              title="audit log (--json for every field)", empty="no audit rows yet")


def _short(details: Mapping[str, str], width: int = 20) -> str:
    """Details for a table cell: hashes and ids cut short (the full values are in --json)."""
    return ", ".join(f"{k}={v if len(v) <= width else v[:width - 1] + '…'}" for k, v in details.items())
