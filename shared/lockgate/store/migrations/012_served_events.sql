-- Whether an inference event came on the routers' own subject (a request a router served). The sink sets
-- it from the message's subject, never from the event: an application may send any event on its own
-- subject, so only served events are a release's recorded answers. Rows stored before are not served.
ALTER TABLE inference_events ADD COLUMN IF NOT EXISTS served Bool DEFAULT false;
