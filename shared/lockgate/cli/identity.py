"""`lockgate identity ...` and `lockgate break-glass`: personal keys, and the signed override an admin sends.

A NATS role or an API key is shared by everyone who holds it; a personal key says who acted. The
private key stays under the home (0600); an admin trusts its public key with a role
(`lockgate gate trust --person NAME --role approver FILE`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from lockgate.cli.params import FiniteFloat
from lockgate.cli.render import console, emit_json
from lockgate.cli.root import handle_errors, json_option
from lockgate.errors import ConfigError
from lockgate.identity import Identity, create_identity, identities_dir, load_identity, sign_override
from lockgate.signing import public_pem, read_trust_file, trust_file_path

PASSPHRASE_ENV = "LOCKGATE_IDENTITY_PASSPHRASE"


def _passphrase() -> bytes | None:
    """An encrypted key's passphrase: LOCKGATE_IDENTITY_PASSPHRASE, else asked at the terminal (None without
    one: the caller says the key is encrypted)."""
    given = os.environ.get(PASSPHRASE_ENV)
    if given:
        return given.encode()
    if sys.stdin.isatty():
        return click.prompt("passphrase of your personal key", hide_input=True, err=True).encode()
    return None


def _new_passphrase() -> bytes:
    given = os.environ.get(PASSPHRASE_ENV)
    if given:
        return given.encode()
    if not sys.stdin.isatty():
        raise ConfigError(f"--passphrase needs a terminal to ask it twice, or {PASSPHRASE_ENV}")
    return click.prompt("passphrase for the new key", hide_input=True, confirmation_prompt=True, err=True).encode()


def chosen_identity(ctx: click.Context) -> Identity:
    """The identity of `--as` / LOCKGATE_IDENTITY, or the only one under the home (NotFound otherwise)."""
    root = ctx.find_root().obj
    return load_identity(root["settings"], root.get("identity"), _passphrase)


def optional_identity(ctx: click.Context) -> Identity | None:
    """Like chosen_identity, but None when none was asked for and the home has none (the work goes unsigned).

    With several and none chosen it refuses (ConfigError), before the caller writes anything: what it signs
    (a release, an artifact) binds once, so going unsigned there could never be undone, and a policy with
    `forbid_self_approval` refuses every approval of a release without a signed author.
    """
    root = ctx.find_root().obj
    if not root.get("identity"):
        folder = identities_dir(root["settings"])
        found = sorted(p.stem for p in folder.glob("*.key")) if folder.is_dir() else []
        if not found:
            return None
        if len(found) > 1:
            raise ConfigError(f"several personal identities ({', '.join(found)}): choose one with --as NAME "
                              "(or LOCKGATE_IDENTITY)")
    return chosen_identity(ctx)


def register(cli: click.Group) -> None:
    """Attach `identity` and `break-glass` to the top-level group."""

    @cli.group()
    def identity() -> None:
        """Personal identities: the keys that sign reviews, break-glass overrides and releases."""

    @identity.command("create")
    @click.argument("name")
    @click.option("--passphrase", is_flag=True,
                  help=f"Encrypt the private key with a passphrase (asked twice, or {PASSPHRASE_ENV}); every "
                       "signature then asks for it: whoever copies the file cannot sign as NAME.")
    @click.pass_context
    @handle_errors
    def create(ctx: click.Context, name: str, passphrase: bool) -> None:
        """Make NAME's Ed25519 key pair under the home; prints the public key for an admin to trust."""
        ident = create_identity(ctx.obj["settings"], name, _new_passphrase if passphrase else None)
        pub = identities_dir(ctx.obj["settings"]) / f"{name}.pub"
        console.print(f"created identity [bold]{name}[/bold] (key id {ident.key_id}); private key "
                      f"{pub.with_suffix('.key')} (0600{', encrypted' if passphrase else ''}). An admin trusts it "
                      "with:", highlight=False)
        click.echo(f"  lockgate gate trust --person {name} --role approver {pub}")
        click.echo(public_pem(ident.signer.public).decode(), nl=False)

    @identity.command("show")
    @json_option
    @click.pass_context
    @handle_errors
    def show(ctx: click.Context, as_json: bool) -> None:
        """The chosen identity: name, key id, and whether (and with which roles) the trust file knows it."""
        ident = chosen_identity(ctx)
        path = trust_file_path(ctx.obj["settings"])
        trust = read_trust_file(path)
        person = trust.people.get(ident.name)
        known = person is not None and person.key_id == ident.key_id
        revoked = known and ident.key_id in trust.revoked
        if as_json:
            emit_json({"name": ident.name, "key_id": ident.key_id, "trust_file": str(path), "trusted": known and not
                       revoked, "revoked": revoked, "roles": list(person.roles) if known and person else [],
                       # the tenants whose releases they review (empty: every tenant's)
                       "tenants": list(person.tenants) if known and person else []})
            return
        if not known or person is None:
            status = f"not trusted in {path}"
        elif revoked:
            status = f"REVOKED in {path}"
        else:
            scope = f", reviewing tenant {', '.join(person.tenants)} only" if person.tenants else ""
            status = f"trusted in {path} as {', '.join(person.roles)}{scope}"
        click.echo(f"{ident.name} key {ident.key_id}: {status}")

    @cli.command("break-glass")
    @click.argument("deployment")
    @click.argument("release")
    @click.option("--action", type=click.Choice(["promote", "canary"]), required=True,
                  help="promote: POST .../DEPLOYMENT/promote; canary: PUT .../DEPLOYMENT with RELEASE as canary.")
    @click.option("--reason", required=True, help="Why admission is overridden (recorded and shown until cleared).")
    @click.option("--weight", type=FiniteFloat(0, 100, min_open=True), default=None,
                  help="With --action canary (required): the percent of traffic RELEASE takes, and the most it may "
                       "get without a gate decision allowing it.")
    @click.pass_context
    @handle_errors
    def break_glass(ctx: click.Context, deployment: str, release: str, action: str, reason: str,
                    weight: float | None) -> None:
        """Sign a break-glass override as an admin person; prints the `break_glass` object for the admin API.

        It is valid for 10 minutes and only for this deployment, release, action and weight.
        """
        if (action == "canary") != (weight is not None):
            raise click.UsageError("--weight PERCENT is required with --action canary (the traffic the override lets "
                                  "RELEASE take) and does not apply to --action promote (all of it)")
        glass = sign_override(chosen_identity(ctx), deployment=deployment, release=release, action=action,
                              reason=reason, at=int(time.time()), weight=weight)
        click.echo(json.dumps({"break_glass": glass}))
