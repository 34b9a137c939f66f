-- Whether a scored answer is one a router served (its event came on the routers' own subject): only
-- those scores are a canary's live evidence, since an application may send any event on its own.
ALTER TABLE inference_scores ADD COLUMN IF NOT EXISTS served Bool DEFAULT false;
