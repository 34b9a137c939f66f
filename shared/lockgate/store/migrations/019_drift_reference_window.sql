-- The time span of stable's window in a canary-versus-stable report (the canary's is window_start/window_end):
-- both arms' windows cover the same time. NULL for now-versus-reference reports and for reports stored before.
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS reference_window_start Nullable(DateTime64(6, 'UTC'));
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS reference_window_end Nullable(DateTime64(6, 'UTC'));
