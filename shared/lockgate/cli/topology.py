"""`lockgate topology apply`: bring lockgate's streams and buckets to the configuration this version declares, as
admin. Services create what is missing but may not change what exists (permissions.py `_manage_topology`): an
upgrade's new limits, or a repair after someone changed a stream, is this command's."""

from __future__ import annotations

import click

from lockgate.bus import Bus
from lockgate.cli.access import with_bus
from lockgate.cli.render import console, emit_json
from lockgate.cli.root import handle_errors, json_option


def register(cli: click.Group) -> None:
    """Attach the commands to the top-level group."""

    @cli.group()
    def topology() -> None:
        """lockgate's JetStream streams and buckets."""

    @topology.command("apply")
    @json_option
    @click.pass_context
    @handle_errors
    def apply(ctx: click.Context, as_json: bool) -> None:
        """Create the streams and buckets that are missing and change those that differ to lockgate's
        configuration (role admin: no service may change one). The sink names those that differ at start (its
        log, `/readyz` topology_differs)."""
        settings = ctx.obj["settings"]

        async def work(bus: Bus) -> list[str]:
            bus.replicas = settings.replicas  # as the services declare them (LOCKGATE_REPLICAS)
            return await bus.ensure_topology(update=True)

        changed = with_bus(settings, work, role="admin")
        if as_json:
            emit_json({"changed": changed})
            return
        for stream in changed:
            console.print(f"changed {stream} to lockgate's configuration", highlight=False, soft_wrap=True)
        console.print(f"{len(changed)} changed; every stream and bucket is as lockgate declares it", highlight=False)
