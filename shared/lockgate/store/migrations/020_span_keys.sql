-- Every stored span's key, so the sink stores a span once per (SenderTenant, SenderApp, TraceId, SpanId) whatever exports
-- carry it: before, each insert was recognised by its message only, and a span in two exports (a Collector
-- re-batching after a timeout, a retry over the other protocol) or twice in one had a row each time.
-- `SenderTenant`: the tenant whose API key sent the span over OTLP (the receiver stamps it as the resource attribute
-- `lockgate.tenant`), '' for lockgate's own; spans stored before read it from that attribute.
ALTER TABLE otel_traces ADD COLUMN IF NOT EXISTS SenderTenant LowCardinality(String)
    DEFAULT ResourceAttributes['lockgate.tenant'] CODEC(ZSTD(1));
-- `SenderApp`: that key's app (stamped as `lockgate.app`); spans stored before read it from that attribute.
ALTER TABLE otel_traces ADD COLUMN IF NOT EXISTS SenderApp LowCardinality(String)
    DEFAULT ResourceAttributes['lockgate.app'] CODEC(ZSTD(1));

-- Ordered by the key, and partitioned by day as otel_traces is: the sink looks a batch's keys up within the
-- batch's times (a re-exported span keeps its start), so only those days' parts are read, by the primary index.
-- A repeated key (a crash between the view's creation and its backfill) is harmless: the sink reads distinct keys.
CREATE TABLE IF NOT EXISTS otel_traces_keys (
    SenderTenant LowCardinality(String),
    SenderApp LowCardinality(String),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1))
) ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
ORDER BY (SenderTenant, SenderApp, TraceId, SpanId);

CREATE MATERIALIZED VIEW IF NOT EXISTS otel_traces_keys_mv TO otel_traces_keys AS
SELECT SenderTenant, SenderApp, TraceId, SpanId, Timestamp FROM otel_traces;

INSERT INTO otel_traces_keys SELECT SenderTenant, SenderApp, TraceId, SpanId, Timestamp FROM otel_traces;
