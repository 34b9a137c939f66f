-- The hash-chained, signed audit log (lockgate.auditchain): decisions, reviews, overrides, manual
-- rollout actions and key changes, one row per seq. `lockgate audit verify` walks it in seq order.
CREATE TABLE IF NOT EXISTS audit_log (
    id String,
    time DateTime64(6, 'UTC'),
    tenant LowCardinality(String),
    seq UInt64,
    producer LowCardinality(String),
    kind LowCardinality(String),
    actor String,
    target String,
    action LowCardinality(String),
    recorded_at DateTime64(6, 'UTC'),
    reason String,
    details Map(String, String),
    prev_hash String,
    hash String,
    key_id String,
    signature String
) ENGINE = MergeTree
ORDER BY seq
SETTINGS non_replicated_deduplication_window = 10000;
