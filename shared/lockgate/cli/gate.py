"""`lockgate gate ...`: explain, approve, reject and verify signed gate decisions."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC
from pathlib import Path
from typing import Any

import click
import msgspec
from nats.aio.msg import Msg
from rich.text import Text

from lockgate import artifacts, documents
from lockgate.bus import Bus
from lockgate.cli.access import with_bus
from lockgate.cli.audit import (
    NotChained,
    may_record,
    may_record_admin_change,
    read_head,
    record_change,
    record_undone,
)
from lockgate.cli.identity import chosen_identity
from lockgate.cli.params import TIMEOUT
from lockgate.cli.render import console, emit_json, err_console, say_with, shown, table
from lockgate.cli.root import fail, handle_errors, json_option
from lockgate.client import get_decision
from lockgate.codec import Codec
from lockgate.config import Settings
from lockgate.contracts import GateAudited, GateDecided, GateReview
from lockgate.contracts.gates import audit_msg_id, review_key
from lockgate.contracts.names import check_name
from lockgate.errors import ConfigError, LockgateError, NotFound, SignatureError
from lockgate.identity import PERSON_ROLES, Identity, scope_refusal, sign_review
from lockgate.provenance.attest import other_content
from lockgate.signing import (
    Keyring,
    TrustFile,
    load_public_key,
    public_pem,
    read_trust_file,
    retire_key,
    revoke_key,
    revoke_person,
    trust_file_path,
    trust_key,
    trust_person,
    undo_grant,
)

_decided: Codec[GateDecided] = Codec(GateDecided)
_audited: Codec[GateAudited] = Codec(GateAudited)


class ReviewRefused(LockgateError):
    """An approval or rejection the gate does not accept: the gatekeeper refused it, or the CLI saw it would."""

    exit_code = 4  # README "Exit codes": refused, as a router's refusal of a rollout action


class ReviewUnanswered(LockgateError):
    """Neither a new decision nor a refusal answered a review in time."""




async def current_decision(bus: Bus, release: str) -> GateDecided:
    """The release's latest decision from KV `lg_gates`, or NotFound (InvalidName for a bad name)."""
    decision = await get_decision(await bus.kv(bus.subjects.kv_gates), release)
    if decision is None:
        raise NotFound(f"release {release!r} has no gate decision")
    return decision


def rule_rows(decision: GateDecided) -> list[dict[str, Any]]:
    """One readable row per rule."""
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    return [{"rule": r.rule + (" (dry-run)" if r.dry_run else ""), "verdict": r.verdict, "metric": r.metric,
             "observed": num(r.observed), "interval": "-" if r.low is None else f"[{num(r.low)}, {num(r.high)}]",
             "baseline": num(r.baseline), "threshold": f"{r.op} {num(r.threshold)}", "hint": r.hint}
            for r in decision.rules]


