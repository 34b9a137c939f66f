-- What an eval run ran on (issue 11, reproducible runs): versions, hardware, seeds, model and endpoint.
ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS environment Map(String, String);
