-- Every stored inference event's, ledger entry's and online score's key, ordered by it, so the sink finds whether an event was
-- stored (or billed) already by the primary index, whatever its time: inference_events and cost_ledger are
-- ordered by time, and a lookup there had to be bounded to the batch's times, so an event re-sent with another
-- time (an application building it again under its id) was stored and billed twice. A repeated key (a crash
-- between a view's creation and its backfill) is harmless: the sink reads distinct keys.
CREATE TABLE IF NOT EXISTS inference_event_keys (
    tenant LowCardinality(String),
    app LowCardinality(String),
    id String,
    time DateTime64(6, 'UTC') CODEC(Delta, ZSTD(1))
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (tenant, app, id);

CREATE MATERIALIZED VIEW IF NOT EXISTS inference_event_keys_mv TO inference_event_keys AS
SELECT tenant, app, id, time FROM inference_events;

INSERT INTO inference_event_keys SELECT tenant, app, id, time FROM inference_events;

CREATE TABLE IF NOT EXISTS cost_ledger_keys (
    tenant LowCardinality(String),
    app LowCardinality(String),
    event_id String,
    time DateTime64(6, 'UTC') CODEC(Delta, ZSTD(1))
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (tenant, app, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS cost_ledger_keys_mv TO cost_ledger_keys AS
SELECT tenant, app, event_id, time FROM cost_ledger;

INSERT INTO cost_ledger_keys SELECT tenant, app, event_id, time FROM cost_ledger;

-- An answer's online scores, one row per (event, scorer): the evaluator scores a re-sent event again, with its time.
CREATE TABLE IF NOT EXISTS inference_scores_keys (
    tenant LowCardinality(String),
    app LowCardinality(String),
    scorer LowCardinality(String),
    event_id String,
    time DateTime64(6, 'UTC') CODEC(Delta, ZSTD(1))
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (tenant, app, scorer, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS inference_scores_keys_mv TO inference_scores_keys AS
SELECT tenant, app, scorer, event_id, time FROM inference_scores;

INSERT INTO inference_scores_keys SELECT tenant, app, scorer, event_id, time FROM inference_scores;
