-- Version 8: how much of a model's work each process holds (unfinished
-- generations), so processes split a model's limits in proportion to it and
-- one holding none of its work is no member of its pacing.
ALTER TABLE apex_audition.pacing ADD COLUMN work INTEGER NOT NULL DEFAULT 0;