async def request_review(bus: Bus, release: str, action: str, identity: Identity, reason: str,
                         timeout_s: float, settings: Settings | None = None) -> GateDecided:
    """Publish a GateReview signed by `identity` as `lockgate gate approve|reject` does, and wait for the
    gate's new decision; ReviewRefused, with the gatekeeper's reason, when it refuses the review. With `settings`, a
    review the trust file there scopes `identity` out of is refused before anything is sent (the gatekeeper would
    refuse it: nothing would answer)."""
    current = await current_decision(bus, release)
    why = scope_refusal(settings, identity, current.tenant) if settings is not None else ""
    if why:
        raise ReviewRefused(f"cannot {action} {release}: it is a release of tenant {current.tenant}, and {why} (an "
                            f"admin adds the tenant with `lockgate gate trust --person ... --tenant {current.tenant}`)")
    if action == "approve" and current.decision != "NEEDS_REVIEW":
        raise ReviewRefused(f"cannot approve {release}: its latest decision is {current.decision}, not NEEDS_REVIEW "
                            f"(approvals never override a BLOCK; re-run the eval instead)")
    if action == "approve" and identity.name in current.approvals:
        raise ReviewRefused(f"{identity.name} already approved {release}; its policy needs other approvers too")
    review = sign_review(identity, GateReview(release=release, action=action, actor=identity.name,
                                              reason=reason, decision_id=current.id, tenant=current.tenant))
    # The gatekeeper answers a review with a new decision, or refuses it with an audit row only: both are followed,
    # subscribed before it is sent. Before (probe p28 F3), only decisions were, so a refusal given within a second
    # read as a 30 s timeout blaming the gatekeeper.
    answers: asyncio.Queue[Msg] = asyncio.Queue()
    subs = [await bus.nc.subscribe(subject, cb=answers.put)
            for subject in (bus.subjects.gate_decided(release), bus.subjects.gate_audit)]
    try:
        await bus.publish(bus.subjects.gate_review(release), review)
        async with asyncio.timeout(timeout_s):
            while True:
                msg = await answers.get()
                if msg.subject != bus.subjects.gate_audit:
                    new = _decided.decode(msg.data)
                    if new.reviewed_by == identity.name and new.id != current.id:
                        return new
                    continue
                # Its audit row is published under an id derived from the review's (the refused decision's own
                # id is salted): every other row, another review's or an eval's, is someone else's.
                if (msg.headers or {}).get("Nats-Msg-Id") != audit_msg_id(review_key(review.id)):
                    continue
                row = _audited.decode(msg.data)
                if row.action == "refused":
                    raise ReviewRefused(f"refused by the gatekeeper: {row.reason}")
    except TimeoutError:
        if bus.refused(bus.subjects.gate_audit, "subscribe to") is not None:
            # NATS users written before the approver role could read audit rows: a refusal is recorded, not seen here.
            raise ReviewUnanswered(f"no new decision for {release} within {timeout_s:.0f}s, and NATS does not let "
                                   f"{bus.auth.user or 'this connection'!r} see the gatekeeper's refusals "
                                   f"({bus.subjects.gate_audit}): see `lockgate decisions --release {release}` for one"
                                   ) from None
        raise ReviewUnanswered(f"no answer to the {action} of {release} within {timeout_s:.0f}s (neither a new "
                               "decision nor a refusal): is the gatekeeper running? (`lockgate status`)") from None
    finally:
        for sub in subs:
            await sub.unsubscribe()


def _keyring(settings: Settings, keys: tuple[str, ...]) -> Keyring:
    """The configured trust roots plus `--key` files; never keys published on the bus. Before, `--key` replaced the
    trust file, and a revoked or retired key's forgery verified."""
    return Keyring.from_settings(settings, pinned=keys)


def _verify(settings: Settings, release: str | None, path: str | None,
            keys: tuple[str, ...]) -> tuple[GateDecided, Keyring, str]:
    """The decision (from a file or the stack), the keyring it verified against (Keyring.verify_record) and why it
    admits nothing now ("" when it admits): a key retired since it signed still verifies what it decided before (it
    admits nothing, which the caller says). A PASS whose approvals no longer all count fails: it was decided, but
    nothing may act on it. Only against the stack is the release's binding there to compare (`not_admitting_now`)."""
    ring = _keyring(settings, keys)

    def check(dec: GateDecided) -> None:
        ring.verify_record(dec)

    d: GateDecided | None = None
    if path:
        try:
            d = documents.decode_json(Path(path).read_bytes(), GateDecided, where=path, error=SignatureError)
        except msgspec.DecodeError as exc:
            raise SignatureError(f"{path} is not a gate decision: {exc}") from None
        check(d)
        return d, ring, ring.not_admitting(d)

    async def work(bus: Bus) -> tuple[GateDecided, Keyring, str]:
        dec = await current_decision(bus, release or "")
        check(dec)
        return dec, ring, await not_admitting_now(bus, ring, dec)

    return with_bus(settings, work)


async def not_admitting_now(bus: Bus, ring: Keyring, decision: GateDecided) -> str:
    """Why a verified `decision` admits nothing now ("" when it admits): `Keyring.not_admitting`, or for one that
    would admit, how the content it judged differs from what its release name is bound to now (`other_content`).

    A PASS speaks for the content it judged, not for whatever its name came to hold: a binding written with its own
    `Nats-TTL` expires and the name binds again (probe p32 F1), and the router then refuses the PASS while `gate
    verify` said it admits. A name bound to nothing now (that binding expired and nothing bound it again, or a value
    that binds nothing) admits nothing either: the router serves no release without a binding (before, this said
    the PASS admits)."""
    why = ring.not_admitting(decision)
    if why:
        return why
    try:
        bound = (await artifacts.release_of(bus, decision.release)).get("artifacts")
    except NotFound as exc:  # TakenUnbound too: a value that binds nothing
        return f"its release name is bound to nothing now: {exc.message}"
    return other_content(decision, bound)


