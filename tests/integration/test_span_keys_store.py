"""The keys of stored spans (migration 020): spans stored before it are keyed by the tenant that sent them too."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from lockgate.contracts import SpanRecord
from lockgate.store import open_store
from lockgate.store.migrate import _statements, apply_migrations, migration_files
from lockgate.store.tables import OTEL_TRACES

pytestmark = pytest.mark.timeout(60)


def _span(span_id: str, resource: dict[str, str]) -> SpanRecord:
    return SpanRecord(timestamp=datetime(2026, 12, 5, tzinfo=UTC), trace_id="0e" * 16, span_id=span_id,
                      parent_span_id="", trace_state="", name="work", kind="Internal", service="shop",
                      resource=resource, scope_name="", scope_version="", attributes={}, duration_ns=1,
                      status_code="Unset", status_message="")


def test_spans_stored_before_are_keyed_by_their_senders_tenant_and_app(chdb_url: str, unique: str) -> None:
    store = open_store(chdb_url, unique, migrate=False)
    try:
        # The table as 001 made it, with a tenant's span and one of lockgate's own stored before 020.
        core = next(sql for version, _, sql in migration_files() if version == 1)
        store.command(next(s for s in _statements(core) if "TABLE IF NOT EXISTS otel_traces" in s))
        old = [_span("00000000000000a1", {"lockgate.tenant": "acme", "lockgate.app": "shop"}),
               _span("00000000000000a2", {})]
        columns = [c for c in OTEL_TRACES.columns if c not in ("SenderTenant", "SenderApp")]
        data = OTEL_TRACES.data(old)
        store.insert_columns("otel_traces", columns, [data[OTEL_TRACES.index(c)] for c in columns], token=None)
        assert "020_span_keys.sql" in apply_migrations(store)
        store.insert_columns("otel_traces", OTEL_TRACES.columns,
                             OTEL_TRACES.data([_span("00000000000000a3", {"lockgate.tenant": "globex",
                                                                         "lockgate.app": "web"})]), token=None)
        expected = [{"SenderTenant": "", "SenderApp": "", "SpanId": "00000000000000a2"},
                    {"SenderTenant": "acme", "SenderApp": "shop", "SpanId": "00000000000000a1"},
                    {"SenderTenant": "globex", "SenderApp": "web", "SpanId": "00000000000000a3"}]
        query = "SELECT SenderTenant, SenderApp, SpanId FROM {table} ORDER BY SenderTenant, SpanId"
        assert store.rows(query.format(table="otel_traces")) == expected
        assert store.rows(query.format(table="otel_traces_keys")) == expected
    finally:
        store.command(f"DROP DATABASE IF EXISTS {unique}")
