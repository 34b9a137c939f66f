"""`lockgate scores DEPLOYMENT`: the online evaluation scores of a deployment's live answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import click

from lockgate.cli import access
from lockgate.cli.render import output
from lockgate.cli.root import handle_errors, json_option


def register(cli: click.Group) -> None:
    """Attach `scores` to the top-level group."""

    @cli.command("scores")
    @click.argument("deployment")
    @click.option("--since", "since_min", type=click.FloatRange(min=0, min_open=True), default=60.0,
                  show_default=True, help="Minutes back.")
    @click.option("--scorer", help="Only this scorer (e.g. pii_free, llm_judge).")
    @click.option("--event", "event_id", help="One answer's scores (its inference event id).")
    @json_option
    @click.pass_context
    @handle_errors
    def scores_cmd(ctx: click.Context, deployment: str, since_min: float, scorer: str | None, event_id: str | None,
                   as_json: bool) -> None:
        """Scores per release, variant and scorer (answers scored, scorer errors, mean), or one answer's."""
        since = None if event_id else datetime.now(UTC) - timedelta(minutes=since_min)
        args: dict[str, Any] = {"deployment": deployment, "since": since, "scorer": scorer, "event_id": event_id}
        rows = access.query(ctx.obj["settings"], "online_scores", direct=ctx.obj["direct"], **args)
        title = f"scores of answer {event_id}" if event_id else \
            f"online scores of {deployment}, last {since_min:g} min (errors: no score, e.g. the judge was down)"
        output(rows, as_json, title=title, empty="no scores: is online evaluation sampling this deployment?")
