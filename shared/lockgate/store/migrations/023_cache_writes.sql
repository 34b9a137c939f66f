-- Prompt-cache writes an inference event reports (InferenceEvent.cache_write_tokens, of them the ones kept an hour:
-- cache_write_1h_tokens), counted inside input_tokens as cached_tokens are and priced at their own rates. Rows stored
-- before wrote none they knew of.
ALTER TABLE inference_events ADD COLUMN IF NOT EXISTS cache_write_tokens UInt32 DEFAULT 0;
ALTER TABLE inference_events ADD COLUMN IF NOT EXISTS cache_write_1h_tokens UInt32 DEFAULT 0;