async def not_admitted(bus: Bus, ring: Keyring, release: str) -> str:
    """Why the gate admits `release` nothing now, as `gate verify` judges it ("" when its current decision is a PASS
    that admits it): no decision, one that does not verify, or one that admits nothing (`not_admitting_now`)."""
    decision = await get_decision(await bus.kv(bus.subjects.kv_gates), release)
    if decision is None:
        return f"{release} has no gate decision"
    try:
        ring.verify_record(decision)
    except SignatureError as exc:  # an approval withdrawn too
        return f"{release}'s gate decision {decision.id} is refused: {exc.message}"
    why = await not_admitting_now(bus, ring, decision)
    return f"{release}'s gate decision {decision.id} is a {decision.decision}: {why}" if why else ""


# README "Exit codes": an authentic decision that admits nothing exits as `eval run` of a gate that did not pass.
NOT_ADMITTED = 5

authentic_only_option = click.option(
    "--authentic-only", is_flag=True,
    help="Check only that it is genuine: exit 0 also when it admits nothing now (a BLOCK, a NEEDS_REVIEW, a PASS a "
         "retired key signed, a release statement), not only for a PASS that admits its release.")


def decided_at(decision: GateDecided) -> str:
    """When the decision was made, as a verdict line says it (UTC, to the second)."""
    t = decision.time if decision.time.tzinfo else decision.time.replace(tzinfo=UTC)
    return f"{t.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"


def verdict(prefix: str, said: str, why: str, *, authentic_only: bool, as_json: bool, doc: Mapping[str, Any]) -> None:
    """End a verify command that found its decision authentic: `doc` on stdout with --json, else `prefix: said`;
    exit NOT_ADMITTED with one line saying `why` when it admits nothing now, unless `authentic_only`.

    A pipeline reads `lockgate verify att.json && deploy` as "may this ship": before (probe p20 F4, F12), an
    authentic BLOCK, NEEDS_REVIEW or retired key's PASS exited 0 like a PASS that admits."""
    if as_json:
        emit_json(doc)
    if why and not authentic_only:
        fail(f"{said}: authentic, but {why} (--authentic-only checks only that it is genuine)", NOT_ADMITTED)
    if not as_json:
        # click.echo, not rich: scripts read exactly one line, which rich would wrap.
        click.echo(f"{prefix}: {said}" + (f" (authentic, but {why})" if why else ""))


def _recorded_or_undone(settings: Settings, path: Path, before: TrustFile | None, *, kid: str, person: str = "",
                        details: Mapping[str, object]) -> None:
    """Record a grant of trust just written to the trust file (`before` it: None if there was no file), or take it
    back when the audit log does not take it (unreachable, refused by the server): the command then fails in one
    line saying why and that the grant was undone. Before, the key stayed trusted and no audit row said so."""
    who = f"{person} (key {kid})" if person else f"key {kid}"
    try:
        record_change(settings, target=f"person:{person}" if person else f"signing-key:{kid}", action="trust",
                      details=details)
    except BaseException as exc:
        try:
            undo_grant(path, before, kid=kid, person=person)
        except (LockgateError, OSError) as undo:
            kept = (f"the trust of {who} is not in the audit log and could not be undone ({undo}): take it out of "
                    f"{path} by hand")
        else:
            if person:
                had = before is not None and person in before.people
                state = f"{person} is {'as before' if had else 'not'} in {path}"
            else:
                had = before is not None and kid in before.keys
                state = f"key {kid} is {'trusted as before' if had else 'not trusted'} in {path}"
            kept = f"the trust of {who} was not recorded in the audit log, so it was undone: {state}"
            if isinstance(exc, (NotChained, KeyboardInterrupt)):  # its entry queued, or perhaps sent, unchained
                kept += record_undone(settings, target=f"person:{person}" if person else f"signing-key:{kid}",
                                      action="trust", details=details)
        say_with(exc, kept)
        raise


def _recorded_in_force(settings: Settings, what: str, again: str, *, target: str, action: str,
                       details: Mapping[str, object]) -> None:
    """Record a revocation or retirement already written to the trust file. It is a safety action, so it stays in
    force when the audit log does not take it (or the role may not record it): the command fails in one line saying
    so and how to record it (run again, it records: a revocation changes nothing more, a retirement at most takes
    in the audit rows chained since)."""
    try:
        may_record(settings, "change the trust file (record the change in the audit log)")
        record_change(settings, target=target, action=action, details=details)
    except NotChained as exc:  # its queued entry is chained later: running it again would record it twice
        exc.message = f"{exc.message}; {what} is in force but not in the audit log"
        raise
    except LockgateError as exc:
        exc.message = (f"{exc.message}; {what} is in force but not in the audit log: record it with `{again}` "
                       "once the audit log takes entries")
        raise


