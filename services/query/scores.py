"""Online evaluation scores of live answers (`inference_scores`): per release, variant and scorer, or one answer's.

The sink stores each (answer, scorer) once, so the counts need no FINAL and no dedupe here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from lockgate.store import Store


def online_scores(store: Store, deployment: str, since: datetime | None = None, scorer: str | None = None,
                  event_id: str | None = None) -> list[dict[str, Any]]:
    """Per release, variant and scorer: answers scored, scorer errors (e.g. a judge outage), mean, min, max
    and the time span; with `event_id`, that answer's rows (a value or an error per scorer)."""
    where = ["deployment = {d:String}"]
    if since is not None:
        where.append("time >= {since:DateTime64(6, 'UTC')}")
    if scorer:
        where.append("scorer = {s:String}")
    params: dict[str, Any] = {"d": deployment, "since": since, "s": scorer or ""}
    if event_id:
        where.append("event_id = {e:String}")
        params["e"] = event_id
        return store.rows("SELECT time, event_id, release, variant, scorer, value, error FROM inference_scores "
                          f"WHERE {' AND '.join(where)} ORDER BY scorer", params)
    return store.rows(
        "SELECT release, variant, scorer, countIf(value IS NOT NULL) AS scored, countIf(value IS NULL) AS errors, "
        "avgOrNull(value) AS mean, minOrNull(value) AS min, maxOrNull(value) AS max, "
        "min(time) AS first, max(time) AS last FROM inference_scores "
        f"WHERE {' AND '.join(where)} GROUP BY release, variant, scorer ORDER BY release, variant, scorer", params)
