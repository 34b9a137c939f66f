"""Online evaluation scores of live answers (`inference_scores`): per release, variant and scorer, or one answer's,
as the deployment's tenant reads them.

The sink stores each (answer, scorer) once, so the counts need no FINAL and no dedupe here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lockgate.services.query.traces import release_tenant
from lockgate.store import Store


def deployment_tenant(store: Store, deployment: str) -> str | None:
    """The tenant whose releases `deployment` serves (a route serves one tenant's releases): the one the release
    its latest route change named is registered under; None if no route change names a registered release."""
    rows = store.rows(
        "SELECT named, max(time) AS last FROM rollout_events ARRAY JOIN [stable_release, canary_release] AS named "
        "WHERE deployment = {d:String} AND named != '' GROUP BY named ORDER BY last DESC LIMIT 1", {"d": deployment})
    return release_tenant(store, str(rows[0]["named"])) if rows else None


# Any application may send events naming any deployment, release and variant on its own subject, and the evaluator
# scores them too (served = false; the router's analysis ignores them). Read by deployment alone, another tenant's
# events naming a deployment and its canary were merged into the canary's rows (probe p25: their e-mail addresses
# read as the canary leaking PII). So a deployment's scores are by default its own tenant's answers that a router
# served, and every row says whose answers it counts and whether a router served them.
def online_scores(store: Store, deployment: str, since: datetime | None = None, scorer: str | None = None,
                  event_id: str | None = None, tenant: str | None = None,
                  everyone: bool = False) -> list[dict[str, Any]]:
    """Per tenant, release, variant and scorer, and whether a router served the answers: answers scored, scorer
    errors (e.g. a judge outage), mean, min, max and the time span; with `event_id`, that answer's rows (a value or
    an error per scorer). By default the answers a router served of `tenant`, else of the tenant whose releases the
    deployment serves (`deployment_tenant`; every tenant's if none is known). With `everyone`, answers no router
    served (an application's own events) too, and every tenant's unless `tenant` is given."""
    where = ["deployment = {d:String}"]
    if not everyone:
        where.append("served")
        tenant = tenant if tenant is not None else deployment_tenant(store, deployment)
    if tenant is not None:
        where.append("tenant = {t:String}")
    if since is not None:
        where.append("time >= {since:DateTime64(6, 'UTC')}")
    if scorer:
        where.append("scorer = {s:String}")
    params: dict[str, Any] = {"d": deployment, "since": since, "s": scorer or "", "t": tenant or ""}
    if event_id:
        where.append("event_id = {e:String}")
        params["e"] = event_id
        return store.rows("SELECT time, tenant, served, event_id, release, variant, scorer, value, error "
                          f"FROM inference_scores WHERE {' AND '.join(where)} ORDER BY tenant, served DESC, scorer",
                          params)
    return store.rows(
        "SELECT tenant, served, release, variant, scorer, countIf(value IS NOT NULL) AS scored, "
        "countIf(value IS NULL) AS errors, avgOrNull(value) AS mean, minOrNull(value) AS min, "
        "maxOrNull(value) AS max, min(time) AS first, max(time) AS last FROM inference_scores "
        f"WHERE {' AND '.join(where)} GROUP BY tenant, served, release, variant, scorer "
        "ORDER BY tenant, served DESC, release, variant, scorer", params)
