"""`lockgate status`: is the pipeline keeping up, and did anything land in the DLQ?"""

from __future__ import annotations

import click

from lockgate.cli.access import with_bus
from lockgate.cli.main import handle_errors, json_option
from lockgate.cli.render import emit_json, table
from lockgate.queries.status import status as read_status


def register(cli: click.Group) -> None:
    """Attach the command to the top-level group."""

    @cli.command()
    @json_option
    @click.pass_context
    @handle_errors
    def status(ctx: click.Context, as_json: bool) -> None:
        """Streams, consumer backlog (pending / unacked / redelivered) and dead letters by origin."""
        report = with_bus(ctx.obj["settings"], read_status)
        if as_json:
            emit_json(report)
            return
        table(report["streams"], title="streams")
        table(report["consumers"], title="consumers (pending = not yet delivered; unacked = in flight)")
        table(report["dead_letters"], title="dead letters by origin", empty="no dead letters")