def register(cli: click.Group) -> None:
    """Attach `gate` to the top-level group."""

    @cli.group()
    def gate() -> None:
        """Explain, review and verify gate decisions."""

    @gate.command("explain")
    @click.argument("release")
    @json_option
    @click.pass_context
    @handle_errors
    def explain(ctx: click.Context, release: str, as_json: bool) -> None:
        """The latest decision for RELEASE, rule by rule, with hints."""
        d = with_bus(ctx.obj["settings"], lambda bus: current_decision(bus, release))
        if as_json:
            emit_json(d)
            return
        console.print(f"[bold]{d.release}: {d.decision}[/bold]  decision {d.id} at {decided_at(d)}",
                      highlight=False)
        try:  # as the router and the SDK read it: a PASS its consumers refuse must not read as one that admits
            _keyring(ctx.obj["settings"], ()).verify(d)
        except SignatureError as exc:
            console.print(Text.assemble(("admits nothing:", "bold red"), " ", shown(exc.message),
                                        f" (lockgate gate verify {d.release})"), highlight=False)
        console.print(Text.assemble("reason: ", shown(d.reason)), highlight=False)
        for label, value in (("review required", d.review_required), ("reviewed by", d.reviewed_by),
                             ("eval run", d.eval_run), ("policy", d.policy), ("baseline", d.baseline),
                             ("signed by key", d.key_id or "UNSIGNED")):
            if value:
                console.print(Text.assemble(f"{label}: ", shown(str(value))), highlight=False)
        table(rule_rows(d), title="rules", empty="no rules were evaluated")
        for r in d.rules:
            if r.explanation:
                console.print(Text.assemble("- ", shown(r.explanation)), highlight=False)

    def review_command(action: str) -> None:
        @gate.command(action, help=f"{action.capitalize()} RELEASE as your personal identity (--as NAME): approve "
                                   "needs a pending NEEDS_REVIEW decision; reject always blocks (an override when "
                                   "nothing is pending).")
        @click.argument("release")
        @click.option("--reason", required=True, help="Why (kept in the audit log).")
        @click.option("--actor", hidden=True, help="Removed: the reviewer is the signing identity (--as NAME).")
        @click.option("--timeout", "timeout_s", type=TIMEOUT, default=30.0, show_default=True,
                      help="Seconds to wait.")
        @json_option
        @click.pass_context
        @handle_errors
        def review(ctx: click.Context, release: str, reason: str, actor: str | None, timeout_s: float,
                   as_json: bool) -> None:
            if actor is not None:
                raise LockgateError("--actor is gone: a free-text name proves nothing. Reviews are signed by a "
                                    "personal identity: `lockgate identity create NAME` once, an admin trusts it "
                                    "(`lockgate gate trust --person NAME --role approver ...`), then "
                                    f"`lockgate --as NAME gate {action} ...`")
            identity = chosen_identity(ctx)
            new = with_bus(ctx.obj["settings"],
                           lambda bus: request_review(bus, release, action, identity, reason, timeout_s,
                                                      ctx.obj["settings"]),
                           role="approver")
            if as_json:
                emit_json(new)
            else:
                console.print(f"{release}: {new.decision} ({new.reason})", highlight=False)

    review_command("approve")
    review_command("reject")

    @gate.command("verify")
    @click.argument("release", required=False)
    @click.option("--file", "path", type=click.Path(exists=True, dir_okay=False), help="A decision saved as JSON.")
    @click.option("--key", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
                  help="Also trust this public key PEM (repeatable), besides the trust file and settings.trusted_keys, "
                       "whose revocations and retirements still apply.")
    @authentic_only_option
    @json_option
    @click.pass_context
    @handle_errors
    def verify(ctx: click.Context, release: str | None, path: str | None, keys: tuple[str, ...],
               authentic_only: bool, as_json: bool) -> None:
        """Check that a decision admits its release now: offline (--file, against the trust file; --key adds a key)
        or against the running stack. Exit 0 for an authentic PASS that admits; 5 for an authentic decision that
        admits nothing (a BLOCK, a NEEDS_REVIEW, a PASS signed by a key retired since, and against the stack a PASS
        that judged other content than RELEASE is bound to now, or whose RELEASE is bound to nothing now: 0 with
        --authentic-only); 4 if it is not authentic, or is a PASS whose approvals no longer all count (a revoked
        approver)."""
        settings: Settings = ctx.obj["settings"]
        if bool(release) == bool(path):
            raise click.UsageError("give exactly one of RELEASE or --file", ctx)
        d, ring, why = _verify(settings, release, path, keys)
        retired = ring.retired.get(d.key_id)
        doc: dict[str, Any] = {"id": d.id, "release": d.release, "decision": d.decision, "key_id": d.key_id,
                               "time": d.time, "admits": not why}
        if retired is not None:
            doc["retired_at"] = retired.at
        if why:
            doc["not_admitted"] = why
        trust = trust_file_path(settings)
        if not trust.is_file() and (authentic_only or not why):
            # Without the trust file nothing here knows a revocation, a retirement or whose approvals count: a leaked
            # key's decision verifies (probe p20 F13). Said, not refused: pinned keys alone are a supported setup.
            err_console.print(f"[yellow]warning:[/yellow] no trust file at {trust}: revocations, retirements and "
                              "approvers are unknown here, so a revoked key's decision verifies; give this machine "
                              "the trust file (LOCKGATE_TRUST_FILE)", highlight=False, soft_wrap=True)
        verdict("ok", f"decision {d.id} ({d.release}: {d.decision}, decided {decided_at(d)}) is signed by key "
                      f"{d.key_id}", why, authentic_only=authentic_only, as_json=as_json, doc=doc)

    @gate.command("trust")
    @click.argument("key", type=click.Path(exists=True, dir_okay=False))
    @click.option("--person", help="Trust KEY as this person's (reviews, break-glass, authorship), not as a "
                                   "decision-signing key.")
    @click.option("--role", "roles", multiple=True, type=click.Choice(PERSON_ROLES),
                  help="The person's role (repeatable): approver reviews, admin also overrides, operator authors.")
    @click.option("--tenant", "tenants", multiple=True,
                  help="An approver reviews only this tenant's releases (repeatable; none: every tenant's). An admin "
                       "is never scoped.")
    @click.pass_context
    @handle_errors
    def trust_cmd(ctx: click.Context, key: str, person: str | None, roles: tuple[str, ...],
                  tenants: tuple[str, ...]) -> None:
        """Trust KEY (a PEM public or private Ed25519 key) in the trust file; prints its key id. The change is
        recorded in the audit log, or undone: a role that may not record it is refused before the file is
        touched, and a trust the running stack's audit log does not take is taken back. A person's roles and
        tenants are set to those given."""
        settings: Settings = ctx.obj["settings"]
        path = trust_file_path(settings)
        if person:
            check_name(person, "person")
            for tenant in tenants:
                check_name(tenant, "tenant")
            if not roles:
                raise click.UsageError("--person needs at least one --role (approver, admin or operator)", ctx)
        elif roles or tenants:
            raise click.UsageError(f"{'--role' if roles else '--tenant'} applies to a person: add --person NAME", ctx)
        public = load_public_key(key)
        # Whom the trust file names decides whose reviews count and whose decisions move traffic: an operator who
        # trusted a person as approver had that person's approval turn a NEEDS_REVIEW into a PASS (probe p3).
        may_record_admin_change(settings, "trust a key or a person (whose decisions and reviews then count)",
                                "change the trust file (record the change in the audit log)")
        before = read_trust_file(path) if path.is_file() else None
        if person:
            kid = trust_person(path, person, public, roles, tenants)
            scope = {"tenants": ",".join(sorted(set(tenants)))} if tenants else {}
            _recorded_or_undone(settings, path, before, kid=kid, person=person,
                                details={"key_id": kid, "roles": ",".join(sorted(set(roles))), **scope,
                                         "trust_file": path})
            reviews = f"; reviews tenant {', '.join(sorted(set(tenants)))} only" if tenants else ""
            click.echo(f"trusted {person} ({', '.join(sorted(set(roles)))}{reviews}) with key {kid} in {path}")
            return
        kid = trust_key(path, public)
        _recorded_or_undone(settings, path, before, kid=kid, details={"trust_file": path})
        click.echo(f"trusted key {kid} in {path}")

    @gate.command("revoke")
    @click.argument("key_id", required=False)
    @click.option("--person", help="Revoke this person's key instead of a KEY_ID.")
    @click.pass_context
    @handle_errors
    def revoke_cmd(ctx: click.Context, key_id: str | None, person: str | None) -> None:
        """Revoke KEY_ID (or --person NAME's key) in the trust file because it leaked: everything it signed is
        refused from then on, its decisions and audit rows included. A key rotated out is `gate retire`d."""
        path = trust_file_path(ctx.obj["settings"])
        if bool(key_id) == bool(person):
            raise click.UsageError("give exactly one of KEY_ID or --person NAME", ctx)
        if person:
            key_id = revoke_person(path, person)
            click.echo(f"revoked {person}'s key {key_id} in {path}")
            _recorded_in_force(ctx.obj["settings"], f"the revocation of {person}'s key {key_id} in {path}",
                               f"lockgate gate revoke --person {person}", target=f"person:{person}",
                               action="revoke", details={"key_id": key_id, "trust_file": path})
            return
        key_id = key_id or ""
        ring = Keyring.from_settings(ctx.obj["settings"])
        if key_id not in {*ring.keys, *ring.retired, *ring.revoked}:
            # A mistyped id revoked nothing while the leaked key stayed trusted (before, "revoked key nope", exit 0).
            holder = next((name for name, p in read_trust_file(path).people.items() if p.key_id == key_id), None)
            if holder is not None:
                raise ConfigError(f"key {key_id} is {holder}'s personal key: `lockgate gate revoke --person {holder}`")
            raise ConfigError(f"key {key_id!r} is no decision key of the trust roots (trusted: "
                              f"{', '.join(sorted(ring.keys)) or 'none'}); nothing revoked (`lockgate gate keys`)")
        revoke_key(path, key_id)
        click.echo(f"revoked key {key_id} in {path}")
        _recorded_in_force(ctx.obj["settings"], f"the revocation of key {key_id} in {path}",
                           f"lockgate gate revoke {key_id}", target=f"signing-key:{key_id}", action="revoke",
                           details={"trust_file": path})

    @gate.command("retire")
    @click.argument("key_id")
    @click.pass_context
    @handle_errors
    def retire_cmd(ctx: click.Context, key_id: str) -> None:
        """Retire decision key KEY_ID after a rotation (run it once no gatekeeper holds the key): what it signed
        until now still verifies as history (`gate verify`, `audit verify`: the audit rows up to the chain's head
        now), but it admits nothing and signs nothing new. Reads that head from the running stack."""
        settings: Settings = ctx.obj["settings"]
        path = trust_file_path(settings)

        async def retire(bus: Bus) -> Any:
            async def head_seq() -> int:
                head = await read_head(bus)
                return head.seq if head is not None else 0

            await asyncio.to_thread(retire_key, path, key_id, until_seq=await head_seq())
            # A gatekeeper still holding the key chains nothing once the trust file says so, but a row it chained
            # between our read and the change is past that seq: read the head again, so such rows verify too.
            return await asyncio.to_thread(retire_key, path, key_id, until_seq=await head_seq())

        retirement = with_bus(settings, retire)
        at = f"{retirement.at:%Y-%m-%d %H:%M:%S}Z"
        click.echo(f"retired key {key_id} in {path}: what it signed until {at} (audit rows up to seq "
                   f"{retirement.until_seq}) still verifies; it admits nothing new, so re-gate a release whose "
                   "current decision it signed")
        _recorded_in_force(settings, f"the retirement of key {key_id} in {path}", f"lockgate gate retire {key_id}",
                           target=f"signing-key:{key_id}", action="retire",
                           details={"trust_file": path, "until_seq": str(retirement.until_seq), "at": at})

    @gate.command("keys")
    @json_option
    @click.pass_context
    @handle_errors
    def keys_cmd(ctx: click.Context, as_json: bool) -> None:
        """Print the trusted decision keys (PEM) of the trust file and settings, for offline `verify --key`."""
        settings: Settings = ctx.obj["settings"]
        ring = Keyring.from_settings(settings)
        if not ring.keys:
            raise NotFound(f"no trusted signing keys in {trust_file_path(settings)} or LOCKGATE_TRUSTED_KEYS; "
                           f"`lockgate up` writes the gatekeeper's key there")
        if as_json:
            emit_json([{"key_id": kid, "pem": public_pem(pub).decode(),
                        **({"retired_at": ring.retired[kid].at} if kid in ring.retired else {})}
                       for kid, pub in sorted(ring.keys.items())])
            return
        for kid, pub in sorted(ring.keys.items()):
            click.echo(f"# key id {kid}")
            click.echo(public_pem(pub).decode(), nl=False)
