-- Version 7: how each successful generation was sent: `sync` (one request)
-- or `batch` (an item of a provider batch, at the batch price). NULL for
-- generations stored before Apex kept it.
ALTER TABLE apex_audition.generations ADD COLUMN transport TEXT;
