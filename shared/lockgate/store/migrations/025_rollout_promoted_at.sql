-- When the router promoted the stable release a route change announces (RolloutState.promoted_at, 0 for none or a
-- route promoted before it was kept): the drift monitor restarts its reference once per promotion (probe p69).
ALTER TABLE rollout_events ADD COLUMN IF NOT EXISTS promoted_at Float64 DEFAULT 0;
