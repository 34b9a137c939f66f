-- Online evaluation of sampled live answers (issue 8): one row per (inference event, scorer), its
-- value, or the error that left it without one (a judge outage). Written by the sink from
-- InferenceScored events, once per (event_id, scorer) however often a score is re-sent.
CREATE TABLE IF NOT EXISTS inference_scores (
    time DateTime64(6, 'UTC'),
    tenant LowCardinality(String),
    event_id String,
    app LowCardinality(String),
    deployment LowCardinality(String),
    variant LowCardinality(String),
    release LowCardinality(String),
    scorer LowCardinality(String),
    value Nullable(Float64),
    error String
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (deployment, time, event_id, scorer)
SETTINGS non_replicated_deduplication_window = 10000;
