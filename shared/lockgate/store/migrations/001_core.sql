-- lockgate core schema. Rows are append-only. Every table that receives redelivered
-- batches keeps a deduplication window so inserts carrying the same
-- insert_deduplication_token are dropped (no FINAL needed at query time).

CREATE TABLE IF NOT EXISTS inference_events (
    id String,
    time DateTime64(6, 'UTC'),
    tenant LowCardinality(String),
    app LowCardinality(String),
    deployment LowCardinality(String),
    variant LowCardinality(String),
    release LowCardinality(String),
    model LowCardinality(String),
    response_model LowCardinality(String),
    provider LowCardinality(String),
    operation LowCardinality(String),
    input_tokens UInt32,
    output_tokens UInt32,
    cached_tokens UInt32,
    latency_ms Float32,
    ttft_ms Float32,
    status LowCardinality(String),
    error_type LowCardinality(String),
    finish_reason LowCardinality(String),
    prompt Nullable(String),
    response Nullable(String),
    user_hash String,
    session_id String,
    trace_id String,
    span_id String,
    source LowCardinality(String),
    attributes Map(String, String),
    scores Map(String, Float64),
    -- the NATS message (Nats-Msg-Id) the event arrived in: how the sink recognises a redelivery
    msg_id String,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_trace trace_id TYPE bloom_filter(0.001) GRANULARITY 4,
    INDEX idx_id id TYPE bloom_filter(0.001) GRANULARITY 4,
    INDEX idx_msg msg_id TYPE bloom_filter(0.001) GRANULARITY 4
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (tenant, app, deployment, time)
SETTINGS non_replicated_deduplication_window = 10000;

-- The OpenTelemetry Collector ClickHouse exporter's traces table, column for column.
CREATE TABLE IF NOT EXISTS otel_traces (
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS dead_letters (
    id String,
    time DateTime64(6, 'UTC'),
    origin LowCardinality(String),
    subject String,
    reason String,
    error String,
    payload String,
    headers Map(String, String),
    deliveries UInt16
) ENGINE = MergeTree
ORDER BY (origin, time)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS artifacts (
    hash String,
    kind LowCardinality(String),
    name String,
    size UInt64,
    media_type LowCardinality(String),
    labels Map(String, String),
    tenant LowCardinality(String),
    signature String,
    key_id String,
    event_id String,
    registered_at DateTime64(6, 'UTC')
) ENGINE = MergeTree
ORDER BY (kind, name, hash)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS lineage_edges (
    src String,
    src_kind LowCardinality(String),
    dst String,
    dst_kind LowCardinality(String),
    relation LowCardinality(String),
    time DateTime64(6, 'UTC'),
    event_id String,
    INDEX idx_dst dst TYPE bloom_filter(0.001) GRANULARITY 1
) ENGINE = MergeTree
ORDER BY (src, relation, dst)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS lineage_runs (
    run_id String,
    kind LowCardinality(String),
    release String,
    inputs Array(String),
    outputs Array(String),
    time DateTime64(6, 'UTC'),
    event_id String
) ENGINE = MergeTree
ORDER BY (run_id, time)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS releases (
    release String,
    app LowCardinality(String),
    tenant LowCardinality(String),
    artifacts Map(String, String),
    parent String,
    description String,
    time DateTime64(6, 'UTC'),
    event_id String
) ENGINE = MergeTree
ORDER BY (release, time)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS eval_runs (
    run_id String,
    release String,
    suite String,
    baseline String,
    policy String,
    status LowCardinality(String),
    n_cases UInt32,
    n_errors UInt32,
    metrics Map(String, Float64),
    error String,
    time DateTime64(6, 'UTC'),
    event_id String
) ENGINE = MergeTree
ORDER BY (release, time)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS eval_cases (
    run_id String,
    case_id String,
    repeat UInt16,
    release String,
    input String,
    expected String,
    output String,
    scores Map(String, Float64),
    latency_ms Float64,
    input_tokens UInt32,
    output_tokens UInt32,
    error String,
    time DateTime64(6, 'UTC')
) ENGINE = MergeTree
ORDER BY (run_id, case_id, repeat)
SETTINGS non_replicated_deduplication_window = 10000;

-- Append-only audit of decisions, approvals and overrides.
CREATE TABLE IF NOT EXISTS gate_decisions (
    id String,
    time DateTime64(6, 'UTC'),
    release String,
    action LowCardinality(String),
    actor String,
    decision LowCardinality(String),
    eval_run String,
    policy String,
    baseline String,
    rules String,
    reason String,
    signature String,
    key_id String,
    tenant LowCardinality(String)
) ENGINE = MergeTree
ORDER BY (release, time)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS rollout_events (
    id String,
    time DateTime64(6, 'UTC'),
    deployment LowCardinality(String),
    stable_release String,
    canary_release String,
    canary_weight Float64,
    phase LowCardinality(String),
    step UInt16,
    reason String,
    decision_id String
) ENGINE = MergeTree
ORDER BY (deployment, time)
SETTINGS non_replicated_deduplication_window = 10000;

-- One row per feature per report.
CREATE TABLE IF NOT EXISTS drift_reports (
    id String,
    time DateTime64(6, 'UTC'),
    deployment LowCardinality(String),
    app LowCardinality(String),
    window_start DateTime64(6, 'UTC'),
    window_end DateTime64(6, 'UTC'),
    reference_n UInt32,
    current_n UInt32,
    feature LowCardinality(String),
    psi Float64,
    ks_stat Float64,
    ks_pvalue Float64,
    reference_mean Float64,
    current_mean Float64,
    drifted Bool
) ENGINE = MergeTree
ORDER BY (deployment, time, feature)
SETTINGS non_replicated_deduplication_window = 10000;

-- One row per priced inference event.
CREATE TABLE IF NOT EXISTS cost_ledger (
    event_id String,
    time DateTime64(6, 'UTC'),
    tenant LowCardinality(String),
    app LowCardinality(String),
    deployment LowCardinality(String),
    release LowCardinality(String),
    model LowCardinality(String),
    input_tokens UInt32,
    output_tokens UInt32,
    cached_tokens UInt32,
    cost_usd Float64,
    priced Bool,
    price_book LowCardinality(String)
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (tenant, app, deployment, time)
SETTINGS non_replicated_deduplication_window = 10000
