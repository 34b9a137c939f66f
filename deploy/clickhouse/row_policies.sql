-- Per-tenant row policies for server mode (issue 7, item 5): run once as an admin after
-- deploy/clickhouse/users.d/lockgate.xml is loaded. A tenant reader sees only its tenant's rows
-- in the tables that have a `tenant` column (tables without one are shared: grant them per need); the shared reader (query service) sees all rows.
-- Add one block per tenant (replace `acme`).
CREATE ROW POLICY IF NOT EXISTS tenant_acme ON lockgate.inference_events, lockgate.gate_decisions, lockgate.cost_ledger, lockgate.releases
    USING tenant = 'acme' TO lockgate_reader_acme;
CREATE ROW POLICY IF NOT EXISTS reader_all ON lockgate.inference_events, lockgate.gate_decisions, lockgate.cost_ledger, lockgate.releases
    USING 1 TO lockgate_reader;
