"""The `--at` / `--since` / `--until` times of the provenance commands."""

from __future__ import annotations

import datetime as dt

from lockgate.errors import ConfigError


def parse_time(value: str | None, option: str = "--at") -> dt.datetime | None:
    """An ISO 8601 time as aware UTC (UTC unless it carries an offset); ConfigError naming the option."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{option} {value!r} is not an ISO 8601 time (e.g. 2026-12-03T09:30:00Z)") from None
    return parsed.astimezone(dt.UTC) if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
