-- The API key that authenticated a request a router served (InferenceEvent.key_id: its id, never its
-- secret), so a canary's evidence can be told apart per caller. Rows stored before name no key.
ALTER TABLE inference_events ADD COLUMN IF NOT EXISTS key_id LowCardinality(String) DEFAULT '';
