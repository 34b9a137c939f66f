-- Per-tenant row policies for server mode (issue 7, item 5): run once as an admin after
-- deploy/clickhouse/users.d/lockgate.xml is loaded. A tenant reader sees only its tenant's rows: of every table
-- with a `tenant` column, and of the spans (their resource attribute `lockgate.tenant`), the only tables its
-- user is granted; the shared reader (query service) sees all rows. A table a migration gives a `tenant` column
-- is added to both lists (tests/integration/test_clickhouse_users.py reads the schema and checks it).
-- Add one block per tenant (replace `acme`).
CREATE ROW POLICY IF NOT EXISTS tenant_acme ON lockgate.analysis_runs, lockgate.artifacts, lockgate.audit_log, lockgate.cost_hourly, lockgate.cost_ledger, lockgate.cost_ledger_keys, lockgate.drift_reports, lockgate.gate_decisions, lockgate.inference_event_keys, lockgate.inference_events, lockgate.inference_scores, lockgate.inference_scores_keys, lockgate.releases
    USING tenant = 'acme' TO lockgate_reader_acme;
CREATE ROW POLICY IF NOT EXISTS tenant_acme_spans ON lockgate.otel_traces
    USING ResourceAttributes['lockgate.tenant'] = 'acme' TO lockgate_reader_acme;
CREATE ROW POLICY IF NOT EXISTS reader_all ON lockgate.analysis_runs, lockgate.artifacts, lockgate.audit_log, lockgate.cost_hourly, lockgate.cost_ledger, lockgate.cost_ledger_keys, lockgate.drift_reports, lockgate.gate_decisions, lockgate.inference_event_keys, lockgate.inference_events, lockgate.inference_scores, lockgate.inference_scores_keys, lockgate.releases, lockgate.otel_traces
    USING 1 TO lockgate_reader;
