"""`lockgate topology apply`: bring lockgate's streams and buckets to the configuration this version declares, as
admin. Services create what is missing but may not change what exists (permissions.py `_manage_topology`): an
upgrade's new limits, or a repair after someone changed a stream, is this command's. The streams that record who did
what (`Subjects.kept_streams`) are no identity's to change, admin included: it names one that differs and leaves it."""

from __future__ import annotations

import click

from lockgate.bus import Bus
from lockgate.cli.access import with_bus
from lockgate.cli.render import console, emit_json
from lockgate.cli.root import fail, handle_errors, json_option


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
        """Create the streams and buckets that are missing, with the consumers each interest stream keeps events
        for (its readers: no service may declare another's), and change those that differ to lockgate's
        configuration (role admin: no service may change one). The sink names those that differ at start (its
        log, `/readyz` topology_differs) and the readers missing (its log). A stream that records who did what (the provenance stream, the releases
        and audit buckets) is never changed: one that differs is named and left (exit 5, the rest applied)."""
        settings = ctx.obj["settings"]

        async def work(bus: Bus) -> tuple[list[str], list[str]]:
            bus.replicas = settings.replicas  # as the services declare them (LOCKGATE_REPLICAS)
            changed = await bus.ensure_topology(update=True)
            return changed, bus.topology_differs  # with update, only the kept streams that differ are left

        changed, left = with_bus(settings, work, role="admin")
        if as_json:
            emit_json({"changed": changed, "left": left})
        else:
            for stream in changed:
                console.print(f"changed {stream} to lockgate's configuration", highlight=False, soft_wrap=True)
            for stream in left:
                console.print(f"left {stream}", highlight=False, soft_wrap=True)
            every = "" if left else "; every stream and bucket is as lockgate declares it"
            console.print(f"{len(changed)} changed{every}", highlight=False)
        if left:
            # Not allowed, as README's exit codes say: no lockgate identity may change these, admin included.
            fail(f"{len(left)} kept stream(s) differ from lockgate's configuration and were left as they are (the "
                 "rest is applied); see docs/scale.md, \"Changing a kept stream\"", 5)
