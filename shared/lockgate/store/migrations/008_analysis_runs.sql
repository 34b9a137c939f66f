-- Signed records of rollout analysis measurements (AnalysisRun, issue 8): one row per measurement, each
-- metric's values against its threshold as JSON in `metrics`; `lockgate rollout analysis` verifies
-- `signature` (the router's key) over the row's content, so a changed row is flagged.
CREATE TABLE IF NOT EXISTS analysis_runs (
    id String,
    time DateTime64(6, 'UTC'),
    tenant LowCardinality(String),
    deployment LowCardinality(String),
    release String,
    baseline String,
    template LowCardinality(String),
    step UInt32,
    look UInt32,
    phase LowCardinality(String),
    outcome LowCardinality(String),
    successes UInt32,
    failures UInt32,
    inconclusives UInt32,
    successes_needed UInt32,
    failure_limit UInt32,
    inconclusive_limit UInt32,
    canary_n UInt64,
    stable_n UInt64,
    dry_run Bool,
    metrics String,
    error String,
    key_id String,
    signature String
) ENGINE = MergeTree
ORDER BY (deployment, time)
SETTINGS non_replicated_deduplication_window = 10000;
