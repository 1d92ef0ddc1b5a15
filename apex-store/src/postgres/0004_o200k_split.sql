-- Version 4: the instruction's own o200k_base count beside the total.
ALTER TABLE apex_audition.context_versions ADD COLUMN o200k_prompt_tokens BIGINT;
