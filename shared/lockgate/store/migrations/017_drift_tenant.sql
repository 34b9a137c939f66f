-- Whose events a drift report compares: the drift monitor keeps each tenant's windows of a deployment apart, and
-- the router and the gate judge a release only on reports of the tenant it is registered under. Reports stored
-- before have the default tenant (their windows could hold several tenants' events).
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS tenant LowCardinality(String) DEFAULT 'default';
