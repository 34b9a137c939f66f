-- The rollout attempt each route change is part of (RolloutState.started_at, 0 for none) and whether the change
-- began it: `lockgate lineage export` makes each attempt one OpenLineage run. Rows stored before name no attempt:
-- each is exported as a change of its own.
ALTER TABLE rollout_events ADD COLUMN IF NOT EXISTS started_at Float64 DEFAULT 0;
ALTER TABLE rollout_events ADD COLUMN IF NOT EXISTS began Bool DEFAULT false;
