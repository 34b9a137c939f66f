-- Drift that acts (issue 8): the test chosen per feature, canary-versus-stable reports, the text embedder.
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS test LowCardinality(String);
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS statistic Float64;
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS p_value Nullable(Float64);
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS threshold Float64;
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS test_drifted Bool;
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS reference_size UInt32;
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS current_size UInt32;
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS comparison LowCardinality(String) DEFAULT 'now_vs_reference';
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS release String;
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS reference_release String;
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS embedder LowCardinality(String);
