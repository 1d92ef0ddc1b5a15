-- Version 2: exact OpenAI (o200k_base) token counts per context version.
ALTER TABLE apex_audition.context_versions ADD COLUMN o200k_tokens BIGINT;
