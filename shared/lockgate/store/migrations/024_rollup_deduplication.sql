-- The tables materialized views fill from deduplicated tables keep a deduplication window of their own, as their sources
-- do: a block ClickHouse drops as a repeat of its insert's token (the sink retrying an insert whose outcome it did not
-- learn) is then dropped from each view's block too (`deduplicate_blocks_in_dependent_materialized_views`, which
-- Store.insert_columns sets; a view's block is named after its source block, never after its own rows, so two inserts
-- that sum to equal rows are both kept). Before, probe p47 F2, cost_hourly counted a dropped block again: 12 calls for
-- 11 ledger entries.
ALTER TABLE cost_hourly MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE otel_traces_trace_id_ts MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE inference_event_keys MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE cost_ledger_keys MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE inference_scores_keys MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE otel_traces_keys MODIFY SETTING non_replicated_deduplication_window = 10000
