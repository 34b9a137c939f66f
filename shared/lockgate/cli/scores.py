"""`lockgate scores DEPLOYMENT`: the online evaluation scores of a deployment's live answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import click

from lockgate.cli import access
from lockgate.cli.params import FiniteFloat
from lockgate.cli.render import output
from lockgate.cli.root import handle_errors, json_option
from lockgate.contracts.names import ID_RULE, check_name


def register(cli: click.Group) -> None:
    """Attach `scores` to the top-level group."""

    @cli.command("scores")
    @click.argument("deployment")
    @click.option("--since", "since_min", type=FiniteFloat(min=0, min_open=True, max=10 * 366 * 24 * 60), default=60.0,
                  show_default=True, help="Minutes back.")
    @click.option("--scorer", help="Only this scorer (e.g. pii_free, llm_judge).")
    @click.option("--event", "event_id", help="One answer's scores (its inference event id).")
    @click.option("--tenant", help="This tenant's answers (default: the tenant whose releases the deployment serves).")
    @click.option("--all", "everyone", is_flag=True,
                  help="Also answers no router served (applications' own events), of every tenant unless --tenant.")
    @json_option
    @click.pass_context
    @handle_errors
    def scores_cmd(ctx: click.Context, deployment: str, since_min: float, scorer: str | None, event_id: str | None,
                   tenant: str | None, everyone: bool, as_json: bool) -> None:
        """Scores per tenant, release, variant and scorer (answers scored, scorer errors, mean), or one answer's: by
        default of the answers a router served for the deployment's own tenant."""
        # A name or an event id no event can carry is a mistake, refused as `rollout get` refuses a bad name:
        # before, an empty listing and exit 0 (probe p70 F10).
        check_name(deployment, "deployment")
        if tenant is not None:
            check_name(tenant, "tenant")
        if event_id is not None and not (0 < len(event_id) <= 128 and event_id.isprintable() and " " not in event_id):
            raise click.BadParameter(f"{event_id!r} is not an event id: {ID_RULE}", param_hint="'--event'")
        since = None if event_id else datetime.now(UTC) - timedelta(minutes=since_min)
        args: dict[str, Any] = {"deployment": deployment, "since": since, "scorer": scorer, "event_id": event_id,
                                "tenant": tenant, "everyone": everyone}
        rows = access.query(ctx.obj["settings"], "online_scores", direct=ctx.obj["direct"], **args)
        # An application of any tenant may send events naming this deployment: say whose answers are counted.
        who = f"tenant {tenant}'s" if tenant else "every tenant's" if everyone else "its tenant's"
        whose = f"{who} answers" + (", served or not" if everyone else " a router served")
        title = f"scores of answer {event_id} ({whose})" if event_id else \
            f"online scores of {deployment}, {whose}, last {since_min:g} min (errors: no score, e.g. the judge was down)"
        output(rows, as_json, title=title, empty="no scores: is online evaluation sampling this deployment? (--all "
                                                 "shows applications' own events too)")
