"""A retention setting under which a re-sent event could be billed again is refused at start, by `up` and by a store
owner (`serve sink`), in one line naming the tables, their days and `event_time_past_s` (probe p61 F1).

The sink deduplicates an event, span or score against its table's stored keys; ClickHouse drops a row already past
its TTL as it is inserted. Before, with `LOCKGATE_RETENTION_DAYS=cost_ledger=7` and events accepted 30 days back, an
event dated 10 days ago re-sent three times found no key each time and `lockgate cost` billed it three times
(`cost_hourly`, kept for ever, kept each insert)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

LOCKGATE = [sys.executable, "-m", "lockgate.cli.__main__"]
FREE = ["--nats-port", "0", "--router-port", "0", "--grpc-port", "0", "--otlp-grpc-port", "0", "--otlp-http-port", "0"]


def _refusal(short: str, days: int, past: str = "30 days") -> str:
    many = "," in short
    return (f"error: retention {short} (days) is shorter than event_time_past_s ({past}: how old an accepted event may "
            f"be) and 1 day: an event re-sent after its row expired would be stored, and billed, again; keep "
            f"{'them' if many else 'it'} {days} days or more (0 = for ever), or lower LOCKGATE_EVENT_TIME_PAST_S\n")


def _lockgate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # A refusal takes a second or two; a stack that starts instead runs until this timeout ends the test.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")}
    return subprocess.run([*LOCKGATE, *args], capture_output=True, text=True, env=clean | env | {"COLUMNS": "300"},
                          timeout=60)


@pytest.mark.parametrize(("env", "refusal"), [
    # A ledger set alone: its key table follows it, and both are named.
    ({"LOCKGATE_RETENTION_DAYS": "cost_ledger=7"}, _refusal("cost_ledger=7, cost_ledger_keys=7", 31)),
    # A key table set alone, under its row table's default.
    ({"LOCKGATE_RETENTION_DAYS": "otel_traces_keys=30"}, _refusal("otel_traces_keys=30", 31)),
    ({"LOCKGATE_RETENTION_DAYS": "inference_scores=30,inference_events=0"},
     _refusal("inference_scores=30, inference_scores_keys=30", 31)),
    # Events accepted further back than the defaults keep them.
    ({"LOCKGATE_EVENT_TIME_PAST_S": str(95 * 86400), "LOCKGATE_RETENTION_DAYS": "otel_traces=0"},
     _refusal("inference_events=90, inference_event_keys=90, inference_scores=90, inference_scores_keys=90", 96,
              "95 days")),
])
def test_up_refuses_a_deduplicated_table_kept_no_longer_than_events_are_accepted(
        tmp_path: Path, env: dict[str, str], refusal: str) -> None:
    out = _lockgate(env, "up", "--home", str(tmp_path), *FREE)
    assert (out.returncode, out.stderr) == (2, refusal), out.stdout
    assert not (tmp_path / "nats").exists()  # refused before anything started


def test_a_store_owner_refuses_it_at_its_start(tmp_path: Path) -> None:
    # `serve sink` opens the store before it connects to NATS (none answers on port 1): the store's own refusal.
    out = _lockgate({"LOCKGATE_RETENTION_DAYS": "cost_ledger=7", "LOCKGATE_HOME": str(tmp_path)},
                    "serve", "sink", "--nats", "nats://127.0.0.1:1", "--clickhouse", f"chdb://{tmp_path / 'ch'}")
    assert (out.returncode, out.stderr) == (2, _refusal("cost_ledger=7, cost_ledger_keys=7", 31)), out.stdout
