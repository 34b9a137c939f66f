-- Derived tables kept by materialized views, so the queries that matter stay fast as tables grow.
-- Run before the sink writes (as `lockgate up` and every store owner do, in open_store): a row
-- inserted between a view's creation and its backfill would be counted by both.

-- Where each trace lives in time, as the OpenTelemetry Collector's ClickHouse exporter keeps
-- `otel_traces_trace_id_ts`; ours also covers spans that link to a trace (a sink batch carrying a
-- request), so a trace by id reads only that time range of otel_traces. Ordered by TraceId, it needs
-- no skip index (the exporter's bloom filter made the lookup slower here, not faster).
CREATE TABLE IF NOT EXISTS otel_traces_trace_id_ts (
    TraceId String CODEC(ZSTD(1)),
    Start DateTime CODEC(Delta, ZSTD(1)),
    End DateTime CODEC(Delta, ZSTD(1))
) ENGINE = MergeTree
PARTITION BY toDate(Start)
ORDER BY (TraceId, Start);

CREATE MATERIALIZED VIEW IF NOT EXISTS otel_traces_trace_id_ts_mv TO otel_traces_trace_id_ts AS
SELECT tid AS TraceId, min(Timestamp) AS Start, max(Timestamp) AS End
FROM otel_traces ARRAY JOIN arrayConcat([TraceId], Links.TraceId) AS tid
WHERE tid != ''
GROUP BY tid;

-- Spans stored before this migration (a repeated range is harmless: readers take min and max).
INSERT INTO otel_traces_trace_id_ts
SELECT tid AS TraceId, min(Timestamp) AS Start, max(Timestamp) AS End
FROM otel_traces ARRAY JOIN arrayConcat([TraceId], Links.TraceId) AS tid
WHERE tid != ''
GROUP BY tid;

-- Spend per tenant, app, deployment, model, release, price book and hour: every dimension
-- `lockgate cost` groups by. Rows of one key are summed at merge; readers sum them too. Exact
-- because the sink stores a ledger entry once per event id.
CREATE TABLE IF NOT EXISTS cost_hourly (
    hour DateTime('UTC'),
    tenant LowCardinality(String),
    app LowCardinality(String),
    deployment LowCardinality(String),
    model LowCardinality(String),
    release LowCardinality(String),
    price_book LowCardinality(String),
    calls UInt64,
    input_tokens UInt64,
    output_tokens UInt64,
    cached_tokens UInt64,
    cost_usd Float64,
    unpriced_calls UInt64
) ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant, app, deployment, model, release, price_book, hour);

CREATE MATERIALIZED VIEW IF NOT EXISTS cost_hourly_mv TO cost_hourly AS
SELECT toStartOfHour(time) AS hour, tenant, app, deployment, model, release, price_book,
       count() AS calls, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(cached_tokens) AS cached_tokens, sum(cost_usd) AS cost_usd, countIf(NOT priced) AS unpriced_calls
FROM cost_ledger
GROUP BY hour, tenant, app, deployment, model, release, price_book;

-- The ledger stored before this migration, once: skipped when a crash made this file run again.
INSERT INTO cost_hourly
SELECT toStartOfHour(time) AS hour, tenant, app, deployment, model, release, price_book,
       count() AS calls, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(cached_tokens) AS cached_tokens, sum(cost_usd) AS cost_usd, countIf(NOT priced) AS unpriced_calls
FROM cost_ledger
WHERE (SELECT count() FROM cost_hourly) = 0
GROUP BY hour, tenant, app, deployment, model, release, price_book
