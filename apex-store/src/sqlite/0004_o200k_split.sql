-- Version 4: the instruction's own o200k_base count beside the total, so the
-- cacheable prefix (total minus instruction) is known without tokenising
-- anything at run time. NULL for versions ingested before.
ALTER TABLE apex_audition.context_versions ADD COLUMN o200k_prompt_tokens INTEGER;
