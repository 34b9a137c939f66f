-- Who made a route change (RolloutState.actor): the API key identity of an operator's change, '' for one the router
-- made on evidence (a gate decision, analysis, drift, the step clock); `rollout history` shows that as `router`.
-- Rows stored before kept no actor: they read 'unknown' (the reason names the operator of a pause, resume,
-- set-weight or abort), never `router` for a change an operator made.
ALTER TABLE rollout_events ADD COLUMN IF NOT EXISTS actor String DEFAULT 'unknown';
