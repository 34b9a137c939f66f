-- The object holding the whole original of a dead letter whose payload was cut (DeadLetter.original), read with
-- `lockgate dlq --original NAME`; empty for a letter that holds its payload whole, and for rows stored before.
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS original String DEFAULT '';
