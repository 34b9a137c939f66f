"""`lockgate attest decision|release RELEASE` and `lockgate attest verify FILE` (also `lockgate verify FILE`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from lockgate import documents
from lockgate.cli.access import with_bus
from lockgate.cli.main import handle_errors, json_option
from lockgate.cli.render import console, emit_json, err_console
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
    @json_option
    @click.pass_context
    @handle_errors
    def attest_verify(ctx: click.Context, path: str, keys: tuple[str, ...], as_json: bool) -> None:
        """Check an attestation offline against the trust file: who signed the envelope (an operator or admin),
        that the subject is the release it describes, and (for a decision) the gatekeeper's signature over
        exactly the artifacts the release holds. Exit 4 if anything fails."""

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
        # (retired, not revoked) still verifies, as `gate verify` and `audit verify` read history.
        result = at.verify(env, _signer(settings), lambda decision: ring.verify(decision, history=True))
        if as_json:
            emit_json({k: v for k, v in result.items() if k != "statement"}
                      | {"predicateType": result["statement"]["predicateType"],
                         "subject": result["statement"]["subject"]})
            return
        what = f"decision {result['decision']} for" if "decision" in result else "release"
        extra = f"; decision signed by key {result['decision_key']}" if "decision_key" in result else ""
        console.print(f"verified: {what} {result['release']}, attested by {', '.join(result['signed_by'])}{extra}",
                      highlight=False)

    # The spelling: `lockgate verify FILE` is `lockgate attest verify FILE`.
    cli.add_command(attest_verify, name="verify")
