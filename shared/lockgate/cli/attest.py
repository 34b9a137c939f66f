"""`lockgate attest decision|release RELEASE` and `lockgate attest verify FILE` (also `lockgate verify FILE`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from lockgate import documents
from lockgate.cli.access import with_bus
from lockgate.cli.gate import authentic_only_option, decided_at, verdict
from lockgate.cli.render import err_console
from lockgate.cli.root import handle_errors, json_option
from lockgate.errors import ConfigError

# Who may sign an attestation: those who may make what it describes (register releases, request evals). The
# envelope's signer alone vouches for a release statement's bundle and a decision statement's eval summary.
ATTESTERS = ("operator", "admin")


def _signer(settings: Any) -> Callable[[str, str, bytes], str]:
    """The envelope check: a trusted person's current key, with a role in ATTESTERS."""
    from lockgate.identity import verify_person

    def check(kid: str, sig: str, data: bytes) -> str:
        return verify_person(settings, kid, sig, data, roles=ATTESTERS, what="the attestation", allow_revoked=False)

    return check


def _write(doc: dict[str, Any], out: str | None) -> None:
    import json

    text = json.dumps(doc, indent=2, sort_keys=True)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
        err_console.print(f"wrote {out}", highlight=False)
    else:
        click.echo(text)


def register(cli: click.Group) -> None:
    """Attach `attest decision|release|verify`."""

    @cli.group()
    def attest() -> None:
        """in-toto attestations (DSSE envelopes) of gate decisions and releases, verified offline."""

    out_option = click.option("--out", type=click.Path(dir_okay=False), help="Write to a file, not stdout.")

    @attest.command("decision")
    @click.argument("release")
    @out_option
    @click.pass_context
    @handle_errors
    def attest_decision(ctx: click.Context, release: str, out: str | None) -> None:
        """The release's current gate decision as a signed in-toto Statement (subject: the release bundle)."""
        from lockgate import artifacts
        from lockgate.cli.gate import current_decision
        from lockgate.cli.identity import chosen_identity
        from lockgate.provenance import attest as at
        from lockgate.queryclient import ask
        from lockgate.signing import Keyring

        settings = ctx.obj["settings"]
        identity = chosen_identity(ctx)

        ring = Keyring.from_settings(settings)

        async def work(bus: Any) -> dict[str, Any]:
            decision = await current_decision(bus, release)
            ring.verify(decision)  # never attest a decision the trust roots refuse
            found = await ask(bus, "lineage_export", {"release": release, "limit": 1000})
            run = next((e for e in found["evals"] if e["run_id"] == decision.eval_run), None)
            return at.envelope(at.decision_statement(decision, await artifacts.release_of(bus, release), run),
                               identity)

        env = with_bus(settings, work)
        at.verify(env, _signer(settings), ring.verify)  # never write one `attest verify` refuses (say why now)
        _write(env, out)

    @attest.command("release")
    @click.argument("release")
    @out_option
    @click.pass_context
    @handle_errors
    def attest_release(ctx: click.Context, release: str, out: str | None) -> None:
        """What the release is made of, as a signed in-toto Statement."""
        from lockgate import artifacts
        from lockgate.cli.identity import chosen_identity
        from lockgate.provenance import attest as at
        from lockgate.signing import Keyring

        settings = ctx.obj["settings"]
        identity = chosen_identity(ctx)

        async def work(bus: Any) -> dict[str, Any]:
            return at.envelope(at.release_statement(await artifacts.release_of(bus, release)), identity)

        env = with_bus(settings, work)
        at.verify(env, _signer(settings), Keyring.from_settings(settings).verify)
        _write(env, out)

    @attest.command("verify")
    @click.argument("path", type=click.Path(dir_okay=False))
    @click.option("--key", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
                  help="Also trust this PEM public key for the decision's signature (repeatable).")
    @authentic_only_option
    @json_option
    @click.pass_context
    @handle_errors
    def attest_verify(ctx: click.Context, path: str, keys: tuple[str, ...], authentic_only: bool,
                      as_json: bool) -> None:
        """Check an attestation offline against the trust file: who signed the envelope (an operator or admin),
        that the subject is the release it describes, and (for a decision) the gatekeeper's signature over
        exactly the artifacts the release holds, and that the PASS's approvals still count. Exit 4 if anything
        fails; 5 if it is authentic but admits nothing now (a BLOCK, a NEEDS_REVIEW, a PASS signed by a key retired
        since, a release statement: 0 with --authentic-only); 0 for a PASS that admits its release."""

        from lockgate.contracts import GateDecided
        from lockgate.provenance import attest as at
        from lockgate.signing import Keyring

        settings = ctx.obj["settings"]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        env = documents.parse(data, "json", where=f"{path} (a DSSE envelope)", error=at.AttestationRefused)
        if not isinstance(env, dict):
            raise at.AttestationRefused(f"{path} is not a DSSE envelope")
        ring = Keyring.from_settings(settings, pinned=keys)

        # An attestation is a record of what was decided: one signed before its gatekeeper key was rotated out
        # (retired, not revoked) is authentic, as `gate verify` and `audit verify` read history; whether it admits
        # is said apart. A PASS whose approvals no longer all count is refused, as `gate verify` refuses it.
        checked: list[GateDecided] = []

        def check(decision: GateDecided) -> str:
            kid = ring.verify_record(decision)
            checked.append(decision)
            return kid

        result = at.verify(env, _signer(settings), check)
        doc = {k: v for k, v in result.items() if k != "statement"} | {
            "predicateType": result["statement"]["predicateType"], "subject": result["statement"]["subject"]}
        signers = f"{result['release']}, attested by {', '.join(result['signed_by'])}"
        if checked:
            decision = checked[-1]
            why = ring.not_admitting(decision)
            said = (f"decision {decision.decision} for {signers}; decision signed by key {result['decision_key']}, "
                    f"decided {decided_at(decision)}")
            doc["time"] = decision.time
            if decision.key_id in ring.retired:
                doc["retired_at"] = ring.retired[decision.key_id].at
        else:
            why = "a release statement carries no gate decision, so it admits nothing"
            said = f"release {signers}"
        doc["admits"] = not why
        if why:
            doc["not_admitted"] = why
        verdict("verified", said, why, authentic_only=authentic_only, as_json=as_json, doc=doc)

    # The spelling: `lockgate verify FILE` is `lockgate attest verify FILE`.
    cli.add_command(attest_verify, name="verify")
