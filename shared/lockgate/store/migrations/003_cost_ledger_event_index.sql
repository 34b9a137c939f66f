-- The sink looks a redelivered cost-ledger fact up by event_id before storing it again, as it looks
-- inference messages up by msg_id; without an index that lookup reads the whole ledger.
ALTER TABLE cost_ledger ADD INDEX IF NOT EXISTS idx_event event_id TYPE bloom_filter(0.001) GRANULARITY 4;
