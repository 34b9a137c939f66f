-- Whether a drift report's windows hold only answers a router served (events on the routers' own subject):
-- only such reports move traffic or gate a release, since an application may send any event on its own.
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS served Bool DEFAULT false;
