-- Version 2: exact OpenAI (o200k_base) token counts per context version,
-- counted at ingest. Rows ingested before this version keep NULL and fall
-- back to the byte estimate.
ALTER TABLE apex_audition.context_versions ADD COLUMN o200k_tokens INTEGER;
