-- Per-case scorer details the scores map cannot hold: LLM-judge replies and reasons, cache hits.
ALTER TABLE eval_cases ADD COLUMN IF NOT EXISTS details String DEFAULT '';
