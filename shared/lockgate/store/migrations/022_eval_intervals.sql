-- Each metric's confidence interval (EvalCompleted.intervals, as JSON: metric -> {estimate, low, high, confidence,
-- method, n}): `lockgate lineage DATASET` lists every eval outcome with its metrics' intervals. Rows stored before
-- hold '' and show point values only.
ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS intervals String DEFAULT '';
