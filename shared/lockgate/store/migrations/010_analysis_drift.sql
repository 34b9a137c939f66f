-- Analysis with a `drift` metric (issue 8): the features its drift metrics found drifted, per measurement.
ALTER TABLE analysis_runs ADD COLUMN IF NOT EXISTS drifted_features Array(String);
